"""fedledger.chain: the ledger side of the round pipeline, and the audit.

Public API (``from fedledger.chain import ...``)::

    OnChainAudit(strategy, ledger, store, run_id)   any Flower strategy, every round on the ledger
    OnChainAudit.from_context(strategy, context)    the same from the run-config (run_config.LedgerConfig)
    LedgerTrail, build_ledger, build_trail          the trail alone, a ledger from settings
    audit_mod, audited                              the client mod that signs train replies; an existing
                                                    ClientApp with the mod applied
    ArtifactStore                                   a run's audit/ folder
    audit_run(folder) -> AuditReport                the audit

Modules:

- ``UpdateRegistry.sol`` / ``UpdateRegistry.json`` (compiled with solc-js 0.8.37, evm cancun)
- :mod:`.hashing`         canonical SHA-256 of adapter tensors (``update_hash``) and of JSON documents
- :mod:`.signing`         client keys and EIP-191 signatures (``audit_record``), key files
- :mod:`.mods`            ``audit_mod`` / ``audited``: sign any ClientApp's train replies; ``node_key``
- :mod:`.ledger`          web3.py adapter (``Ledger.connect`` / ``Ledger.in_process``, the aggregator's
                          key, ``LedgerError``)
- :mod:`.run_config`      ``LedgerConfig``: the run-config keys of an audited run, their defaults
- :mod:`.store`           the run's files: safetensors adapters, ``run.json``, ``round.json`` (``ArtifactStore``)
- :mod:`.journal`         ``audit/journal.jsonl``: every ledger write, on disk before it is sent; what a
                          node lost, re-sent (``resend_lost``; ``fedledger resend``)
- :mod:`.trail`           ``LedgerTrail``: ``core.pipeline.AuditTrail`` on the ledger (verify, record, commit)
- :mod:`.audit_strategy`  ``OnChainAudit``, ``build_ledger``, ``build_trail``
- :mod:`.audit`           ``audit_run(folder)`` -> report (OK / MISMATCH / MISSING / NOT-ON-CHAIN /
                          BAD-SIGNATURE / NO-AGGREGATE / REJECTED / UNSIGNED / NOT-RECOMPUTED), every
                          aggregate recomputed
- :mod:`.devnet`          anvil devnet with persisted state (``start`` / ``stop`` / ``status``)

The names above are imported on first use (PEP 562): web3 and eth-account are heavy, and
``import fedledger.chain.hashing`` should not pay for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "OnChainAudit": "audit_strategy", "build_ledger": "audit_strategy", "build_trail": "audit_strategy",
    "LedgerTrail": "trail", "audit_mod": "mods", "audited": "mods", "ArtifactStore": "store",
    "audit_run": "audit",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .audit import audit_run
    from .audit_strategy import OnChainAudit, build_ledger, build_trail
    from .mods import audit_mod, audited
    from .store import ArtifactStore
    from .trail import LedgerTrail


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
