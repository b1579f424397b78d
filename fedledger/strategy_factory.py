"""Typed settings -> the round of a run: a ``RoundPipeline`` around one of Flower's strategies
(hub modes), or a relay runner (serverless modes).

    RoundPipeline(inner, trust=[PageRankScorer], trail=[LedgerTrail], identities=Roster,
                  observers=[HubAccounting], max_examples=...)

``inner`` is one of Flower's own strategies (FedAvg, FedProx, FedAdam, Krum, ...);
``strategy="pagerank"`` is FedAvg weighted by trust x num-examples. The stages are explicit
arguments, so their order is the pipeline's (``core/pipeline.py``), never the order of wrappers.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy,
)

from fedledger.core import Identities, Identity, RoundPipeline

from .config import Settings


def _common(settings: Settings, num_nodes: int) -> dict:
    s = settings.strategy
    return {
        "fraction_train": s.fraction_train,
        "fraction_evaluate": s.fraction_evaluate,
        "min_train_nodes": s.min_train_nodes,
        "min_evaluate_nodes": 1 if s.fraction_evaluate > 0 else 0,
        "min_available_nodes": s.min_available_nodes or max(1, num_nodes),
    }


def build_inner(settings: Settings, num_nodes: int) -> Strategy:
    """One of Flower's strategies, configured from the typed settings."""
    s = settings.strategy
    kw = _common(settings, num_nodes)
    f = s.num_malicious if s.num_malicious >= 0 else len(settings.attack.malicious)
    builders: dict[str, Callable[[], Strategy]] = {
        "fedavg": lambda: FedAvg(**kw),
        "pagerank": lambda: FedAvg(**kw),
        "fedprox": lambda: FedProx(proximal_mu=s.proximal_mu, **kw),
        "fedadam": lambda: FedAdam(eta=s.server_lr, **kw),
        "fedyogi": lambda: FedYogi(eta=s.server_lr, **kw),
        "fedadagrad": lambda: FedAdagrad(eta=s.server_lr, **kw),
        "fedavgm": lambda: FedAvgM(server_momentum=s.server_momentum, **kw),
        "fedmedian": lambda: FedMedian(**kw),
        "fedtrimmedavg": lambda: FedTrimmedAvg(beta=s.trim_beta, **kw),
        "krum": lambda: Krum(num_malicious_nodes=f, **kw),
        "multikrum": lambda: MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, num_nodes - f), **kw),
        "bulyan": lambda: Bulyan(num_malicious_nodes=f, **kw),
    }
    return builders[s.name]()


def build_trust(settings: Settings, reference_fn=None):
    """The PageRank trust stage when ``trust="pagerank"`` or ``strategy="pagerank"``, else None."""
    if settings.trust.mode != "pagerank" and settings.strategy.name != "pagerank":
        return None
    from fedledger.strategies.pagerank import PageRankScorer

    t = settings.trust
    return PageRankScorer(reference_fn=reference_fn, threshold=t.threshold, pretrusted=t.pretrusted or None,
                          damping=t.damping, norm_tol=t.norm_tol, history_weight=t.history_weight, anchor=t.anchor,
                          clip=t.clip, reweight=settings.strategy.name == "pagerank")


def build_topology(settings: Settings, num_nodes: int):
    from fedledger.strategies import topology as topo_lib

    t = settings.topology
    return topo_lib.build(t.topology, max(1, num_nodes), seed=settings.run.seed, latency=t.link_latency,
                          bandwidth=t.link_bandwidth, heterogeneity=t.speed_heterogeneity)


def build_pipeline(settings: Settings, num_nodes: int, *, identities: Identities, trail=None, reference_fn=None,
                   max_examples: int | None = None, checkpoint=None) -> RoundPipeline:
    """The hub round of a run (see the module docstring)."""
    from fedledger.strategies.accounting import HubAccounting

    def peer_of(node_id: int) -> int | None:
        ident = identities.resolve(node_id) or Identity(node_id)
        return ident.partition

    accounting = HubAccounting(build_topology(settings, num_nodes), local_steps=settings.train.local_steps,
                               step_seconds=settings.topology.step_seconds, peer_of=peer_of)
    return RoundPipeline(build_inner(settings, num_nodes), trust=build_trust(settings, reference_fn), trail=trail,
                         identities=identities, observers=[accounting], max_examples=max_examples,
                         checkpoint=checkpoint)


def build_relay(settings: Settings, num_nodes: int):
    """The relay runner of a serverless run (``ring`` | ``gossip`` | ``async-gossip``)."""
    from fedledger.strategies.relay import build_relay as build

    t = settings.topology
    return build(settings.strategy.name, topology=build_topology(settings, num_nodes),
                 local_steps=settings.train.local_steps, step_seconds=t.step_seconds, seed=settings.run.seed,
                 latency=t.link_latency, bandwidth=t.link_bandwidth, heterogeneity=t.speed_heterogeneity,
                 gossip_k=t.gossip_k, gossip_steps=t.gossip_steps, ring_order=t.ring_order,
                 staleness_exponent=t.staleness_exponent, min_train_nodes=settings.strategy.min_train_nodes,
                 min_available_nodes=settings.strategy.min_available_nodes)
