"""``RoundPipeline``: the one path every hub round takes, around any Flower Message-API strategy.

    decode each reply once (core.update) -> identify (node id -> Identity, resolved once)
    -> verify signed records (audit trail) -> record what was received and rejected (audit trail)
    -> score and filter by trust (trust stage) -> aggregate with the wrapped strategy -> commit

Each step is a small, optional stage given to the constructor; the template below reads top to
bottom and every round ends in one :class:`RoundReport`. The public wrappers are the same
pipeline with one stage each, so they compose in any order into *one* pipeline (one decode, one
policy): ``OnChainAudit(PageRankTrust(Krum()))`` == ``PageRankTrust(OnChainAudit(Krum()))``.

A reply never ends the run: malformed replies are rejected at the boundary with a reason, and
an exception raised by the wrapped strategy's ``aggregate_train`` / ``aggregate_evaluate`` is
caught, logged and recorded (the global model stays as it was). The aggregate is returned in
the adapter's own dtypes (Flower's FedAdam, for one, computes in float64).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from .aggregate import FusedMean, fast_rule, weighted_mean
from .trust import Contribution, TrustDecision, apply_decision
from .update import (
    AUDIT_KEY, NUM_EXAMPLES, BoundaryError, Identity, Layout, Rejected, Update, all_finite, decode_evaluate_reply,
    decode_global, decode_replies, encode_array, is_no_reply, payload_nbytes,
)

log = logging.getLogger("fedledger")

DEFAULT_MAX_EXAMPLES = 10**9


# ---------------------------------------------------------------------------- stage protocols
@runtime_checkable
class Identities(Protocol):
    """Node id -> Identity, resolved once per node by whoever builds the pipeline."""

    def refresh(self, grid: Grid) -> None: ...

    def resolve(self, node_id: int) -> Identity | None: ...


class NodeIdentities:
    """The default: a node is known by its Flower node id only (what a plain Flower app has)."""

    def refresh(self, grid: Grid) -> None:
        return None

    def resolve(self, node_id: int) -> Identity | None:
        return Identity(int(node_id))


class TrustStage(Protocol):
    def decide(self, server_round: int, updates: Sequence[Update], global_arrays: Mapping[str, np.ndarray]
               ) -> TrustDecision: ...

    def describe(self) -> dict: ...


class AuditTrail(Protocol):
    """Where the round is recorded (``fedledger.chain.trail.LedgerTrail``)."""

    def begin(self, run: dict, global_arrays: Mapping[str, np.ndarray], grid: Grid) -> None:
        """Once, before the first instructions go out: ``run`` is :meth:`RoundPipeline.describe`."""

    def instruction(self, server_round: int, global_arrays: Mapping[str, np.ndarray], weight_key: str
                    ) -> Mapping[str, int | str]:
        """What every train instruction of the round carries as its ``audit`` ConfigRecord (what a
        client needs to sign and check its commitment)."""

    def verify(self, server_round: int, update: Update) -> tuple[str | None, str | None]:
        """(verified signer or None for an accepted unsigned update, rejection reason or None)."""

    def record(self, server_round: int, global_arrays: Mapping[str, np.ndarray], updates: Sequence[Update],
               rejected: Sequence[Rejected]) -> None: ...

    def commit(self, server_round: int, aggregate: Mapping[str, np.ndarray] | None, report: "RoundReport") -> None: ...


class Observer(Protocol):
    """Adds fields to the round report (e.g. network accounting); never changes the aggregate."""

    def observe(self, report: "RoundReport") -> dict: ...


# ---------------------------------------------------------------------------- the report
@dataclass
class RoundReport:
    """Everything one round did, for ``metrics.json`` and the per-round log line."""

    round: int
    started: float = field(default_factory=time.perf_counter)  # perf_counter() when the round was configured
    finished: float | None = None                              # ... when its aggregation was committed
    sent: int = 0                                    # train messages sent
    bytes_sent: int = 0
    bytes_received: int = 0
    down_bytes: dict[int, int] = field(default_factory=dict)   # node id -> bytes sent to it
    up_bytes: dict[int, int] = field(default_factory=dict)     # node id -> bytes received from it
    received: int = 0
    kept: list[dict] = field(default_factory=list)             # identity + num-examples of each accepted update
    rejected: list[dict] = field(default_factory=list)         # identity + reason + stage
    distrusted: list[dict] = field(default_factory=list)       # identities the trust stage excluded
    trust: dict | None = None                                  # the trust decision as recorded
    aggregated: int = 0                                        # updates that entered the aggregate
    aggregate_error: str | None = None
    metrics: dict = field(default_factory=dict)                # aggregated train metrics
    seconds: dict = field(default_factory=dict)                # per phase
    extra: dict = field(default_factory=dict)                  # observers' fields (exchange, ledger ...)
    record: dict = field(default_factory=dict)                 # fields the round adds to its ledger document

    def to_dict(self) -> dict:
        d = {"round": self.round, "sent": self.sent, "bytes-sent": self.bytes_sent,
             "bytes-received": self.bytes_received, "received": self.received, "kept": self.kept,
             "rejected": self.rejected, "distrusted": self.distrusted, "trust": self.trust,
             "aggregated": self.aggregated, "aggregate-error": self.aggregate_error, "metrics": self.metrics,
             "seconds": {k: round(v, 4) for k, v in self.seconds.items()},
             "wall-seconds": None if self.finished is None else round(self.finished - self.started, 4)}
        d.update(self.extra)
        return d


# ---------------------------------------------------------------------------- the rule on record
#: Flower strategies whose aggregate is a deterministic function of the replies (and, for the
#: stateful ones, of the earlier rounds): the auditor can replay them (core.replay).
REPLAYABLE = {"FedAvg", "FedProx", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan", "FedAdam",
              "FedYogi", "FedAdagrad", "FedAvgM"}


_METRICS_ONLY = ("train_metrics_aggr_fn", "evaluate_metrics_aggr_fn")


def describe_strategy(strategy: Strategy) -> dict:
    """``{"name", "module", "params"}``: the constructor arguments the strategy holds as
    attributes (JSON scalars only), enough for :mod:`core.replay` to rebuild it. A callable
    argument that is not Flower's default marks the rule ``"custom": true`` (not replayable)."""
    cls = type(strategy)
    params, custom = {}, []
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or not hasattr(strategy, name):
            continue
        value = getattr(strategy, name)
        if value is None or isinstance(value, (bool, int, float, str)):
            params[name] = value
        elif callable(value):
            if name in _METRICS_ONLY or getattr(value, "__name__", "") == "select_multikrum":
                continue  # metric aggregation never touches the arrays; select_multikrum is Bulyan's default
            custom.append(name)
    out = {"name": cls.__name__, "module": cls.__module__, "params": params}
    if custom:
        out["custom"] = sorted(custom)
    return out


# ---------------------------------------------------------------------------- aggregation
def reply_metadata(node_id: int, server_round: int, run_id: int = 0) -> Metadata:
    """Metadata of a synthetic train reply from ``node_id`` (replay, tests): no Flower runtime needed."""
    return Metadata(run_id=int(run_id), message_id="", src_node_id=int(node_id), dst_node_id=0,
                    reply_to_message_id="", group_id=str(server_round), created_at=0.0, ttl=3600.0,
                    message_type="train")


def aggregate_contributions(strategy: Strategy, server_round: int, contributions: Sequence[Contribution],
                            metadata: Sequence[Metadata], layout: Layout, metrics: Sequence[Mapping] | None = None,
                            originals: Sequence[ArrayRecord] | None = None, fused: FusedMean | None = None
                            ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None, str | None]:
    """Aggregate the contributions as ``strategy.aggregate_train`` does, on clean replies, in order.

    Returns (aggregate in the layout's dtypes, aggregated metrics, error). The pipeline and the
    auditor's replay both call this, so a recomputed aggregate is produced by the same code.
    Each reply carries one ArrayRecord under the strategy's ``arrayrecord_key`` and one
    MetricRecord with the metric keys *all* contributions share plus the weight.

    For Flower's own FedAvg and FedProx (``core.aggregate.fast_rule``) the arrays are averaged
    by ``core.aggregate.weighted_mean`` straight from the decoded views (Flower's arithmetic,
    bit for bit) and the metrics by the strategy's own ``train_metrics_aggr_fn``; every other
    rule gets the replies through its own ``aggregate_train``. ``fused``: the sum the boundary's
    finiteness pass already computed (``core.aggregate.FusedMean``), used when it is exactly
    this sum.
    """
    if not contributions:
        return None, None, None
    weight_key = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
    arrays_key = getattr(strategy, "arrayrecord_key", "arrays")
    metrics = list(metrics) if metrics is not None else [{} for _ in contributions]
    shared = set.intersection(*(set(m) for m in metrics)) - {weight_key} if metrics else set()
    mrecs = [MetricRecord({**{k: m[k] for k in sorted(shared)}, weight_key: c.weight})
             for c, m in zip(contributions, metrics, strict=True)]
    if fast_rule(strategy) and all(d.kind == "f" for _, d in layout.specs.values()):
        return _weighted_mean_rule(strategy, contributions, mrecs, layout, arrays_key, originals, fused)
    messages = []
    for i, (c, meta, mrec) in enumerate(zip(contributions, metadata, mrecs, strict=True)):
        record = _record_of(c, originals[i] if originals is not None else None)
        messages.append(Message(content=RecordDict({arrays_key: record, "metrics": mrec}), metadata=meta))
    try:
        arrays, agg_metrics = strategy.aggregate_train(server_round, messages)
    except Exception as exc:  # noqa: BLE001  (a strategy must not end the run)
        return None, None, f"{type(strategy).__name__}.aggregate_train raised {type(exc).__name__}: {exc}"
    if arrays is None:
        return None, agg_metrics, None
    try:
        out = _normalise(arrays, layout)
    except BoundaryError as exc:
        return None, agg_metrics, f"{type(strategy).__name__} returned an unusable aggregate: {exc}"
    return out, agg_metrics, None


def _record_of(c: Contribution, original: ArrayRecord | None) -> ArrayRecord:
    """The reply's own ArrayRecord when the contribution is unchanged, else a new one."""
    if original is not None and not c.changed:
        return original
    return to_record(c.arrays)


def _weighted_mean_rule(strategy: Strategy, contributions: Sequence[Contribution], mrecs: Sequence[MetricRecord],
                        layout: Layout, arrays_key: str, originals: Sequence[ArrayRecord] | None,
                        fused: FusedMean | None = None
                        ) -> tuple[dict[str, np.ndarray] | None, MetricRecord | None, str | None]:
    """FedAvg / FedProx: the arrays by ``weighted_mean`` (Flower's arithmetic), the metrics by the
    strategy's ``train_metrics_aggr_fn`` on the replies' records, as its ``aggregate_train`` does."""
    name = type(strategy).__name__
    weight_key = getattr(strategy, "weighted_by_key", NUM_EXAMPLES)
    arrays = [None if c.changed else c.arrays for c in contributions]
    weights = [m[weight_key] for m in mrecs]
    out = fused.take(arrays, weights) if fused is not None else None
    proven_finite = out is not None
    if out is None:
        out = weighted_mean([c.arrays for c in contributions], weights, layout)
    fn = getattr(strategy, "train_metrics_aggr_fn", None) or aggregate_metricrecords
    if fn is aggregate_metricrecords:  # Flower's default reads the MetricRecords only
        contents = [RecordDict({"metrics": m}) for m in mrecs]
    else:  # a user's function may look at the arrays too
        contents = [RecordDict({arrays_key: _record_of(c, originals[i] if originals is not None else None),
                                "metrics": m}) for i, (c, m) in enumerate(zip(contributions, mrecs, strict=True))]
    try:
        agg_metrics = fn(contents, weight_key)
    except Exception as exc:  # noqa: BLE001
        return None, None, f"{name}.train_metrics_aggr_fn raised {type(exc).__name__}: {exc}"
    bad = None if proven_finite else next((k for k, v in out.items() if v.dtype.kind == "f" and not all_finite(v)),
                                          None)
    if bad is not None:
        return None, agg_metrics, f"{name} returned an unusable aggregate: {bad}: NaN/Inf values"
    return out, agg_metrics, None


def _normalise(arrays: ArrayRecord, layout: Layout) -> dict[str, np.ndarray]:
    """The aggregate with the global adapter's names, shapes and dtypes; finite."""
    got = {k: a.numpy() for k, a in arrays.items()}
    if set(got) != set(layout.specs):
        raise BoundaryError("tensor names differ from the global adapter's")
    out = {}
    for name, (shape, dtype) in layout.specs.items():
        v = np.asarray(got[name])
        if tuple(v.shape) != tuple(shape):
            raise BoundaryError(f"{name}: shape {v.shape} != {shape}")
        v = np.ascontiguousarray(v, dtype=dtype)
        if not np.isfinite(v).all():
            raise BoundaryError(f"{name}: NaN/Inf values")
        out[name] = v
    return out


def to_record(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of ``arrays`` (names kept), each encoded with one copy (``encode_array``)."""
    record = ArrayRecord()
    for k, v in arrays.items():
        record[k] = encode_array(v)  # set item by item: ArrayRecord({...}) would rebuild every Array
    return record


# ---------------------------------------------------------------------------- the pipeline
class RoundPipeline(Strategy):
    """Run ``strategy`` behind one decode, an identity, an optional audit trail and trust stage.

    Parameters
    ----------
    strategy : Strategy
        Any Flower Message-API strategy (``FedAvg``, ``Krum``, ... or your own). A
        ``RoundPipeline`` given here is merged: its stages join this one's (one stage per kind).
    trust : TrustStage, optional
        Scores the decoded updates and decides who is left out and how kept ones are clipped.
    trail : AuditTrail, optional
        Verifies each update's signed record and records the round (e.g. on a ledger).
    identities : Identities, optional
        Node id -> Identity. Default: the node id alone.
    observers : sequence of Observer
        Add fields to each round's report (network accounting, ...).
    max_examples : int
        Upper bound of a reply's ``num-examples`` (default 10**9; the fedledger ServerApp sets
        the training-set size).
    checkpoint : core.checkpoint.Checkpoint, optional
        Saved after every completed round (after the trail committed it); ``core.checkpoint.resume``
        and ``start(..., first_round=r + 1)`` continue a run from it.
    """

    def __init__(self, strategy: Strategy, *, trust: TrustStage | None = None, trail: AuditTrail | None = None,
                 identities: Identities | None = None, observers: Sequence[Observer] = (),
                 max_examples: int | None = None, checkpoint=None) -> None:
        if isinstance(strategy, RoundPipeline):  # compose: one pipeline, one decode, one policy
            inner = strategy
            trust = _one("trust stage", trust, inner.trust)
            trail = _one("audit trail", trail, inner.trail)
            identities = identities if identities is not None else (
                None if isinstance(inner.identities, NodeIdentities) else inner.identities)
            observers = (*inner.observers, *observers)
            max_examples = max_examples if max_examples is not None else inner.max_examples
            checkpoint = _one("checkpoint", checkpoint, inner.checkpoint)
            strategy = inner.strategy
        if not isinstance(strategy, Strategy):
            raise TypeError(f"expected a Flower Strategy, got {type(strategy).__name__}")
        self.strategy = strategy
        self.trust = trust
        self.trail = trail
        self.identities: Identities = identities if identities is not None else NodeIdentities()
        self.observers = tuple(observers)
        self.max_examples = int(max_examples if max_examples is not None else DEFAULT_MAX_EXAMPLES)
        self.checkpoint = checkpoint
        self.reports: dict[int, RoundReport] = {}
        self._global: dict[str, np.ndarray] | None = None
        self._layout: Layout | None = None
        self._begun = False

    # ----------------------------------------------------------------- resume
    def mark_begun(self) -> None:
        """The run began before (a resumed run): the trail's ``begin`` is not called again."""
        self._begun = True

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn=None, *, first_round: int = 1):
        """Flower's ``Strategy.start``; with ``first_round`` > 1 (a resumed run) the rounds
        ``first_round .. num_rounds`` run the same steps from ``initial_arrays`` (the global
        after round ``first_round - 1``), without the initial evaluation."""
        if first_round == 1:
            return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config,
                                 evaluate_fn)
        from flwr.serverapp.strategy.result import Result

        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(), initial_arrays
        result.arrays = initial_arrays
        log.info("resuming at round %s of %s", first_round, num_rounds)
        for rnd in range(int(first_round), int(num_rounds) + 1):
            replies = grid.send_and_receive(self.configure_train(rnd, arrays, train_config, grid), timeout=timeout)
            agg, train_metrics = self.aggregate_train(rnd, replies)
            if agg is not None:
                result.arrays = arrays = agg
            if train_metrics is not None:
                result.train_metrics_clientapp[rnd] = train_metrics
            replies = grid.send_and_receive(self.configure_evaluate(rnd, arrays, evaluate_config, grid),
                                            timeout=timeout)
            eval_metrics = self.aggregate_evaluate(rnd, replies)
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[rnd] = eval_metrics
            if evaluate_fn:
                res = evaluate_fn(rnd, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[rnd] = res
        return result

    # ----------------------------------------------------------------- description
    def describe(self) -> dict:
        """What the round does, on the record: the rule, the trust stage, the limits."""
        return {"rule": describe_strategy(self.strategy),
                "trust": self.trust.describe() if self.trust is not None else None,
                "max-examples": self.max_examples,
                "layout": [[n, list(s), d.str] for n, (s, d) in self._layout.specs.items()] if self._layout else None}

    def summary(self) -> None:
        stages = ["decode"] + [name for name, s in (("identities", self.identities), ("audit trail", self.trail),
                                                    ("trust", self.trust)) if s is not None]
        log.info("round pipeline: %s -> %s", " -> ".join(stages), type(self.strategy).__name__)
        self.strategy.summary()

    # ----------------------------------------------------------------- train
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        self.identities.refresh(grid)
        self._global = decode_global(arrays)
        self._layout = Layout.of(self._global)
        if self.trail is not None and not self._begun:
            self.trail.begin(self.describe(), self._global, grid)
        self._begun = True
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.trail is not None:
            weight_key = getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES)
            instruction = ConfigRecord(dict(self.trail.instruction(server_round, self._global, weight_key)))
            for m in messages:
                m.content[AUDIT_KEY] = instruction
        report = RoundReport(server_round, sent=len(messages))
        for m in messages:
            n = payload_nbytes(m)
            report.down_bytes[int(m.metadata.dst_node_id)] = n
            report.bytes_sent += n
        self.reports[server_round] = report
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._global is None:
            raise RuntimeError("RoundPipeline.aggregate_train needs configure_train first (the global adapter)")
        replies = list(replies)
        missing = [m for m in replies if is_no_reply(m)]
        if missing:   # Flower's stand-ins for nodes that went away mid-round: dropouts, not refusals
            log.warning("round %s: %d node(s) did not reply (%s); the round goes on with the others",
                        server_round, len(missing), missing[0].error.reason)
            replies = [m for m in replies if not is_no_reply(m)]
        report = self.reports.setdefault(server_round, RoundReport(server_round))
        clock = _Clock(report)
        report.received = len(replies)
        for m in replies:
            n = payload_nbytes(m)
            report.up_bytes[int(m.metadata.src_node_id)] = n
            report.bytes_received += n

        # 1. decode each reply once, at the boundary (a plain FedAvg round sums while it checks)
        fused = FusedMean(self._layout) if self._fusable() else None
        updates, rejected = decode_replies(replies, self._layout, self.max_examples,
                                           getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES), finite_check=fused)
        # 2. who sent it: the identity resolved once for that node, never what the reply says
        updates, rejected = self._identify(updates, rejected)
        # 3. signed records (an audit trail verifies them; the signer joins the identity)
        if self.trail is not None:
            updates, rejected = self._verify(server_round, updates, rejected)
        clock.lap("decode")
        # 4. record what was received and what was refused, before anything else happens
        if self.trail is not None:
            self.trail.record(server_round, self._global, updates, rejected)
        clock.lap("record")
        # 5. trust: who is left out, how the kept updates are clipped or weighted
        decision = self.trust.decide(server_round, updates, self._global) if (self.trust and updates) else None
        contributions = apply_decision([(u.identity.key, u.arrays, u.num_examples) for u in updates],
                                       self._global, decision)
        clock.lap("trust")
        # 6. aggregate with the wrapped strategy, on clean replies in record order
        by_key = {u.identity.key: u for u in updates}
        kept = [by_key[c.key] for c in contributions]
        aggregate, metrics, error = aggregate_contributions(
            self.strategy, server_round, contributions, [u.message.metadata for u in kept], self._layout,
            [u.metrics for u in kept], _Originals(kept, self._layout), fused)
        clock.lap("aggregate")
        self._fill(report, updates, rejected, decision, kept, metrics, error)
        if error:
            log.warning("round %s: %s; the global adapter is unchanged", server_round, error)
        elif aggregate is None and updates:
            log.warning("round %s: %s aggregated nothing; the global adapter is unchanged", server_round,
                        type(self.strategy).__name__)
        elif not updates:
            log.warning("round %s: no valid update; the global adapter is unchanged", server_round)
        # 7. commit the aggregate and the round's record
        if self.trail is not None:
            self.trail.commit(server_round, aggregate, report)
        clock.lap("commit")
        report.finished = time.perf_counter()
        for observer in self.observers:
            report.extra.update(observer.observe(report))
        if self.checkpoint is not None:   # the round is complete: a resume starts after it
            self.checkpoint.save(self, server_round, aggregate if aggregate is not None else self._global)
        return (to_record(aggregate) if aggregate is not None else None), metrics

    # ----------------------------------------------------------------- evaluate
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        clean, weight_key = [], getattr(self.strategy, "weighted_by_key", NUM_EXAMPLES)
        decoded = []
        for msg in replies:
            try:
                decoded.append((msg, decode_evaluate_reply(msg, self.max_examples, weight_key)))
            except BoundaryError as exc:
                log.warning("round %s: evaluate reply of node %s rejected: %s", server_round,
                            msg.metadata.src_node_id, exc)
        if not decoded:
            return None
        shared = set.intersection(*(set(m) for _, m in decoded))
        for msg, m in decoded:
            clean.append(Message(content=RecordDict({"metrics": MetricRecord({k: m[k] for k in sorted(shared)})}),
                                 metadata=msg.metadata))
        try:
            return self.strategy.aggregate_evaluate(server_round, clean)
        except Exception as exc:  # noqa: BLE001
            log.warning("round %s: %s.aggregate_evaluate raised %s: %s", server_round, type(self.strategy).__name__,
                        type(exc).__name__, exc)
            return None

    # ----------------------------------------------------------------- steps
    def _fusable(self) -> bool:
        """Whether the finiteness pass can compute the aggregate too: Flower's own FedAvg/FedProx
        arithmetic on a float layout, and no trust stage (whose decision would change the sum)."""
        return (self.trust is None and fast_rule(self.strategy)
                and all(d.kind == "f" for _, d in self._layout.specs.values()))

    def _identify(self, updates: list[Update], rejected: list[Rejected]) -> tuple[list[Update], list[Rejected]]:
        return identify_updates(self.identities, updates, rejected)

    def _verify(self, server_round: int, updates: list[Update], rejected: list[Rejected]
                ) -> tuple[list[Update], list[Rejected]]:
        return verify_updates(self.trail, server_round, updates, rejected)

    def _fill(self, report: RoundReport, updates, rejected, decision, kept, metrics, error) -> None:
        fill_report(report, updates, rejected, decision, len(kept), metrics, error)


# ---------------------------------------------------------------------------- shared steps
def identify_updates(identities: Identities, updates: Sequence[Update], rejected: Sequence[Rejected]
                     ) -> tuple[list[Update], list[Rejected]]:
    """Step 2: each update gets the identity resolved once for its node (unknown nodes and a second
    reply of one identity are rejected); rejected replies get theirs too. The KD and split runners
    call this as the pipeline does."""
    out, refused = [], [_with_identity(identities, r) for r in rejected]
    seen: set[str] = set()
    for u in updates:
        ident = identities.resolve(u.node_id)
        if ident is None:
            refused.append(Rejected(u.node_id, "node is not part of this run (no identity)", "identity"))
        elif ident.key in seen:
            refused.append(Rejected(u.node_id, f"{ident.key} already replied in this round", "identity", ident))
        else:
            seen.add(ident.key)
            out.append(u.with_identity(ident))
    return out, refused


def fill_report(report: RoundReport, updates: Sequence[Update], rejected: Sequence[Rejected],
                decision: TrustDecision | None, aggregated: int, metrics, error: str | None) -> None:
    """The round's outcome into ``report`` (kept, rejected with a log line each, trust, counts)."""
    report.kept = [{**u.identity.to_dict(), "num-examples": u.num_examples, "metrics": dict(u.metrics)}
                   for u in updates]
    report.rejected = [r.to_dict() for r in rejected]
    for r in rejected:
        log.warning("round %s: rejected the reply of node %s%s: %s", report.round, r.node_id,
                    f" ({r.identity.key})" if r.identity and r.identity.partition is not None else "", r.reason)
    if decision is not None:
        report.trust = decision.to_dict()
        excluded = set(decision.excluded)
        report.distrusted = [u.identity.to_dict() for u in updates if u.identity.key in excluded]
    report.aggregated = aggregated if not error else 0
    report.aggregate_error = error
    report.metrics = {k: v for k, v in dict(metrics or {}).items() if isinstance(v, (int, float))}


def _with_identity(identities: Identities, r: Rejected) -> Rejected:
    ident = identities.resolve(r.node_id) if r.node_id >= 0 else None
    return Rejected(r.node_id, r.reason, r.stage, ident)


def verify_updates(trail: AuditTrail, server_round: int, updates: Sequence[Update], rejected: Sequence[Rejected]
                   ) -> tuple[list[Update], list[Rejected]]:
    """Step 3: the trail checks each update's signed record; the verified signer joins the identity."""
    out, rejected = [], list(rejected)
    for u in updates:
        signer, reason = trail.verify(server_round, u)
        if reason is not None:
            rejected.append(Rejected(u.node_id, reason, "signature", u.identity))
            continue
        if signer is not None and u.identity.signer is None:
            u = u.with_identity(Identity(u.identity.node_id, u.identity.partition, signer))
        out.append(u)
    return out, rejected


def _arrayrecord(update: Update, layout: Layout) -> ArrayRecord:
    """A new ArrayRecord holding the reply's own (validated) Array objects in the layout's order:
    nothing is re-encoded, and a strategy that empties its input (Flower's Bulyan and
    FedTrimmedAvg pop the arrays they read) never touches the reply itself."""
    (rec,) = update.message.content.array_records.values()
    out = ArrayRecord()
    for name in layout.names:
        out[name] = rec[name]
    return out


class _Originals(Sequence):
    """The kept replies' own ArrayRecords, built only when a rule needs them (the FedAvg fast
    path reads the decoded views instead)."""

    def __init__(self, updates: Sequence[Update], layout: Layout):
        self.updates, self.layout = updates, layout

    def __len__(self) -> int:
        return len(self.updates)

    def __getitem__(self, i):
        return _arrayrecord(self.updates[i], self.layout)


def _one(what: str, a, b):
    if a is not None and b is not None and a is not b:
        raise ValueError(f"two {what}s in one pipeline; compose wrappers with one {what} each")
    return a if a is not None else b


class _Clock:
    def __init__(self, report: RoundReport):
        self.report, self.t = report, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.report.seconds[name] = self.report.seconds.get(name, 0.0) + now - self.t
        self.t = now


def strategy_class(spec: Mapping) -> type | None:
    """The class a :func:`describe_strategy` spec names, if it is one of Flower's replayable rules."""
    if spec.get("custom") or spec.get("name") not in REPLAYABLE or not str(spec.get("module", "")).startswith("flwr."):
        return None
    try:
        return getattr(importlib.import_module(spec["module"]), spec["name"])
    except (ImportError, AttributeError):
        return None
