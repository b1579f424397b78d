"""An in-process Flower ``Grid``: runs a real ``ClientApp`` for N nodes inside one Python process.

Benchmarks use it to drive the very same strategies and ClientApp handlers as ``flwr run``,
without Ray start-up and with one shared model in memory (nodes run one after another). It is
no replacement for the simulation or deployment engines; those are tested separately.

    grid = InProcessGrid(app, num_nodes=5, run_config=cfg)
    result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3)
    runner.run(grid, grid.node_of, arrays, num_rounds=3)          # serverless: partition -> node

As in a real run, node ids are random 64-bit integers (seeded) with no relation to the
partition a node holds: node config ``partition-id=i`` goes to the ``i``-th node created
(``node_ids[i]``), and ``get_node_ids`` lists them in id order. ``partition_of`` /
``node_of`` say which node holds which partition (for tests and benches; the ServerApp learns
it from the nodes themselves). ``drop`` holds node ids that do not reply (to test drop-outs).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Iterable

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid

log = logging.getLogger("fedledger")


class InProcessGrid(Grid):
    """Grid whose nodes are contexts of one ClientApp called in this process."""

    def __init__(self, app, num_nodes: int, run_config: dict, run_id: int = 1, node_config_extra=None, seed: int = 0):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, run_id
        self.app = app
        self.run_id = run_id
        self.node_ids = random_node_ids(num_nodes, seed)  # node_ids[i] holds partition i
        self.partition_of = {nid: i for i, nid in enumerate(self.node_ids)}
        self.node_of = {i: nid for i, nid in enumerate(self.node_ids)}
        self.contexts = {
            nid: Context(
                run_id=run_id,
                node_id=nid,
                node_config={"partition-id": i, "num-partitions": num_nodes, **(node_config_extra or {})},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(self.node_ids)
        }
        self.drop: set[int] = set()
        self.client_seconds: dict[int, float] = {}
        self._inbox: dict[str, Message] = {}
        self._run = None

    # -- Grid API -------------------------------------------------------------------
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.node_ids)

    def get_nodes(self):
        return []

    def _handle(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        if nid in self.drop or nid not in self.contexts:
            return None
        start = time.perf_counter()
        try:
            reply = self.app(msg, self.contexts[nid])
        except Exception as exc:  # the ClientApp failed: reply with an error, as Flower does
            log.warning("node %s failed: %s\n%s", nid, exc, traceback.format_exc(limit=3))
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        self.client_seconds[nid] = self.client_seconds.get(nid, 0.0) + time.perf_counter() - start
        return reply

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            reply = self._handle(msg)
            key = str(id(msg))
            if reply is not None:
                self._inbox[key] = reply
            ids.append(key)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._inbox.pop(k) for k in message_ids if k in self._inbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def random_node_ids(num_nodes: int, seed: int = 0) -> list[int]:
    """``num_nodes`` distinct random unsigned 64-bit node ids (never 0 or 1, which Flower reserves)."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    while len(ids) < num_nodes:
        nid = int(rng.integers(2, 2**64 - 1, dtype=np.uint64, endpoint=True))
        if nid not in ids:
            ids.append(nid)
    return ids
