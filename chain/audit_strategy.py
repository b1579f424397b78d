"""``OnChainAudit``: any Flower Message-API strategy, with every round recorded on the ledger.

``OnChainAudit(strategy, ledger, store, run_id)`` is a ``core.pipeline.RoundPipeline`` whose
audit trail is a :class:`~fedledger.chain.trail.LedgerTrail`: each reply is decoded and
validated once (a malformed reply is refused with its reason, never aggregated), its signed
record verified, every accepted update and every refused reply recorded (three transactions a
round) and the aggregate committed with the round document. Stacked with another pipeline
(``PageRankTrust``) it merges into one pipeline, in either order.

In a Flower ServerApp of your own, one line builds it from the run-config
(:mod:`.run_config` lists the keys and their defaults)::

    strategy = OnChainAudit.from_context(FedAvg(...), context)

For the fedledger ServerApp: :func:`build_ledger` (a ledger from settings) and
:func:`build_trail` (the trail and an ``info()`` for ``metrics.json``), to hand to
``RoundPipeline(trail=...)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from logging import INFO

from flwr.app import Context
from flwr.common import log
from flwr.serverapp.strategy import Strategy

from fedledger.core.pipeline import Identities, RoundPipeline

from .ledger import DEFAULT_RPC, Ledger, LedgerError
from .run_config import LedgerConfig
from .store import ArtifactStore, new_run_folder
from .trail import LedgerTrail


class OnChainAudit(RoundPipeline):
    """``strategy`` behind one decode and a :class:`LedgerTrail` on ``ledger`` / ``store``.

    ``require_audit_record``: refuse replies without a signed ``audit`` record (default).
    ``identities``: node id -> Identity (default: the node id alone). ``run_info``: extra keys
    for ``run.json``. ``max_examples``: upper bound of a reply's ``num-examples``.
    """

    def __init__(self, strategy: Strategy, ledger: Ledger, store: ArtifactStore, run_id: int, *,
                 require_audit_record: bool = True, identities: Identities | None = None,
                 run_info: Mapping | None = None, max_examples: int | None = None) -> None:
        trail = LedgerTrail(ledger, store, run_id, require_audit_record=require_audit_record, run_info=run_info)
        super().__init__(strategy, trail=trail, identities=identities, max_examples=max_examples)

    @classmethod
    def from_context(cls, strategy: Strategy, context: Context, *, require_audit_record: bool = True,
                     identities: Identities | None = None, run_info: Mapping | None = None,
                     max_examples: int | None = None, **settings) -> "OnChainAudit":
        """``strategy`` audited as the run-config of ``context`` says (:class:`LedgerConfig`).

        ``settings`` override run-config keys by field name (``audit="eth-tester"``,
        ``rpc_url=...``, ``run_dir=...``); the other keywords are the constructor's. The run
        folder ``<run-dir>/<time>-run<id>/`` is created now and logged with the registry;
        ``audit/run.json`` in it names the ledger (kind, RPC URL, chain id, registry, deploy
        block) from the first round on, and ``run.json`` records the app's run-config.
        ``fedledger audit --run-id <id> --runs <run-dir>`` audits it. Bad values and an
        unreachable chain raise one :class:`LedgerError` line."""
        config = LedgerConfig.from_run_config(context.run_config, **settings)
        ledger = build_ledger(config.audit, config.rpc_url, config.registry_address, chain_id=config.chain_id_or_none,
                              private_key_file=config.aggregator_key_file or None)
        folder = new_run_folder(config.run_dir, context.run_id)
        info = {"run-config": {k: v for k, v in context.run_config.items()}, **(run_info or {})}
        audit = cls(strategy, ledger, ArtifactStore(folder), context.run_id, require_audit_record=require_audit_record,
                    identities=identities, run_info=info, max_examples=max_examples)
        where = f"at {ledger.rpc_url}" if ledger.rpc_url else "in this process (eth-tester; ends with the ServerApp)"
        log(INFO, "fedledger: run %s is audited on registry %s, chain %s %s; run folder %s; audit it with: "
            "fedledger audit --run-id %s --runs %s", context.run_id, ledger.address, ledger.chain_id, where, folder,
            context.run_id, os.path.dirname(folder))
        return audit


def build_ledger(kind: str, rpc_url: str = DEFAULT_RPC, registry_address: str = "", chain_id: int | None = None,
                 private_key: str | None = None, private_key_file: str | None = None) -> Ledger:
    """``kind``: ``"anvil"`` (any JSON-RPC node at ``rpc_url``) or ``"eth-tester"`` (in-process,
    written by its first funded account; keys do not apply). ``chain_id`` None or 0: whatever
    the node reports. Key: ``private_key``, ``private_key_file``, else ``$FEDLEDGER_AGGREGATOR_KEY``."""
    if kind == "eth-tester":
        return Ledger.in_process()
    if kind in ("anvil", "rpc"):
        return Ledger.connect(rpc_url, registry_address or None, chain_id=chain_id or None, private_key=private_key,
                              private_key_file=private_key_file or None)
    raise LedgerError(f"unknown audit kind {kind!r}; use audit=\"anvil\" or audit=\"eth-tester\"")


def build_trail(kind: str, run_folder: str, run_id: int, *, rpc_url: str = DEFAULT_RPC, registry_address: str = "",
                chain_id: int | None = None, private_key_file: str | None = None, require_audit_record: bool = True,
                run_info: Mapping | None = None) -> tuple[LedgerTrail, Callable[[], dict]]:
    """For the ServerApp: ``(trail, info)``. ``RoundPipeline(strategy, trail=trail, ...)`` records
    the run under ``<run_folder>/audit/``; ``info()`` describes the ledger and its cost."""
    ledger = build_ledger(kind, rpc_url, registry_address, chain_id=chain_id, private_key_file=private_key_file)
    trail = LedgerTrail(ledger, ArtifactStore(run_folder), run_id, require_audit_record=require_audit_record,
                        run_info=run_info)
    return trail, trail.info


__all__ = ["OnChainAudit", "build_ledger", "build_trail"]
