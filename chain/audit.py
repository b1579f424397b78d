"""Audit a recorded run: the chain's records against the stored files, and every aggregate recomputed.

The auditor takes its inputs from the chain. The registry address and chain id it is given (on
the command line, or by the run folder's ``run.json``) are hints it checks: the node must be
that chain, the code at that address this version's UpdateRegistry, and the events are read
from the registry's own deploy block (read from the chain, never from ``run.json``). The run
folder is untrusted data that must hash to what the chain says:

- ``run.json`` must hash to the run hash the registry recorded at ``openRun``; only then are its
  rule, parameters, trust settings and layout used to recompute the aggregates, and its
  registry, chain id, admin, aggregator and enrolled set must be the chain's;
- each ``round.json`` must hash to the document hash committed with the round; its global
  adapter must be the one the registry opened the round with (the last committed aggregate),
  and its signed updates the records on chain.

Then, walking the rounds in order, one row per finding:

- ``OK``             a client's stored update hashes to its record on chain, its signer was
                     enrolled when it was recorded, and its EIP-712 signature over (chain id,
                     registry, run id, round, the round's global, update hash, example count)
                     recovers to the recorded client; an aggregate recomputed bit-exactly from
                     the recorded updates with their *signed* example counts;
- ``MISMATCH``       bytes or records that differ from what the chain committed (a stored file,
                     ``round.json``, ``run.json``); a client that signed for another global than
                     the round's; an aggregate that is not what the rule computes from the
                     recorded updates and trust decision (names round and rule);
- ``MISSING``        a file, a record, a run record or a commit that should be there and is not;
- ``NOT-ON-CHAIN``   what the run folder holds and the chain does not: a stored round, a stored
                     update file or a journaled record (``audit/journal.jsonl``: every write the
                     aggregator made, journaled before it was sent) with no record on chain; the
                     node lost it (a restart from an older state) or it was never sent.
                     ``fedledger resend RUN_FOLDER --send`` re-sends journaled writes;
- ``BAD-SIGNATURE``  a signature on chain that does not recover to the recorded client over the
                     recorded fields (an inflated example count, a record replayed from another
                     registry, chain, run or round);
- ``NOT-ENROLLED``   a record whose signer the admin had not enrolled (or had revoked) when it
                     was recorded (the registry refuses these; a node or a copy that shows one
                     is not telling the truth);
- ``DROPPED``        an enrolled client's signed commitment for a round that does not record it:
                     posted by the client with ``contest`` (the proof, on chain), or claimed in
                     a refusal the round document lists (not proven);
- ``NO-AGGREGATE``   a committed round whose aggregate hash is zero: the run learned nothing;
- ``REJECTED``       a reply the aggregator refused, with its reason (counted, not a problem);
- ``ABSENT``         a client enrolled when the run opened with no record, refusal or contest in a
                     committed round whose document the chain vouches for: it did not reply (a
                     dropout) or was not sampled (counted, not a problem: who was missing from
                     which round). Not claimed for a round with a refusal that names no signer;
- ``UNSIGNED``       an update accepted without a signed record (``require_audit_record=False``):
                     its bytes match the round document, but nobody signed it;
- ``NOT-RECOMPUTED`` the aggregate's hash matches, but the rule cannot be replayed (a user's own
                     class, custom callables, a run record the chain does not vouch for) or its
                     inputs are unavailable; or a server-side step the audit cannot re-run
                     (KD-FedLLM's distillation into the next global adapter, Split-FedLLM's
                     server part: rows of kind ``server``);
- ``NO-CHAIN``       the events are the run folder's ``events.jsonl``: the copy an eth-tester run
                     kept of a chain that ended with it, written by the aggregator itself.

The run's record names its **framework** (``run.json`` ``framework``; absent: FedLLM, parameter
sharing), and the audit's header names it. Every client record of every framework is the same
EIP-712 commitment (chain id, registry, run id, round, global hash, update hash, example count,
:class:`~.signing.Commitment`), recorded and checked the same way; what its fields mean:

- FedLLM: update hash = the adapter update; global hash = the global adapter the round sent;
  num-examples = the update's FedAvg weight. The aggregate is the next round's global.
- KD-FedLLM (``kd-variant="server"``; the client variant is refused with an audit at start-up):
  update hash = the canonical hash of the logit reply (``values``, ``ids``, ``public-ids``);
  global hash = the global adapter that round's ``train.kd`` carried (the client trained from
  it and computed its logits with the adapter it trained from it); num-examples = the weight
  of its soft labels in the aggregate (its private example count). The soft labels
  (``soft-labels-hash``, ``<round>/soft-labels.safetensors``) are recomputed bit-exactly from
  the recorded replies (``core.softlabels``, row ``soft-labels``). The **committed aggregate
  is the next global adapter** (the server distilled the soft labels into it: NOT-RECOMPUTED,
  kind ``server``; or, when nothing was distilled, the round's global unchanged: checked), so
  that the chain's current global is always the adapter the next round sends.
- Split-FedLLM: update hash = the client-side adapter plus its ``activations-digest`` (the
  digest chain of every activation message it sent that round, ``core.digest``); global hash =
  the global client-side adapter the round's first ``train.split`` message carried; num-examples
  = its FedAvg weight. The digest must be the one the server recorded receiving (round.json
  ``activations``); the aggregate (FedAvg of the client-side adapters) is recomputed; the
  server part is recorded by hash and checked against its file, NOT-RECOMPUTED (kind
  ``server``: its inputs, the activations, are not kept).

Verdict and exit code (:attr:`AuditReport.exit_code`): 0 every record verified, 1 problems found,
3 no problem found but not everything verified. What the audit proves, and what stays trusted
(the chain node it reads, the admin), is in docs/THREAT_MODEL.md.
"""

from __future__ import annotations

import bisect
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
from .journal import JOURNAL_FILE, read_journal
from .ledger import Ledger, LedgerError, records_digest
from .signing import Commitment, recover
from .store import ArtifactStore
from .trail import ZERO_HASH

PROBLEMS = ("MISMATCH", "MISSING", "NOT-ON-CHAIN", "BAD-SIGNATURE", "NOT-ENROLLED", "DROPPED", "NO-AGGREGATE")
UNVERIFIED = ("NOT-RECOMPUTED", "UNSIGNED", "NO-CHAIN")
#: Rules whose server state carries over from round to round: once a round cannot be replayed,
#: the later rounds cannot be either.
STATEFUL = {"FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"}
EXIT_OK, EXIT_PROBLEMS, EXIT_UNVERIFIED = 0, 1, 3

STATUSES = ("OK", *PROBLEMS, "REJECTED", "ABSENT", *UNVERIFIED)
# NOT-ON-CHAIN rows are problems: a record the run made and the chain does not hold is a record lost
KINDS = ("update", "rejected", "aggregate", "global", "document", "run", "contest", "participation", "server")
ADDRESS_FILE = re.compile(r"(0x[0-9a-f]{40})\.safetensors")   # a signed update's file (unsigned: identity key)
#: how a client's refusal names the round it was dropped from (chain.inclusion writes it)
DROP_CLAIM = re.compile(r"my signed record of round (\d+) \(update (0x[0-9a-f]{64})\) is not on chain")
FRAMEWORKS = {"fedllm": "FedLLM (parameter sharing)", "kd-fedllm": "KD-FedLLM (knowledge distillation)",
              "split-fedllm": "Split-FedLLM (split learning)"}


@dataclass(frozen=True)
class Row:
    round: int
    client: str          # signer address, identity key, or what the row is about ("aggregate", "global", "run.json")
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
    admin: str = "?"
    aggregator: str = "?"
    enrolled: int = 0
    admin_pinned: bool = False
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
    def absent(self) -> list[Row]:
        return self._with(("ABSENT",))

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
        if self._with(("NO-CHAIN",)):
            gaps.append("the events are the aggregator's own copy (no chain to check them against)")
        for kind, what in (("aggregate", "aggregate(s)"), ("server", "server step(s)")):
            rows = [r for r in self.not_recomputed if r.kind == kind]
            if rows:
                reasons = "; ".join(dict.fromkeys(r.detail for r in rows))
                gaps.append(f"{len(rows)} {what} NOT RECOMPUTED ({reasons})")
        if self.unsigned:
            gaps.append(f"{len(self.unsigned)} update(s) UNSIGNED (accepted without a signed record)")
        if gaps:
            return "audit: no problem found, but " + ", and ".join(gaps)
        n, a = len(self.rejected), len(self.absent)
        notes = ([f"{n} repl{'y' if n == 1 else 'ies'} REJECTED by the aggregator"] if n else []) + (
            [f"{a} client-round(s) ABSENT"] if a else [])
        return "audit: OK, every record verified" + (f" ({', '.join(notes)})" if notes else "")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "exit-code": self.exit_code, "verdict": self.verdict, "run-id": self.run_id,
                "registry-address": self.registry, "chain-id": self.chain_id, "source": self.source,
                "framework": self.framework, "rule": self.rule, "admin": self.admin, "admin-pinned": self.admin_pinned,
                "aggregator": self.aggregator, "enrolled": self.enrolled, "seconds": round(self.seconds, 3),
                "records": sum(1 for r in self.rows if r.kind == "update"), "problems": len(self.problems),
                "rejected": len(self.rejected), "absent": len(self.absent),
                "not-recomputed": len(self.not_recomputed),
                "unsigned": len(self.unsigned), "rows": [asdict(r) for r in self.rows]}

    def table(self) -> str:
        pin = "pinned with --admin" if self.admin_pinned else "not pinned: pass --admin ADDRESS to require it"
        lines = [f"audit of run {self.run_id} ({self.framework}; {self.rule}): registry {self.registry} on chain "
                 f"{self.chain_id} ({self.source})",
                 f"admin {self.admin} ({pin}), aggregator {self.aggregator}, {self.enrolled} signer(s) enrolled at "
                 f"run open",
                 f"{'round':>5}  {'client':<42}  {'status':<14}  detail"]
        lines += [f"{r.round:>5}  {r.client:<42}  {r.status:<14}  {r.detail}" for r in self.rows]
        lines.append(self.verdict)
        return "\n".join(lines)


# ---------------------------------------------------------------------------- what the chain says
@dataclass
class ChainRecord:
    """Everything the audit takes from the chain (or, for an eth-tester run, from its copy)."""

    source: str
    verified: bool                  # False: the aggregator's own copy (events.jsonl)
    chain_id: int
    registry: str
    admin: str
    aggregator: str
    deploy_block: int | None
    events: list[dict]              # the run's events, in chain order
    enrolment: list[dict]           # Enrolled / Revoked events, in chain order

    def enrolled_at(self) -> "Enrolment":
        return Enrolment(self.enrolment)


class Enrolment:
    """Who was enrolled at any point of the chain (events replayed in order)."""

    def __init__(self, events: list[dict]):
        self._keys = [(int(e["block"]), int(e["log-index"])) for e in events]
        self._events = events

    def at(self, block: int, log_index: int) -> set[str]:
        """The enrolled signers (lower case) just before the event at (block, log index)."""
        now: set[str] = set()
        for e in self._events[:bisect.bisect_left(self._keys, (int(block), int(log_index)))]:
            (now.add if e["event"] == "Enrolled" else now.discard)(e["signer"].lower())
        return now


def read_chain(run: Mapping, store: ArtifactStore, rpc_url: str | None, registry_address: str | None,
               ledger: Ledger | None) -> tuple[ChainRecord, Ledger | None]:
    """The chain's record of the run: from ``ledger`` when given; else from the node at ``rpc_url``
    (default: the one ``run.json`` names) and ``registry_address`` (default: ``run.json``'s), both
    checked (chain id read from the node, the registry's code, its own deploy block); else, for an
    eth-tester run, its exported copy."""
    run_id = int(run["run-id"])
    if ledger is None and run.get("kind") == "eth-tester" and not rpc_url:
        events = store.read_events()
        return ChainRecord("eth-tester: the in-process chain ended with the run; events from the run folder's copy",
                           False, int(run.get("chain-id", 0)), str(run.get("registry-address", "?")),
                           str(run.get("admin", "?")), str(run.get("aggregator", "?")), None,
                           [e for e in events if e.get("run-id") == run_id],
                           sorted((e for e in events if e["event"] in ("Enrolled", "Revoked")),
                                  key=lambda e: (e["block"], e["log-index"]))), None
    if ledger is None:
        url = rpc_url or run.get("rpc-url")
        if not url:
            raise LedgerError(f"{store.run_path} names no RPC URL; pass --rpc-url")
        ledger = Ledger.connect(url, registry_address or run.get("registry-address"), read_only=True)
        source = f"live chain at {url}"
    else:
        if not ledger.code_is_registry():
            raise LedgerError(f"the contract at {ledger.address} is not this version's UpdateRegistry")
        source = f"live chain ({ledger.kind})"
    reader = Ledger(ledger.w3, ledger.contract, None, ledger.kind, ledger.rpc_url,
                    deploy_block=ledger.registry_deploy_block())
    events = reader.registry_events()   # one read: the run's events and the enrolment history
    return ChainRecord(source, True, reader.chain_id, reader.address, reader.admin_address(),
                       reader.aggregator_address(), reader.deploy_block,
                       [e for e in events if e.get("run-id") == run_id],
                       [e for e in events if e["event"] in ("Enrolled", "Revoked")]), ledger


# ---------------------------------------------------------------------------- the entry point
def audit_run(run_folder: str, rpc_url: str | None = None, registry_address: str | None = None,
              ledger: Ledger | None = None, atol: float = 0.0, admin: str | None = None) -> AuditReport:
    """Audit the run stored in ``run_folder`` (the run folder or its ``audit/`` subfolder).

    The chain is ``ledger`` when given, else the node and registry the run used (``rpc_url`` /
    ``registry_address`` override them), else, for an eth-tester run, the events exported while
    it ran. ``admin``: the admin address the auditor trusts (flagged when the registry's differs).
    Bad input raises a one-line :class:`LedgerError`."""
    start = time.perf_counter()
    store = ArtifactStore(run_folder, create=False)
    run_bytes, run = _read_run(store)
    chain, _ = read_chain(run, store, rpc_url, registry_address, ledger)
    walk = RunAudit(run, run_bytes, store, chain, atol, admin)
    rows = walk.rows()
    return AuditReport(walk.run_id, chain.registry, chain.chain_id, chain.source, walk.replay.rule, tuple(rows),
                       time.perf_counter() - start, admin=chain.admin, aggregator=chain.aggregator,
                       enrolled=len(walk.enrolled_at_open), admin_pinned=admin is not None,
                       framework=framework_label(run) + (" (named by a run.json the chain does not vouch for)"
                                                         if walk.run_untrusted else ""))


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


# ---------------------------------------------------------------------------- the walk
@dataclass
class _Round:
    """What the chain says about one round."""

    opened: dict | None = None
    records: list[dict] = field(default_factory=list)
    commit: dict | None = None
    contests: list[dict] = field(default_factory=list)


class RunAudit:
    """Walk a run's rounds in order; :meth:`rows` gives the findings."""

    def __init__(self, run: Mapping, run_bytes: bytes, store: ArtifactStore, chain: ChainRecord, atol: float = 0.0,
                 admin: str | None = None):
        self.run, self.store, self.chain, self.atol, self.pinned_admin = run, store, chain, float(atol), admin
        self.run_id = int(run["run-id"])
        self.run_hash = bytes_hash(run_bytes)
        self.enrolment = chain.enrolled_at()
        self.enrolled_at_open: set[str] = set()
        self.replay_lost: str | None = None       # why a stateful replay cannot go on
        self.run_untrusted: str | None = None     # why run.json's rule must not be used
        self.run_hash_flagged = False
        self.replay = Replay(run)
        self.framework = str(run.get("framework", "fedllm"))
        self.record_kind = {"kd-fedllm": "signed logit reply, ",
                            "split-fedllm": "signed adapter + activations digest, "}.get(self.framework, "")

    def rows(self) -> list[Row]:
        out = self._run_rows()
        rounds = self._rounds(self.chain.events)
        for rnd in sorted(set(rounds) | set(self._stored_rounds())):
            if rnd not in rounds:
                out.append(Row(rnd, "round.json", "NOT-ON-CHAIN", f"round {rnd} is stored in the run folder "
                                                                   f"({self._stored_what(rnd)}) but the chain has no "
                                                                   f"record of it", "document"))
                continue
            out += self._round(rnd, rounds[rnd])
        out += self._not_on_chain(rounds)
        if not rounds:
            out.append(Row(0, "-", "MISSING", f"no rounds of run {self.run_id} on the registry", "document"))
        return sorted(out, key=lambda r: r.round)

    # ----------------------------------------------------------------- the run folder against the chain
    def _stored_what(self, rnd: int) -> str:
        files = self._stored_updates(rnd)
        parts = [f"{len(files)} update file(s)"] + [name for name, path in (
            ("round.json", self.store.round_path(rnd)), ("global", self.store.global_path(rnd)),
            ("aggregate", self.store.aggregate_path(rnd))) if os.path.exists(path)]
        return ", ".join(parts)

    def _stored_updates(self, rnd: int) -> list[str]:
        """The signers whose update file round ``rnd`` stores (unsigned updates' files are not listed)."""
        folder = os.path.join(self.store.round_dir(rnd), "updates")
        if not os.path.isdir(folder):
            return []
        return sorted(m.group(1) for m in (ADDRESS_FILE.fullmatch(n) for n in os.listdir(folder)) if m)

    def _journaled(self) -> dict[tuple[int, str], str]:
        """(round, signer) -> update hash of every record the aggregator journaled for this registry and run."""
        out: dict[tuple[int, str], str] = {}
        for e in read_journal(os.path.join(self.store.root, JOURNAL_FILE)):
            if (e.get("op") != "record-updates" or int(e.get("run-id", -1)) != self.run_id
                    or str(e.get("registry", "")).lower() != self.chain.registry.lower()):
                continue
            for u in e.get("updates", []):
                out[(int(e["round"]), str(u["client"]).lower())] = str(u["update-hash"])
        return out

    def _not_on_chain(self, rounds: dict[int, "_Round"]) -> list[Row]:
        """A stored update file or a journaled record of a round on chain that the chain does not record."""
        rows = []
        journaled = self._journaled()
        stored = {(rnd, c) for rnd in rounds for c in self._stored_updates(rnd)}
        for rnd, client in sorted(set(journaled) | stored):
            if rnd not in rounds:
                continue   # the whole round is not on chain: one row above
            recorded = {e["client"].lower(): e["update-hash"] for e in rounds[rnd].records}
            if client in recorded:
                if client in {c for (r, c) in journaled if r == rnd} and journaled[(rnd, client)] != recorded[client]:
                    rows.append(Row(rnd, client, "MISMATCH", f"the journal holds update {journaled[(rnd, client)][:12]}"
                                                             f"..., the chain records {recorded[client][:12]}...",
                                    "update"))
                continue
            where = " and ".join(w for w, present in (("a stored update file", (rnd, client) in stored),
                                                      ("a journaled signed record", (rnd, client) in journaled))
                                 if present)
            rows.append(Row(rnd, client, "NOT-ON-CHAIN", f"the run folder holds {where} of round {rnd}, the chain no "
                                                         f"record: lost by the node or never sent (`fedledger resend "
                                                         f"RUN_FOLDER --send` re-sends journaled records)", "update"))
        return rows

    # ----------------------------------------------------------------- the run
    def _run_rows(self) -> list[Row]:
        out: list[Row] = []
        chain = self.chain
        if not chain.verified:
            out.append(Row(0, "chain", "NO-CHAIN", "events read from audit/events.jsonl, the aggregator's own copy of "
                                                   "an eth-tester chain that ended with the run: nothing here is "
                                                   "proven against a chain", "run"))
        if self.pinned_admin is not None and self.pinned_admin.lower() != chain.admin.lower():
            out.append(Row(0, "admin", "MISMATCH", f"the registry's admin is {chain.admin}, not the admin you trust "
                                                   f"{self.pinned_admin}: its enrolments prove nothing to you", "run"))
        opened = [e for e in chain.events if e["event"] == "RunOpened"]
        if not opened:
            self._distrust_run("the chain has no run record (RunOpened) of this run")
            out.append(Row(0, "run.json", "MISSING", f"the registry has no RunOpened for run {self.run_id}: the run's "
                                                     f"parameters were never recorded on chain", "run"))
            return out
        run_open = opened[0]
        self.enrolled_at_open = self.enrolment.at(run_open["block"], run_open["log-index"])
        if run_open["run-hash"] != self.run_hash:
            self.run_hash_flagged = True
            self._distrust_run("run.json does not hash to the run record on chain")
            out.append(Row(0, "run.json", "MISMATCH", f"run.json hashes to {self.run_hash[:12]}..., the chain recorded "
                                                      f"{run_open['run-hash'][:12]}... at run open (block "
                                                      f"{run_open['block']}): its rule and parameters are not used",
                           "run"))
            return out
        claims = {"registry-address": (str(self.run.get("registry-address", "")).lower(), chain.registry.lower()),
                  "chain-id": (self.run.get("chain-id"), chain.chain_id),
                  "admin": (str(self.run.get("admin", "")).lower(), chain.admin.lower()),
                  "aggregator": (str(self.run.get("aggregator", "")).lower(), chain.aggregator.lower()),
                  "enrolled": (sorted(str(a).lower() for a in self.run.get("enrolled", [])),
                               sorted(self.enrolled_at_open))}
        for key, (claimed, actual) in claims.items():
            if claimed != actual:
                shown = (f"{len(claimed)} signer(s)", f"{len(actual)}") if key == "enrolled" else (claimed, actual)
                out.append(Row(0, "run.json", "MISMATCH", f"run.json says {key} {shown[0]}, the chain read says "
                                                          f"{shown[1]}", "run"))
        return out

    def _distrust_run(self, why: str) -> None:
        """The run record is not the chain's: its rule is not used to recompute anything."""
        self.run_untrusted = f"{why}; its rule is not used to recompute the aggregates"

    def _rounds(self, events: list[dict]) -> dict[int, _Round]:
        rounds: dict[int, _Round] = {}
        for e in events:
            if e.get("run-id") != self.run_id or "round" not in e:
                continue
            r = rounds.setdefault(int(e["round"]), _Round())
            if e["event"] == "RoundOpened":
                r.opened = e
            elif e["event"] == "UpdateRecorded":
                r.records.append(e)
            elif e["event"] == "AggregateCommitted":
                r.commit = e
            elif e["event"] == "Contested":
                r.contests.append(e)
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
        rows += self._contests(rnd, chain)
        if doc is not None:
            rows += [_rejected_row(rnd, r) for r in doc.get("rejected", [])]
            rows += self._activation_rows(rnd, doc, entries)
            rows += self._drop_claims(rnd, doc)
        rows += self._absent(rnd, chain, doc)
        global_arrays = self._global(rnd, chain, doc, rows)
        if self.framework == "kd-fedllm":
            rows += self._kd_rows(rnd, chain, doc, global_arrays, entries)
        else:
            rows.append(self._aggregate(rnd, chain, doc, global_arrays, entries))
        if doc is not None:
            rows += self._server_rows(rnd, doc)
        return rows

    def _kd_rows(self, rnd: int, chain: _Round, doc: dict | None, global_arrays, entries) -> list[Row]:
        """KD: the soft labels recomputed from the recorded logit replies (``soft-labels-hash``),
        and the committed aggregate, which is the next global adapter (distilled by the server:
        not recomputed; or this round's global, unchanged)."""
        recomputed, why_not = self._replay(rnd, doc, global_arrays, entries)
        if chain.commit is None:
            return [Row(rnd, "aggregate", "MISSING", "round opened on chain but never committed", "aggregate")]
        committed = chain.commit["aggregate-hash"]
        if doc is not None and doc.get("aggregate-hash") != committed:
            return [Row(rnd, "round.json", "MISMATCH", "round.json names another aggregate than the chain", "document")]
        rows = []
        want = doc.get("soft-labels-hash") if doc is not None else None
        if doc is None:
            pass
        elif want is None:
            rows.append(Row(rnd, "soft-labels", "MISMATCH", f"round {rnd}: the recorded logit replies aggregate to soft "
                                                            f"labels, but the round records none", "aggregate")
                        if recomputed is not None else
                        Row(rnd, "soft-labels", "NO-AGGREGATE", _nothing_learned(doc), "aggregate"))
        else:
            h, _ = _hash_file(self.store.artifact_path(rnd, "soft-labels"))
            status = _file_status(h, want, "stored soft labels", "round.json")
            if status is not None:
                rows.append(Row(rnd, "soft-labels", *status, kind="aggregate"))
            elif why_not is not None:
                rows.append(Row(rnd, "soft-labels", "NOT-RECOMPUTED", why_not, "aggregate"))
            elif recomputed is not None and update_hash(recomputed) == want:
                rows.append(Row(rnd, "soft-labels", "OK", f"{self.replay.rule} recomputed bit-exactly from the signed "
                                                          f"logit replies", "aggregate"))
            else:
                rows.append(Row(rnd, "soft-labels", "MISMATCH", f"round {rnd}: the recorded soft labels are not what "
                                                                f"{self.replay.rule} computes from the signed logit "
                                                                f"replies and their signed example counts", "aggregate"))
        if committed == ZERO_HASH:
            rows.append(Row(rnd, "aggregate", "NO-AGGREGATE", "the round committed no next global adapter", "aggregate"))
            return rows
        h, _ = _hash_file(self.store.aggregate_path(rnd))
        status = _file_status(h, committed, "stored next global adapter", "chain")
        if status is not None:
            rows.append(Row(rnd, "aggregate", *status, kind="aggregate"))
        elif doc is None:
            rows.append(Row(rnd, "aggregate", "NOT-RECOMPUTED", f"the inputs of round {rnd} are not all verified (see "
                                                                f"the rows above)", "aggregate"))
        elif doc.get("server-distilled"):
            rows.append(Row(rnd, "next-global", "NOT-RECOMPUTED", "the committed aggregate is the next global adapter, "
                                                                  "which the server distilled from the soft labels; "
                                                                  "the audit cannot re-train it", "server"))
        elif committed == doc.get("global-hash"):
            rows.append(Row(rnd, "aggregate", "OK", "nothing was distilled: the committed next global adapter is this "
                                                    "round's, unchanged", "aggregate"))
        else:
            rows.append(Row(rnd, "aggregate", "MISMATCH", "the committed next global adapter differs from this round's, "
                                                          "but the round records no distillation", "aggregate"))
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
        """Split: the server part the round records by hash, checked against its file and reported
        as not recomputed (the audit cannot re-train it: its inputs, the activations, are not kept)."""
        if "server-part-hash" not in doc:
            return []
        h, _ = _hash_file(self.store.artifact_path(rnd, "server-part"))
        status = _file_status(h, doc["server-part-hash"], "stored server part", "round.json")
        if status is not None:
            return [Row(rnd, "server-part", *status, kind="server")]
        return [Row(rnd, "server-part", "NOT-RECOMPUTED", f"the server part trained on {doc.get('server-steps', '?')} "
                                                          "activation messages that are not kept (they can be "
                                                          "inverted); the audit cannot re-run it", "server")]

    def _absent(self, rnd: int, chain: _Round, doc: dict | None) -> list[Row]:
        """The clients enrolled at run open that the committed round neither records nor lists. None
        when a refusal of the round names no signer (it may be any of them: not claimed)."""
        if chain.commit is None or not self.enrolled_at_open or doc is None:
            return []
        refused = doc.get("rejected", [])
        if any(not r.get("signer") for r in refused):
            return []
        present = {e["client"].lower() for e in chain.records} | {c["client"].lower() for c in chain.contests}
        present |= {str(r["signer"]).lower() for r in refused}
        from eth_utils import to_checksum_address

        return [Row(rnd, to_checksum_address(a), "ABSENT", f"enrolled at run open; round {rnd} has no record, refusal or contest of it: "
                                      f"it did not reply (a dropout) or was not sampled", "participation")
                for a in sorted(self.enrolled_at_open - present)]

    def _round_global(self, chain: _Round) -> str | None:
        return chain.opened["global-hash"] if chain.opened is not None else None

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
        if doc is not None:
            signed = [(u["client"].lower(), u["update-hash"], int(u["num-examples"])) for u in doc.get("updates", [])
                      if u.get("client")]
            on_chain = [(e["client"].lower(), e["update-hash"], int(e["num-examples"])) for e in chain.records]
            if signed != on_chain:
                rows.append(Row(rnd, "round.json", "MISMATCH", "the updates round.json lists are not the records on "
                                                                "chain (clients, hashes, num-examples, order)", "document"))
                doc = None
        # a verified round document lists every accepted update; otherwise every record on chain is checked
        listed = doc.get("updates", []) if doc is not None else [
            {"client": e["client"], "num-examples": e["num-examples"], "update-hash": e["update-hash"]}
            for e in chain.records]
        by_client = {e["client"].lower(): e for e in chain.records}
        entries: list[tuple] | None = []
        for u in listed:
            record = by_client.get(str(u.get("client")).lower())
            row, arrays = self._update(rnd, u, record, chain, doc)
            rows.append(row)
            if arrays is None or doc is None or entries is None or row.status not in ("OK", "UNSIGNED"):
                entries = None   # the replay uses verified records only
                continue
            ident = Identity(int(u["node-id"]), u.get("partition"))
            weight = int(record["num-examples"]) if record is not None else int(u["num-examples"])  # the signed count
            entries.append((ident.key, ident.node_id, arrays, weight))
        return entries

    def _update(self, rnd: int, listed: dict, record: dict | None, chain: _Round, doc: dict | None
                ) -> tuple[Row, dict | None]:
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
        if client.lower() not in self.enrolment.at(record["block"], record["log-index"]):
            return Row(rnd, client, "NOT-ENROLLED", f"the admin had not enrolled {client} when round {rnd} recorded "
                                                    f"it (block {record['block']})"), None
        h, arrays = _hash_file(self.store.update_path(rnd, client))
        status = _file_status(h, record["update-hash"], "stored update", "chain")
        if status is not None:
            return Row(rnd, client, *status), None
        signed, detail = self._signature(rnd, record, self._round_global(chain), doc)
        if signed is not None:
            return Row(rnd, client, signed, detail), arrays
        return Row(rnd, client, "OK", f"{self.record_kind}{record['num-examples']} examples"), arrays

    def _signature(self, rnd: int, record: dict, round_global: str | None, doc: dict | None
                   ) -> tuple[str | None, str]:
        """(None, "") when the client's signature covers the recorded fields and the round's global."""
        def signer(global_hash):
            if global_hash is None:
                return None
            try:
                return recover(self._commitment(rnd, global_hash, record), record["signature"])
            except ValueError:
                return None

        client = record["client"].lower()
        got = signer(round_global)
        if got is not None and got.lower() == client:
            return None, ""
        other = doc.get("global-hash") if doc is not None else None
        if other not in (None, round_global) and (signer(other) or "").lower() == client:
            return "MISMATCH", (f"signed for global {other[:12]}... (the one round.json names), not the global the "
                                f"chain opened round {rnd} with {str(round_global)[:12]}...: it was sent another model")
        return "BAD-SIGNATURE", (f"the signature does not recover to the client over (round {rnd}, global "
                                 f"{str(round_global)[:12]}..., update {record['update-hash'][:12]}..., "
                                 f"{record['num-examples']} examples) on registry {self.chain.registry[:12]}... of "
                                 f"chain {self.chain.chain_id} (recovers to {got})")

    def _commitment(self, rnd: int, global_hash: str, record: dict) -> Commitment:
        return Commitment(self.chain.chain_id, self.chain.registry, self.run_id, rnd, global_hash,
                          record["update-hash"], int(record["num-examples"]))

    def _contests(self, rnd: int, chain: _Round) -> list[Row]:
        """A contest is an enrolled client's proof that the round left its signed update out."""
        rows = []
        for c in chain.contests:
            client = c["client"]
            try:
                ok = recover(self._commitment(rnd, c["global-hash"], c), c["signature"]).lower() == client.lower()
            except ValueError:
                ok = False
            if not ok:
                rows.append(Row(rnd, client, "BAD-SIGNATURE", "a contest whose signature is not the client's", "contest"))
                continue
            base = self._round_global(chain)
            how = ("trained from the round's global" if c["global-hash"] == base else
                   f"trained from {c['global-hash'][:12]}..., not the round's global {str(base)[:12]}...: it was "
                   f"sent another model")
            rows.append(Row(rnd, client, "DROPPED", f"contested on chain (block {c['block']}): its signed update "
                                                    f"{c['update-hash'][:12]}... of {c['num-examples']} examples "
                                                    f"({how}) is not in the committed round", "contest"))
        return rows

    def _drop_claims(self, rnd: int, doc: dict) -> list[Row]:
        """Refusals listed in round.json in which a client says an earlier round dropped it."""
        contested = {(e["round"], e["update-hash"]) for e in self.chain.events if e["event"] == "Contested"}
        rows = []
        for r in doc.get("rejected", []):
            m = DROP_CLAIM.search(str(r.get("reason", "")))
            if m is None:
                continue
            claimed, who = int(m.group(1)), r.get("signer") or _rejected_label(r)
            if (claimed, m.group(2)) in contested:   # the contest row already shows it, with the proof
                continue
            rows.append(Row(claimed, str(who), "DROPPED", f"claimed in its refusal of round {rnd} (round.json): its "
                                                          f"signed update {m.group(2)[:12]}... is not in round "
                                                          f"{claimed}; no contest on chain, so not proven", "contest"))
        return rows

    def _global(self, rnd: int, chain: _Round, doc: dict | None, rows: list[Row]) -> dict | None:
        """The verified global adapter of the round (None when unknown)."""
        if doc is None:
            return None
        h, arrays = _hash_file(self.store.global_path(rnd))
        status = _file_status(h, doc["global-hash"], "stored global adapter", "round.json")
        if status is not None:
            rows.append(Row(rnd, "global", *status, kind="global"))
            arrays = None
        base = self._round_global(chain)
        if base is None:
            rows.append(Row(rnd, "global", "MISSING", f"the chain has no RoundOpened for round {rnd}", "global"))
            return None
        if doc["global-hash"] != base:
            rows.append(Row(rnd, "global", "MISMATCH", f"round {rnd} started from {doc['global-hash'][:12]}..., but the "
                                                        f"chain opened it from {base[:12]}... (round {rnd - 1}'s "
                                                        f"result, or the run's initial global)", "global"))
            return None
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
                                                         f"the recorded updates, but none was committed (zero hash)",
                           "aggregate")
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
                                                 f"computes from the recorded updates, their signed example counts and "
                                                 f"the trust decision", "aggregate")

    def _replay(self, rnd: int, doc, global_arrays, entries) -> tuple[dict | None, str | None]:
        """(recomputed aggregate or None, why it was not recomputed or None)."""
        rule = self.replay.rule
        if self.run_untrusted is not None:
            return None, self.run_untrusted
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


def _rejected_label(r: Mapping) -> str:
    node = r.get("node-id", -1)
    return Identity(int(node), r.get("partition")).key if isinstance(node, int) else str(node)


def _rejected_row(rnd: int, r: Mapping) -> Row:
    return Row(rnd, _rejected_label(r), "REJECTED", f"{r.get('stage', '?')}: {r.get('reason', '?')}", "rejected")


def _nothing_learned(doc: dict | None) -> str:
    if doc is None:
        return "the round committed no aggregate"
    if doc.get("aggregate-error"):
        return f"no aggregate: {doc['aggregate-error']}"
    if not doc.get("updates"):
        n = len(doc.get("rejected", []))
        return f"no update was accepted ({n} repl{'y' if n == 1 else 'ies'} rejected)"
    return "the rule aggregated nothing from the accepted updates"


__all__ = ["AuditReport", "ChainRecord", "Row", "RunAudit", "audit_run", "read_chain"]
