"""``LedgerTrail``: the ledger's ``core.pipeline.AuditTrail``; what an audited round leaves behind.

``RoundPipeline`` calls it at four points; each writes files to the :class:`ArtifactStore` and
the round costs three transactions whatever the number of clients:

- ``begin(run)``: ``run.json`` = the pipeline's description (rule, parameters, trust stage,
  adapter layout, max-examples), the ledger (kind, RPC URL, chain id, registry, deploy block,
  aggregator), run id, hash format and the caller's ``run_info``.
- ``verify(round, update)``: the reply's signed ``audit`` record (``update-hash``, ``signature``,
  ``signer``) must be there (unless ``require_audit_record=False``: the update is then accepted
  *unsigned*), name the hash of the arrays received, and carry a signature by the claimed
  signer over (run id, round, hash); the signer must be the one the node is known by, and may
  answer once per round.
- ``record(round, global, updates, rejected)``: stores the round's global adapter and every
  accepted update, then ``openRound`` and ONE ``recordUpdates`` batch: the signed updates, in
  record order (client address, update hash, num-examples, signature). Unsigned updates are not
  put on chain; the round document lists them with ``"client": null``.
- ``commit(round, aggregate, report)``: stores the aggregate and writes the round document
  ``round.json`` (canonical JSON)::

      {"round", "run-id", "run-hash" (SHA-256 of run.json),
       "global-hash",
       "updates":  [{"client", "node-id", "partition", "num-examples", "update-hash"}, ...]
                   (every accepted update, in record order),
       "rejected": [{"node-id", "partition", "signer", "reason", "stage"}, ...],
       "trust":    the trust decision (TrustDecision.to_dict()) or null,
       "aggregate-hash" (the zero hash when the round aggregated nothing), "aggregate-error",
       ... the round's own fields (``RoundReport.record``; KD and split rounds add theirs:
       "framework", the logit query, "next-global-hash", "server-part" ...)}

  then ONE ``commitAggregate(runId, round, aggregateHash, documentHash)`` transaction, with
  ``documentHash`` = SHA-256 of the file's bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedledger.core.pipeline import RoundReport
from fedledger.core.update import Identity, Rejected, Update

from .hashing import HASH_FORMAT, update_hash
from .ledger import Ledger, UpdateEntry
from .signing import recover_signer
from .store import ArtifactStore

log = logging.getLogger("fedledger.chain")
ZERO_HASH = "0x" + "00" * 32


@dataclass(frozen=True)
class Recorded:
    """One accepted update as the round document lists it (``client`` None: unsigned)."""

    client: str | None
    identity: Identity
    num_examples: int
    update_hash: str
    signature: str = ""

    @property
    def label(self) -> str:
        """The name its stored file goes by: the signer address, or the identity key if unsigned."""
        return self.client if self.client is not None else self.identity.key

    def to_dict(self) -> dict:
        return {"client": self.client, "node-id": self.identity.node_id, "partition": self.identity.partition,
                "num-examples": self.num_examples, "update-hash": self.update_hash}


class LedgerTrail:
    """Record a pipeline's rounds in ``store`` and on ``ledger`` under ``run_id``.

    ``require_audit_record``: refuse replies without a signed ``audit`` record (default); when
    False they are accepted unsigned (kept off chain, listed in the round document, shown as
    UNSIGNED by the audit). ``run_info``: extra keys for ``run.json`` (e.g. the run config).
    """

    def __init__(self, ledger: Ledger, store: ArtifactStore, run_id: int, *, require_audit_record: bool = True,
                 run_info: Mapping | None = None):
        self.ledger, self.store, self.run_id = ledger, store, int(run_id)
        self.require_audit_record = bool(require_audit_record)
        self.run_info = dict(run_info or {})
        self.rejected: dict[int, list[dict]] = {}       # round -> refused replies (for metrics.json)
        self.document_hashes: dict[int, str] = {}       # round -> committed round-document hash
        self._run_hash: str | None = None
        self._verified: dict[tuple[int, int], tuple[str, str, str]] = {}   # (round, node) -> (hash, signer, sig)
        self._signers: dict[int, set[str]] = {}
        self._rounds: dict[int, dict] = {}
        ledger.listeners.append(self._export)

    # ----------------------------------------------------------------- AuditTrail
    def begin(self, run: dict) -> None:
        ours = {**self.ledger.info(), "run-id": self.run_id, "hash-format": HASH_FORMAT}
        clash = sorted((set(run) | set(ours)) & set(self.run_info))
        if clash:
            raise ValueError(f"run_info keys {clash} collide with the run's record; rename them")
        self._run_hash = self.store.write_run({**run, **ours, **self.run_info})

    def verify(self, server_round: int, update: Update) -> tuple[str | None, str | None]:
        audit = update.audit
        if audit is None:
            if self.require_audit_record:
                return None, "no 'audit' ConfigRecord: the client does not sign its updates"
            return None, None
        claimed, signature, signer = (str(audit.get(k, "")) for k in ("update-hash", "signature", "signer"))
        actual = update_hash(update.arrays)
        if claimed.lower() != actual:
            return None, f"claimed update-hash {claimed[:12]}... is not the received arrays' hash {actual[:12]}..."
        try:
            recovered = recover_signer(self.run_id, server_round, actual, signature)
        except (ValueError, TypeError) as exc:
            return None, f"bad signature ({exc})"
        if recovered.lower() != signer.lower():
            return None, f"signature recovers to {recovered}, not the claimed signer {signer}"
        known = update.identity.signer if update.identity is not None else None
        if known is not None and known.lower() != recovered.lower():
            return None, f"signed by {recovered}, but node {update.node_id} is known as {known}"
        seen = self._signers.setdefault(server_round, set())
        if recovered.lower() in seen:
            return None, f"signer {recovered} already replied in this round"
        seen.add(recovered.lower())
        self._verified[(server_round, update.node_id)] = (actual, recovered, signature)
        return recovered, None

    def record(self, server_round: int, global_arrays: Mapping[str, np.ndarray], updates: Sequence[Update],
               rejected: Sequence[Rejected]) -> None:
        self._require_begun()
        self.store.save_global(server_round, global_arrays)
        recorded = [self._recorded(server_round, u) for u in updates]
        for r, u in zip(recorded, updates, strict=True):
            self.store.save_update(server_round, r.label, u.arrays)
        self._rounds[server_round] = {"global-hash": update_hash(global_arrays), "updates": recorded,
                                      "rejected": [r.to_dict() for r in rejected]}
        self.rejected[server_round] = self._rounds[server_round]["rejected"]
        self.ledger.open_round(self.run_id, server_round)
        self.ledger.record_updates(self.run_id, server_round, [
            UpdateEntry(r.client, r.update_hash, r.num_examples, r.signature) for r in recorded if r.client])

    def commit(self, server_round: int, aggregate: Mapping[str, np.ndarray] | None, report: RoundReport) -> None:
        if server_round not in self._rounds:
            raise RuntimeError(f"LedgerTrail.commit of round {server_round} without record(); RoundPipeline calls both")
        held = self._rounds[server_round]
        agg_hash = ZERO_HASH
        if aggregate is not None:
            agg_hash = update_hash(aggregate)
            self.store.save_aggregate(server_round, aggregate)
        document = {"round": int(server_round), "run-id": self.run_id, "run-hash": self._run_hash,
                    "global-hash": held["global-hash"], "updates": [r.to_dict() for r in held["updates"]],
                    "rejected": held["rejected"], "trust": report.trust, "aggregate-hash": agg_hash,
                    "aggregate-error": report.aggregate_error}
        clash = sorted(set(document) & set(report.record))
        if clash:
            raise ValueError(f"round {server_round}: report.record keys {clash} collide with the round document")
        document.update(report.record)
        doc_hash = self.store.write_round(server_round, document)
        self.ledger.commit_aggregate(self.run_id, server_round, agg_hash, doc_hash)
        self.document_hashes[server_round] = doc_hash
        del self._rounds[server_round]
        self._signers.pop(server_round, None)
        self._verified = {k: v for k, v in self._verified.items() if k[0] != server_round}

    def artifact(self, server_round: int, name: str, arrays: Mapping[str, np.ndarray]) -> str:
        """Store one more tensor set of the round (``<round>/<name>.safetensors``) and return its
        hash, for the round document to name (KD: the next global adapter; split: the server part)."""
        self.store.save_arrays(self.store.artifact_path(server_round, name), arrays)
        return update_hash(arrays)

    # ----------------------------------------------------------------- for the glue
    def info(self) -> dict:
        """The ledger and what it cost, for ``metrics.json``."""
        tx = self.ledger.tx_log
        return {**self.ledger.info(), "run-id": self.run_id, "transactions": len(tx),
                "gas-used": sum(t["gas"] for t in tx), "artifacts": self.store.root,
                "rejected-replies": {str(k): v for k, v in sorted(self.rejected.items()) if v}}

    # ----------------------------------------------------------------- helpers
    def _export(self, events: list[dict]) -> None:
        """Keep an offline copy of this run's events (the only copy an eth-tester run leaves)."""
        mine = [e for e in events if e["run-id"] == self.run_id]
        if mine:
            self.store.append_events(mine)

    def _require_begun(self) -> None:
        if self._run_hash is None:
            raise RuntimeError("LedgerTrail.record before begin(); RoundPipeline.configure_train calls begin")

    def _recorded(self, server_round: int, update: Update) -> Recorded:
        identity = update.identity if update.identity is not None else Identity(update.node_id)
        verified = self._verified.get((server_round, update.node_id))
        if verified is None:  # accepted unsigned (require_audit_record=False)
            return Recorded(None, identity, update.num_examples, update_hash(update.arrays))
        h, signer, signature = verified
        return Recorded(signer, identity, update.num_examples, h, signature)


__all__ = ["LedgerTrail", "Recorded", "ZERO_HASH"]
