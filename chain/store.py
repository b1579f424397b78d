"""Artifact store: what an audited run recorded off chain, as safetensors and canonical JSON.

A run folder is ``<run-dir>/<time>-run<id>/`` (:func:`new_run_folder`; the fedledger ServerApp
and ``OnChainAudit.from_context`` both make it), found again by run id with
:func:`find_run_folders` (``fedledger audit --run-id ID --runs <run-dir>``).

Layout under ``<run folder>/audit/``::

    run.json                        the run's record: the round pipeline (rule, parameters, trust
                                    stage, adapter layout, max-examples), the ledger (kind, RPC
                                    URL, chain id, registry, deploy block, aggregator), run id,
                                    hash format
    events.jsonl                    the registry events of this run as mined (an offline copy; the
                                    only copy for eth-tester, whose chain dies with the ServerApp)
    round-0001/global.safetensors   the global adapter the round started from
    round-0001/updates/<client>.safetensors
                                    each accepted update (<client>: signer address, lower case, or
                                    the identity key of an unsigned update)
    round-0001/aggregate.safetensors
    round-0001/round.json           the round document (see ``fedledger.chain.trail``)
    round-0001/<name>.safetensors   what else the round's document names by hash (KD-FedLLM: the
                                    next global adapter ``next-global``; Split-FedLLM: the
                                    server part ``server-part``)

``run.json`` and ``round.json`` are canonical JSON (``hashing.canonical_json``: sorted keys, no
whitespace, ASCII). The SHA-256 of a ``round.json`` file's bytes is the ``documentHash``
committed on chain with the round's aggregate; each round document holds the SHA-256 of
``run.json``'s bytes, so the run's record is bound to the chain too.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any, Mapping

import numpy as np

from .hashing import bytes_hash, canonical_arrays, canonical_json

RUN_FILE = "run.json"
ROUND_FILE = "round.json"


def new_run_folder(run_dir: str, run_id: int) -> str:
    """Create and return ``<run-dir>/<YYYYmmdd-HHMMSS>-run<run_id>`` (absolute)."""
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-run{int(run_id)}"
    path = os.path.abspath(os.path.join(os.path.expanduser(run_dir), name))
    os.makedirs(path, exist_ok=True)
    return path


def find_run_folders(run_dir: str, run_id: int) -> list[str]:
    """The run folders of ``run_id`` under ``run_dir`` that hold an audit record, oldest first."""
    pattern = os.path.join(glob.escape(os.path.abspath(os.path.expanduser(run_dir))), f"*-run{int(run_id)}")
    return sorted(p for p in glob.glob(pattern) if os.path.isfile(os.path.join(p, "audit", RUN_FILE)))


def _atomic_write(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


class ArtifactStore:
    """One run's ``audit/`` folder (``run_folder`` may be the run folder or its ``audit/``)."""

    def __init__(self, run_folder: str, create: bool = True):
        root = os.path.abspath(run_folder)
        self.root = root if os.path.basename(os.path.normpath(root)) == "audit" else os.path.join(root, "audit")
        if create:
            os.makedirs(self.root, exist_ok=True)

    # paths
    def round_dir(self, server_round: int) -> str:
        return os.path.join(self.root, f"round-{int(server_round):04d}")

    def update_path(self, server_round: int, client: str) -> str:
        return os.path.join(self.round_dir(server_round), "updates", f"{client.lower()}.safetensors")

    def global_path(self, server_round: int) -> str:
        return os.path.join(self.round_dir(server_round), "global.safetensors")

    def aggregate_path(self, server_round: int) -> str:
        return os.path.join(self.round_dir(server_round), "aggregate.safetensors")

    def artifact_path(self, server_round: int, name: str) -> str:
        """A round's extra tensors (KD: ``next-global``; split: ``server-part``)."""
        return os.path.join(self.round_dir(server_round), f"{name}.safetensors")

    def round_path(self, server_round: int) -> str:
        return os.path.join(self.round_dir(server_round), ROUND_FILE)

    @property
    def run_path(self) -> str:
        return os.path.join(self.root, RUN_FILE)

    # writes
    def save_arrays(self, path: str, arrays: Mapping[str, Any]) -> str:
        from safetensors.numpy import save_file

        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        save_file(dict(canonical_arrays(arrays)), tmp)
        os.replace(tmp, path)
        return path

    def save_update(self, server_round: int, client: str, arrays: Mapping[str, Any]) -> str:
        return self.save_arrays(self.update_path(server_round, client), arrays)

    def save_global(self, server_round: int, arrays: Mapping[str, Any]) -> str:
        return self.save_arrays(self.global_path(server_round), arrays)

    def save_aggregate(self, server_round: int, arrays: Mapping[str, Any]) -> str:
        return self.save_arrays(self.aggregate_path(server_round), arrays)

    def write_run(self, data: dict) -> str:
        """Write ``run.json`` (canonical JSON); returns the SHA-256 of its bytes."""
        body = canonical_json(data)
        _atomic_write(self.run_path, body)
        return bytes_hash(body)

    def write_round(self, server_round: int, data: dict) -> str:
        """Write the round document (canonical JSON); returns the SHA-256 of its bytes."""
        body = canonical_json(data)
        os.makedirs(self.round_dir(server_round), exist_ok=True)
        _atomic_write(self.round_path(server_round), body)
        return bytes_hash(body)

    def append_events(self, events: list[dict]) -> None:
        with open(os.path.join(self.root, "events.jsonl"), "a") as fh:
            for e in events:
                fh.write(json.dumps(e, sort_keys=True) + "\n")

    # reads
    @staticmethod
    def load_arrays(path: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file

        return load_file(path)

    @staticmethod
    def read_document(path: str) -> tuple[bytes, dict] | None:
        """(file bytes, parsed JSON) of ``run.json`` / ``round.json``; None when absent.
        Raises ValueError when the file is not a JSON object."""
        if not os.path.exists(path):
            return None
        with open(path, "rb") as fh:
            body = fh.read()
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError(f"{path} is not a JSON object")
        return body, data

    def read_events(self) -> list[dict]:
        path = os.path.join(self.root, "events.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as fh:
            return [json.loads(line) for line in fh if line.strip()]
