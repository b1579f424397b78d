"""``ValidateUpdates``: drop malformed client updates before any strategy sees them.

Flower's FedAvg family aborts the whole aggregation when one reply is inconsistent. This
wrapper checks each reply against the layout of the arrays sent in ``configure_train``
(same names, same shapes, finite floats, a positive ``num-examples``), logs the reason for
every rejected reply, and hands only the good ones to the wrapped strategy, so the round goes
on without the bad ones. It also counts the bytes sent and received per round.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .kernels import filter_valid_replies, layout, message_nbytes
from .wrapper import StrategyWrapper

log = logging.getLogger("fedledger")


class ValidateUpdates(StrategyWrapper):
    """Reject replies with wrong keys/shapes/NaN/Inf; record traffic per round.

    Parameters
    ----------
    inner : Strategy
        Any Flower Message-API strategy.
    """

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.expected_layout: list[tuple[str, tuple[int, ...]]] | None = None
        self.traffic: dict[int, dict[str, int]] = {}
        self.rejected: dict[int, list[dict]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.expected_layout = layout(arrays)
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        sent = sum(message_nbytes(m) for m in messages)
        self.traffic[server_round] = {"bytes-sent": sent, "bytes-received": 0, "messages-sent": len(messages)}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        received = sum(message_nbytes(m) for m in replies)
        self.traffic.setdefault(server_round, {"bytes-sent": 0, "messages-sent": 0})["bytes-received"] = received
        good = filter_valid_replies(replies, self.expected_layout, who=type(self.innermost()).__name__)
        good_ids = {id(m) for m in good}
        self.rejected[server_round] = [
            {"node-id": m.metadata.src_node_id} for m in replies if id(m) not in good_ids
        ]
        if not good:
            log.warning("round %s: no valid update; the global adapter is unchanged", server_round)
            return None, None
        return self.inner.aggregate_train(server_round, good)
