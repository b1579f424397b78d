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
from .kernels import to_arrayrecord
from .peer import chunk_bounds, ring_indices, vector_to_adapter
from .relay import RelayRun, RelayRunner, RoundOutcome

log = logging.getLogger("fedledger")

RING_ORDERS = ("tsp", "naive", "random")


class RingAllReduce(RelayRunner):
    """Ring all-reduce relayed hop by hop (see module docstring); FedAvg exactly."""

    message_type = "train.ring"
    name = "ring"

    def __init__(self, order: str = "tsp", **kw):
        super().__init__(**kw)
        if order not in RING_ORDERS:
            raise ValueError(f"ring-order {order!r} is not 'tsp', 'naive' or 'random'")
        self.order_method = order

    def begin(self, run: RelayRun) -> None:
        self._synced: set[int] = set()  # peers holding the last round's ring result
        self._last: ArrayRecord | None = None

    def ring(self, topology: topo_lib.Topology, peers, nbytes: float = 0.0) -> list[int]:
        return topo_lib.ring_order(topology, self.order_method, seed=self.seed, nbytes=nbytes, nodes=peers)

    def run_round(self, run: RelayRun, server_round: int) -> RoundOutcome:
        peers = self.live_peers(run, server_round)
        contents = self.train_contents(run, server_round, self.synced(self._synced), self._last, peers)
        replies = run.relay.send(contents, server_round)
        metrics = self.mean_metrics(replies)
        alive = sorted(replies)
        absent = sorted(set(run.topology.nodes) - set(contents))    # not connected at the round's start
        if not alive:
            return RoundOutcome(None, metrics, {"participants": [], "dropped": sorted(run.topology.nodes)})
        nbytes = run.nbytes
        dropped, restarts, unreachable = absent + sorted(set(contents) - set(alive)), 0, set()
        phases = []
        while True:
            net = self.live_network(run, alive, server_round)
            unreachable |= set(net.unreachable)
            topology = net.whole or run.topology   # cut: time the hops on the whole network (the relay carries them)
            order = self.ring(topology, alive, nbytes / len(alive))
            ok, vec, bad, step_phases = self._all_reduce(run, topology, order, server_round)
            phases += step_phases
            if ok:
                break
            restarts += 1
            dropped += bad
            alive = [p for p in alive if p not in bad]
            log.warning("ring: round %s: peers %s dropped mid-ring, re-forming over %s", server_round, bad, alive)
            if not alive:
                self._synced = set()
                return RoundOutcome(None, metrics, {"participants": [], "dropped": sorted(set(dropped))})
        acc = topo_lib._merge_phases(phases, run.compute_seconds(alive, self.step_seconds))
        entry = {"participants": alive, "dropped": sorted(set(dropped)), "restarts": restarts, "ring-order": order,
                 "ring-cycle-latency": topo_lib.ring_cycle_latency(topology, order, nbytes / len(order)),
                 "unreachable": sorted(unreachable), "adapter-bytes": nbytes, **self.accounting(acc)}
        arrays = to_arrayrecord(vector_to_adapter(vec, run.like))
        self._synced, self._last = set(alive), arrays
        return RoundOutcome(arrays, metrics, entry)

    def _all_reduce(self, run: RelayRun, topology: topo_lib.Topology, order: list[int], server_round: int):
        """Run one reduce-scatter + all-gather over ``order`` (timed on ``topology``). Returns
        (ok, reduced vector, peers to drop, the network phases so far)."""
        n = len(order)
        total_steps = 2 * (n - 1)
        outputs: dict[int, ArrayRecord] = {}
        phases = []
        reduced: dict[int, np.ndarray] = {}
        for s in range(total_steps + 1):
            replies = run.relay.send(self._step_contents(order, s, outputs, server_round), server_round)
            bad = self._failed(order, replies)
            if bad:
                return False, None, bad, phases
            new_outputs = {}
            for p in order:
                if s < total_steps or n == 1:
                    rec = replies[p].content.array_records.get("chunk")
                    if rec is None:
                        return False, None, [p], phases
                    new_outputs[p] = rec
            if s < total_steps:
                transfers = []
                for pos, p in enumerate(order):
                    transfers.append((p, order[(pos + 1) % n], int(new_outputs[p]["chunk"].numpy().nbytes)))
                phases.append(topology.phase(transfers))
                if s == n - 1:  # first all-gather step: every fully reduced chunk passes the relay
                    for pos, p in enumerate(order):
                        reduced[ring_indices(pos, n, s)[0]] = new_outputs[p]["chunk"].numpy()
            elif n == 1:
                reduced[0] = new_outputs[order[0]]["chunk"].numpy()
            outputs = new_outputs
        vec = np.concatenate([reduced[i] for i in range(n)])
        return True, vec, [], phases

    @staticmethod
    def _step_contents(order: list[int], s: int, outputs: dict[int, ArrayRecord], server_round: int
                       ) -> dict[int, RecordDict]:
        """Step ``s``: each peer merges the chunk its predecessor handed over at step ``s-1`` and
        hands over its next one."""
        n = len(order)
        total_steps = 2 * (n - 1)
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
        return contents

    @staticmethod
    def _failed(order: list[int], replies: dict) -> list[int]:
        """Peers to route around: those that did not reply, and the predecessors of those that
        rejected the chunk they were handed (the predecessor sent garbage)."""
        n = len(order)
        missing = [p for p in order if p not in replies]
        rejected = [order[(pos - 1) % n] for pos, p in enumerate(order)
                    if p in replies and float(replies[p].content["metrics"].get("rejected", 0)) > 0]
        return sorted(set(missing) | set(rejected))


def fedavg_reference(vectors: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Plain weighted average of flat vectors (for tests)."""
    w = np.asarray(weights, dtype=np.float64)
    return (np.stack(vectors).astype(np.float64) * (w / w.sum())[:, None]).sum(0)


__all__ = ["RING_ORDERS", "RingAllReduce", "chunk_bounds", "fedavg_reference"]
