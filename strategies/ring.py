"""Ring all-reduce over Flower: reduce-scatter then all-gather, relayed hop by hop.

The ServerApp never averages. Each round:

1. ``phase=train``: every peer trains locally and keeps ``[n x, n]`` (n = its examples).
2. ``2(N-1)`` relay steps: at each step peer ``p`` hands the server one chunk (1/N of the
   vector) and the server forwards it to the ring successor, which *adds* it (reduce-scatter)
   or *overwrites* its copy (all-gather). Each peer therefore sends exactly ``2(N-1)/N`` of the
   adapter bytes, and ends with ``sum n_i x_i / sum n_i``: FedAvg weighted by examples.

The ring order minimises the cycle's latency (TSP on the fastest-path metric; ``naive`` and
``random`` orders are there for comparison). A peer that does not reply, or that reports a
malformed chunk from its predecessor, is routed around: the ring re-forms among the remaining
peers and the all-reduce restarts from their local vectors, so the round completes.
The server reassembles the averaged model from the all-gather chunks it relays (no extra
traffic) only to hand it to central evaluation.
"""

from __future__ import annotations

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from . import topology as topo_lib
from .kernels import array_nbytes, to_arrayrecord
from .peer import chunk_bounds, ring_indices, vector_to_adapter
from .serverless import RelayStrategy

log = logging.getLogger("fedledger")


class RingAllReduce(RelayStrategy):
    message_type = "train.ring"
    name = "ring"

    def __init__(self, order: str = "tsp", **kw):
        super().__init__(**kw)
        if order not in ("tsp", "naive", "random"):
            raise ValueError(f"ring-order {order!r} is not 'tsp', 'naive' or 'random'")
        self.order_method = order
        self._synced: set[int] = set()  # peers holding the last round's ring result
        self._last: ArrayRecord | None = None

    def ring(self, peers, nbytes: float = 0.0) -> list[int]:
        return topo_lib.ring_order(self.topology, self.order_method, seed=self.seed, nbytes=nbytes, nodes=peers)

    def run_round(self, grid, server_round, initial_arrays, train_config, timeout):
        cfg = {**dict(train_config), "server-round": server_round, "phase": "train"}
        contents = {}
        for p in self.topology.nodes:
            c = RecordDict({"config": ConfigRecord(cfg)})
            if p not in self._synced:  # first round, or a peer that missed the last ring
                c["arrays"] = self._last if self._last is not None else initial_arrays
            contents[p] = c
        replies = self.send(grid, contents, server_round, timeout)
        metrics = self.mean_metrics(replies)
        alive = sorted(replies)
        if not alive:
            return None, metrics, {"participants": [], "dropped": sorted(contents)}
        nbytes = array_nbytes(initial_arrays)
        dropped, restarts = sorted(set(contents) - set(alive)), 0
        phases, peer_sent = [], {}
        while True:
            order = self.ring(alive, nbytes / len(alive))
            ok, vec, bad, step_phases, sent = self._all_reduce(grid, order, server_round, timeout)
            phases += step_phases
            for p, b in sent.items():
                peer_sent[p] = peer_sent.get(p, 0) + b
            if ok:
                break
            restarts += 1
            dropped += bad
            alive = [p for p in alive if p not in bad]
            log.warning("ring: round %s: peers %s dropped mid-ring, re-forming over %s", server_round, bad, alive)
            if not alive:
                return None, metrics, {"participants": [], "dropped": dropped}
        acc = topo_lib._merge_phases(phases, self.compute_seconds(alive, self.steps_of(train_config)))
        entry = {"participants": alive, "dropped": sorted(set(dropped)), "restarts": restarts, "ring-order": order,
                 "ring-cycle-latency": topo_lib.ring_cycle_latency(self.topology, order, nbytes / len(order)),
                 "adapter-bytes": nbytes, **self.accounting(acc)}
        arrays = to_arrayrecord(vector_to_adapter(vec, self._layout_like))
        self._synced, self._last = set(alive), arrays
        return arrays, metrics, entry

    def _all_reduce(self, grid, order, server_round, timeout):
        """Run one reduce-scatter + all-gather over ``order``. Returns (ok, reduced vector,
        peers to drop, phases, bytes sent per peer)."""
        n = len(order)
        total_steps = 2 * (n - 1)
        outputs: dict[int, ArrayRecord] = {}
        phases, sent = [], {p: 0 for p in order}
        reduced: dict[int, np.ndarray] = {}
        for s in range(total_steps + 1):
            contents = {}
            for pos, p in enumerate(order):
                cfg = {"phase": "step", "ring-size": n, "reset": s == 0, "finish": s == total_steps,
                       "server-round": server_round, "in-index": -1, "out-index": -1}
                c = RecordDict()
                if s > 0:
                    _, recv, op = ring_indices(pos, n, s - 1)
                    pred = order[(pos - 1) % n]
                    cfg.update({"in-index": recv, "in-op": op, "in-from": pred})
                    c["chunk"] = outputs[pred]
                if s < total_steps:
                    cfg["out-index"] = ring_indices(pos, n, s)[0]
                elif n == 1:
                    cfg["out-index"] = 0  # a lone peer hands its vector over for evaluation
                c["config"] = ConfigRecord(cfg)
                contents[p] = c
            replies = self.send(grid, contents, server_round, timeout)
            missing = [p for p in order if p not in replies]
            rejected = []
            for pos, p in enumerate(order):
                r = replies.get(p)
                if r is not None and float(r.content["metrics"].get("rejected", 0)) > 0:
                    rejected.append(order[(pos - 1) % n])  # the predecessor sent garbage
            bad = sorted(set(missing) | set(rejected))
            if bad:
                return False, None, bad, phases, sent
            new_outputs = {}
            for pos, p in enumerate(order):
                if s < total_steps or n == 1:
                    rec = replies[p].content.array_records.get("chunk")
                    if rec is None:
                        return False, None, [p], phases, sent
                    new_outputs[p] = rec
            if s < total_steps:
                transfers = []
                for pos, p in enumerate(order):
                    b = int(new_outputs[p]["chunk"].numpy().nbytes)
                    sent[p] += b
                    transfers.append((p, order[(pos + 1) % n], b))
                phases.append(self.topology.phase(transfers))
                if s == n - 1:  # first all-gather step: every fully reduced chunk passes the relay
                    for pos, p in enumerate(order):
                        reduced[ring_indices(pos, n, s)[0]] = new_outputs[p]["chunk"].numpy()
            elif n == 1:
                reduced[0] = new_outputs[order[0]]["chunk"].numpy()
            outputs = new_outputs
        vec = np.concatenate([reduced[i] for i in range(n)])
        return True, vec, [], phases, sent


def fedavg_reference(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Plain weighted average of flat vectors (for tests)."""
    w = np.asarray(weights, dtype=np.float64)
    return (np.stack(vectors).astype(np.float64) * (w / w.sum())[:, None]).sum(0)


__all__ = ["RingAllReduce", "chunk_bounds", "fedavg_reference"]
