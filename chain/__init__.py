"""fedledger.chain: the ledger side of the round pipeline, and the audit.

- ``UpdateRegistry.sol`` / ``UpdateRegistry.json`` (compiled with solc-js 0.8.37, evm cancun)
- :mod:`.hashing`         canonical SHA-256 of adapter tensors (``update_hash``) and of JSON documents
- :mod:`.signing`         client keys and EIP-191 signatures (``audit_record`` for the ClientApp)
- :mod:`.ledger`          web3.py adapter (``Ledger.connect`` / ``Ledger.in_process``, the aggregator's
                          key, ``LedgerError``)
- :mod:`.store`           the run's files: safetensors adapters, ``run.json``, ``round.json`` (``ArtifactStore``)
- :mod:`.trail`           ``LedgerTrail``: ``core.pipeline.AuditTrail`` on the ledger (verify, record, commit)
- :mod:`.audit_strategy`  ``OnChainAudit(strategy, ledger, store, run_id)``, ``build_ledger``, ``build_trail``
- :mod:`.audit`           ``audit_run(folder)`` -> report (OK / MISMATCH / MISSING / BAD-SIGNATURE /
                          NO-AGGREGATE / REJECTED / UNSIGNED / NOT-RECOMPUTED), every aggregate recomputed
- :mod:`.devnet`          anvil devnet with persisted state (``start`` / ``stop`` / ``status``)

Submodules are imported on demand (web3 is heavy); this package imports nothing itself.
"""
