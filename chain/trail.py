"""``LedgerTrail``: the ledger's ``core.pipeline.AuditTrail``; what an audited round leaves behind.

``RoundPipeline`` calls it at five points; each writes files to the :class:`ArtifactStore`. The
run costs one ``openRun`` (after the admin's enrolment, when the trail enrols) and each round
three aggregator transactions whatever the number of clients:

- ``begin(run, global, grid)``: the admin enrols the run's clients (:class:`Enrolment`; on a
  devnet it also funds them, so that they can contest); ``run.json`` = the pipeline's
  description (rule, parameters, trust stage, adapter layout, max-examples), the ledger (kind,
  RPC URL, chain id, registry, deploy block, admin, aggregator), the signers enrolled at run
  open, run id, hash format and the caller's ``run_info``; then ``openRun(runId, SHA-256 of
  run.json, hash of the initial global)``: the chain holds the run's parameters from the start.
- ``instruction(round, global, weight key)``: the ``audit`` ConfigRecord of every train
  instruction: chain id, registry address, ledger kind, the ledger run id (what clients sign and
  check: it need not be Flower's run id), round, weight key. A client signs its
  commitment under that registry's EIP-712 domain (and checks the chain before training).
- ``verify(round, update)``: the reply's signed ``audit`` record (``update-hash``,
  ``global-hash``, ``num-examples``, ``signature``, ``signer``) must be there (unless
  ``require_audit_record=False``: the update is then accepted *unsigned*), name the hash of the
  arrays received, the global this round sent and the weight the reply carries, and carry the
  claimed signer's EIP-712 signature of that commitment; the signer must be the one the node is
  known by, be enrolled on the registry, and may answer once per round.
- ``record(round, global, updates, rejected)``: stores the round's global adapter and every
  accepted update, then ``openRound`` (the registry fills in the round's global: the last
  committed aggregate) and ONE ``recordUpdates`` batch: the signed updates, in record order
  (client address, update hash, num-examples, signature). Unsigned updates are not put on
  chain; the round document lists them with ``"client": null``.
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
       "framework", the logit query, "soft-labels-hash", "server-part-hash" ...; a KD
       round commits its next global adapter as the aggregate)}

  then ONE ``commitAggregate(runId, round, aggregateHash, documentHash)`` transaction, with
  ``documentHash`` = SHA-256 of the file's bytes.

Nothing lost: every write is first appended (fsync) to ``audit/journal.jsonl``
(:mod:`.journal`), then sent. After each commit the trail reads the chain back and re-sends
what the node lost (a node restarted from an older state); a write the registry refuses is
retried once after re-sending what the node lost before it. A node that does not answer is
waited for (``Ledger.wait`` seconds, a visible back-off), then the run stops with one line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedledger.core.pipeline import RoundReport
from fedledger.core.update import Identity, Rejected, Update

from .hashing import HASH_FORMAT, LayoutHasher, bytes_hash, update_hash
from .journal import JOURNAL_FILE, Journal, describe, lost, send
from .ledger import Ledger, LedgerError, Refused
from .signing import Commitment, recover, simulation_account
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


# ---------------------------------------------------------------------------- enrolment
@dataclass(frozen=True)
class Enrolment:
    """Who the admin enrols when a run begins (run-config ``enrol``):

    - ``"simulation"``: the simulation key of every partition ``0 .. N-1`` (N = the nodes
      connected when the run begins), derived from this machine's federation secret;
    - ``"none"``: nobody (the admin enrolled the clients beforehand: ``fedledger registry enrol``);
    - a comma-separated list of 0x addresses: exactly those (key-file nodes of a test bench).
    """

    policy: str = "simulation"

    def __post_init__(self):
        if self.policy not in ("simulation", "none"):
            from web3 import Web3

            bad = [a for a in self.addresses_listed() if not Web3.is_address(a)]
            if bad or not self.addresses_listed():
                raise LedgerError(f"run-config enrol={self.policy!r} is not valid: must be \"simulation\", \"none\" or "
                                  f"a comma-separated list of 0x addresses")

    def addresses_listed(self) -> list[str]:
        return [a.strip() for a in self.policy.split(",") if a.strip()]

    def signers(self, num_nodes: int, key_folder: str | None = None) -> list[str]:
        if self.policy == "none":
            return []
        if self.policy == "simulation":
            return [simulation_account(p, key_folder).address for p in range(num_nodes)]
        return self.addresses_listed()


class LedgerTrail:
    """Record a pipeline's rounds in ``store`` and on ``ledger`` under ``run_id``.

    ``admin``: the registry written by its admin (``ledger.admin(...)``), who enrols
    ``enrolment``'s signers when the run begins; None: the trail enrols nobody (they must be
    enrolled already). ``require_audit_record``: refuse replies without a signed ``audit``
    record (default); when False they are accepted unsigned (kept off chain, listed in the round
    document, shown as UNSIGNED by the audit). ``run_info``: extra keys for ``run.json``.
    """

    def __init__(self, ledger: Ledger, store: ArtifactStore, run_id: int, *, require_audit_record: bool = True,
                 run_info: Mapping | None = None, admin: Ledger | None = None,
                 enrolment: Enrolment | None = None):
        self.ledger, self.store, self.run_id = ledger, store, int(run_id)
        self.admin, self.enrolment = admin, enrolment if enrolment is not None else Enrolment("none")
        self.require_audit_record = bool(require_audit_record)
        self.run_info = dict(run_info or {})
        self.rejected: dict[int, list[dict]] = {}       # round -> refused replies (for metrics.json)
        self.document_hashes: dict[int, str] = {}       # round -> committed round-document hash
        self._run_hash: str | None = None
        self._globals: dict[int, str] = {}              # round -> hash of the global it sent
        self._enrolled: set[str] = set()
        self._exported_enrolment = 0
        self._verified: dict[tuple[int, int], tuple[str, str, str]] = {}   # (round, node) -> (hash, signer, sig)
        self._signers: dict[int, set[str]] = {}
        self._rounds: dict[int, dict] = {}
        self.journal = Journal(os.path.join(store.root, JOURNAL_FILE))
        self.resent: list[dict] = []                    # journal entries re-sent because the node lost them
        self._hasher: tuple[object, LayoutHasher | None] = (None, None)   # (layout, its hasher)
        ledger.listeners.append(self._export)

    # ----------------------------------------------------------------- AuditTrail
    def begin(self, run: dict, global_arrays: Mapping[str, np.ndarray], grid) -> None:
        self._enrol(len(list(grid.get_node_ids())) if grid is not None else 0)
        self._refresh_enrolment()
        ours = {**self.ledger.info(), "run-id": self.run_id, "hash-format": HASH_FORMAT,
                "enrolled": sorted(self._enrolled)}
        clash = sorted((set(run) | set(ours)) & set(self.run_info))
        if clash:
            raise ValueError(f"run_info keys {clash} collide with the run's record; rename them")
        self._run_hash = self.store.write_run({**run, **ours, **self.run_info})
        self._write({"op": "open-run", "run-id": self.run_id, "run-hash": self._run_hash,
                     "initial-global": update_hash(global_arrays)})

    def instruction(self, server_round: int, global_arrays: Mapping[str, np.ndarray], weight_key: str) -> dict:
        self._globals[server_round] = update_hash(global_arrays)
        self._refresh_enrolment()   # reads only the blocks mined since the last round
        return {"chain-id": self.ledger.chain_id, "registry": self.ledger.address, "ledger": self.ledger.kind,
                "run-id": self.run_id, "server-round": int(server_round), "weight-key": str(weight_key)}

    def verify(self, server_round: int, update: Update) -> tuple[str | None, str | None]:
        audit = update.audit
        if audit is None:
            if self.require_audit_record:
                return None, "no 'audit' ConfigRecord: the client does not sign its updates"
            return None, None
        claimed, claimed_global, signature, signer = (str(audit.get(k, "")) for k in
                                                      ("update-hash", "global-hash", "signature", "signer"))
        actual = self._hash(update)
        if claimed.lower() != actual:
            return None, f"claimed update-hash {claimed[:12]}... is not the received arrays' hash {actual[:12]}..."
        sent = self._globals.get(server_round)
        if claimed_global.lower() != sent:
            return None, f"signed global-hash {claimed_global[:12]}... is not the global this round sent {str(sent)[:12]}..."
        if audit.get("num-examples") != update.num_examples:
            return None, f"signed num-examples {audit.get('num-examples')!r} is not the reply's {update.num_examples}"
        commitment = Commitment(self.ledger.chain_id, self.ledger.address, self.run_id, server_round, sent, actual,
                                update.num_examples)
        try:
            recovered = recover(commitment, signature)
        except (ValueError, TypeError) as exc:
            return None, f"bad signature ({exc})"
        if recovered.lower() != signer.lower():
            return None, f"signature recovers to {recovered}, not the claimed signer {signer}"
        known = update.identity.signer if update.identity is not None else None
        if known is not None and known.lower() != recovered.lower():
            return None, f"signed by {recovered}, but node {update.node_id} is known as {known}"
        if recovered.lower() not in self._enrolled:
            return None, f"signer {recovered} is not enrolled on the registry {self.ledger.address}"
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
        self._write({"op": "open-round", "run-id": self.run_id, "round": int(server_round)})
        signed = [{"client": r.client, "update-hash": r.update_hash, "num-examples": int(r.num_examples),
                   "signature": r.signature} for r in recorded if r.client]
        if signed:
            self._write({"op": "record-updates", "run-id": self.run_id, "round": int(server_round), "updates": signed})

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
        self._write({"op": "commit", "run-id": self.run_id, "round": int(server_round), "aggregate-hash": agg_hash,
                     "document-hash": doc_hash})
        self.check_on_chain()
        self.document_hashes[server_round] = doc_hash
        del self._rounds[server_round]
        self._globals.pop(server_round, None)
        self._signers.pop(server_round, None)
        self._verified = {k: v for k, v in self._verified.items() if k[0] != server_round}

    def artifact(self, server_round: int, name: str, arrays: Mapping[str, np.ndarray]) -> str:
        """Store one more tensor set of the round (``<round>/<name>.safetensors``) and return its
        hash, for the round document to name (KD: the next global adapter; split: the server part)."""
        self.store.save_arrays(self.store.artifact_path(server_round, name), arrays)
        return update_hash(arrays)

    # ----------------------------------------------------------------- resume
    def position(self) -> dict:
        """Where the run stands on the ledger (for a checkpoint): run id, chain, registry, run hash."""
        return {"run-id": self.run_id, "chain-id": self.ledger.chain_id, "registry": self.ledger.address,
                "rpc-url": self.ledger.rpc_url, "run-hash": self._run_hash,
                "document-hashes": dict(self.document_hashes)}

    def resume(self, position: Mapping, last_round: int) -> None:
        """Continue a run from ``position`` (:meth:`position` of its checkpoint) after round
        ``last_round``: the same run on the same registry; what the node lost is re-sent first."""
        for key, ours in (("registry", self.ledger.address), ("chain-id", self.ledger.chain_id),
                          ("run-id", self.run_id)):
            if str(position.get(key)).lower() != str(ours).lower():
                raise LedgerError(f"the checkpoint's {key} is {position.get(key)}, this trail's {ours}; resume on the "
                                  f"registry and run the checkpoint names")
        loaded = self.store.read_document(self.store.run_path)
        if loaded is None or bytes_hash(loaded[0]) != position["run-hash"]:
            raise LedgerError(f"{self.store.run_path} is missing or is not the run record the checkpoint names; "
                              f"resume from the run folder the run wrote")
        self._run_hash = position["run-hash"]
        self.document_hashes = {int(k): v for k, v in position.get("document-hashes", {}).items()}
        self.check_on_chain()
        run = self.ledger.patiently("the read of the run", lambda: self.ledger.get_run(self.run_id))
        if not run["opened-at"]:
            raise LedgerError(f"run {self.run_id} is not open on the registry {self.ledger.address} (an eth-tester "
                              f"chain ends with its ServerApp: such a run cannot resume)")
        current = run["current-round"]
        committed = self.ledger.get_round(self.run_id, current)["committed"] if current else True
        if current > last_round + 1 or (current == last_round + 1 and committed):
            raise LedgerError(f"the chain's run {self.run_id} is at round {current}, past the checkpoint (round "
                              f"{last_round}): the ServerApp stopped between a commit and its checkpoint; this run "
                              f"cannot resume (audit it with `fedledger audit`)")
        if current == last_round + 1:
            log.warning("ledger: round %s was opened on chain before the ServerApp stopped; it runs again (its "
                        "records are kept if the clients send the same updates)", current)
        self._exported_enrolment = len(self.ledger.patiently("the read of the enrolment",
                                                             self.ledger.enrolment_events))   # already exported
        self._refresh_enrolment()
        log.info("ledger: run %s resumes on registry %s after round %s", self.run_id, self.ledger.address, last_round)

    # ----------------------------------------------------------------- nothing lost
    def check_on_chain(self) -> list[dict]:
        """Read the chain back (its state, not a receipt) and re-send, from the journal, every
        write of this run the node no longer holds; returns what was re-sent."""
        def once():
            missing = lost(self.ledger, self._journaled())
            if missing:
                log.warning("ledger: the node at %s does not hold %d journaled write(s) of run %s, from %s on (a "
                            "restart from an older state?); sending them from %s", self.ledger.rpc_url or "(in process)",
                            len(missing), self.run_id, describe(missing[0]), self.journal.path)
            for entry in missing:
                send(self.ledger, self.admin, entry)
            return missing

        missing = self.ledger.patiently("the read-back of the run's records", once)
        self.resent += missing
        return missing

    def _write(self, entry: dict) -> None:
        """Journal ``entry`` (on disk before anything is sent), then send it. A refusal may mean
        that the node lost earlier writes: those are re-sent first, then this one once more."""
        self.journal.append({**entry, "chain-id": self.ledger.chain_id, "registry": self.ledger.address})
        try:
            send(self.ledger, self.admin, entry)
        except Refused:
            if len(self.ledger.patiently("a read of the run's records", lambda: lost(self.ledger,
                                                                                     self._journaled()))) <= 1:
                raise   # nothing before it is missing: the registry refuses this write itself
            self.check_on_chain()

    def _journaled(self) -> list[dict]:
        """The journal's entries for this registry and run (a folder reused for another chain keeps its own)."""
        return [e for e in self.journal.entries() if e.get("registry") == self.ledger.address
                and e.get("chain-id") == self.ledger.chain_id and e.get("run-id", self.run_id) == self.run_id]

    # ----------------------------------------------------------------- for the glue
    def info(self) -> dict:
        """The ledger and what it cost, for ``metrics.json``."""
        tx = self.ledger.tx_log + (self.admin.tx_log if self.admin is not None else [])
        return {**self.ledger.info(), "run-id": self.run_id, "transactions": len(tx),
                "gas-used": sum(t["gas"] for t in tx), "artifacts": self.store.root,
                "journal": self.journal.path, "resent-writes": len(self.resent),
                "rejected-replies": {str(k): v for k, v in sorted(self.rejected.items()) if v}}

    # ----------------------------------------------------------------- helpers
    def _enrol(self, num_nodes: int) -> None:
        """The admin enrols (and, on a devnet, funds) the run's signers."""
        signers = self.enrolment.signers(num_nodes)
        if not signers:
            return
        if self.admin is None:
            raise LedgerError(f"enrol={self.enrolment.policy!r} needs the registry's admin key; give admin-key-file "
                              f"(or $FEDLEDGER_ADMIN_KEY), or enrol the clients beforehand and set enrol=\"none\"")
        self._write({"op": "enrol", "signers": list(signers)})
        funded = self.admin.fund(signers)
        log.info("admin %s enrolled %d signer(s)%s on registry %s", self.admin.sender, len(signers),
                 f", {funded} funded for contests (devnet)" if funded else "", self.ledger.address)

    def _refresh_enrolment(self) -> None:
        """The signers enrolled now; enrolment events not yet in the offline copy are added to it."""
        events = self.ledger.patiently("the read of the enrolment", self.ledger.enrolment_events)
        self.store.append_events(events[self._exported_enrolment:])
        self._exported_enrolment = len(events)
        now: set[str] = set()
        for e in events:
            (now.add if e["event"] == "Enrolled" else now.discard)(e["signer"].lower())
        self._enrolled = now

    def _export(self, events: list[dict]) -> None:
        """Keep an offline copy of this run's events (the only copy an eth-tester run leaves)."""
        mine = [e for e in events if e.get("run-id") == self.run_id]
        if mine:
            self.store.append_events(mine)

    def _require_begun(self) -> None:
        if self._run_hash is None:
            raise RuntimeError("LedgerTrail.record before begin(); RoundPipeline.configure_train calls begin")

    def _hash(self, update: Update) -> str:
        """The canonical hash of an update. Arrays decoded against a layout (``Update.layout``) are
        hashed straight from the received bytes with that layout's prefix hashed once per round."""
        layout = update.layout
        if layout is None:
            return update_hash(update.arrays)
        known, hasher = self._hasher
        if known is not layout:
            try:
                hasher = LayoutHasher(layout.specs)
            except ValueError:  # a big-endian layout: convert tensor by tensor
                hasher = None
            self._hasher = (layout, hasher)
        return hasher.hexdigest(update.arrays) if hasher is not None else update_hash(update.arrays)

    def _recorded(self, server_round: int, update: Update) -> Recorded:
        identity = update.identity if update.identity is not None else Identity(update.node_id)
        verified = self._verified.get((server_round, update.node_id))
        if verified is None:  # accepted unsigned (require_audit_record=False)
            return Recorded(None, identity, update.num_examples, self._hash(update))
        h, signer, signature = verified
        return Recorded(signer, identity, update.num_examples, h, signature)


__all__ = ["Enrolment", "LedgerTrail", "Recorded", "ZERO_HASH"]
