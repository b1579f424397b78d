"""Serverless exchanges as Flower strategies, and the factory the ServerApp calls.

Flower is hub-and-spoke. In ``ring``, ``gossip`` and ``async-gossip`` the ServerApp **never
averages**: it is only a relay that forwards each peer's payload along the edges the topology
prescribes (ring successor, gossip neighbours); the peers merge locally in their ClientApp
(``fedledger.client_peer``, state in ``context.state``). The same code runs in simulation and
deployment; network time is *simulated* on the peer-to-peer network model of
``strategies/topology.py`` (the relay hop through the Flower hub is counted separately as
``relay-bytes``), so serverless and server FedAvg are timed on the same network.

    strategy = build_serverless_strategy("ring", run_config, num_nodes)
    result = strategy.start(grid, initial_arrays, num_rounds, evaluate_fn=...)
    strategy.history   # per-round accounting (bytes per peer/link, simulated + wall time)

Run-config keys: ``topology`` ("complete" | "geometric" | file), ``gossip-k`` (neighbours per
round, default 2), ``gossip-steps`` (mixing steps per round, 1), ``ring-order`` ("tsp" |
"naive" | "random"), ``link-latency`` (s, 0.02), ``link-bandwidth`` (bytes/s, 12.5e6),
``speed-heterogeneity`` (log-normal sd of node speeds, 0), ``step-seconds`` (simulated seconds
of one local step at speed 1, 1.0), ``staleness-exponent`` (0.5), ``seed``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from . import topology as topo_lib
from .kernels import as_numpy_dict, message_nbytes, to_arrayrecord, unflatten, weighted_average
from .wrapper import StrategyWrapper

log = logging.getLogger("fedledger")

SERVERLESS = ("ring", "gossip", "async-gossip")


class RelayStrategy(Strategy):
    """Base of the serverless strategies: the server is a relay and a clock, never an averager.

    Subclasses implement :meth:`run_round`. Peer ``i`` of the topology is the ``i``-th node id
    in sorted order. ``history`` holds one accounting dict per round.
    """

    message_type = "train"

    def __init__(self, topology: topo_lib.Topology | str = "complete", local_steps: int | None = None,
                 step_seconds: float = 1.0, seed: int = 0, latency: float = topo_lib.DEFAULT_LATENCY,
                 bandwidth: float = topo_lib.DEFAULT_BANDWIDTH, heterogeneity: float = 0.0):
        self.topology_spec = topology
        self.topology: topo_lib.Topology | None = topology if isinstance(topology, topo_lib.Topology) else None
        self.local_steps = local_steps
        self.step_seconds = float(step_seconds)
        self.seed = int(seed)
        self.latency, self.bandwidth, self.heterogeneity = float(latency), float(bandwidth), float(heterogeneity)
        self.history: list[dict] = []
        self.node_of: dict[int, int] = {}  # peer index -> Flower node id
        self.peer_of: dict[int, int] = {}  # Flower node id -> peer index
        self._relay_bytes = 0
        self._messages = 0
        self._layout_like: dict | None = None
        self.malicious: list[int] | None = None  # ground truth (partition ids), for `detection` only
        self.detection: dict[int, dict] = {}
        self.pid_of: dict[int, int] = {}  # peer index -> partition id (from train metrics)

    # -- Strategy's abstract API (the round loop is start() itself) ---------------------
    def configure_train(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_train(self, server_round, replies):
        return None, None

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self) -> None:
        log.info("%s: serverless relay (the server never averages), topology=%s", type(self).__name__,
                 self.topology_spec if isinstance(self.topology_spec, str) else "custom")

    # -- helpers --------------------------------------------------------------------------
    def setup(self, grid: Grid) -> None:
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise RuntimeError("no nodes connected")
        if self.topology is None:
            self.topology = topo_lib.build(str(self.topology_spec), len(node_ids), seed=self.seed, latency=self.latency,
                                           bandwidth=self.bandwidth, heterogeneity=self.heterogeneity)
        if len(self.topology) != len(node_ids):
            raise topo_lib.TopologyError(f"topology has {len(self.topology)} peers but {len(node_ids)} nodes are connected")
        peers = self.topology.nodes
        self.node_of = dict(zip(peers, node_ids))
        self.peer_of = {v: k for k, v in self.node_of.items()}

    def send(self, grid: Grid, contents: dict[int, RecordDict], server_round: int, timeout: float | None) -> dict[int, Message]:
        """Send ``contents[peer]`` to each peer; return valid (non-error) replies by peer index."""
        msgs = []
        for peer, content in contents.items():
            msg = Message(content=content, dst_node_id=self.node_of[peer], message_type=self.message_type,
                          group_id=str(server_round))
            self._relay_bytes += message_nbytes(msg)
            msgs.append(msg)
        self._messages += len(msgs)
        out = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            peer = self.peer_of.get(reply.metadata.src_node_id)
            if peer is None:
                continue
            if reply.has_error():
                log.warning("%s: peer %s replied with error: %s", type(self).__name__, peer, reply.error.reason)
                continue
            self._relay_bytes += message_nbytes(reply)
            out[peer] = reply
        missing = sorted(set(contents) - set(out))
        if missing:
            log.warning("%s: round %s: no reply from peers %s (routed around)", type(self).__name__, server_round, missing)
        return out

    def steps_of(self, train_config: ConfigRecord) -> int:
        if "local-steps" in train_config:
            return int(train_config["local-steps"])
        return int(self.local_steps or 1)

    def compute_seconds(self, peers: Iterable[int], local_steps: int) -> float:
        return max((self.topology.compute_time(p, local_steps, self.step_seconds) for p in peers), default=0.0)

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        self.setup(grid)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        self._layout_like = as_numpy_dict(initial_arrays)
        result = Result()
        result.arrays = initial_arrays
        if evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        self.begin(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_fn, result)
        for rnd in range(1, num_rounds + 1):
            if getattr(self, "finished", False):
                break
            relay0, msgs0, t0 = self._relay_bytes, self._messages, time.perf_counter()
            arrays, metrics, entry = self.run_round(grid, rnd, initial_arrays, train_config, timeout)
            entry = {"round": rnd, "strategy": self.name, **entry,
                     "relay-bytes": self._relay_bytes - relay0, "relay-messages": self._messages - msgs0,
                     "wall-seconds": time.perf_counter() - t0}
            self.history.append(entry)
            if arrays is not None:
                result.arrays = arrays
            if metrics:
                result.train_metrics_clientapp[rnd] = MetricRecord(metrics)
            if evaluate_fn and arrays is not None and not getattr(self, "evaluates_itself", False):
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
        return result

    name = "relay"

    def begin(self, grid, initial_arrays, num_rounds, timeout, train_config, evaluate_fn, result) -> None:
        """Hook before the first round (the async strategy runs its whole event loop here)."""

    def run_round(self, grid: Grid, server_round: int, initial_arrays: ArrayRecord, train_config: ConfigRecord,
                  timeout: float) -> tuple[ArrayRecord | None, dict, dict]:
        raise NotImplementedError

    # -- peer-side trust (run-config trust="pagerank") ----------------------------------
    def learn_partitions(self, replies: dict[int, Message]) -> None:
        for p, r in replies.items():
            m = r.content.metric_records.get("metrics")
            if m is not None and "partition-id" in m:
                self.pid_of[p] = int(m["partition-id"])

    def record_distrust(self, server_round: int, votes: dict[int, set], heard: dict[int, set],
                        participants: Iterable[int]) -> tuple[dict, set[int]]:
        """Peers report whom they distrusted; a peer distrusted by more than half of the peers
        that received its model this round counts as excluded (``detection`` vs ground truth)
        and is left out of the evaluation mean. ``votes[p]`` / ``heard[p]``: the distinct peers
        that distrusted / received ``p``'s model. Returns (history fields, excluded peers)."""
        flagged = [p for p, v in votes.items() if 2 * len(v) > len(heard.get(p, ()))]
        pid = lambda p: self.pid_of.get(p, p)  # noqa: E731
        out = {"distrusted-votes": {str(pid(p)): len(v) for p, v in sorted(votes.items()) if v},
               "distrusted": sorted(pid(p) for p in flagged)}
        if self.malicious is not None:
            from .detection import detection_metrics

            self.detection[server_round] = detection_metrics(out["distrusted"], self.malicious,
                                                             [pid(p) for p in participants])
        return out, set(flagged)

    # -- shared reporting ------------------------------------------------------------
    @staticmethod
    def mean_metrics(replies: dict[int, Message]) -> dict:
        vals: dict[str, list] = defaultdict(list)
        for reply in replies.values():
            for rec in reply.content.metric_records.values():
                for k, v in rec.items():
                    if isinstance(v, (int, float)):
                        vals[k].append(float(v))
        out = {k: float(np.mean(v)) for k, v in vals.items()}
        if "num-examples" in vals:
            out["num-examples"] = float(np.sum(vals["num-examples"]))
        return out

    def weighted_mean(self, models: dict[int, np.ndarray], weights: dict[int, float]) -> ArrayRecord:
        """Examples-weighted mean of peers' final models, for central evaluation only."""
        peers = sorted(models)
        vec = weighted_average(np.stack([models[p] for p in peers]), [weights[p] for p in peers])
        return to_arrayrecord(unflatten(vec, self._layout_like))

    @staticmethod
    def accounting(acc: dict) -> dict:
        """Topology accounting -> JSON-ready per-round fields."""
        j = topo_lib.jsonable_accounting(acc)
        return {"sim-network-seconds": acc["network-seconds"], "sim-compute-seconds": acc["compute-seconds"],
                "sim-round-seconds": acc["round-seconds"], "peer-bytes-sent": j["peer-sent"],
                "peer-bytes-received": j["peer-received"], "link-bytes": j["link-bytes"],
                "total-peer-bytes": acc["total-bytes"]}


class NetworkAccounting(StrategyWrapper):
    """Accounting for any hub strategy (server FedAvg & co) on the same network model: per round
    bytes per peer and per link of the star through ``server`` (a peer node, default the graph's
    centre), simulated network + compute time (:func:`topology.fedavg_round`) and wall time."""

    def __init__(self, inner: Strategy, topology: topo_lib.Topology, server: int | str = "centre",
                 local_steps: int = 1, step_seconds: float = 1.0):
        super().__init__(inner)
        self.topology = topology
        self.server = server
        self.local_steps = local_steps
        self.step_seconds = step_seconds
        self.history: list[dict] = []
        self._round: dict = {}

    def configure_train(self, server_round, arrays, config, grid):
        msgs = list(self.inner.configure_train(server_round, arrays, config, grid))
        node_ids = sorted(grid.get_node_ids())
        peer_of = {nid: i for i, nid in zip(self.topology.nodes, node_ids)}
        self._round = {"t0": time.perf_counter(), "peer_of": peer_of,
                       "down": {peer_of[m.metadata.dst_node_id]: message_nbytes(m) for m in msgs
                                if m.metadata.dst_node_id in peer_of}}
        return msgs

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        peer_of = self._round.get("peer_of", {})
        up = {peer_of[r.metadata.src_node_id]: message_nbytes(r) for r in replies
              if not r.has_error() and r.metadata.src_node_id in peer_of}
        out = self.inner.aggregate_train(server_round, replies)
        topo = self.topology
        s = topo.centre(max(up.values(), default=0)) if self.server == "centre" else int(self.server)
        down = self._round.get("down", {})
        acc = topo_lib._merge_phases(
            [topo.phase([(s, p, b) for p, b in down.items()]), topo.phase([(p, s, b) for p, b in up.items()])],
            max((topo.compute_time(p, self.local_steps, self.step_seconds) for p in up), default=0.0))
        self.history.append({"round": server_round, "strategy": "server-fedavg", "server-node": s,
                             "participants": sorted(up), **RelayStrategy.accounting(acc),
                             "wall-seconds": time.perf_counter() - self._round.get("t0", time.perf_counter())})
        return out


# ---------------------------------------------------------------------- factory
def _cfg(run_config: dict, key: str, default):
    value = run_config.get(key, default)
    return type(default)(value) if default is not None and value is not None else value


def build_serverless_strategy(name: str, run_config: dict, num_nodes: int) -> Strategy:
    """``ring`` | ``gossip`` | ``async-gossip`` configured from run-config (see module docstring)."""
    run_config = dict(run_config)
    malicious = [int(x) for x in str(run_config.get("malicious", "")).replace(" ", "").split(",") if x != ""]
    strategy = _build(name, run_config)
    if str(run_config.get("trust", "none")) == "pagerank":
        from .pagerank import pagerank_kwargs_from_config

        pagerank_kwargs_from_config(run_config)  # bad trust-* values: one error here, not one per peer
        if name == "ring":
            log.warning("trust='pagerank' has no effect with strategy='ring': ring peers only see partial sums "
                        "(use gossip or async-gossip for peer-side trust)")
        elif malicious:
            strategy.malicious = malicious
    return strategy


def _build(name: str, run_config: dict) -> Strategy:
    common = dict(
        topology=str(run_config.get("topology", "complete")),
        local_steps=_cfg(run_config, "local-steps", 1),
        step_seconds=_cfg(run_config, "step-seconds", 1.0),
        seed=_cfg(run_config, "seed", 0),
        latency=_cfg(run_config, "link-latency", topo_lib.DEFAULT_LATENCY),
        bandwidth=_cfg(run_config, "link-bandwidth", topo_lib.DEFAULT_BANDWIDTH),
        heterogeneity=_cfg(run_config, "speed-heterogeneity", 0.0),
    )
    if name == "ring":
        from .ring import RingAllReduce

        return RingAllReduce(order=str(run_config.get("ring-order", "tsp")), **common)
    if name == "gossip":
        from .gossip import Gossip

        return Gossip(k=_cfg(run_config, "gossip-k", 2), steps=_cfg(run_config, "gossip-steps", 1), **common)
    if name == "async-gossip":
        from .async_gossip import AsyncGossip

        return AsyncGossip(k=_cfg(run_config, "gossip-k", 2),
                           staleness_exponent=_cfg(run_config, "staleness-exponent", 0.5), **common)
    raise ValueError(f"strategy {name!r} is not serverless; choose one of {', '.join(SERVERLESS)}")
