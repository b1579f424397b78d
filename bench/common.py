"""Helpers shared by the benchmarks: machine info, result writing, timing."""

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


def write_results(name: str, payload: dict, markdown: str) -> tuple[str, str]:
    out = os.path.join(os.path.dirname(__file__), "results")
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
