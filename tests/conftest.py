"""Shared fixtures: a key folder for the session, a tiny model Task, Flower's task identity, a clean
``fedledger`` logger and cheap garbage collections. Reply builders live in ``tests/replies.py``."""

from __future__ import annotations

import gc
import logging
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.fixture(autouse=True, scope="session")
def _key_folder(tmp_path_factory):
    """Simulation keys derive from a federation secret in a local key folder: one folder for the
    session (flwr run's SuperLink and its ClientApps inherit the variable), never the repo's."""
    saved = os.environ.get("FEDLEDGER_KEY_DIR")
    os.environ["FEDLEDGER_KEY_DIR"] = str(tmp_path_factory.mktemp("keys"))
    yield os.environ["FEDLEDGER_KEY_DIR"]
    if saved is None:
        os.environ.pop("FEDLEDGER_KEY_DIR", None)
    else:
        os.environ["FEDLEDGER_KEY_DIR"] = saved


@pytest.fixture(autouse=True)
def _flower_identity():
    """Flower's Message() needs a run/node identity outside a running app."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:  # e.g. a GPU box with only torch/transformers/peft for tests/test_qlora.py
        yield
        return
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield


@pytest.fixture(autouse=True)
def _fedledger_logger():
    """A test that runs the ServerApp in-process installs its handler (propagate=False); put the
    logger back so that later ``caplog`` tests still see its records."""
    logger = logging.getLogger("fedledger")
    saved = (logger.propagate, list(logger.handlers), logger.level)
    yield
    logger.propagate, logger.handlers[:], logger.level = saved[0], saved[1], saved[2]


@pytest.fixture(autouse=True)
def _young_garbage_only():
    """Flower's Bulyan and FedTrimmedAvg call gc.collect() per record; freezing what earlier tests
    left alive keeps each of those collections to this test's own objects."""
    gc.freeze()
    yield
    gc.unfreeze()


def node_key_files(folder, n: int):
    """``n`` fresh signer accounts, each key in its own file under ``folder``, and the
    ``key-file="..."`` node-config entries that give SuperNode i the i-th key."""
    from eth_account import Account

    accounts, extra = [Account.create() for _ in range(n)], []
    for i, acct in enumerate(accounts):
        key_file = folder / f"node-{i}.key"
        key_file.write_text(acct.key.hex())
        extra.append(f'key-file="{key_file}"')
    return accounts, extra


def random_adapter(seed: int = 0, shapes=(("a.lora_A.weight", (4, 8)), ("a.lora_B.weight", (8, 4)))):
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes}


TINY = {"model": "tiny", "num-rounds": 2, "local-steps": 5, "learning-rate": 5e-3, "batch-size": 8, "eval-batches": 4}


@pytest.fixture(scope="session")
def tiny_settings():
    from fedledger.config import Settings

    return Settings.from_run_config(TINY)


@pytest.fixture(scope="session")
def tiny_task(tiny_settings):
    from fedledger.task import get_task

    return get_task(tiny_settings, 1)


@pytest.fixture(scope="session")
def audited_attacked_run(tmp_path_factory):
    """One real ServerApp run in-process (tiny model, 3 nodes, 2 rounds, node 2 flips signs,
    PageRank trust, eth-tester ledger) with fedledger run's progress markers on:
    (run folder, the fedledger log lines it printed). Shared by the report and progress tests."""
    from flwr.app import Context, RecordDict

    from fedledger import server_app
    from fedledger.client_app import app as client_app
    from fedledger.inprocess import InProcessGrid

    cfg = {**TINY, "local-steps": 1, "trust": "pagerank", "attack": "sign-flip", "malicious": "2",
           "audit": "eth-tester", "run-dir": str(tmp_path_factory.mktemp("audited"))}
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger, saved = logging.getLogger("fedledger"), os.environ.get("FEDLEDGER_PROGRESS")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    os.environ["FEDLEDGER_PROGRESS"] = "1"
    try:
        grid = InProcessGrid(client_app, 3, cfg, run_id=21, seed=3)
        folder = server_app.run(grid, Context(run_id=21, node_id=0, node_config={}, state=RecordDict(),
                                              run_config=cfg), settle=0.0)
    finally:
        logger.removeHandler(handler)
        if saved is None:
            os.environ.pop("FEDLEDGER_PROGRESS", None)
        else:
            os.environ["FEDLEDGER_PROGRESS"] = saved
    return folder, lines
