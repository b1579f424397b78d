"""Discrete-event simulation of asynchronous push-pull gossip, and dissemination times.

:class:`AsyncEngine` decides, from each peer's compute speed and the link times of the
topology, who exchanges with whom and when:

* peer ``i`` trains (``local_steps * step_seconds / speed_i`` simulated seconds); when done it
  push-pulls with ``k`` random graph neighbours (the exchange takes the phase time of those
  ``2k`` transfers on the network model), then merges what it received and trains again;
* a model pushed to a busy peer waits in its inbox until that peer's next wake-up;
* a pull returns the partner's last *completed* model.

It drives :class:`~.async_gossip.AsyncGossip` (each wake-up is one relayed message) and, on
its own, the information-passing simulations below.

Dissemination time (``simulate_dissemination``): from t=0 until every peer's current model
contains every other peer's round-``track`` update, for the synchronous (barrier per round)
and asynchronous schedules on the same network model.
"""

from __future__ import annotations

import heapq
import math
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from . import topology as topo_lib

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
