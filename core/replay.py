"""Replay a recorded run's aggregation: the auditor's recomputation of every aggregate.

The run's record (``RoundPipeline.describe()``) names the rule (class, module, constructor
arguments) and the trust stage; each round's record holds the global adapter the round started
from, the accepted updates in record order and the trust decision. :class:`Replay` builds a
*fresh* instance of the rule and feeds it the rounds in order, through the same
``apply_decision`` + ``aggregate_contributions`` code the pipeline ran, so for a deterministic
rule the recomputed aggregate is bit-identical to an honest aggregator's. Stateful rules
(FedAdam, FedYogi, FedAdagrad, FedAvgM) are replayed round by round, so their server state is
rebuilt too. A rule the auditor cannot rebuild (a user's own class, a custom callable, a DP
wrapper that adds noise) gets a reason instead of a result: the audit then says it did not
recompute that aggregate. KD-FedLLM's rule (``core.softlabels``, ``SoftLabelAverage``) is
replayed the same way: the recorded logit replies, weights and trust decision give the
aggregated soft labels again, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from . import softlabels
from .pipeline import aggregate_contributions, reply_metadata, strategy_class, to_record
from .trust import TrustDecision, apply_decision
from .update import Layout


class Replay:
    """Recompute aggregates of one recorded run, round by round (call :meth:`round` in order)."""

    def __init__(self, run: Mapping):
        spec = dict(run.get("rule") or {})
        self.rule = spec.get("name", "?")
        self.reason: str | None = None
        self.strategy = None
        layout = run.get("layout")
        self.layout = Layout({n: (tuple(s), np.dtype(d)) for n, s, d in layout}) if layout else None
        cls = strategy_class(spec)
        self.soft: dict | None = None
        if self.rule == softlabels.RULE and spec.get("module") == softlabels.__name__:
            self.soft = dict(spec.get("params", {}))
        elif self.layout is None:
            self.reason = "the run's record has no adapter layout"
        elif cls is None:
            why = f"custom callables {spec['custom']}" if spec.get("custom") else \
                f"{spec.get('module', '?')}.{self.rule} is not one of Flower's deterministic rules"
            self.reason = f"{self.rule} cannot be recomputed by the auditor ({why})"
        else:
            try:
                with _quiet_flower():  # e.g. FedAvg's "fraction_evaluate is set to 0.0": not the auditor's business
                    self.strategy = cls(**spec.get("params", {}))
            except TypeError as exc:
                self.reason = f"{self.rule} could not be rebuilt from its recorded parameters ({exc})"

    @property
    def ok(self) -> bool:
        return self.strategy is not None or self.soft is not None

    def round(self, server_round: int, global_arrays: Mapping[str, np.ndarray],
              entries: Sequence[tuple[str, int, Mapping[str, np.ndarray], int]], trust: Mapping | None
              ) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """``entries``: (identity key, node id, arrays, num-examples) in record order.
        Returns (recomputed aggregate or None, error of the rule or None)."""
        if self.soft is not None:
            decision = TrustDecision.from_dict(trust) if trust else None
            contributions = apply_decision([(k, a, ne) for k, _, a, ne in entries], {}, decision)
            return softlabels.aggregate(contributions, float(self.soft["temperature"]), int(self.soft["vocab-size"])), None
        if self.strategy is None:
            raise RuntimeError(self.reason)
        ordered = {n: np.asarray(global_arrays[n]) for n in self.layout.names}
        with _task_identity(), _quiet_flower():
            self.strategy.configure_train(server_round, to_record(ordered), ConfigRecord(), _ReplayGrid(self.strategy))
        decision = TrustDecision.from_dict(trust) if trust else None
        contributions = apply_decision([(k, {n: a[n] for n in self.layout.names}, ne) for k, _, a, ne in entries],
                                       ordered, decision)
        node_of = {k: node for k, node, _, _ in entries}
        metadata = [reply_metadata(node_of[c.key], server_round) for c in contributions]
        with _quiet_flower():
            aggregate, _, error = aggregate_contributions(self.strategy, server_round, contributions, metadata,
                                                          self.layout)
        return aggregate, error


class _ReplayGrid(Grid):
    """Enough of a Grid for a strategy's ``configure_train`` to run (it only samples node ids)."""

    def __init__(self, strategy):
        need = max(int(getattr(strategy, "min_available_nodes", 1)), int(getattr(strategy, "min_train_nodes", 1)), 1)
        self._ids = list(range(1, need + 1))

    def get_node_ids(self) -> Iterable[int]:
        return list(self._ids)

    def set_run(self, run_id):  # pragma: no cover - never called in a replay
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *a, **k):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


@contextlib.contextmanager
def _quiet_flower():
    """Flower's strategies log their sampling and warnings at INFO/WARNING; a replay is silent."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _task_identity():
    """Flower's ``Message()`` reads a process-wide task identity; an auditor's process has none."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    if saved[0] is None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


__all__ = ["Replay"]
