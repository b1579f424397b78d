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
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from . import topology as topo_lib
from .kernels import array_nbytes, flatten, weighted_average
from .peer import consensus_distance, metropolis_weights
from .serverless import RelayStrategy

log = logging.getLogger("fedledger")


class Gossip(RelayStrategy):
    message_type = "train.gossip"
    name = "gossip"

    def __init__(self, k: int = 2, steps: int = 1, **kw):
        super().__init__(**kw)
        if k < 1 or steps < 1:
            raise ValueError("gossip-k and gossip-steps must be >= 1")
        self.k, self.steps = int(k), int(steps)
        self.rng = np.random.default_rng(self.seed)
        self._synced: set[int] = set()
        self._last = None
        self._info: dict[int, set] | None = None  # whose round-1 update each peer's model holds
        self._clock = 0.0
        self.dissemination_seconds: float | None = None

    def run_round(self, grid, server_round, initial_arrays, train_config, timeout):
        cfg = {**dict(train_config), "server-round": server_round, "phase": "train"}
        contents = {}
        for p in self.topology.nodes:
            c = RecordDict({"config": ConfigRecord(cfg)})
            if p not in self._synced:
                c["arrays"] = self._last if self._last is not None else initial_arrays
            contents[p] = c
        replies = self.send(grid, contents, server_round, timeout)
        self.learn_partitions(replies)
        metrics = self.mean_metrics(replies)
        records = {p: r.content["arrays"] for p, r in replies.items() if "arrays" in r.content.array_records}
        n_ex = {p: float(replies[p].content["metrics"].get("num-examples", 1.0)) for p in records}
        alive = sorted(records)
        if not alive:
            return None, metrics, {"participants": [], "dropped": sorted(contents)}
        self._synced |= set(alive)
        if self._info is None:
            self._info = {p: {p} for p in alive}
        flat = {p: flatten(records[p]) for p in alive}
        true_avg = weighted_average(np.stack([flat[p] for p in alive]), [n_ex[p] for p in alive])
        mass = dict(n_ex)
        nbytes = array_nbytes(initial_arrays)
        consensus = [consensus_distance(np.stack([flat[p] for p in alive]), true_avg)]
        phases, exchanges = [], []
        votes, heard = defaultdict(set), defaultdict(set)  # peer -> distinct peers that distrusted / received it
        dropped = sorted(set(contents) - set(alive))
        for step in range(self.steps):
            pairs = topo_lib.gossip_pairs(self.topology, self.k, self.rng, nodes=alive)
            weights = metropolis_weights(pairs, alive)
            contents = {}
            for i in alive:
                c = RecordDict()
                mcfg = {"phase": "mix", "server-round": server_round, "self-weight": weights[i][i]}
                for j, w in weights[i].items():
                    if j == i:
                        continue
                    c[f"peer-{j}"] = records[j]
                    mcfg[f"w-{j}"] = w
                    mcfg[f"mass-{j}"] = mass[j]
                c["config"] = ConfigRecord(mcfg)
                contents[i] = c
            replies = self.send(grid, contents, server_round, timeout)
            phases.append(self.topology.phase([(i, j, nbytes) for i, j in pairs] + [(j, i, nbytes) for i, j in pairs]))
            exchanges.append([list(e) for e in pairs])
            if self._info is not None:
                new = {p: set(v) for p, v in self._info.items()}
                for i, j in pairs:
                    new[i] |= self._info.get(j, set())
                    new[j] |= self._info.get(i, set())
                self._info = new
            gone = [p for p in alive if p not in replies]
            if gone:
                dropped += gone
                alive = [p for p in alive if p in replies]
                self._synced -= set(gone)
                if not alive:
                    return None, metrics, {"participants": [], "dropped": dropped}
            for i, j in pairs:
                if i in replies:
                    heard[j].add(i)
                if j in replies:
                    heard[i].add(j)
            for p in alive:
                if p in replies:
                    for q in replies[p].content["metrics"].get("distrusted-peers", []):
                        votes[int(q)].add(p)
            for p in alive:
                records[p] = replies[p].content["arrays"]
                flat[p] = flatten(records[p])
                mass[p] = float(replies[p].content["metrics"].get("mass", mass[p]))
            consensus.append(consensus_distance(np.stack([flat[p] for p in alive]), true_avg))
        acc = topo_lib._merge_phases(phases, self.compute_seconds(alive, self.steps_of(train_config)))
        self._clock += acc["round-seconds"]
        if self.dissemination_seconds is None and all(self._info.get(p, set()) >= set(alive) for p in alive):
            self.dissemination_seconds = self._clock
        distrust, excluded = self.record_distrust(server_round, votes, heard, alive)
        shown = [p for p in alive if p not in excluded] or alive  # what the trusted peers hold
        arrays = self.weighted_mean({p: flat[p] for p in shown}, {p: mass[p] for p in shown})  # mass-weighted: conserved
        self._last = arrays
        entry = {"participants": alive, "dropped": sorted(set(dropped)), "k": self.k, "exchanges": exchanges,
                 "consensus": consensus, "consensus-max": consensus[-1]["consensus-max"],
                 "consensus-mean": consensus[-1]["consensus-mean"], "adapter-bytes": nbytes,
                 "sim-time": self._clock, "dissemination-seconds": self.dissemination_seconds, **self.accounting(acc),
                 **distrust}
        return arrays, metrics, entry
