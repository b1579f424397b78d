"""``StrategyWrapper``: the base for behaviour added around *any* Flower Message-API strategy.

It forwards the five Strategy methods to ``inner`` and inherits ``Strategy.start``, so the
round loop calls the wrapper first. Subclasses override only what they change, e.g.
``ValidateUpdates(FedAvg())`` or ``PageRankTrust(Krum())``.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy


class StrategyWrapper(Strategy):
    """Delegate every Strategy method to ``inner``; attribute look-ups fall through too."""

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner

    def __getattr__(self, name: str):
        # Only called when normal lookup fails: expose the inner strategy's attributes.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.inner.aggregate_train(server_round, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.inner.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.inner.summary()

    def innermost(self) -> Strategy:
        """The strategy at the centre of a stack of wrappers."""
        s = self.inner
        while isinstance(s, StrategyWrapper):
            s = s.inner
        return s
