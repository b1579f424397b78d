"""Audit a recorded run: the chain's records against the stored files, and every aggregate recomputed.

The auditor trusts only the chain. Each committed round binds, by hash, the round document
(``round.json``: global adapter, accepted updates in record order, refused replies, trust
decision, aggregate), which in turn binds ``run.json`` (the rule and its parameters). Walking
the rounds in order, one row per finding:

- ``OK``             a client's stored update hashes to its record on chain and its signature
                     recovers to the recorded client; an aggregate recomputed bit-exactly;
- ``MISMATCH``       bytes or records that differ from what the chain committed: a stored update,
                     global or aggregate; ``round.json`` / ``run.json``; a round that did not start
                     from the previous round's aggregate; an aggregate that is not what the rule
                     computes from the recorded updates and trust decision (names round and rule);
- ``MISSING``        a file, a record or a commit that should be there and is not;
- ``BAD-SIGNATURE``  a signature on chain that does not recover to the recorded client;
- ``NO-AGGREGATE``   a committed round whose aggregate hash is zero: the run learned nothing;
- ``REJECTED``       a reply the aggregator refused, with its reason (counted, not a problem);
- ``UNSIGNED``       an update accepted without a signed record (``require_audit_record=False``):
                     its bytes match the round document, but nobody signed it;
- ``NOT-RECOMPUTED`` the aggregate's hash matches, but the rule cannot be replayed (a user's own
                     class, custom callables) or its inputs are unavailable; or a server-side step
                     the audit cannot re-run (KD-FedLLM's distillation into the global adapter,
                     Split-FedLLM's server part: rows of kind ``server``).

The run's record names its **framework** (``run.json`` ``framework``; absent: FedLLM, parameter
sharing): in KD-FedLLM every client record is a signed logit reply and the aggregate is the
soft labels (``core.softlabels``, replayed bit-exactly), and each round names the adapter the
next one starts from (``next-global-hash``); in Split-FedLLM a client record is the client-side
adapter plus the digest of the activations it sent (both signed; the digest must be the one the
server recorded), the aggregate their FedAvg, and the server part is recorded by hash.

The aggregate is recomputed with ``fedledger.core.replay.Replay`` (the same trust and
aggregation code the round ran) from the stored global of each round, the recorded updates in
record order and the recorded trust decision; stateful rules (FedAdam, FedYogi, FedAdagrad,
FedAvgM) are replayed round by round. Verdict and exit code (:attr:`AuditReport.exit_code`):
0 every record verified, 1 problems found, 3 no problem found but not everything verified.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from fedledger.core.replay import Replay
from fedledger.core.update import Identity

from .hashing import bytes_hash, update_hash
from .ledger import Ledger, LedgerError, records_digest
from .signing import recover_signer
from .store import ArtifactStore
from .trail import ZERO_HASH

PROBLEMS = ("MISMATCH", "MISSING", "BAD-SIGNATURE", "NO-AGGREGATE")
UNVERIFIED = ("NOT-RECOMPUTED", "UNSIGNED")
#: Rules whose server state carries over from round to round: once a round cannot be replayed,
#: the later rounds cannot be either.
STATEFUL = {"FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"}
EXIT_OK, EXIT_PROBLEMS, EXIT_UNVERIFIED = 0, 1, 3


STATUSES = ("OK", *PROBLEMS, "REJECTED", *UNVERIFIED)
KINDS = ("update", "rejected", "aggregate", "global", "document", "server")
FRAMEWORKS = {"fedllm": "FedLLM (parameter sharing)", "kd-fedllm": "KD-FedLLM (knowledge distillation)",
              "split-fedllm": "Split-FedLLM (split learning)"}


@dataclass(frozen=True)
class Row:
    round: int
    client: str          # signer address, identity key, or what the row is about ("aggregate", "global", "round.json")
    status: str          # one of STATUSES
    detail: str = ""
    kind: str = "update"  # one of KINDS

    def __post_init__(self):
        if self.status not in STATUSES or self.kind not in KINDS:
            raise ValueError(f"audit row status {self.status!r} / kind {self.kind!r}: expected one of {STATUSES} / {KINDS}")


@dataclass(frozen=True)
class AuditReport:
    run_id: int
    registry: str
    chain_id: int
    source: str
    rule: str
    rows: tuple[Row, ...]
    seconds: float = 0.0
    framework: str = "FedLLM (parameter sharing)"

    def _with(self, statuses) -> list[Row]:
        return [r for r in self.rows if r.status in statuses]

    @property
    def problems(self) -> list[Row]:
        return self._with(PROBLEMS)

    @property
    def not_recomputed(self) -> list[Row]:
        return self._with(("NOT-RECOMPUTED",))

    @property
    def unsigned(self) -> list[Row]:
        return self._with(("UNSIGNED",))

    @property
    def rejected(self) -> list[Row]:
        return self._with(("REJECTED",))

    @property
    def exit_code(self) -> int:
        if self.problems:
            return EXIT_PROBLEMS
        return EXIT_UNVERIFIED if self._with(UNVERIFIED) else EXIT_OK

    @property
    def ok(self) -> bool:
        """Every record verified: no problem and nothing left unchecked."""
        return self.exit_code == EXIT_OK

    @property
    def verdict(self) -> str:
        if self.problems:
            return f"audit: {len(self.problems)} problem(s) found"
        gaps = []
        for kind, what in (("aggregate", "aggregate(s)"), ("server", "server step(s)")):
            rows = [r for r in self.not_recomputed if r.kind == kind]
            if rows:
                reasons = "; ".join(dict.fromkeys(r.detail for r in rows))
                gaps.append(f"{len(rows)} {what} NOT RECOMPUTED ({reasons})")
        if self.unsigned:
            gaps.append(f"{len(self.unsigned)} update(s) UNSIGNED (accepted without a signed record)")
        if gaps:
            return "audit: no problem found, but " + ", and ".join(gaps)
        n = len(self.rejected)
        return "audit: OK, every record verified" + (
            f" ({n} repl{'y' if n == 1 else 'ies'} REJECTED by the aggregator)" if n else "")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "exit-code": self.exit_code, "verdict": self.verdict, "run-id": self.run_id,
                "registry-address": self.registry, "chain-id": self.chain_id, "source": self.source,
                "framework": self.framework, "rule": self.rule, "seconds": round(self.seconds, 3),
                "records": sum(1 for r in self.rows if r.kind == "update"), "problems": len(self.problems),
                "rejected": len(self.rejected), "not-recomputed": len(self.not_recomputed),
                "unsigned": len(self.unsigned), "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        lines = [f"audit of run {self.run_id} ({self.framework}; {self.rule}): registry {self.registry} on chain "
                 f"{self.chain_id} ({self.source})",
                 f"{'round':>5}  {'client':<42}  {'status':<14}  detail"]
        lines += [f"{r.round:>5}  {r.client:<42}  {r.status:<14}  {r.detail}" for r in self.rows]
        lines.append(self.verdict)
        return "\n".join(lines)


# ---------------------------------------------------------------------------- the entry point
def audit_run(run_folder: str, rpc_url: str | None = None, registry_address: str | None = None,
              ledger: Ledger | None = None, atol: float = 0.0) -> AuditReport:
    """Audit the run stored in ``run_folder`` (the run folder or its ``audit/`` subfolder).

    Events come from ``ledger`` when given, else from the chain the run used (``rpc_url`` /
    ``registry_address`` override it), else, for an eth-tester run, from the events exported
    while it ran. Bad input raises a one-line :class:`LedgerError`."""
    start = time.perf_counter()
    store = ArtifactStore(run_folder, create=False)
    run_bytes, run = _read_run(store)
    run_id = int(run["run-id"])
    events, source, ledger = _events(run, store, run_id, rpc_url, registry_address, ledger)
    replay = Replay(run)
    rows = RunAudit(run, bytes_hash(run_bytes), store, replay, atol).rows(events)
    return AuditReport(run_id, ledger.address if ledger else run.get("registry-address", "?"),
                       ledger.chain_id if ledger else run.get("chain-id", 0), source, replay.rule, tuple(rows),
                       time.perf_counter() - start, framework_label(run))


def framework_label(run: Mapping) -> str:
    """Which framework the run's record says it used, in words."""
    name = str(run.get("framework", "fedllm"))
    label = FRAMEWORKS.get(name, name)
    if name == "kd-fedllm":
        return f"{label}, {'the server distils' if run.get('kd-variant') == 'server' else 'the clients distil'}"
    if name == "split-fedllm":
        return f"{label}, cut after block {run.get('split-layer')}"
    return label


def _read_run(store: ArtifactStore) -> tuple[bytes, dict]:
    try:
        loaded = store.read_document(store.run_path)
    except ValueError:
        raise LedgerError(f"{store.run_path} is not valid JSON; the run's record is damaged") from None
    if loaded is None:
        raise LedgerError(f"no audit record at {store.run_path}; pass the folder of a run made with audit=\"anvil\" "
                          f"or audit=\"eth-tester\"")
    if "run-id" not in loaded[1]:
        raise LedgerError(f"{store.run_path} has no run-id; the run's record is damaged")
    return loaded


def _events(run: dict, store: ArtifactStore, run_id: int, rpc_url, registry_address, ledger):
    if ledger is not None:
        return ledger.events(run_id), f"live chain ({ledger.kind})", ledger
    if run.get("kind") == "eth-tester" and not rpc_url:
        return (store.read_events(), "eth-tester: the in-process chain ended with the run; events exported at run time",
                None)
    url = rpc_url or run.get("rpc-url")
    if not url:
        raise LedgerError(f"{store.run_path} names no RPC URL; pass --rpc-url")
    ledger = Ledger.connect(url, registry_address or run.get("registry-address"),
                            chain_id=None if registry_address else run.get("chain-id"),
                            deploy_block=run.get("deploy-block", 0), read_only=True)
    return ledger.events(run_id), f"live chain at {url}", ledger


# ---------------------------------------------------------------------------- the walk
@dataclass
class _Round:
    """What the chain says about one round."""

    records: list[dict] = field(default_factory=list)
    commit: dict | None = None


class RunAudit:
    """Walk a run's rounds in order; :meth:`rows` gives the findings."""

    def __init__(self, run: Mapping, run_hash: str, store: ArtifactStore, replay: Replay, atol: float = 0.0):
        self.run, self.run_hash, self.store, self.replay, self.atol = run, run_hash, store, replay, float(atol)
        self.run_id = int(run["run-id"])
        self.expected_global: str | None = None   # hash the next round must start from (None: unknown)
        self.replay_lost: str | None = None       # why a stateful replay cannot go on
        self.run_hash_flagged = False
        self.record_kind = {"kd-fedllm": "signed logit reply, ",
                            "split-fedllm": "signed adapter + activations digest, "}.get(str(run.get("framework")), "")

    def rows(self, events: list[dict]) -> list[Row]:
        rounds = self._rounds(events)
        out: list[Row] = []
        for rnd in sorted(set(rounds) | set(self._stored_rounds())):
            if rnd not in rounds:
                out.append(Row(rnd, "round.json", "MISSING", f"round {rnd} is stored but has no record on chain",
                               "document"))
                continue
            out += self._round(rnd, rounds[rnd])
        if not rounds:
            out.append(Row(0, "-", "MISSING", f"no events of run {self.run_id} on the registry", "document"))
        return out

    def _rounds(self, events: list[dict]) -> dict[int, _Round]:
        rounds: dict[int, _Round] = {}
        for e in events:
            if e.get("run-id") != self.run_id:
                continue
            r = rounds.setdefault(int(e["round"]), _Round())  # RoundOpened alone: a round with no record yet
            if e["event"] == "UpdateRecorded":
                r.records.append(e)
            elif e["event"] == "AggregateCommitted":
                r.commit = e
        for r in rounds.values():
            r.records.sort(key=lambda e: e["index"])
        return rounds

    def _stored_rounds(self) -> list[int]:
        if not os.path.isdir(self.store.root):
            return []
        return [int(m.group(1)) for m in (re.fullmatch(r"round-(\d+)", n) for n in os.listdir(self.store.root)) if m]

    # ----------------------------------------------------------------- one round
    def _round(self, rnd: int, chain: _Round) -> list[Row]:
        rows: list[Row] = []
        doc = self._document(rnd, chain, rows)
        if chain.commit is not None and (chain.commit["num-records"] != len(chain.records)
                                         or records_digest(chain.records) != chain.commit["records-digest"]):
            rows.append(Row(rnd, "aggregate", "MISMATCH", "committed records digest does not match the recorded events",
                            "aggregate"))
        entries = self._updates(rnd, chain, doc, rows)
        if doc is not None:
            rows += [_rejected_row(rnd, r) for r in doc.get("rejected", [])]
            rows += self._activation_rows(rnd, doc, entries)
        global_arrays = self._global(rnd, chain, doc, rows)
        rows.append(self._aggregate(rnd, chain, doc, global_arrays, entries))
        if doc is not None:
            rows += self._server_rows(rnd, doc)
        return rows

    # ----------------------------------------------------------------- KD and split rounds
    def _activation_rows(self, rnd: int, doc: dict, entries) -> list[Row]:
        """Split: the activation digest each client signed is the one the server recorded receiving."""
        recorded = doc.get("activations")
        if recorded is None or not entries:
            return []
        rows = []
        for key, node, arrays, _ in entries:
            signed = bytes(np.asarray(arrays.get("activations-digest", []), dtype=np.uint8)).hex()
            partition = key.removeprefix("partition-")
            want = recorded.get(partition, {}).get("digest")
            if signed != want:
                rows.append(Row(rnd, key, "MISMATCH", f"the signed activations digest {signed[:12]}... is not the "
                                                      f"digest round.json records for {key} ({str(want)[:12]}...)"))
        return rows

    def _server_rows(self, rnd: int, doc: dict) -> list[Row]:
        """The server-side steps a KD or split round records by hash: checked against their files,
        reported as not recomputed (the audit cannot re-train them)."""
        rows = []
        for name, key, what in (("next-global", "next-global-hash", "next global adapter"),
                                ("server-part", "server-part-hash", "server part")):
            if key not in doc:
                continue
            h, _ = _hash_file(self.store.artifact_path(rnd, name))
            status = _file_status(h, doc[key], f"stored {what}", "round.json")
            if status is not None:
                rows.append(Row(rnd, name, *status, kind="server"))
            elif name == "next-global" and doc.get("server-distilled"):
                rows.append(Row(rnd, name, "NOT-RECOMPUTED", "the server distilled the soft labels into the next "
                                                             "global adapter; the audit cannot re-train it", "server"))
            elif name == "next-global" and doc[key] != doc.get("global-hash"):
                rows.append(Row(rnd, name, "MISMATCH", "the next global adapter differs from this round's, but the "
                                                       "round records no distillation", "server"))
            elif name == "next-global":
                rows.append(Row(rnd, name, "OK", "the next global adapter is this round's, unchanged", "server"))
            else:
                rows.append(Row(rnd, name, "NOT-RECOMPUTED", f"the server part trained on {doc.get('server-steps', '?')} "
                                                             "activation messages that are not kept (they can be "
                                                             "inverted); the audit cannot re-run it", "server"))
        return rows

    def _document(self, rnd: int, chain: _Round, rows: list[Row]) -> dict | None:
        """The round document when its bytes hash to the committed document hash, else None."""
        if chain.commit is None:
            return None
        path = self.store.round_path(rnd)
        try:
            loaded = self.store.read_document(path)
        except ValueError:
            rows.append(Row(rnd, "round.json", "MISMATCH", "round.json is not a JSON document", "document"))
            return None
        if loaded is None:
            rows.append(Row(rnd, "round.json", "MISSING", "round.json not found", "document"))
            return None
        body, doc = loaded
        h, want = bytes_hash(body), chain.commit["document-hash"]
        if h != want:
            rows.append(Row(rnd, "round.json", "MISMATCH", f"round.json hashes to {h[:12]}..., the chain committed "
                                                            f"{want[:12]}...", "document"))
            return None
        if doc.get("round") != rnd or doc.get("run-id") != self.run_id:
            rows.append(Row(rnd, "round.json", "MISMATCH", f"the committed round.json is the document of round "
                                                            f"{doc.get('round')} of run {doc.get('run-id')}", "document"))
            return None
        if doc.get("run-hash") != self.run_hash and not self.run_hash_flagged:
            self.run_hash_flagged = True
            rows.append(Row(rnd, "run.json", "MISMATCH", f"run.json hashes to {self.run_hash[:12]}..., the committed "
                                                          f"round documents name {str(doc.get('run-hash'))[:12]}...",
                            "document"))
        return doc

    def _updates(self, rnd: int, chain: _Round, doc: dict | None, rows: list[Row]) -> list[tuple] | None:
        """One row per accepted update; the replay's entries, or None when some are unavailable."""
        listed = doc.get("updates", []) if doc is not None else [
            {"client": e["client"], "num-examples": e["num-examples"], "update-hash": e["update-hash"]}
            for e in chain.records]
        if doc is not None:
            signed = [(u["client"].lower(), u["update-hash"], int(u["num-examples"])) for u in listed if u.get("client")]
            on_chain = [(e["client"].lower(), e["update-hash"], int(e["num-examples"])) for e in chain.records]
            if signed != on_chain:
                rows.append(Row(rnd, "round.json", "MISMATCH", "the updates round.json lists are not the records on "
                                                                "chain (clients, hashes, num-examples, order)", "document"))
                doc = None
        by_client = {e["client"].lower(): e for e in chain.records}
        entries: list[tuple] | None = []
        for u in listed:
            row, arrays = self._update(rnd, u, by_client.get(str(u.get("client")).lower()))
            rows.append(row)
            if arrays is None or doc is None or entries is None:
                entries = None
                continue
            ident = Identity(int(u["node-id"]), u.get("partition"))
            entries.append((ident.key, ident.node_id, arrays, int(u["num-examples"])))
        return entries

    def _update(self, rnd: int, listed: dict, record: dict | None) -> tuple[Row, dict | None]:
        client = listed.get("client")
        if client is None:  # accepted unsigned: only the round document vouches for its bytes
            label = Identity(int(listed["node-id"]), listed.get("partition")).key
            h, arrays = _hash_file(self.store.update_path(rnd, label))
            status = _file_status(h, listed["update-hash"], "stored update", "round.json")
            if status is not None:
                return Row(rnd, label, *status), None
            return Row(rnd, label, "UNSIGNED", f"{listed['num-examples']} examples, accepted without a signed record; "
                                               f"bytes match round.json"), arrays
        if record is None:
            return Row(rnd, client, "MISSING", "listed in round.json but not recorded on chain"), None
        h, arrays = _hash_file(self.store.update_path(rnd, client))
        status = _file_status(h, record["update-hash"], "stored update", "chain")
        if status is not None:
            return Row(rnd, client, *status), None
        try:
            signer = recover_signer(self.run_id, rnd, record["update-hash"], record["signature"])
        except ValueError:
            signer = None
        if signer is None or signer.lower() != client.lower():
            return Row(rnd, client, "BAD-SIGNATURE", f"signature recovers to {signer}"), arrays
        return Row(rnd, client, "OK", f"{self.record_kind}{listed['num-examples']} examples"), arrays

    def _global(self, rnd: int, chain: _Round, doc: dict | None, rows: list[Row]) -> dict | None:
        """The verified global adapter of the round (None when unknown); updates what the next round
        must start from."""
        expected, self.expected_global = self.expected_global, None
        if doc is None:
            agg = chain.commit["aggregate-hash"] if chain.commit else ZERO_HASH
            self.expected_global = agg if agg != ZERO_HASH else None
            return None
        h, arrays = _hash_file(self.store.global_path(rnd))
        status = _file_status(h, doc["global-hash"], "stored global adapter", "round.json")
        if status is not None:
            rows.append(Row(rnd, "global", *status, kind="global"))
            arrays = None
        if expected is not None and doc["global-hash"] != expected:
            rows.append(Row(rnd, "global", "MISMATCH", f"round {rnd} started from {doc['global-hash'][:12]}..., not "
                                                        f"from round {rnd - 1}'s result {expected[:12]}...", "global"))
        agg = doc.get("aggregate-hash", ZERO_HASH)
        if "next-global-hash" in doc:  # KD: the aggregate is soft labels; the round names its next adapter
            self.expected_global = doc["next-global-hash"]
        else:
            self.expected_global = agg if agg != ZERO_HASH else doc["global-hash"]
        return arrays

    def _aggregate(self, rnd: int, chain: _Round, doc: dict | None, global_arrays, entries) -> Row:
        recomputed, why_not = self._replay(rnd, doc, global_arrays, entries)  # every round, in order
        if chain.commit is None:
            return Row(rnd, "aggregate", "MISSING", "round opened on chain but never committed", "aggregate")
        committed = chain.commit["aggregate-hash"]
        if doc is not None and doc.get("aggregate-hash") != committed:
            return Row(rnd, "round.json", "MISMATCH", "round.json names another aggregate than the chain", "document")
        if committed == ZERO_HASH:
            if recomputed is not None:
                return Row(rnd, "aggregate", "MISMATCH", f"round {rnd}: {self.replay.rule} computes an aggregate from "
                                                         f"the recorded updates, but none was committed", "aggregate")
            return Row(rnd, "aggregate", "NO-AGGREGATE", _nothing_learned(doc), "aggregate")
        h, stored = _hash_file(self.store.aggregate_path(rnd))
        status = _file_status(h, committed, "stored aggregate", "chain")
        if status is not None:
            return Row(rnd, "aggregate", *status, kind="aggregate")
        if why_not is not None:
            return Row(rnd, "aggregate", "NOT-RECOMPUTED", why_not, "aggregate")
        if recomputed is None:
            return Row(rnd, "aggregate", "MISMATCH", f"round {rnd}: {self.replay.rule} aggregates nothing from the "
                                                     f"recorded updates, but an aggregate was committed", "aggregate")
        if update_hash(recomputed) == committed:
            return Row(rnd, "aggregate", "OK", f"{self.replay.rule} recomputed bit-exactly", "aggregate")
        if self.atol > 0 and recomputed.keys() == stored.keys() and all(
                np.allclose(recomputed[k], stored[k], atol=self.atol, rtol=0) for k in recomputed):
            return Row(rnd, "aggregate", "OK", f"{self.replay.rule} recomputed within atol={self.atol} (not bit-exact)",
                       "aggregate")
        return Row(rnd, "aggregate", "MISMATCH", f"round {rnd}: the committed aggregate is not what {self.replay.rule} "
                                                 f"computes from the recorded updates and trust decision", "aggregate")

    def _replay(self, rnd: int, doc, global_arrays, entries) -> tuple[dict | None, str | None]:
        """(recomputed aggregate or None, why it was not recomputed or None)."""
        rule = self.replay.rule
        if not self.replay.ok:
            return None, self.replay.reason
        if self.replay_lost is not None:
            return None, self.replay_lost
        if doc is None or global_arrays is None or entries is None:
            if rule in STATEFUL:
                self.replay_lost = f"{rule} keeps server state and round {rnd} could not be replayed"
            return None, f"the inputs of round {rnd} are not all verified (see the rows above)"
        with _quiet_flower():
            aggregate, _error = self.replay.round(rnd, global_arrays, entries, doc.get("trust"))
        return aggregate, None


# ---------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _quiet_flower():
    """The replayed rule logs its sampling and counts like a live round: not news to an auditor."""
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        flwr_log.setLevel(level)


def _hash_file(path: str) -> tuple[str | None, dict | None]:
    """(canonical hash, arrays) of a stored safetensors file; (None, None) if absent, ("unreadable", None)."""
    if not os.path.exists(path):
        return None, None
    try:
        arrays = ArtifactStore.load_arrays(path)
    except Exception:  # noqa: BLE001  (a corrupted header: the file no longer parses)
        return "unreadable", None
    return update_hash(arrays), arrays


def _file_status(h: str | None, want: str, what: str, where: str) -> tuple[str, str] | None:
    """(status, detail) when a stored file is not the one ``where`` names by hash, else None."""
    if h is None:
        return "MISSING", f"{what} file not found"
    if h == "unreadable":
        return "MISMATCH", f"{what} cannot be read"
    if h != want:
        return "MISMATCH", f"{what} hashes to {h[:12]}..., {where} has {want[:12]}..."
    return None


def _rejected_row(rnd: int, r: Mapping) -> Row:
    node = r.get("node-id", -1)
    label = Identity(int(node), r.get("partition")).key if isinstance(node, int) else str(node)
    return Row(rnd, label, "REJECTED", f"{r.get('stage', '?')}: {r.get('reason', '?')}", "rejected")


def _nothing_learned(doc: dict | None) -> str:
    if doc is None:
        return "the round committed no aggregate"
    if doc.get("aggregate-error"):
        return f"no aggregate: {doc['aggregate-error']}"
    if not doc.get("updates"):
        n = len(doc.get("rejected", []))
        return f"no update was accepted ({n} repl{'y' if n == 1 else 'ies'} rejected)"
    return "the rule aggregated nothing from the accepted updates"


__all__ = ["AuditReport", "Row", "RunAudit", "audit_run"]
