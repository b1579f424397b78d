"""The base of the KD-FedLLM and Split-FedLLM round runners (``strategies/kd.py``, ``strategies/split.py``).

Neither framework is "send the model, average the replies": a KD round is three exchanges
(train, logit query, distil), a split round is one exchange per local step. So, like the relay
runners, a :class:`FrameworkRunner` is not a Flower ``Strategy``: :meth:`FrameworkRunner.run` is a
plain loop of :meth:`FrameworkRunner.run_round`, and the hub talks to the clients through a
:class:`~.relay.Relay` (one RecordDict per client, replies by partition, bytes and messages
counted per client).

What every round shares with the hub strategies:

- the same boundary: replies are decoded once (``fedledger.core``), get the identity resolved
  once for their node (``core.pipeline.identify_updates``) and, on an audited run, their signed
  record checked and recorded by the same audit trail (``verify_updates`` / ``trail.record`` /
  ``trail.commit``); every round ends in a ``core.RoundReport``;
- the same network model: :class:`RoundTally` times each exchange as a star through the
  server's node on the run's :class:`~.topology.Topology` (the server sits at the centre peer,
  as ``HubAccounting`` places it) and the round's ``exchange`` entry has the same fields
  (``accounting.exchange_fields``), plus per client: bytes up and down, round trips, compute
  seconds, estimated FLOPs and peak RSS as the client reported them, and the server's compute
  seconds. ``sim-compute-seconds`` is *measured* here (the slowest client's compute plus the
  server's), not the ``step-seconds`` model of the other modes.

Topology peers and report keys are partitions; ``peers`` maps each partition to its node id.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedledger.core.pipeline import AuditTrail, Identities, RoundReport
from fedledger.core.update import AUDIT_KEY, NUM_EXAMPLES

from . import topology as topo_lib
from .accounting import exchange_fields
from .relay import Relay, _checked_peers

log = logging.getLogger("fedledger")

CLIENT_FIELDS = ("bytes-up", "bytes-down", "round-trips", "compute-seconds", "flops", "peak-rss-mb")
EvaluateFn = Callable[[int, ArrayRecord | None], Mapping | None]


@dataclass(frozen=True)
class FrameworkResult:
    """A whole run: the final global adapter (None when the server holds none: KD with client-side
    distillation), each round's report and accounting entry."""

    arrays: ArrayRecord | None
    reports: dict[int, RoundReport] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced: the new global adapter (None: unchanged / none), the arrays to
    evaluate centrally (None: the clients evaluate themselves), the round's report and extra
    accounting fields."""

    arrays: ArrayRecord | None
    evaluate: ArrayRecord | None
    report: RoundReport
    entry: dict = field(default_factory=dict)


class RoundTally:
    """One round's exchanges: sends through the relay, what each client moved and did, the network phases."""

    def __init__(self, relay: Relay, topology: topo_lib.Topology, server: int):
        self.relay, self.topology, self.server = relay, topology, int(server)
        self.phases: list[dict] = []
        self.clients: dict[int, dict] = defaultdict(lambda: dict.fromkeys(CLIENT_FIELDS, 0.0))
        self.server_seconds = 0.0
        self.started = time.perf_counter()

    def send(self, contents: Mapping[int, RecordDict], server_round: int, message_type: str) -> dict[int, Message]:
        """One exchange: ``contents`` to their peers, the replies back (two phases on the network)."""
        to_before = {p: self.relay.bytes_to[p] for p in contents}
        from_before = {p: self.relay.bytes_from[p] for p in contents}
        replies = self.relay.send(contents, server_round, message_type)
        down = {p: self.relay.bytes_to[p] - to_before[p] for p in contents}
        up = {p: self.relay.bytes_from[p] - from_before[p] for p in replies}
        for p in contents:
            c = self.clients[p]
            c["bytes-down"] += down[p]
            c["round-trips"] += 1
        for p, reply in replies.items():
            c = self.clients[p]
            c["bytes-up"] += up[p]
            m = reply.content.metric_records.get("metrics")
            if m is not None:
                c["compute-seconds"] += _number(m.get("compute-seconds"))
                c["flops"] += _number(m.get("flops"))
                c["peak-rss-mb"] = max(c["peak-rss-mb"], _number(m.get("peak-rss-mb")))
        self.phases.append(self._phase([(self.server, p, b) for p, b in down.items()]))
        self.phases.append(self._phase([(p, self.server, b) for p, b in up.items()]))
        return replies

    def _phase(self, transfers: list[tuple[int, int, int]]) -> dict:
        """Concurrent transfers; a message without array bytes still pays its path's latency."""
        phase = self.topology.phase([t for t in transfers if t[2] > 0])
        empty = [self.topology.path_time(a, b, 0.0) for a, b, n in transfers if n <= 0 and a != b]
        if empty:
            phase["seconds"] = max(phase["seconds"], max(empty))
        return phase

    def server_work(self):
        """``with tally.server_work(): ...`` adds the block's wall time to the server's compute."""
        return _Timer(self)

    def entry(self, server_round: int, strategy: str, participants, dropped) -> dict:
        slowest = max((c["compute-seconds"] for c in self.clients.values()), default=0.0)
        acc = topo_lib._merge_phases(self.phases, slowest + self.server_seconds)
        clients = {str(p): {k: (int(v) if k in ("bytes-up", "bytes-down", "round-trips") else float(v))
                            for k, v in c.items()} for p, c in sorted(self.clients.items())}
        return {"round": server_round, "strategy": strategy, "server-node": self.server,
                "participants": sorted(participants), "dropped": sorted(dropped), "clients": clients,
                "server-seconds": self.server_seconds, "compute-source": "measured", **exchange_fields(acc),
                "wall-seconds": time.perf_counter() - self.started}


class _Timer:
    def __init__(self, tally: RoundTally):
        self.tally = tally

    def __enter__(self):
        self.t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.tally.server_seconds += time.perf_counter() - self.t
        return False


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value) else 0.0


@dataclass(frozen=True)
class RunContext:
    """One run's fixed facts, handed to every round."""

    relay: Relay
    topology: topo_lib.Topology
    server: int
    initial: ArrayRecord
    train_config: ConfigRecord
    peers: tuple[int, ...]


class FrameworkRunner:
    """Base of :class:`~.kd.KDRunner` and :class:`~.split.SplitRunner` (see the module docstring).

    Subclasses set ``name`` and ``framework`` and implement :meth:`describe` (what goes on the
    record: rule, layout, the framework's own parameters), :meth:`begin` (per-run state) and
    :meth:`run_round`. ``identities`` resolve node ids (the ServerApp's Roster); ``trail`` is an
    optional audit trail (``fedledger.chain.trail.LedgerTrail``); ``max_examples`` bounds a
    reply's ``num-examples``.
    """

    name = "framework"
    framework = "?"

    def __init__(self, topology: topo_lib.Topology, *, identities: Identities, trail: AuditTrail | None = None,
                 local_steps: int = 1, seed: int = 0, max_examples: int = 10**9, timeout: float = 3600.0) -> None:
        if not isinstance(topology, topo_lib.Topology):
            raise TypeError(f"topology must be a Topology, got {type(topology).__name__}")
        if int(local_steps) < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        self.topology, self.identities, self.trail = topology, identities, trail
        self.local_steps, self.seed, self.max_examples, self.timeout = int(local_steps), int(seed), int(max_examples), timeout
        self.history: list[dict] = []
        self.reports: dict[int, RoundReport] = {}

    # ------------------------------------------------------------------ the run
    def run(self, grid: Grid, peers: Mapping[int, int], initial_arrays: ArrayRecord, num_rounds: int, *,
            train_config: ConfigRecord | None = None, evaluate_fn: EvaluateFn | None = None) -> FrameworkResult:
        """Run ``num_rounds`` rounds among ``peers`` (partition -> Flower node id).

        ``evaluate_fn(round, arrays)`` evaluates the global adapter after each round (round 0:
        the initial one); ``arrays`` is None when the clients evaluated their own models (the
        round's entry then holds ``client-eval``)."""
        peers = _checked_peers(peers)
        if int(num_rounds) < 1:
            raise ValueError(f"num_rounds must be >= 1, got {num_rounds}")
        topology = self.topology
        if not set(peers) <= set(topology.nodes):
            raise topo_lib.TopologyError(f"topology has peers {topology.nodes[:10]} but the run has partitions "
                                         f"{sorted(peers)[:10]}")
        if set(peers) != set(topology.nodes):  # a node that never proved who it is takes no part
            topology = topology.subgraph(sorted(peers))
        nbytes = sum(a.numpy().nbytes for a in initial_arrays.values())
        run = RunContext(relay=Relay(grid, peers, "train", self.timeout, owner=type(self).__name__),
                         topology=topology, server=topology.centre(nbytes), initial=initial_arrays,
                         train_config=train_config if train_config is not None else ConfigRecord(),
                         peers=tuple(sorted(peers)))
        log.info("%s: %s over %s clients", type(self).__name__, self.framework, len(peers))
        self.history, self.reports = [], {}
        self.begin(run)
        if self.trail is not None:   # the run's initial global on chain: what round 1 sends (and clients check)
            self.trail.begin(self.describe(), self.initial_global(), grid)
        if evaluate_fn is not None:
            evaluate_fn(0, initial_arrays)
        current: ArrayRecord | None = initial_arrays
        for server_round in range(1, int(num_rounds) + 1):
            tally = RoundTally(run.relay, run.topology, run.server)
            outcome = self.run_round(run, server_round, tally)
            outcome.report.bytes_sent = int(sum(c["bytes-down"] for c in tally.clients.values()))
            outcome.report.bytes_received = int(sum(c["bytes-up"] for c in tally.clients.values()))
            participants = [k["partition"] for k in outcome.report.kept if k.get("partition") is not None]
            entry = {**tally.entry(server_round, self.name, participants,
                                   set(run.peers) - set(participants)), **outcome.entry}
            self.history.append(entry)
            self.reports[server_round] = outcome.report
            if outcome.arrays is not None:
                current = outcome.arrays
            if evaluate_fn is not None:
                evaluate_fn(server_round, outcome.evaluate)
        return FrameworkResult(self.final(current), dict(self.reports), list(self.history))

    def final(self, current: ArrayRecord | None) -> ArrayRecord | None:
        return current

    # ------------------------------------------------------------------ for subclasses
    def describe(self) -> dict:
        raise NotImplementedError

    def begin(self, run: RunContext) -> None:
        """Reset per-run state before the first round."""

    def initial_global(self) -> Mapping[str, np.ndarray]:
        """The global model round 1 sends (after :meth:`begin`): the run's initial global on chain."""
        raise NotImplementedError

    def instruction(self, server_round: int) -> ConfigRecord | None:
        """The round's ``audit`` instruction (what a client signs under and checks on chain), for
        the round's current global (:meth:`initial_global` in round 1); None when not audited."""
        if self.trail is None:
            return None
        return ConfigRecord(dict(self.trail.instruction(server_round, self.current_global(), NUM_EXAMPLES)))

    def current_global(self) -> Mapping[str, np.ndarray]:
        """The global model this round sends (the chain's current global)."""
        raise NotImplementedError

    def run_round(self, run: RunContext, server_round: int, tally: RoundTally) -> RoundOutcome:
        raise NotImplementedError


__all__ = ["CLIENT_FIELDS", "FrameworkResult", "FrameworkRunner", "RoundOutcome", "RoundTally", "RunContext"]
