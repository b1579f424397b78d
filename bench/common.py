"""Helpers shared by the benchmarks: machine info, result writing, node identities."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time


def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = ""
    cpu = cpu_model()
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "torch": torch.__version__, "torch-threads": torch.get_num_threads(),
            "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
    except OSError:
        return ""


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, payload: dict, markdown: str, out: str | None = None) -> tuple[str, str]:
    """``<out>/<name>.json`` and ``<out>/<name>.md`` (``out`` defaults to bench/results)."""
    out = out or RESULTS
    os.makedirs(out, exist_ok=True)
    jpath, mpath = os.path.join(out, f"{name}.json"), os.path.join(out, f"{name}.md")
    with open(jpath, "w") as fh:
        json.dump(payload, fh, indent=2, default=float)
    with open(mpath, "w") as fh:
        fh.write(markdown)
    return jpath, mpath


def machine_line(info: dict) -> str:
    return (f"Machine: {info['cpu']} ({info['cpus']} CPUs, torch {info['torch']}, {info['torch-threads']} threads), "
            f"commit `{info['commit']}`, {info['date']}.")


class GridPartitions:
    """``fedledger.core.Identities`` for an ``InProcessGrid``: each node is known by the partition
    the bench gave it (``grid.partition_of``), as the ServerApp's Roster would have resolved it,
    without a ``query.identity`` round trip."""

    def __init__(self, grid):
        self.partition_of = dict(grid.partition_of)

    def refresh(self, grid) -> None:
        return None

    def resolve(self, node_id: int):
        from fedledger.core import Identity

        partition = self.partition_of.get(int(node_id))
        return None if partition is None else Identity(int(node_id), partition)


def partitions_of(entries) -> list[int]:
    """The partitions of a report's ``kept`` / ``rejected`` / ``distrusted`` entries (unknown ones dropped)."""
    return [e["partition"] for e in entries if e.get("partition") is not None]


def round_detection(report, malicious) -> dict:
    """Detection of one ``RoundReport`` against the bench's ground truth: excluded = distrusted +
    rejected partitions, participants = kept + rejected partitions."""
    from fedledger.strategies.detection import detection_metrics

    rejected = partitions_of(report.rejected)
    return detection_metrics(partitions_of(report.distrusted) + rejected, malicious,
                             partitions_of(report.kept) + rejected)
