"""Nothing lost (in process): every ledger write is journaled before it is sent, a node rolled back
to an older state gets the lost writes again, the audit names what the chain does not hold, and a
node that does not answer is waited for, visibly, then the run stops. The same on a real anvil
killed with SIGKILL: tests/test_faults.py."""

from __future__ import annotations

import json
import logging
import os

import pytest
import requests

from fedledger.chain import journal
from fedledger.chain.audit import audit_run
from fedledger.chain.ledger import Ledger, NodeDown

from .test_chain_audit import Federation, audited, problems


@pytest.fixture()
def chain():
    return Ledger.in_process()


def _fedavg():
    from flwr.serverapp.strategy import FedAvg

    return FedAvg()


def _records_on_chain(ledger, run_id) -> list[tuple[int, str]]:
    return [(e["round"], e["client"].lower()) for e in ledger.events(run_id) if e["event"] == "UpdateRecorded"]


def test_every_write_is_on_disk_in_the_journal_before_it_is_sent(chain, tmp_path, monkeypatch):
    fed = Federation()
    path = tmp_path / "audit" / journal.JOURNAL_FILE
    seen = []
    for name in ("open_run", "open_round", "record_updates", "commit_aggregate"):
        real = getattr(chain, name)

        def checked(*args, _real=real, _name=name):
            last = json.loads(path.read_text().splitlines()[-1])
            seen.append((_name, last["op"], last.get("round")))
            return _real(*args)

        monkeypatch.setattr(chain, name, checked)
    fed.drive(audited(_fedavg(), chain, tmp_path, fed), rounds=2)
    assert seen == [("open_run", "open-run", None),
                    ("open_round", "open-round", 1), ("record_updates", "record-updates", 1),
                    ("commit_aggregate", "commit", 1),
                    ("open_round", "open-round", 2), ("record_updates", "record-updates", 2),
                    ("commit_aggregate", "commit", 2)]
    ops = [e["op"] for e in journal.read_journal(str(path))]
    assert ops == ["enrol", "open-run"] + ["open-round", "record-updates", "commit"] * 2


def test_writes_a_rolled_back_node_lost_are_resent_once_and_the_audit_passes(chain, tmp_path, caplog):
    """The node goes back to its state after round 1 (as anvil restarted from an older state file)
    while round 3 is about to start: round 2's records and commit are re-sent from the journal."""
    fed = Federation()
    pipeline = audited(_fedavg(), chain, tmp_path, fed)
    snapshot = {}

    def node_rolls_back(rnd, arrays):
        if rnd == 1:
            snapshot["id"] = chain.w3.testing.snapshot()
        if rnd == 2:
            chain.w3.testing.revert(snapshot["id"])
            assert chain.get_run(fed.run_id)["current-round"] == 1   # round 2 is gone from the chain
        return arrays

    with caplog.at_level(logging.WARNING, "fedledger.chain"):
        fed.drive(pipeline, rounds=3, next_global=node_rolls_back)
    # round 2's three writes, then the refused opening of round 3 once more
    assert [(e["op"], e["round"]) for e in pipeline.trail.resent] == [
        ("open-round", 2), ("record-updates", 2), ("commit", 2), ("open-round", 3)]
    assert "does not hold 4 journaled write(s)" in caplog.text and "from the opening of round 2 on" in caplog.text
    records = _records_on_chain(chain, fed.run_id)
    assert len(records) == 9 and len(set(records)) == 9   # 3 clients x 3 rounds, each exactly once
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.ok, report.table()
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 9


def test_records_the_chain_lost_after_the_run_are_not_on_chain_until_resent(chain, tmp_path):
    fed = Federation()
    pipeline = audited(_fedavg(), chain, tmp_path, fed)
    snapshot = {}

    def remember(rnd, arrays):
        if rnd == 1:
            snapshot["id"] = chain.w3.testing.snapshot()
        return arrays

    fed.drive(pipeline, rounds=2, next_global=remember)
    chain.w3.testing.revert(snapshot["id"])     # the node loses round 2 after the run ended
    report = audit_run(str(tmp_path), ledger=chain)
    lost = sorted((r.round, r.client) for r in report.rows if r.status == "NOT-ON-CHAIN")
    assert lost == [(2, "round.json")], report.table()
    assert "3 update file(s), round.json, global, aggregate" in next(r.detail for r in report.rows
                                                                     if r.status == "NOT-ON-CHAIN")
    assert not report.ok and report.exit_code == 1

    entries = [e for e in journal.read_journal(pipeline.trail.journal.path) if e["op"] != "enrol"]
    resent = journal.resend_lost(chain, None, entries)
    assert [e["op"] for e in resent] == ["open-round", "record-updates", "commit"]
    assert journal.resend_lost(chain, None, entries) == []          # a second pass sends nothing
    assert audit_run(str(tmp_path), ledger=chain).ok


def test_a_stored_or_journaled_update_without_a_record_on_chain_is_named(chain, tmp_path):
    fed = Federation()
    pipeline = audited(_fedavg(), chain, tmp_path, fed)
    fed.drive(pipeline, rounds=1)
    store = pipeline.trail.store
    stray = "0x" + "ab" * 20
    with open(store.update_path(1, fed.address(0)), "rb") as src, open(store.update_path(1, stray), "wb") as dst:
        dst.write(src.read())
    record = journal.read_journal(pipeline.trail.journal.path)[-2]
    ghost = {**record, "updates": [{**record["updates"][0], "client": "0x" + "cd" * 20}]}
    pipeline.trail.journal.append(ghost)
    report = audit_run(str(tmp_path), ledger=chain)
    assert sorted(problems(report)) == [(1, stray, "NOT-ON-CHAIN"), (1, "0x" + "cd" * 20, "NOT-ON-CHAIN")]
    details = {r.client: r.detail for r in report.problems}
    assert "a stored update file" in details[stray] and "a journaled signed record" in details["0x" + "cd" * 20]


def test_a_torn_last_journal_line_is_ignored_and_a_damaged_one_is_an_error(tmp_path):
    from fedledger.chain.ledger import LedgerError

    j = journal.Journal(str(tmp_path / "journal.jsonl"))
    j.append({"op": "open-round", "run-id": 1, "round": 1})
    with open(j.path, "a") as fh:
        fh.write('{"op": "commit", "run-')   # the crash came mid-line: that write was never sent
    assert [e["op"] for e in j.entries()] == ["open-round"]
    with open(j.path, "a") as fh:
        fh.write('\n{"op": "open-round", "run-id": 1, "round": 2}\n')
    with pytest.raises(LedgerError, match="line 2 is not JSON"):
        j.entries()
    with pytest.raises(ValueError, match="expected one of"):
        j.append({"op": "transfer"})


def _flaky_node(monkeypatch, ledger, failures: int):
    """The node refuses ``failures`` connections, then answers."""
    real, calls = ledger.get_run, {"n": 0}

    def get_run(run_id):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise requests.exceptions.ConnectionError("connection refused")
        return real(run_id)

    monkeypatch.setattr(ledger, "get_run", get_run)
    return calls


def test_a_node_that_does_not_answer_is_waited_for_with_the_time_left_shown(chain, monkeypatch, caplog):
    chain.retries, chain.wait = 0, 30.0
    monkeypatch.setattr("fedledger.chain.ledger.time.sleep", lambda s: None)
    calls = _flaky_node(monkeypatch, chain, failures=3)
    with caplog.at_level(logging.WARNING, "fedledger.chain"):
        chain.open_run(1, "0x" + "11" * 32, "0x" + "22" * 32)
    assert chain.get_run(1)["opened-at"] and calls["n"] >= 4
    waits = [r.getMessage() for r in caplog.records if "does not answer" in r.getMessage()]
    assert len(waits) == 3 and all("s left before the run stops" in w for w in waits)
    assert "retrying in 1 s" in waits[0] and "retrying in 4 s" in waits[2]
    assert "answers again" in caplog.text


def test_a_node_down_longer_than_the_wait_stops_the_run_in_one_line(chain, monkeypatch):
    chain.retries, chain.wait = 1, 0.3
    _flaky_node(monkeypatch, chain, failures=10**6)
    with pytest.raises(NodeDown) as err:
        chain.open_run(1, "0x" + "11" * 32, "0x" + "22" * 32)
    msg = str(err.value)
    assert "\n" not in msg and "ConnectionError" in msg and "fedledger resend RUN_FOLDER --send" in msg
