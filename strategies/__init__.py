"""fedledger.strategies: trust stages and serverless relays for Flower's Message API.

Public API (``from fedledger.strategies import ...``)::

    PageRankTrust(inner)           any Flower strategy, updates weighted/excluded by PageRank trust
    PageRankScorer, trust_scores   the trust stage alone; the pure scoring function
    RingAllReduce, Gossip, AsyncGossip, build_relay
                                   serverless relay runners (the ServerApp relays, peers merge)
    HubAccounting                  the network accounting observer of hub strategies
    detection_metrics              precision / recall / F1 of an excluded set against the ground truth

The names are imported on first use (PEP 562), so that ``import fedledger.strategies.kernels``
(a ClientApp's import) does not load networkx and scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "PageRankTrust": "pagerank", "PageRankScorer": "pagerank", "trust_scores": "pagerank",
    "RingAllReduce": "ring", "Gossip": "gossip", "AsyncGossip": "async_gossip", "build_relay": "relay",
    "HubAccounting": "accounting", "detection_metrics": "detection",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .accounting import HubAccounting
    from .async_gossip import AsyncGossip
    from .detection import detection_metrics
    from .gossip import Gossip
    from .pagerank import PageRankScorer, PageRankTrust, trust_scores
    from .relay import build_relay
    from .ring import RingAllReduce


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
