"""Artifact store: every client update and every aggregate of an audited run, as safetensors.

Layout under ``<run folder>/audit/``::

    ledger.json                     registry address, chain id, RPC URL, run id, strategy, hash format
    events.jsonl                    the registry events of this run as mined (an offline copy; the
                                    only copy for eth-tester, whose chain dies with the ServerApp)
    round-0001/round.json           ordered accepted clients (address, node id, num-examples, hash),
                                    refused replies with reasons, aggregate hash
    round-0001/updates/<address>.safetensors
    round-0001/aggregate.safetensors
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

from .hashing import canonical_arrays


def _atomic_write_json(path: str, data: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


class ArtifactStore:
    def __init__(self, run_folder: str):
        self.root = os.path.join(os.path.abspath(run_folder), "audit") if os.path.basename(
            os.path.normpath(run_folder)) != "audit" else os.path.abspath(run_folder)
        os.makedirs(self.root, exist_ok=True)

    # paths
    def round_dir(self, server_round: int) -> str:
        return os.path.join(self.root, f"round-{int(server_round):04d}")

    def update_path(self, server_round: int, client: str) -> str:
        return os.path.join(self.round_dir(server_round), "updates", f"{client.lower()}.safetensors")

    def aggregate_path(self, server_round: int) -> str:
        return os.path.join(self.round_dir(server_round), "aggregate.safetensors")

    # writes
    def save_arrays(self, path: str, arrays: Mapping[str, Any]) -> None:
        from safetensors.numpy import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {k: v for k, v in canonical_arrays(arrays)}
        tmp = path + ".tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)

    def save_update(self, server_round: int, client: str, arrays: Mapping[str, Any]) -> str:
        path = self.update_path(server_round, client)
        self.save_arrays(path, arrays)
        return path

    def save_aggregate(self, server_round: int, arrays: Mapping[str, Any]) -> str:
        path = self.aggregate_path(server_round)
        self.save_arrays(path, arrays)
        return path

    def write_round(self, server_round: int, data: dict) -> None:
        os.makedirs(self.round_dir(server_round), exist_ok=True)
        _atomic_write_json(os.path.join(self.round_dir(server_round), "round.json"), data)

    def write_info(self, data: dict) -> None:
        _atomic_write_json(os.path.join(self.root, "ledger.json"), data)

    def append_events(self, events: list[dict]) -> None:
        with open(os.path.join(self.root, "events.jsonl"), "a") as fh:
            for e in events:
                fh.write(json.dumps(e, sort_keys=True) + "\n")

    # reads
    @staticmethod
    def load_arrays(path: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(path)

    def read_info(self) -> dict:
        with open(os.path.join(self.root, "ledger.json")) as fh:
            return json.load(fh)

    def read_round(self, server_round: int) -> dict | None:
        path = os.path.join(self.round_dir(server_round), "round.json")
        if not os.path.exists(path):
            return None
        with open(path) as fh:
            return json.load(fh)

    def read_events(self) -> list[dict]:
        path = os.path.join(self.root, "events.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
