"""Asynchronous gossip: peers progress without a global barrier.

The discrete-event engine (:class:`~.async_engine.AsyncEngine`) decides, from each peer's
compute speed and the link times of the topology, when each peer wakes up and with whom it
push-pulls. Merging weights = examples x ``(1 + staleness) ** -exponent``, staleness = how many
local iterations the receiver is ahead of the sender's model (``peer.async_merge``).

In :class:`AsyncGossip` the ServerApp never averages: each wake-up is one relayed message to
that peer carrying its inbox (``train.async``); the peer merges and trains in its ClientApp and
replies its model, which the relay delivers later in simulated time. Every peer runs exactly
``num_rounds`` local iterations (equal local steps in every mode); "round r" is recorded when
every peer has finished its r-th iteration, with the examples-weighted mean of the peers' latest
models (computed for evaluation only). Peers may report models they distrusted
(``distrusted-peers``): see ``relay.distrust_fields``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from .async_engine import AsyncEngine
from .kernels import flatten
from .relay import RelayRun, RelayRunner, RoundOutcome, distrust_fields, distrusted_in

log = logging.getLogger("fedledger")


class AsyncGossip(RelayRunner):
    """Asynchronous push-pull gossip relayed through Flower (see module docstring)."""

    message_type = "train.async"
    name = "async-gossip"

    def __init__(self, k: int = 2, staleness_exponent: float = 0.5, **kw):
        super().__init__(**kw)
        if int(k) < 1:
            raise ValueError(f"gossip-k must be >= 1, got {k}")
        if not float(staleness_exponent) >= 0:
            raise ValueError(f"staleness-exponent must be >= 0, got {staleness_exponent}")
        self.k, self.staleness_exponent = int(k), float(staleness_exponent)

    def rounds(self, run: RelayRun, num_rounds: int, record: Callable[[int, RoundOutcome], None]) -> None:
        """The event loop replaces the round loop: a round is recorded when every live peer has
        finished that many local iterations."""
        session = _AsyncSession(self, run, num_rounds, record)
        session.engine.run(start_fn=session.wake, snapshot_fn=session.snapshot)


class _AsyncSession:
    """One asynchronous run: the engine, and what the relay learns from the peers' replies."""

    def __init__(self, runner: AsyncGossip, run: RelayRun, num_rounds: int,
                 record: Callable[[int, RoundOutcome], None]) -> None:
        self.runner, self.run, self.record = runner, run, record
        self.nbytes = run.nbytes
        self.engine = AsyncEngine(run.topology, runner.k, self.nbytes, run.local_steps, runner.step_seconds,
                                  num_rounds, seed=runner.seed)
        self.initial = {"arrays": run.initial, "n": 1.0}
        self.started: set[int] = set()
        self.metrics: dict[int, list[dict]] = defaultdict(list)
        # round -> peer -> distinct peers that distrusted / received its model
        self.votes: dict[int, dict] = defaultdict(lambda: defaultdict(set))
        self.heard: dict[int, dict] = defaultdict(lambda: defaultdict(set))
        self._time, self._total = 0.0, 0.0
        self._sent: dict = {}
        self._link: dict = {}

    # ------------------------------------------------------------------ one wake-up
    def wake(self, p: int, items: list, train: bool):
        """Relay ``p``'s inbox to it (and train unless it is done); returns its new model handle,
        or None when it did not answer (the engine drops it)."""
        rnd = self.engine.version[p] + 1
        replies = self.run.relay.send({p: self._wake_content(p, items, train, rnd)}, rnd)
        reply = replies.get(p)
        if reply is None or "arrays" not in reply.content.array_records:
            return None
        self.started.add(p)
        m = reply.content["metrics"]
        for it in items:
            if it["handle"] is not None:
                self.heard[rnd][int(it["from"])].add(p)
        for q in distrusted_in(reply):
            self.votes[rnd][q].add(p)
        if train:
            self.metrics[rnd].append({k: float(v) for k, v in m.items()
                                      if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return {"arrays": reply.content["arrays"], "n": float(m.get("num-examples", 1.0))}

    def _wake_content(self, p: int, items: list, train: bool, rnd: int) -> RecordDict:
        cfg = {**dict(self.run.train_config), "phase": "wake", "train": bool(train), "server-round": rnd,
               "staleness-exponent": self.runner.staleness_exponent}
        c = RecordDict()
        if p not in self.started:
            c["arrays"] = self.run.initial
        idx = 0
        for it in items:
            h = it["handle"]
            if h is None:
                continue  # that peer has not finished an iteration: it still holds the initial model
            c[f"in-{idx}"] = h["arrays"]
            cfg[f"in-{idx}-n"] = float(h["n"])
            cfg[f"in-{idx}-version"] = int(it["version"])
            cfg[f"in-{idx}-from"] = int(it["from"])
            idx += 1
        c["config"] = ConfigRecord(cfg)
        return c

    # ------------------------------------------------------------------ one round
    def snapshot(self, r: int, t: float) -> None:
        """Every live peer has finished iteration ``r`` at simulated time ``t``: record round ``r``."""
        eng, topo = self.engine, self.run.topology
        live = sorted(eng.alive)
        distrust, excluded = distrust_fields(self.votes.get(r, {}), self.heard.get(r, {}))
        handles = {p: eng.completed[p] or self.initial for p in live if p not in excluded}
        handles = handles or {p: eng.completed[p] or self.initial for p in live}
        arrays = self.runner.mean_model(self.run, {p: flatten(h["arrays"]) for p, h in handles.items()},
                                        {p: h["n"] for p, h in handles.items()})
        sent = dict(eng.peer_sent)
        total = float(sum(sent.values()))
        entry = {"participants": live, "dropped": sorted(set(topo.nodes) - eng.alive),
                 "sim-time": t, "sim-round-seconds": t - self._time,
                 "sim-network-seconds": t - self._time,  # no barrier: compute and exchange overlap
                 "sim-compute-seconds": max(topo.compute_time(p, self.run.local_steps, self.runner.step_seconds)
                                            for p in live),
                 "total-peer-bytes": total - self._total, "exchanges-so-far": eng.exchanges,
                 "peer-bytes-sent": {str(k): float(v - self._sent.get(k, 0.0)) for k, v in sent.items()},
                 "link-bytes": {f"{a}->{b}": float(v - self._link.get((a, b), 0.0))
                                for (a, b), v in eng.link_bytes.items()},
                 "adapter-bytes": self.nbytes, "dissemination-seconds": eng.dissemination_time, **distrust}
        self._time, self._total, self._sent, self._link = t, total, sent, dict(eng.link_bytes)
        self.record(r, RoundOutcome(arrays, _mean_train_metrics(self.metrics.get(r, [])), entry))


def _mean_train_metrics(ms: list[dict]) -> dict:
    """Mean of the metrics every peer reported for one iteration; ``num-examples`` summed."""
    if not ms:
        return {}
    keys = set.intersection(*(set(m) for m in ms))
    out = {k: float(np.mean([m[k] for m in ms])) for k in keys}
    if "num-examples" in out:
        out["num-examples"] = float(sum(m["num-examples"] for m in ms))
    return out
