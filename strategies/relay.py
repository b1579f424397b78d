"""Serverless exchanges over Flower: the ServerApp is a relay and a clock, never an averager.

Flower is hub-and-spoke. In ``ring``, ``gossip`` and ``async-gossip`` the ServerApp only
forwards each peer's payload along the edges the topology prescribes (ring successor, gossip
neighbours); the peers merge locally in their ClientApp (``fedledger.client_peer``, state in
``context.state``). The same code runs in simulation and deployment. Network time is
*simulated* on the peer-to-peer model of ``strategies/topology.py`` (the relay hop through the
Flower hub is counted separately as ``relay-bytes``), so serverless and server FedAvg are timed
on the same network.

Topology peer ``p`` is **partition** ``p``; ``peers`` maps each partition to the Flower node id
that holds it (the glue resolves it once; node ids are random 64-bit integers in a real run).
Every id in the history (participants, dropped, distrusted, bytes per peer and link) is a
partition id. Replies are never asked who they are.

    runner = build_relay("ring", topology="complete", local_steps=4, seed=0, ...)
    result = runner.run(grid, peers, initial_arrays, num_rounds=3, evaluate_fn=...)
    result.history[0]["peer-bytes-sent"]                      # {"0": ..., "1": ...}

:func:`build_relay` takes plain typed arguments (the glue maps its settings onto them); an
invalid one raises ValueError, a topology that cannot be used ``topology.TopologyError`` (a
ValueError too).

A :class:`RelayRunner` is not a Flower ``Strategy``: its :meth:`RelayRunner.run` is a plain
loop of :meth:`RelayRunner.run_round` (asynchronous gossip replaces the loop by its event loop).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from . import topology as topo_lib
from .accounting import exchange_fields
from .kernels import array_nbytes, as_numpy_dict, message_nbytes, to_arrayrecord, unflatten, weighted_average

log = logging.getLogger("fedledger")

SERVERLESS = ("ring", "gossip", "async-gossip")
TOPOLOGY_KINDS = ("complete", "geometric")
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | Mapping | None]


# ---------------------------------------------------------------------- results
class RelayStopped(RuntimeError):
    """A round ended with fewer live peers than ``min-train-nodes``: the run stops (one line).
    ``result`` holds every round recorded so far, the stopping round included."""

    def __init__(self, message: str, result: "RelayResult | None" = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class RelayResult:
    """A whole serverless run: the final mean model (for evaluation only; no peer received it),
    mean train metrics per round, central evaluation per round (0 = the initial adapter) and one
    accounting entry per round."""

    arrays: ArrayRecord
    train_metrics: dict[int, dict] = field(default_factory=dict)
    central: dict[int, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.arrays, ArrayRecord):
            raise TypeError(f"RelayResult.arrays must be an ArrayRecord, got {type(self.arrays).__name__}")


@dataclass(frozen=True)
class RoundOutcome:
    """What one round produced: the peers' mean model (None: nobody finished), mean train
    metrics, and the round's accounting fields."""

    arrays: ArrayRecord | None
    metrics: dict
    entry: dict


# ---------------------------------------------------------------------- the relay
class Relay:
    """The Flower hub as a relay: one RecordDict to each topology peer's node, the valid replies
    back by peer, and a count of the bytes and messages that went through it."""

    def __init__(self, grid: Grid, peers: Mapping[int, int], message_type: str, timeout: float | None,
                 owner: str = "relay") -> None:
        self.grid, self.message_type, self.timeout, self.owner = grid, message_type, timeout, owner
        self.node_of = {int(p): int(n) for p, n in peers.items()}
        self.peer_of = {n: p for p, n in self.node_of.items()}
        self.bytes = 0
        self.messages = 0
        self.bytes_to: dict[int, int] = defaultdict(int)      # per peer: bytes relayed to it ...
        self.bytes_from: dict[int, int] = defaultdict(int)    # ... and from it
        self.messages_to: dict[int, int] = defaultdict(int)   # messages sent to it (= round trips)

    def send(self, contents: Mapping[int, RecordDict], server_round: int, message_type: str | None = None
             ) -> dict[int, Message]:
        """Send ``contents[peer]`` to each peer (as ``message_type``, default the relay's); return
        the non-error replies by peer."""
        msgs = []
        for peer, content in contents.items():
            msg = Message(content=content, dst_node_id=self.node_of[peer],
                          message_type=message_type or self.message_type, group_id=str(server_round))
            n = message_nbytes(msg)
            self.bytes += n
            self.bytes_to[peer] += n
            self.messages_to[peer] += 1
            msgs.append(msg)
        self.messages += len(msgs)
        self.last_errors: dict[int, str] = {}   # peer -> the reason of its error reply, for this send
        out: dict[int, Message] = {}
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        sent_as = {m.metadata.message_id: peer for m, peer in zip(msgs, contents) if m.metadata.message_id}
        for reply in replies:
            # a SuperNode's reply comes from its node; the SuperLink answers for a node that stopped
            # sending heartbeats (NODE_UNAVAILABLE) from its own id, naming the message it answers
            peer = self.peer_of.get(int(reply.metadata.src_node_id), sent_as.get(reply.metadata.reply_to_message_id))
            if peer is None or peer not in contents:
                continue
            if reply.has_error():
                log.warning("%s: peer %s replied with error: %s", self.owner, peer, reply.error.reason)
                self.last_errors[peer] = str(reply.error.reason)
                continue
            n = message_nbytes(reply)
            self.bytes += n
            self.bytes_from[peer] += n
            out[peer] = reply
        missing = sorted(set(contents) - set(out))
        if missing:
            log.warning("%s: round %s: no reply from peers %s (routed around)", self.owner, server_round, missing)
        return out

    def update_peers(self, peers: Mapping[int, int]) -> list[int]:
        """Point the run's partitions at the nodes that hold them now (a SuperNode that restarted
        comes back under a new node id); returns the partitions whose node changed."""
        changed = sorted(int(p) for p, n in peers.items() if int(p) in self.node_of and self.node_of[int(p)] != int(n))
        for p in changed:
            self.node_of[p] = int(peers[p])
        self.peer_of = {n: p for p, n in self.node_of.items()}
        return changed


@dataclass(frozen=True)
class RelayRun:
    """One run's fixed facts, handed to every round."""

    topology: topo_lib.Topology
    relay: Relay
    initial: ArrayRecord
    like: dict[str, np.ndarray]        # the adapter layout (names, shapes)
    train_config: ConfigRecord
    local_steps: int

    @property
    def nbytes(self) -> int:
        return array_nbytes(self.initial)

    def compute_seconds(self, peers: Iterable[int], step_seconds: float) -> float:
        """Simulated compute of a synchronous round: the slowest of ``peers``."""
        return max((self.topology.compute_time(p, self.local_steps, step_seconds) for p in peers), default=0.0)


class _Recorder:
    """Collects the rounds into a :class:`RelayResult`: accounting entries with the relay's
    bytes, messages and wall seconds since the previous round, and central evaluation."""

    def __init__(self, name: str, relay: Relay, initial: ArrayRecord, evaluate_fn: EvaluateFn | None,
                 history: list[dict]) -> None:
        self.name, self.relay, self.evaluate_fn = name, relay, evaluate_fn
        self.arrays, self.train_metrics, self.central, self.history = initial, {}, {}, history
        self.evaluate(0, initial)
        self._mark()

    def _mark(self) -> None:
        self._bytes, self._messages, self._t = self.relay.bytes, self.relay.messages, time.perf_counter()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> None:
        if self.evaluate_fn is not None:
            res = self.evaluate_fn(server_round, arrays)
            if res is not None:
                self.central[server_round] = dict(res)

    def record(self, server_round: int, outcome: RoundOutcome) -> None:
        self.history.append({"round": server_round, "strategy": self.name, **outcome.entry,
                             "relay-bytes": self.relay.bytes - self._bytes,
                             "relay-messages": self.relay.messages - self._messages,
                             "wall-seconds": time.perf_counter() - self._t})
        if outcome.metrics:
            self.train_metrics[server_round] = dict(outcome.metrics)
        if outcome.arrays is not None:
            self.arrays = outcome.arrays
            self.evaluate(server_round, outcome.arrays)
        self._mark()

    def result(self) -> RelayResult:
        return RelayResult(self.arrays, self.train_metrics, self.central, self.history)


# ---------------------------------------------------------------------- the runner
class RelayRunner:
    """Base of the serverless runners (``RingAllReduce``, ``Gossip``, ``AsyncGossip``).

    Subclasses set ``name`` and ``message_type`` and implement :meth:`run_round` (and
    :meth:`begin` for per-run state). ``topology``: a :class:`~.topology.Topology` whose peers
    are the partitions, or a spec for ``topology.build`` ("complete" | "geometric" | a file),
    built when the number of peers is known. ``history`` is the running (or last) run's list of
    accounting entries, the one its result holds: an ``evaluate_fn`` finds the entry of the
    round it evaluates there.
    """

    name = "relay"
    message_type = "train"

    #: seconds between two looks at the connected nodes while a round waits for min-available-nodes
    poll_seconds = 1.0

    def __init__(self, topology: topo_lib.Topology | str = "complete", *, local_steps: int = 1,
                 step_seconds: float = 1.0, seed: int = 0, latency: float = topo_lib.DEFAULT_LATENCY,
                 bandwidth: float = topo_lib.DEFAULT_BANDWIDTH, heterogeneity: float = 0.0,
                 min_train_nodes: int = 1, min_available_nodes: int = 0) -> None:
        if not isinstance(topology, (topo_lib.Topology, str)):
            raise TypeError(f"topology must be a Topology or a spec string, got {type(topology).__name__}")
        _check(int(local_steps) >= 1, f"local_steps must be >= 1, got {local_steps}")
        _check(float(step_seconds) > 0, f"step_seconds must be > 0, got {step_seconds}")
        _check(float(latency) >= 0, f"latency must be >= 0 seconds, got {latency}")
        _check(float(bandwidth) > 0, f"bandwidth must be > 0 bytes/s, got {bandwidth}")
        _check(float(heterogeneity) >= 0, f"heterogeneity must be >= 0, got {heterogeneity}")
        _check(int(min_train_nodes) >= 1, f"min-train-nodes must be >= 1, got {min_train_nodes}")
        _check(int(min_available_nodes) >= 0, f"min-available-nodes must be >= 0, got {min_available_nodes}")
        self.min_train_nodes, self.min_available_nodes = int(min_train_nodes), int(min_available_nodes)
        self.topology = topology
        self.local_steps, self.step_seconds, self.seed = int(local_steps), float(step_seconds), int(seed)
        self.latency, self.bandwidth, self.heterogeneity = float(latency), float(bandwidth), float(heterogeneity)
        self.history: list[dict] = []

    # ------------------------------------------------------------------ the run
    def run(self, grid: Grid, peers: Mapping[int, int], initial_arrays: ArrayRecord, num_rounds: int, *,
            timeout: float = 3600, train_config: ConfigRecord | None = None,
            evaluate_fn: EvaluateFn | None = None,
            peers_fn: Callable[[], Mapping[int, int]] | None = None) -> RelayResult:
        """Run ``num_rounds`` rounds among ``peers`` (partition -> Flower node id).

        ``peers_fn()``: the partitions held by a connected node now (partition -> node id), asked
        before every synchronous round; a partition whose node changed (a SuperNode that
        restarted) rejoins from the current model. Default: the nodes of ``peers`` that
        ``grid.get_node_ids()`` lists. Raises :class:`RelayStopped` when a round ends with fewer
        than ``min_train_nodes`` live peers."""
        peers = _checked_peers(peers)
        _check(int(num_rounds) >= 1, f"num_rounds must be >= 1, got {num_rounds}")
        train_config = ConfigRecord() if train_config is None else train_config
        run = RelayRun(topology=self.topology_for(sorted(peers)),
                       relay=Relay(grid, peers, self.message_type, timeout, owner=type(self).__name__),
                       initial=initial_arrays, like=as_numpy_dict(initial_arrays), train_config=train_config,
                       local_steps=int(train_config.get("local-steps", self.local_steps)))
        log.info("%s: serverless relay over %s peers (the server never averages), topology=%s", type(self).__name__,
                 len(peers), self.topology if isinstance(self.topology, str) else "custom")
        self.history = []
        self._peers_fn = peers_fn or (lambda: _connected(grid, run.relay.node_of))
        self._unsynced: set[int] = set()   # partitions that came back under a new node id
        recorder = _Recorder(self.name, run.relay, initial_arrays, evaluate_fn, self.history)

        def record(server_round: int, outcome: RoundOutcome) -> None:
            recorder.record(server_round, outcome)
            self.check_live(server_round, outcome, recorder)

        self.begin(run)
        self.rounds(run, int(num_rounds), record)
        return recorder.result()

    # ------------------------------------------------------------------ live peers
    def live_peers(self, run: RelayRun, server_round: int) -> list[int]:
        """The partitions this round goes to: those a connected node holds. Waits, as Flower's
        hub strategies do, until ``max(min-available-nodes, min-train-nodes)`` are connected
        (``min-available-nodes`` 0 = every peer of the run's start)."""
        need = max(self.min_available_nodes or len(run.topology), self.min_train_nodes)
        waited, said = 0.0, -1.0
        while True:
            now = {int(p): int(n) for p, n in self._peers_fn().items() if int(p) in run.relay.node_of}
            changed = run.relay.update_peers(now)
            if changed:
                log.info("%s: round %s: peers %s rejoined under a new node id; they train from the current model",
                         type(self).__name__, server_round, changed)
                self._unsynced |= set(changed)
            if len(now) >= need:
                return sorted(now)
            if waited - said >= 30.0 or said < 0:
                log.info("%s: round %s waits for peers: %s connected (minimum required: %s; min-available-nodes / "
                         "min-train-nodes)", type(self).__name__, server_round, len(now), need)
                said = waited
            time.sleep(self.poll_seconds)
            waited += self.poll_seconds

    def synced(self, synced: set[int]) -> set[int]:
        """``synced`` less the partitions that came back under a new node id (their state is new)."""
        out = set(synced) - self._unsynced
        self._unsynced = set()
        return out

    def check_live(self, server_round: int, outcome: RoundOutcome, recorder: "_Recorder") -> None:
        """Stop the run (one line) after a round that ended with fewer live peers than
        ``min-train-nodes``; everything recorded so far is in the exception's result."""
        live = outcome.entry.get("participants", [])
        if len(live) < self.min_train_nodes:
            raise RelayStopped(f"{self.name}: round {server_round} ended with {len(live)} live peer(s) "
                               f"{list(live)} (dropped {outcome.entry.get('dropped', [])}), fewer than "
                               f"min-train-nodes={self.min_train_nodes}: the run stops after recording it; start the "
                               f"missing SuperNodes or lower min-train-nodes", recorder.result())

    def live_network(self, run: RelayRun, alive: Iterable[int], server_round: int) -> "LiveNetwork":
        """The simulated network among the live peers (paths never go through a dead peer); a
        cut is said in one line and its unreachable peers counted."""
        net = LiveNetwork.of(run.topology, alive)
        if net.unreachable:
            log.warning("%s: round %s: the dead peers %s cut the live network into %s parts %s; peers %s cannot "
                        "reach the largest part", type(self).__name__, server_round,
                        sorted(set(run.topology.nodes) - set(alive)), len(net.parts),
                        [p.nodes for p in net.parts], list(net.unreachable))
        return net

    def topology_for(self, partitions: list[int]) -> topo_lib.Topology:
        """The run's topology; its peers must be exactly the run's partitions."""
        topo = self.topology
        if isinstance(topo, str):
            if partitions != list(range(len(partitions))):
                raise topo_lib.TopologyError(f"topology {topo!r} has peers 0..{len(partitions) - 1} but the run's "
                                             f"partitions are {partitions[:10]}; pass a Topology with these peers")
            topo = topo_lib.build(topo, len(partitions), seed=self.seed, latency=self.latency,
                                  bandwidth=self.bandwidth, heterogeneity=self.heterogeneity)
        if topo.nodes != partitions:
            raise topo_lib.TopologyError(f"topology has {len(topo)} peers {topo.nodes[:10]} but the run has "
                                         f"{len(partitions)} partitions {partitions[:10]}")
        return topo

    def begin(self, run: RelayRun) -> None:
        """Reset per-run state before the first round."""

    def rounds(self, run: RelayRun, num_rounds: int, record: Callable[[int, RoundOutcome], None]) -> None:
        """The plain loop: one synchronous :meth:`run_round` after the other."""
        for server_round in range(1, num_rounds + 1):
            record(server_round, self.run_round(run, server_round))

    def run_round(self, run: RelayRun, server_round: int) -> RoundOutcome:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared pieces
    def train_contents(self, run: RelayRun, server_round: int, synced: set[int],
                       last: ArrayRecord | None, peers: Iterable[int] | None = None) -> dict[int, RecordDict]:
        """``phase=train`` to every live peer (``peers``, default all); a peer that does not hold
        the last round's result (first round, it missed it, or it rejoined) also gets that model
        (the initial adapter at first)."""
        cfg = {**dict(run.train_config), "server-round": server_round, "phase": "train"}
        contents = {}
        for p in (run.topology.nodes if peers is None else peers):
            c = RecordDict({"config": ConfigRecord(cfg)})
            if p not in synced:
                c["arrays"] = last if last is not None else run.initial
            contents[p] = c
        return contents

    def mean_model(self, run: RelayRun, models: Mapping[int, np.ndarray], weights: Mapping[int, float]) -> ArrayRecord:
        """Weighted mean of peers' flat models, for central evaluation only (no peer receives it)."""
        peers = sorted(models)
        vec = weighted_average(np.stack([models[p] for p in peers]), [weights[p] for p in peers])
        return to_arrayrecord(unflatten(vec, run.like))

    @staticmethod
    def mean_metrics(replies: Mapping[int, Message]) -> dict:
        """Mean of the peers' scalar metrics; ``num-examples`` is summed."""
        vals: dict[str, list] = defaultdict(list)
        for reply in replies.values():
            for rec in reply.content.metric_records.values():
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        vals[k].append(float(v))
        out = {k: float(np.mean(v)) for k, v in vals.items()}
        if "num-examples" in vals:
            out["num-examples"] = float(np.sum(vals["num-examples"]))
        return out

    @staticmethod
    def accounting(acc: Mapping) -> dict:
        return exchange_fields(acc)


# ---------------------------------------------------------------------- the live network
@dataclass(frozen=True)
class LiveNetwork:
    """The topology among the live peers: one :class:`~.topology.Topology` per connected part
    (fastest paths over live peers only, networkx) and the peers outside the largest part."""

    parts: tuple[topo_lib.Topology, ...]
    unreachable: tuple[int, ...]

    @classmethod
    def of(cls, topology: topo_lib.Topology, alive: Iterable[int]) -> "LiveNetwork":
        import networkx as nx

        if set(alive) == set(topology.nodes):
            return cls((topology,), ())
        live = topology.graph.subgraph(sorted(set(alive)))
        comps = sorted((sorted(c) for c in nx.connected_components(live)), key=lambda c: (-len(c), c[0]))
        parts = tuple(topo_lib.Topology(live.subgraph(c).copy()) for c in comps)
        return cls(parts, tuple(p for c in comps[1:] for p in c))

    @property
    def whole(self) -> topo_lib.Topology | None:
        """The live topology when it is in one part, else None."""
        return self.parts[0] if len(self.parts) == 1 else None

    def part_of(self, peer: int) -> topo_lib.Topology:
        return next(p for p in self.parts if peer in p.graph)

    def phase(self, transfers) -> dict:
        """``Topology.phase`` of concurrent transfers within the parts (the parts run side by side:
        the phase lasts as long as the slowest)."""
        groups: dict[int, list] = defaultdict(list)
        for t in transfers:
            groups[next(i for i, p in enumerate(self.parts) if t[0] in p.graph)].append(t)
        done = [self.parts[i].phase(ts) for i, ts in sorted(groups.items())]
        out = {"seconds": max((d["seconds"] for d in done), default=0.0), "link-bytes": {}, "peer-sent": {},
               "peer-received": {}}
        for d in done:
            for key in ("link-bytes", "peer-sent", "peer-received"):
                out[key].update(d[key])
        return out


# ---------------------------------------------------------------------- the factory
def build_relay(name: str, *, topology: str | topo_lib.Topology = "complete", local_steps: int = 1,
                step_seconds: float = 1.0, seed: int = 0, latency: float = topo_lib.DEFAULT_LATENCY,
                bandwidth: float = topo_lib.DEFAULT_BANDWIDTH, heterogeneity: float = 0.0, gossip_k: int = 2,
                gossip_steps: int = 1, ring_order: str = "tsp", staleness_exponent: float = 0.5,
                min_train_nodes: int = 1, min_available_nodes: int = 0) -> RelayRunner:
    """The relay runner ``name`` (one of :data:`SERVERLESS`); ``topology`` is "complete",
    "geometric", a topology file or a :class:`~.topology.Topology` whose peers are the partitions.
    ``min_available_nodes`` (0 = every peer): connected peers a round waits for;
    ``min_train_nodes``: fewest live peers a round may end with (fewer stops the run)."""
    if isinstance(topology, str):
        _check_topology_spec(topology)
    common = dict(topology=topology, local_steps=local_steps, step_seconds=step_seconds, seed=seed,
                  latency=latency, bandwidth=bandwidth, heterogeneity=heterogeneity,
                  min_train_nodes=min_train_nodes, min_available_nodes=min_available_nodes)
    if name == "ring":
        from .ring import RingAllReduce

        return RingAllReduce(order=ring_order, **common)
    if name == "gossip":
        from .gossip import Gossip

        return Gossip(k=gossip_k, steps=gossip_steps, **common)
    if name == "async-gossip":
        from .async_gossip import AsyncGossip

        return AsyncGossip(k=gossip_k, staleness_exponent=staleness_exponent, **common)
    raise ValueError(f"strategy {name!r} is not serverless; choose one of: {', '.join(SERVERLESS)}")


# ---------------------------------------------------------------------- peer-side trust
def distrust_fields(votes: Mapping[int, set], heard: Mapping[int, set]) -> tuple[dict, set[int]]:
    """Peers report whom they distrusted (``distrusted-peers`` in their replies). A peer
    distrusted by more than half of the peers that received its model counts as distrusted and
    is left out of the evaluation mean. ``votes[p]`` / ``heard[p]``: the distinct peers that
    distrusted / received ``p``'s model. Returns (history fields, distrusted peers)."""
    flagged = {p for p, v in votes.items() if 2 * len(v) > len(heard.get(p, ()))}
    return {"distrusted-votes": {str(p): len(v) for p, v in sorted(votes.items()) if v},
            "distrusted": sorted(flagged)}, flagged


def distrusted_in(reply: Message) -> list[int]:
    """The peers a reply says its sender distrusted."""
    m = reply.content.metric_records.get("metrics")
    return [int(q) for q in m.get("distrusted-peers", [])] if m is not None else []


# ---------------------------------------------------------------------- checks
def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_topology_spec(spec: str) -> None:
    """Fail before the run for a spec ``topology.build`` would refuse (the peer count comes later)."""
    if spec not in TOPOLOGY_KINDS and not os.path.isfile(spec):
        raise topo_lib.TopologyError(f"topology {spec!r} is not 'complete', 'geometric' or an existing file")


def _connected(grid: Grid, node_of: Mapping[int, int]) -> dict[int, int]:
    """The run's partitions whose node the grid lists as connected."""
    online = {int(n) for n in grid.get_node_ids()}
    return {p: n for p, n in node_of.items() if n in online}


def _checked_peers(peers: Mapping[int, int]) -> dict[int, int]:
    if not isinstance(peers, Mapping) or not peers:
        raise ValueError("peers must map each partition id to its Flower node id, e.g. {0: node_a, 1: node_b}; "
                         "got none (no nodes connected?)")
    out = {int(p): int(n) for p, n in peers.items()}
    if len(set(out.values())) != len(out):
        raise ValueError("peers maps two partitions to the same Flower node id; each node holds one partition")
    return out
