"""Synchronous gossip (push-pull) over Flower: each round every peer trains, then averages with
``k`` topology neighbours; the ServerApp only relays models between neighbours.

The server never averages. Per round:

1. ``phase=train``: each peer trains locally and replies its model (to be relayed).
2. ``steps`` mixing steps: each peer picks ``k`` graph neighbours; the exchange graph is the
   union of the picks (push-pull: both ends receive each other's model). The relay forwards
   every neighbour's model plus symmetric Metropolis weights; the peer mixes ``(n x, n)``
   locally (``peer.gossip_mix``), so the examples-weighted sum is conserved and every peer
   converges to that round's true FedAvg.

``history`` reports, per round, the consensus distance (max and mean L2 distance of the
peers' models to the true examples-weighted average, before and after each mixing step): the
server computes the true average *only to report it*; no model it sends is an average.
``dissemination-seconds``: simulated time until every peer's model holds every peer's round-1
update (None until then). A peer that does not reply is left out (its neighbours pick others).
Peers may report neighbours they distrusted (``distrusted-peers``): see ``relay.distrust_fields``.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from . import topology as topo_lib
from .kernels import flatten, weighted_average
from .peer import consensus_distance, metropolis_weights
from .relay import RelayRun, RelayRunner, RoundOutcome, distrust_fields, distrusted_in

log = logging.getLogger("fedledger")


class Gossip(RelayRunner):
    """Synchronous push-pull gossip with Metropolis weights (see module docstring)."""

    message_type = "train.gossip"
    name = "gossip"

    def __init__(self, k: int = 2, steps: int = 1, **kw):
        super().__init__(**kw)
        if int(k) < 1 or int(steps) < 1:
            raise ValueError(f"gossip-k and gossip-steps must be >= 1, got {k} and {steps}")
        self.k, self.steps = int(k), int(steps)

    def begin(self, run: RelayRun) -> None:
        self.rng = np.random.default_rng(self.seed)
        self._synced: set[int] = set()
        self._last = None
        self._info: dict[int, set] | None = None  # whose round-1 update each peer's model holds
        self._clock = 0.0
        self.dissemination_seconds: float | None = None

    def run_round(self, run: RelayRun, server_round: int) -> RoundOutcome:
        peers = self.live_peers(run, server_round)
        self._synced = self.synced(self._synced)
        contents = self.train_contents(run, server_round, self._synced, self._last, peers)
        replies = run.relay.send(contents, server_round)
        metrics = self.mean_metrics(replies)
        records = {p: r.content["arrays"] for p, r in replies.items() if "arrays" in r.content.array_records}
        n_ex = {p: float(replies[p].content["metrics"].get("num-examples", 1.0)) for p in records}
        alive = sorted(records)
        self._synced -= set(run.topology.nodes) - set(alive)   # a peer that missed the round gets the mean back
        if not alive:
            return RoundOutcome(None, metrics, {"participants": [], "dropped": sorted(run.topology.nodes)})
        self._synced |= set(alive)
        if self._info is None:
            self._info = {p: {p} for p in alive}
        flat = {p: flatten(records[p]) for p in alive}
        true_avg = weighted_average(np.stack([flat[p] for p in alive]), [n_ex[p] for p in alive])
        mass = dict(n_ex)
        nbytes = run.nbytes
        consensus = [consensus_distance(np.stack([flat[p] for p in alive]), true_avg)]
        phases, exchanges = [], []
        votes, heard = defaultdict(set), defaultdict(set)  # peer -> distinct peers that distrusted / received it
        dropped = sorted(set(run.topology.nodes) - set(alive))
        unreachable: set[int] = set()
        for _ in range(self.steps):
            net = self.live_network(run, alive, server_round)   # paths over live peers only
            unreachable |= set(net.unreachable)
            pairs = topo_lib.gossip_pairs(run.topology, self.k, self.rng, nodes=alive)  # live neighbours only
            replies = run.relay.send(self._mix_contents(alive, pairs, records, mass, server_round), server_round)
            phases.append(net.phase([(i, j, nbytes) for i, j in pairs] + [(j, i, nbytes) for i, j in pairs]))
            exchanges.append([list(e) for e in pairs])
            self._spread_info(pairs)
            gone = [p for p in alive if p not in replies]
            if gone:
                dropped += gone
                alive = [p for p in alive if p in replies]
                self._synced -= set(gone)
                if not alive:
                    return RoundOutcome(None, metrics, {"participants": [], "dropped": sorted(set(dropped))})
            for i, j in pairs:
                if i in replies:
                    heard[j].add(i)
                if j in replies:
                    heard[i].add(j)
            for p in alive:
                for q in distrusted_in(replies[p]):
                    votes[q].add(p)
                records[p] = replies[p].content["arrays"]
                flat[p] = flatten(records[p])
                mass[p] = float(replies[p].content["metrics"].get("mass", mass[p]))
            consensus.append(consensus_distance(np.stack([flat[p] for p in alive]), true_avg))
        acc = topo_lib._merge_phases(phases, run.compute_seconds(alive, self.step_seconds))
        self._clock += acc["round-seconds"]
        if self.dissemination_seconds is None and all(self._info.get(p, set()) >= set(alive) for p in alive):
            self.dissemination_seconds = self._clock
        distrust, excluded = distrust_fields(votes, heard)
        shown = [p for p in alive if p not in excluded] or alive  # what the trusted peers hold
        arrays = self.mean_model(run, {p: flat[p] for p in shown}, {p: mass[p] for p in shown})  # mass: conserved
        self._last = arrays
        entry = {"participants": alive, "dropped": sorted(set(dropped)), "k": self.k, "exchanges": exchanges,
                 "consensus": consensus, "consensus-max": consensus[-1]["consensus-max"],
                 "consensus-mean": consensus[-1]["consensus-mean"], "unreachable": sorted(unreachable),
                 "adapter-bytes": nbytes,
                 "sim-time": self._clock, "dissemination-seconds": self.dissemination_seconds, **self.accounting(acc),
                 **distrust}
        return RoundOutcome(arrays, metrics, entry)

    @staticmethod
    def _mix_contents(alive, pairs, records, mass, server_round) -> dict[int, RecordDict]:
        """One mixing step: each peer gets its exchange partners' models, their masses and the
        Metropolis weights (``peer-<j>``, ``mass-<j>``, ``w-<j>``; ``j`` = the partner's partition)."""
        weights = metropolis_weights(pairs, alive)
        contents = {}
        for i in alive:
            c = RecordDict()
            cfg = {"phase": "mix", "server-round": server_round, "self-weight": weights[i][i]}
            for j, w in weights[i].items():
                if j == i:
                    continue
                c[f"peer-{j}"] = records[j]
                cfg[f"w-{j}"] = w
                cfg[f"mass-{j}"] = mass[j]
            c["config"] = ConfigRecord(cfg)
            contents[i] = c
        return contents

    def _spread_info(self, pairs) -> None:
        """Push-pull spreads whose round-1 update each model holds (for dissemination time); a
        peer that missed round 1 holds its own first update."""
        for pair in pairs:
            for p in pair:
                self._info.setdefault(p, {p})
        new = {p: set(v) for p, v in self._info.items()}
        for i, j in pairs:
            new[i] |= self._info.get(j, set())
            new[j] |= self._info.get(i, set())
        self._info = new
