"""Asynchronous gossip: peers progress without a global barrier.

A discrete-event simulation (:class:`AsyncEngine`) driven by each peer's compute speed and
the link times of the topology decides who exchanges with whom and when:

* peer ``i`` trains (``local_steps * step_seconds / speed_i`` simulated seconds); when done it
  push-pulls with ``k`` random graph neighbours (the exchange takes the phase time of those
  ``2k`` transfers on the network model), then merges what it received and trains again;
* a model pushed to a busy peer waits in its inbox until that peer's next wake-up;
* merging weights = examples x ``(1 + staleness) ** -exponent``, staleness = how many local
  iterations the receiver is ahead of the sender's model (``peer.async_merge``).

In :class:`AsyncGossip` (a Flower strategy) the ServerApp never averages: each wake-up is one
relayed message to that peer carrying its inbox (``train.async``); the peer merges and trains
in its ClientApp and replies its model, which the relay delivers later in simulated time.
Every peer runs exactly ``num_rounds`` local iterations (equal local steps in every mode);
"round r" is evaluated when every peer has finished its r-th iteration, on the examples-weighted
mean of the peers' latest models (computed for evaluation only).

Dissemination time (``simulate_dissemination``): from t=0 until every peer's current model
contains every other peer's round-``track`` update, for the synchronous (barrier per round)
and asynchronous schedules on the same network model.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from . import topology as topo_lib
from .kernels import array_nbytes, flatten
from .serverless import RelayStrategy

log = logging.getLogger("fedledger")

START, FINISH, DELIVER = 0, 1, 2


class AsyncEngine:
    """Event loop of asynchronous push-pull gossip (see module docstring).

    ``start_fn(peer, items, train) -> handle | None`` is called when a peer wakes up; ``items``
    are inbox entries ``{"handle", "from", "version"}``. It returns the handle of the peer's new
    model (None: the peer is gone). Without ``start_fn`` the engine only tracks information.
    ``snapshot_fn(r, time)`` is called when every live peer has finished iteration ``r``.
    """

    def __init__(self, topo: topo_lib.Topology, k: int, nbytes: float, local_steps: int, step_seconds: float,
                 iterations: int, seed: int = 0, track: int = 1):
        self.topo, self.k, self.nbytes = topo, int(k), float(nbytes)
        self.local_steps, self.step_seconds = local_steps, step_seconds
        self.iterations, self.track = int(iterations), int(track)
        self.rng = np.random.default_rng(seed)
        self.peers = topo.nodes
        self.alive = set(self.peers)
        self.version = {p: 0 for p in self.peers}
        self.completed: dict[int, object] = {p: None for p in self.peers}
        self.in_progress: dict[int, object] = {}
        self.inbox: dict[int, list] = {p: [] for p in self.peers}
        self.info = {p: set() for p in self.peers}          # what the peer's current model contains
        self.info_done = {p: set() for p in self.peers}     # ... its last completed model
        self.info_start = {p: set() for p in self.peers}
        self.busy = {p: False for p in self.peers}
        self.dissemination_time: float | None = None
        self.finish_times: dict[int, list[float]] = {p: [] for p in self.peers}
        self.round_times: dict[int, float] = {}
        self.exchanges = 0
        self.link_bytes: dict = defaultdict(float)
        self.peer_sent: dict = defaultdict(float)
        self.peer_recv: dict = defaultdict(float)
        self.bytes_by_round: dict[int, float] = defaultdict(float)
        self._heap: list = []
        self._seq = 0
        self.now = 0.0

    def _push(self, t: float, kind: int, peer: int, payload=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, peer, payload))

    def compute(self, p: int) -> float:
        return self.topo.compute_time(p, self.local_steps, self.step_seconds)

    def run(self, start_fn: Callable | None = None, snapshot_fn: Callable | None = None,
            max_time: float = math.inf, stop_when_disseminated: bool = False) -> "AsyncEngine":
        for p in self.peers:
            self._push(0.0, START, p)
        while self._heap:
            t, _, kind, p, payload = heapq.heappop(self._heap)
            if t > max_time:
                break
            self.now = t
            if p not in self.alive:
                continue
            if kind == START:
                self._start(p, start_fn)
            elif kind == FINISH:
                self._finish(p, snapshot_fn)
            else:
                self._deliver(p, payload, start_fn)
            self._check_dissemination()
            if stop_when_disseminated and self.dissemination_time is not None:
                break
        if snapshot_fn is not None and self.alive:  # rounds completed only because a peer left
            for r in range(1, self.iterations + 1):
                if r not in self.round_times and all(self.version[q] >= r for q in self.alive):
                    self.round_times[r] = self.now
                    snapshot_fn(r, self.now)
        return self

    def _merge_info(self, p: int, items: list) -> None:
        for it in items:
            self.info[p] |= it["info"]

    def _start(self, p: int, start_fn) -> None:
        items, self.inbox[p] = self.inbox[p], []
        self._merge_info(p, items)
        if self.version[p] >= self.iterations:  # done training: only merge what arrived
            self.busy[p] = False
            if items and start_fn is not None:
                h = start_fn(p, items, False)
                if h is None:
                    self.alive.discard(p)
                    return
                self.completed[p] = h
            self.info_done[p] = set(self.info[p])
            return
        if start_fn is not None:
            h = start_fn(p, items, True)
            if h is None:
                self.alive.discard(p)
                return
            self.in_progress[p] = h
        self.busy[p] = True
        self.info_start[p] = set(self.info[p])
        self._push(self.now + self.compute(p), FINISH, p)

    def _finish(self, p: int, snapshot_fn) -> None:
        self.version[p] += 1
        self.finish_times[p].append(self.now)
        self.completed[p] = self.in_progress.pop(p, None)
        if self.version[p] >= self.track:
            self.info_start[p].add(p)
        self.info[p] = set(self.info_start[p])
        self.info_done[p] = set(self.info[p])
        r = self.version[p]
        if r not in self.round_times and all(self.version[q] >= r for q in self.alive):
            self.round_times[r] = self.now
            if snapshot_fn is not None:
                snapshot_fn(r, self.now)
        nb = sorted(set(self.topo.graph.neighbors(p)) & self.alive)
        if not nb:
            self._push(self.now, START, p)
            return
        partners = [int(j) for j in self.rng.choice(nb, size=min(self.k, len(nb)), replace=False)]
        transfers = [(p, j, self.nbytes) for j in partners] + [(j, p, self.nbytes) for j in partners]
        ph = self.topo.phase(transfers)
        self.exchanges += 1
        for key, v in ph["link-bytes"].items():
            self.link_bytes[key] += v
        for key, v in ph["peer-sent"].items():
            self.peer_sent[key] += v
            self.bytes_by_round[self.version[p]] += v
        for key, v in ph["peer-received"].items():
            self.peer_recv[key] += v
        done = self.now + ph["seconds"]
        mine = {"handle": self.completed[p], "from": p, "version": self.version[p], "info": set(self.info_done[p])}
        for j in partners:  # pull: j's latest completed model, as of the request
            self.inbox[p].append({"handle": self.completed[j], "from": j, "version": self.version[j],
                                  "info": set(self.info_done[j])})
            self._push(done, DELIVER, j, mine)  # push: my model reaches j
        self._push(done, START, p)

    def _deliver(self, j: int, item: dict, start_fn) -> None:
        if self.version[j] >= self.iterations and not self.busy[j]:
            # an idle (finished) peer merges on arrival
            self.inbox[j].append(item)
            self._start(j, start_fn)
        else:
            self.inbox[j].append(item)

    def _check_dissemination(self) -> None:
        if self.dissemination_time is None and self.alive and all(self.info[p] >= self.alive for p in self.alive):
            self.dissemination_time = self.now


def simulate_sync_dissemination(topo: topo_lib.Topology, k: int, nbytes: float, local_steps: int,
                                step_seconds: float, seed: int = 0, max_rounds: int = 1000) -> dict:
    """Synchronous gossip with a barrier: each round = slowest peer's compute + one push-pull
    phase. Returns the time (and rounds) until every peer's model holds every round-1 update."""
    rng = np.random.default_rng(seed)
    peers = topo.nodes
    compute = max(topo.compute_time(p, local_steps, step_seconds) for p in peers)
    info = {p: {p} for p in peers}  # after round 1's training each model holds its own update
    t = 0.0
    full = set(peers)
    for r in range(1, max_rounds + 1):
        t += compute
        pairs = topo_lib.gossip_pairs(topo, k, rng)
        t += topo.phase([(i, j, nbytes) for i, j in pairs] + [(j, i, nbytes) for i, j in pairs])["seconds"]
        new = {p: set(info[p]) for p in peers}
        for i, j in pairs:
            new[i] |= info[j]
            new[j] |= info[i]
        info = new
        if all(info[p] >= full for p in peers):
            return {"seconds": t, "rounds": r}
    return {"seconds": math.inf, "rounds": max_rounds}


def simulate_async_dissemination(topo: topo_lib.Topology, k: int, nbytes: float, local_steps: int,
                                 step_seconds: float, seed: int = 0) -> dict:
    eng = AsyncEngine(topo, k, nbytes, local_steps, step_seconds, iterations=10**6, seed=seed)
    eng.run(stop_when_disseminated=True)
    return {"seconds": eng.dissemination_time if eng.dissemination_time is not None else math.inf,
            "exchanges": eng.exchanges}


def simulate_dissemination(topo: topo_lib.Topology, mode: str, k: int, nbytes: float, local_steps: int,
                           step_seconds: float, seed: int = 0) -> dict:
    """``mode`` = ``sync`` | ``async``; see the module docstring for the definition."""
    if mode == "sync":
        return simulate_sync_dissemination(topo, k, nbytes, local_steps, step_seconds, seed)
    if mode == "async":
        return simulate_async_dissemination(topo, k, nbytes, local_steps, step_seconds, seed)
    raise ValueError(f"mode {mode!r} is not 'sync' or 'async'")


class AsyncGossip(RelayStrategy):
    """Asynchronous push-pull gossip relayed through Flower (see module docstring)."""

    message_type = "train.async"
    name = "async-gossip"
    evaluates_itself = True

    def __init__(self, k: int = 2, staleness_exponent: float = 0.5, **kw):
        super().__init__(**kw)
        self.k, self.staleness_exponent = int(k), float(staleness_exponent)
        self.finished = False
        self.engine: AsyncEngine | None = None

    def begin(self, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_fn, result):
        import time

        nbytes = array_nbytes(initial_arrays)
        steps = self.steps_of(train_config)
        eng = AsyncEngine(self.topology, self.k, nbytes, steps, self.step_seconds, num_rounds, seed=self.seed)
        self.engine = eng
        init_handle = {"arrays": initial_arrays, "n": 1.0}
        started: set[int] = set()
        metrics_by_round: dict[int, list] = defaultdict(list)
        # round -> peer -> distinct peers that distrusted / received its model
        votes: dict[int, dict] = defaultdict(lambda: defaultdict(set))
        heard: dict[int, dict] = defaultdict(lambda: defaultdict(set))
        wall = {"t": time.perf_counter(), "relay": 0, "msgs": 0, "bytes": 0.0, "link": {}, "sent": {}, "recv": {}}

        def start_fn(p, items, train):
            cfg = {**dict(train_config), "phase": "wake", "train": bool(train), "server-round": eng.version[p] + 1,
                   "staleness-exponent": self.staleness_exponent}
            c = RecordDict()
            if p not in started:
                c["arrays"] = initial_arrays
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
            replies = self.send(grid, {p: c}, eng.version[p] + 1, timeout)
            r = replies.get(p)
            if r is None or "arrays" not in r.content.array_records:
                return None
            started.add(p)
            m = r.content["metrics"]
            self.learn_partitions({p: r})
            rnd = eng.version[p] + 1
            for it in items:
                if it["handle"] is not None:
                    heard[rnd][int(it["from"])].add(p)
            for q in m.get("distrusted-peers", []):
                votes[rnd][int(q)].add(p)
            if train:
                metrics_by_round[eng.version[p] + 1].append({k: float(v) for k, v in m.items() if isinstance(v, (int, float))})
            return {"arrays": r.content["arrays"], "n": float(m.get("num-examples", 1.0))}

        prev = {"time": 0.0}

        def snapshot_fn(r, t):
            live = sorted(eng.alive)
            distrust, excluded = self.record_distrust(r, votes.get(r, {}), heard.get(r, {}), live)
            handles = {p: eng.completed[p] or init_handle for p in live if p not in excluded}
            handles = handles or {p: eng.completed[p] or init_handle for p in live}
            arrays = self.weighted_mean({p: flatten(h["arrays"]) for p, h in handles.items()},
                                        {p: h["n"] for p, h in handles.items()})
            sent = dict(eng.peer_sent)
            total = float(sum(sent.values()))
            entry = {"round": r, "strategy": self.name, "participants": live,
                     "dropped": sorted(set(self.topology.nodes) - eng.alive),
                     "sim-time": t, "sim-round-seconds": t - prev["time"],
                     "sim-compute-seconds": max(self.topology.compute_time(p, steps, self.step_seconds) for p in live),
                     "total-peer-bytes": total - wall["bytes"], "exchanges-so-far": eng.exchanges,
                     "peer-bytes-sent": {str(k): float(v - wall["sent"].get(k, 0.0)) for k, v in sent.items()},
                     "link-bytes": {f"{a}->{b}": float(v - wall["link"].get((a, b), 0.0)) for (a, b), v in eng.link_bytes.items()},
                     "relay-bytes": self._relay_bytes - wall["relay"], "relay-messages": self._messages - wall["msgs"],
                     "wall-seconds": time.perf_counter() - wall["t"], "adapter-bytes": nbytes,
                     "dissemination-seconds": eng.dissemination_time}
            entry["sim-network-seconds"] = entry["sim-round-seconds"]  # no barrier: compute and exchange overlap
            entry.update(distrust)
            prev["time"] = t
            wall.update(t=time.perf_counter(), relay=self._relay_bytes, msgs=self._messages, bytes=total,
                        link=dict(eng.link_bytes), sent=sent)
            self.history.append(entry)
            result.arrays = arrays
            ms = metrics_by_round.get(r, [])
            if ms:
                from flwr.app import MetricRecord

                keys = set.intersection(*(set(m) for m in ms))
                agg = {k: float(np.mean([m[k] for m in ms])) for k in keys}
                if "num-examples" in agg:
                    agg["num-examples"] = float(sum(m["num-examples"] for m in ms))
                result.train_metrics_clientapp[r] = MetricRecord(agg)
            if evaluate_fn is not None:
                res = evaluate_fn(r, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[r] = res

        eng.run(start_fn=start_fn, snapshot_fn=snapshot_fn)
        self.finished = True
