"""fedledger.chain: an on-chain audit trail for Flower strategies.

- ``UpdateRegistry.sol`` / ``UpdateRegistry.json`` (compiled with solc-js 0.8.37, evm cancun)
- :mod:`.hashing`         canonical SHA-256 of adapter tensors (``update_hash``)
- :mod:`.signing`         client keys and EIP-191 signatures (``audit_record`` for the ClientApp)
- :mod:`.ledger`          web3.py adapter (``Ledger.connect`` / ``Ledger.in_process``, ``LedgerError``)
- :mod:`.store`           safetensors artifact store (``ArtifactStore``)
- :mod:`.audit_strategy`  ``OnChainAudit(strategy, ledger, store, run_id)`` and ``build_audit(...)``
- :mod:`.audit`           ``audit_run(folder)`` -> report (OK / MISMATCH / MISSING / BAD-SIGNATURE)
- :mod:`.devnet`          anvil devnet with persisted state (``start`` / ``stop`` / ``status``)

Submodules are imported on demand (web3 is heavy); this package imports nothing itself.
"""
