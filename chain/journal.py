"""The ledger journal: every write of an audited run, on local disk before it is sent.

``audit/journal.jsonl`` holds one JSON line per write the run makes (the admin's enrolment,
``openRun``, and per round ``openRound``, the ``recordUpdates`` batch and ``commitAggregate``),
appended and fsynced *before* the transaction is sent. A chain node can lose writes it already
confirmed: anvil keeps its state in memory and writes its state file only every
``--state-interval`` seconds and on a clean exit, so a SIGKILL rolls it back to the last dump; a
real chain can reorganise. The journal is what the run meant to put on chain, and
:func:`resend_lost` puts back what the node no longer has:

- it reads the chain (``getRun``, ``getRound``, ``enrolled``: the contract's state, not a
  receipt) for the newest journal entry, then older ones, until one is on chain;
- it re-sends every later entry, in journal order, through the ledger's idempotent writes (each
  reads the chain first and sends only what is missing: nothing lands twice, and the registry
  refuses a second record of a client in a round anyway).

Why newest first is enough: a rollback (or a reorganisation) removes a *suffix* of the chain,
and the registry accepts the run's writes only in order (a round opens after the previous one
committed; a commit binds the count and digest of the round's records), so when an entry is on
chain, every earlier one is too. The common case costs one or two reads.

Entries (``"op"``)::

    {"op": "enrol", "signers": [...]}                                         the admin's
    {"op": "open-run", "run-id", "run-hash", "initial-global"}
    {"op": "open-round", "run-id", "round"}
    {"op": "record-updates", "run-id", "round",
     "updates": [{"client", "update-hash", "num-examples", "signature"}, ...]}
    {"op": "commit", "run-id", "round", "aggregate-hash", "document-hash"}

An entry may appear twice (a write that was retried): re-sending it is a no-op once it is on
chain. ``fedledger resend RUN_FOLDER [--send]`` compares a finished (or stopped) run's journal
with the chain and re-sends what the node lost after the run. The audit reads the
journal too: a journaled record that is not on chain is ``NOT-ON-CHAIN``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence

from .hashing import to_bytes32
from .ledger import Ledger, LedgerError, UpdateEntry, records_digest

log = logging.getLogger("fedledger.chain")
JOURNAL_FILE = "journal.jsonl"
OPS = ("enrol", "open-run", "open-round", "record-updates", "commit")


class Journal:
    """An append-only JSON-lines file; each :meth:`append` is on disk (fsync) when it returns."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)

    def append(self, entry: dict) -> None:
        if entry.get("op") not in OPS:
            raise ValueError(f"journal entry op {entry.get('op')!r}: expected one of {OPS}")
        new = not os.path.exists(self.path)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # the file's name must survive a crash too
            _fsync_dir(os.path.dirname(self.path))

    def entries(self) -> list[dict]:
        """Every entry in order; a last line cut short by a crash is ignored (it was never sent)."""
        return read_journal(self.path)


def read_journal(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as fh:
        lines = fh.read().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            if i >= len(lines) - 2:   # the torn last line of a crash: written, never sent
                break
            raise LedgerError(f"{path} line {i + 1} is not JSON: the journal is damaged") from None
    return out


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- entries <-> the chain
def describe(entry: dict) -> str:
    op = entry["op"]
    if op == "enrol":
        return f"the enrolment of {len(entry['signers'])} signer(s)"
    if op == "open-run":
        return f"the opening of run {entry['run-id']}"
    if op == "open-round":
        return f"the opening of round {entry['round']}"
    if op == "record-updates":
        return f"the {len(entry['updates'])} record(s) of round {entry['round']}"
    return f"the commit of round {entry['round']}"


def entries_of(entry: dict) -> list[UpdateEntry]:
    return [UpdateEntry(u["client"], u["update-hash"], int(u["num-examples"]), u["signature"])
            for u in entry["updates"]]


def on_chain(ledger: Ledger, entry: dict) -> bool:
    """Whether the chain's state (read now, not a receipt) holds ``entry``."""
    op = entry["op"]
    if op == "enrol":
        return all(ledger.is_enrolled(s) for s in entry["signers"])
    run_id = int(entry["run-id"])
    if op == "open-run":
        r = ledger.get_run(run_id)
        return bool(r["opened-at"]) and to_bytes32(r["run-hash"]) == to_bytes32(entry["run-hash"])
    if op == "open-round":
        return ledger.get_run(run_id)["current-round"] >= int(entry["round"])
    r = ledger.get_round(run_id, int(entry["round"]))
    if op == "record-updates":
        records = [{"client": u["client"], "update-hash": u["update-hash"], "num-examples": u["num-examples"]}
                   for u in entry["updates"]]
        if r["count"] == len(records) and r["records-digest"] == records_digest(records):
            return True   # the whole batch, in order, in one read
        return bool(records) and all(ledger.update_hash_of(run_id, int(entry["round"]), u["client"]) is not None
                                     for u in entry["updates"])
    return r["committed"] and to_bytes32(r["aggregate-hash"]) == to_bytes32(entry["aggregate-hash"]) and \
        to_bytes32(r["document-hash"]) == to_bytes32(entry["document-hash"])


def send(ledger: Ledger, admin: Ledger | None, entry: dict) -> None:
    """The write ``entry`` names, through the ledger's idempotent writes (sends only what is missing)."""
    op = entry["op"]
    if op == "enrol":
        if admin is None:
            raise LedgerError("the journal holds an enrolment the chain lost, and the admin's key is not given; give "
                              "admin-key-file (or $FEDLEDGER_ADMIN_KEY)")
        admin.enrol(entry["signers"])
    elif op == "open-run":
        ledger.open_run(int(entry["run-id"]), entry["run-hash"], entry["initial-global"])
    elif op == "open-round":
        ledger.open_round(int(entry["run-id"]), int(entry["round"]))
    elif op == "record-updates":
        ledger.record_updates(int(entry["run-id"]), int(entry["round"]), entries_of(entry))
    else:
        ledger.commit_aggregate(int(entry["run-id"]), int(entry["round"]), entry["aggregate-hash"],
                                entry["document-hash"])


def lost(ledger: Ledger, entries: Sequence[dict]) -> list[dict]:
    """The entries the chain does not hold: those after the newest one it holds (see the module)."""
    for i in range(len(entries) - 1, -1, -1):
        if on_chain(ledger, entries[i]):
            return list(entries[i + 1:])
    return list(entries)


def resend_lost(ledger: Ledger, admin: Ledger | None, entries: Sequence[dict],
                report: Callable[[str], None] | None = None) -> list[dict]:
    """Re-send what the chain lost of ``entries`` (in order); returns the entries re-sent."""
    missing = lost(ledger, entries)
    if missing:
        where = ledger.rpc_url or "the in-process chain"
        (report or log.warning)(f"ledger: the node at {where} no longer has {len(missing)} of the run's writes "
                                f"(from {describe(missing[0])} on: a restart from an older state?); re-sending them "
                                f"from the journal")
    for entry in missing:
        send(ledger, admin, entry)
    return missing


__all__ = ["JOURNAL_FILE", "Journal", "describe", "lost", "on_chain", "read_journal", "resend_lost", "send"]
