"""Builders for train replies as a Flower grid delivers them (random 64-bit node ids), and a Grid
stub that knows node ids only, for driving ``RoundPipeline`` rounds without a ClientApp."""

from __future__ import annotations

import io

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

SHAPES = {"m.lora_A.weight": (4, 8), "m.lora_B.weight": (8, 4)}


def node_ids(n: int, seed: int = 0) -> list[int]:
    """Distinct random 64-bit node ids, as a SuperLink assigns them."""
    rng = np.random.default_rng(seed)
    out: list[int] = []
    while len(out) < n:
        v = int(rng.integers(1, 2**63 - 1))
        if v not in out:
            out.append(v)
    return out


def adapter(seed: int = 0, scale: float = 1.0, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def npy(value: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, value, allow_pickle=False)
    return buf.getvalue()


def record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def instruction(node: int, message_type: str = "train") -> Message:
    return Message(RecordDict(), dst_node_id=int(node), message_type=message_type)


def reply(node: int, arrays: dict | ArrayRecord | None, num_examples=10, metrics: dict | None = None,
          extra: dict | None = None) -> Message:
    content = RecordDict()
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else record(arrays)
    content["metrics"] = MetricRecord({"num-examples": num_examples, **(metrics or {})})
    for k, v in (extra or {}).items():
        content[k] = v
    return Message(content, reply_to=instruction(node))


class NodeGrid(Grid):
    """A Grid that lists node ids (strategies' configure_train samples from it) and answers nothing."""

    def __init__(self, nodes: list[int]):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)

    def set_run(self, run_id):
        pass

    @property
    def run(self):
        return None

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def push_messages(self, messages):
        return []

    def pull_messages(self, message_ids):
        return []

    def send_and_receive(self, messages, *, timeout=None):
        return []


def run_round(pipeline, global_arrays: dict, replies: list[Message], nodes: list[int], server_round: int = 1):
    """configure_train + aggregate_train of one round; returns (aggregate dict or None, report)."""
    list(pipeline.configure_train(server_round, record(global_arrays), ConfigRecord(), NodeGrid(nodes)))
    arrays, _ = pipeline.aggregate_train(server_round, replies)
    agg = {k: v.numpy() for k, v in arrays.items()} if arrays is not None else None
    return agg, pipeline.reports[server_round]


class Partitions:
    """``core.Identities`` for tests: node ids -> partitions as a roster would have resolved them."""

    def __init__(self, nodes: list[int]):
        from fedledger.core import Identity

        self.known = {n: Identity(n, i) for i, n in enumerate(nodes)}

    def refresh(self, grid) -> None:
        return None

    def resolve(self, node_id: int):
        return self.known.get(int(node_id))
