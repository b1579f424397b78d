"""UpdateRegistry on eth-tester: roles, ordering, duplicates, reads; the artifact matches solc."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fedledger.chain import signing
from fedledger.chain.ledger import ARTIFACT, Ledger, LedgerError, UpdateEntry, load_artifact, records_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLC = os.path.join(REPO, ".tools", "node_modules", "solc")
RUN = 9
DOC = "0x" + "d0" * 32


def _entry(i: int, rnd: int, run_id: int = RUN, n: int = 10) -> UpdateEntry:
    acct = signing.simulation_account(i)
    h = "0x" + f"{i + 1:064x}"
    return UpdateEntry(acct.address, h, n + i, signing.sign_update(acct, run_id, rnd, h))


@pytest.fixture(scope="module")
def ledger():
    return Ledger.in_process()


def _revert_types():
    from eth_tester.exceptions import TransactionFailed
    from web3.exceptions import ContractCustomError, ContractLogicError

    return (TransactionFailed, ContractLogicError, ContractCustomError)


def test_artifact_matches_recompile():
    if shutil.which("node") is None or not os.path.isdir(SOLC):
        if os.environ.get("CI") == "true":
            pytest.fail("node or solc-js missing on CI: scripts/install_chain_tools.sh should have installed them")
        pytest.skip("node or solc-js (.tools/node_modules/solc) missing: run bash scripts/install_chain_tools.sh")
    out = subprocess.run(["node", os.path.join(REPO, "chain", "compile.js"), SOLC], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    fresh, committed = json.loads(out), load_artifact(ARTIFACT)
    assert fresh["compiler"] == committed["compiler"]
    assert fresh["abi"] == committed["abi"]
    assert fresh["bytecode"] == committed["bytecode"], "chain/UpdateRegistry.json is stale: node chain/compile.js > chain/UpdateRegistry.json"
    assert fresh["deployedBytecode"] == committed["deployedBytecode"]


def test_rounds_records_aggregate_and_reads(ledger):
    ledger.open_round(RUN, 1)
    entries = [_entry(i, 1) for i in range(5)]
    n_tx = len(ledger.tx_log)
    ledger.record_updates(RUN, 1, entries)
    assert len(ledger.tx_log) == n_tx + 1, "one transaction for the whole batch"
    ledger.commit_aggregate(RUN, 1, "0x" + "ab" * 32, DOC)
    rnd = ledger.get_round(RUN, 1)
    assert rnd["count"] == 5 and rnd["committed"] and rnd["aggregate-hash"] == "0x" + "ab" * 32
    assert rnd["document-hash"] == DOC
    assert ledger.update_hash_of(RUN, 1, entries[2].client) == entries[2].update_hash
    assert ledger.update_hash_of(RUN, 1, signing.simulation_account(99).address) is None
    events = ledger.events(RUN)
    ups = [e for e in events if e["event"] == "UpdateRecorded"]
    assert [e["client"] for e in ups] == [e.client for e in entries]
    assert [e["index"] for e in ups] == list(range(5))
    assert records_digest(ups) == rnd["records-digest"]
    committed = [e for e in events if e["event"] == "AggregateCommitted"]
    assert [(c["round"], c["num-records"], c["document-hash"]) for c in committed] == [(1, 5, DOC)]
    assert committed[0]["records-digest"] == rnd["records-digest"]
    # reads by client
    mine = ledger.events(RUN, client=entries[3].client)
    assert len(mine) == 1 and mine[0]["update-hash"] == entries[3].update_hash and mine[0]["num-examples"] == 13


def test_idempotent_writes_send_nothing_twice(ledger):
    ledger.open_round(RUN, 2)
    entries = [_entry(i, 2) for i in range(3)]
    ledger.record_updates(RUN, 2, entries[:1])
    n_tx = len(ledger.tx_log)
    ledger.open_round(RUN, 2)                 # already open: no tx
    ledger.record_updates(RUN, 2, entries)    # a "retry" with the full batch: only the 2 missing go out
    assert len(ledger.tx_log) == n_tx + 1
    ledger.record_updates(RUN, 2, entries)    # nothing left
    assert len(ledger.tx_log) == n_tx + 1
    assert ledger.get_round(RUN, 2)["count"] == 3
    ledger.commit_aggregate(RUN, 2, "0x" + "cd" * 32, DOC)
    ledger.commit_aggregate(RUN, 2, "0x" + "cd" * 32, DOC)
    assert len(ledger.tx_log) == n_tx + 2
    with pytest.raises(LedgerError, match="different aggregate or round document"):
        ledger.commit_aggregate(RUN, 2, "0x" + "ee" * 32, DOC)
    with pytest.raises(LedgerError, match="different aggregate or round document"):
        ledger.commit_aggregate(RUN, 2, "0x" + "cd" * 32, "0x" + "d1" * 32)


def test_contract_rejects_duplicates_out_of_order_and_outsiders(ledger):
    f = ledger.contract.functions
    owner = ledger.sender
    other = ledger.w3.eth.accounts[1]
    e = _entry(0, 3)
    args = lambda rnd, es: (RUN, rnd, [x.client for x in es], [bytes.fromhex(x.update_hash[2:]) for x in es],  # noqa: E731
                            [x.num_examples for x in es], [bytes.fromhex(x.signature[2:]) for x in es])
    with pytest.raises(_revert_types()):                       # skipping round 3
        f.openRound(RUN, 4).transact({"from": owner})
    with pytest.raises(_revert_types()):                       # record into a closed (committed) round
        f.recordUpdates(*args(2, [e])).transact({"from": owner})
    with pytest.raises(_revert_types()):                       # a non-owner cannot open, record or commit
        f.openRound(RUN, 3).transact({"from": other})
    ledger.open_round(RUN, 3)
    with pytest.raises(_revert_types()):
        f.recordUpdates(*args(3, [e])).transact({"from": other})
    with pytest.raises(_revert_types()):
        f.commitAggregate(RUN, 3, b"\1" * 32, b"\2" * 32).transact({"from": other})
    with pytest.raises(_revert_types()):                       # a round document is always committed
        f.commitAggregate(RUN, 3, b"\1" * 32, b"\0" * 32).transact({"from": owner})
    with pytest.raises(_revert_types()):                       # duplicate inside one batch
        f.recordUpdates(*args(3, [e, e])).transact({"from": owner})
    with pytest.raises(_revert_types()):                       # record for an older round
        f.recordUpdates(*args(1, [e])).transact({"from": owner})
    f.recordUpdates(*args(3, [e])).transact({"from": owner})
    with pytest.raises(_revert_types()):                       # duplicate across batches
        f.recordUpdates(*args(3, [e])).transact({"from": owner})
    with pytest.raises(LedgerError, match="appears twice"):
        ledger.record_updates(RUN, 3, [e, e])
    assert ledger.get_round(RUN, 3)["count"] == 1


def test_ledger_error_names_the_contract_error(ledger):
    with pytest.raises(LedgerError, match="RoundOutOfOrder"):
        ledger.open_round(RUN, 7)


def test_missing_artifact_is_a_clear_error(tmp_path):
    with pytest.raises(LedgerError, match="artifact .* is missing"):
        Ledger.in_process(artifact=str(tmp_path / "nope.json"))


def test_retry_after_lost_response_records_once(ledger):
    """The tx lands but its response is lost: the retry reads the chain and sends nothing again."""
    import requests

    real, calls = ledger._send, {"n": 0}

    def flaky(fn, label):
        calls["n"] += 1
        receipt = real(fn, label)
        if calls["n"] % 2 == 1:
            raise requests.exceptions.ConnectionError("response lost")
        return receipt

    ledger._send = flaky
    try:
        n_tx = len(ledger.tx_log)
        ledger.open_round(77, 1)
        ledger.record_updates(77, 1, [_entry(i, 1, run_id=77) for i in range(3)])
        ledger.commit_aggregate(77, 1, "0x" + "11" * 32, DOC)
    finally:
        ledger._send = real
    assert len(ledger.tx_log) == n_tx + 3 and calls["n"] == 3
    assert ledger.get_round(77, 1)["count"] == 3 and ledger.get_round(77, 1)["committed"]
