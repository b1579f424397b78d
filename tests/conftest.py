"""Shared fixtures: a tiny model Task, message builders, and Flower's task identity."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


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


def make_instruction(node_id: int, message_type: str = "train"):
    from flwr.app import Message, RecordDict

    return Message(RecordDict(), dst_node_id=node_id, message_type=message_type)


def make_reply(arrays: dict | None, num_examples: float = 10, node_id: int = 1, metrics: dict | None = None, extra: dict | None = None):
    """A train reply from ``node_id`` carrying ``arrays`` (None → no ArrayRecord)."""
    from flwr.app import Message, MetricRecord, RecordDict

    from fedledger.strategies.kernels import to_arrayrecord

    content = RecordDict()
    if arrays is not None:
        content["arrays"] = to_arrayrecord(arrays)
    content["metrics"] = MetricRecord({"num-examples": num_examples, **(metrics or {})})
    for k, v in (extra or {}).items():
        content[k] = v
    reply = Message(content, reply_to=make_instruction(node_id))
    return reply


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
