"""Run-config → a Flower strategy stack.

    NetworkAccounting( ValidateUpdates( [OnChainAudit]( [PageRankTrust]( inner ) ) ) )

``inner`` is one of Flower's own strategies (FedAvg, FedProx, FedAdam, Krum, ...) or ours.
Serverless exchanges (ring, gossip, async-gossip) run their own relay loop and are returned
as they are (peers validate what they merge).
"""

from __future__ import annotations

from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum, Strategy,
)

from fedledger.strategies.validation import ValidateUpdates

from .config import ConfigError, Settings

SERVERLESS = ("ring", "gossip", "async-gossip")


def _common(settings: Settings, num_nodes: int) -> dict:
    return {
        "fraction_train": settings.fraction_train,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_train_nodes": 1,
        "min_evaluate_nodes": 1 if settings.fraction_evaluate > 0 else 0,
        "min_available_nodes": max(1, num_nodes),
    }


def build_inner(settings: Settings, num_nodes: int) -> Strategy:
    """One of Flower's strategies (or PageRankTrust) configured from run-config."""
    kw = _common(settings, num_nodes)
    f = int(settings.get("num-malicious", -1))
    if f < 0:
        f = len(settings.malicious_ids())
    name = settings.strategy
    if name == "fedavg":
        return FedAvg(**kw)
    if name == "fedprox":
        return FedProx(proximal_mu=float(settings.get("proximal-mu", 0.01)), **kw)
    if name in ("fedadam", "fedyogi", "fedadagrad"):
        cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[name]
        return cls(eta=float(settings.get("server-lr", 1e-2)), **kw)
    if name == "fedavgm":
        return FedAvgM(server_momentum=float(settings.get("server-momentum", 0.9)), **kw)
    if name == "fedmedian":
        return FedMedian(**kw)
    if name == "fedtrimmedavg":
        return FedTrimmedAvg(beta=float(settings.get("trim-beta", 0.2)), **kw)
    if name == "krum":
        return Krum(num_malicious_nodes=f, **kw)
    if name == "multikrum":
        return MultiKrum(num_malicious_nodes=f, num_nodes_to_select=max(1, num_nodes - f), **kw)
    if name == "bulyan":
        return Bulyan(num_malicious_nodes=f, **kw)
    if name == "pagerank":
        from fedledger.strategies.pagerank import PageRankTrust

        return PageRankTrust(**_pagerank_kwargs(settings), **kw)
    raise ConfigError(f"strategy {name!r} is not a server-side strategy")


def _pagerank_kwargs(settings: Settings) -> dict:
    """``trust-*`` run-config keys (and ``malicious`` as detection ground truth) -> PageRankTrust."""
    from fedledger.strategies.pagerank import pagerank_kwargs_from_config

    try:
        return pagerank_kwargs_from_config(settings.to_dict())
    except ValueError as err:
        raise ConfigError(str(err)) from None


def build_strategy(settings: Settings, num_nodes: int, reference_fn=None, audit=None) -> Strategy:
    """The full stack for a run. ``audit`` is a callable ``strategy -> wrapped strategy``."""
    if settings.strategy in SERVERLESS:
        from fedledger.strategies.serverless import build_serverless_strategy
        from fedledger.strategies.topology import TopologyError

        try:
            return build_serverless_strategy(settings.strategy, settings.to_dict(), num_nodes)
        except TopologyError:
            raise
        except ValueError as err:
            raise ConfigError(str(err)) from None
    strategy = build_inner(settings, num_nodes)
    if settings.trust == "pagerank" and settings.strategy != "pagerank":
        from fedledger.strategies.pagerank import PageRankTrust

        strategy = PageRankTrust(inner=strategy, reference_fn=reference_fn, **_pagerank_kwargs(settings))
    elif settings.strategy == "pagerank" and reference_fn is not None:
        strategy.reference_fn = reference_fn
    if audit is not None:
        strategy = audit(strategy)
    return _network_accounting(ValidateUpdates(strategy), settings, num_nodes)


def _network_accounting(strategy: Strategy, settings: Settings, num_nodes: int) -> Strategy:
    """Per-round bytes per peer and link, simulated network + compute time and wall time of the
    hub exchange on the run's network model (run-config ``topology``, ``link-*``,
    ``speed-heterogeneity``, ``step-seconds``): the same accounting the serverless modes report,
    so ``metrics.json`` compares them on one model (key ``exchange``)."""
    from fedledger.strategies import topology as topo_lib
    from fedledger.strategies.serverless import NetworkAccounting

    rc = settings.to_dict()
    topology = topo_lib.build(str(rc.get("topology", "complete")), max(1, num_nodes), seed=settings.seed,
                              latency=float(rc.get("link-latency", topo_lib.DEFAULT_LATENCY)),
                              bandwidth=float(rc.get("link-bandwidth", topo_lib.DEFAULT_BANDWIDTH)),
                              heterogeneity=float(rc.get("speed-heterogeneity", 0.0)))
    return NetworkAccounting(strategy, topology, local_steps=settings.local_steps,
                             step_seconds=float(rc.get("step-seconds", 1.0)))
