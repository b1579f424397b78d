"""UpdateRegistry on eth-tester: two roles (admin enrols, aggregator writes), run records, ordering,
duplicates, enrolment, contests, reads; the artifact matches solc and its code check masks only
the immutables."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from fedledger.chain import signing
from fedledger.chain.ledger import ARTIFACT, Ledger, LedgerError, UpdateEntry, code_matches, load_artifact, records_digest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOLC = os.path.join(REPO, ".tools", "node_modules", "solc")
RUN = 9
DOC = "0x" + "d0" * 32
G0 = "0x" + "90" * 32      # the run's initial global
AGG = "0x" + "ab" * 32


def commitment(ledger, i: int, rnd: int, run_id: int = RUN, n: int = 10, global_hash: str = G0):
    return signing.Commitment(ledger.chain_id, ledger.address, run_id, rnd, global_hash, "0x" + f"{i + 1:064x}", n + i)


def entry(ledger, i: int, rnd: int, run_id: int = RUN, global_hash: str = G0) -> UpdateEntry:
    c = commitment(ledger, i, rnd, run_id, global_hash=global_hash)
    return UpdateEntry(signing.simulation_account(i).address, c.update_hash, c.num_examples,
                       signing.sign(signing.simulation_account(i), c))


@pytest.fixture(scope="module")
def ledger():
    ledger = Ledger.in_process()
    ledger.admin().enrol([signing.simulation_account(i).address for i in range(5)])
    ledger.open_run(RUN, "0x" + "11" * 32, G0)
    return ledger


def _revert_types():
    from eth_tester.exceptions import TransactionFailed
    from web3.exceptions import ContractCustomError, ContractLogicError

    return (TransactionFailed, ContractLogicError, ContractCustomError)


def _args(run_id, rnd, es):
    return (run_id, rnd, [x.client for x in es], [bytes.fromhex(x.update_hash[2:]) for x in es],
            [x.num_examples for x in es], [bytes.fromhex(x.signature[2:]) for x in es])


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
    assert fresh["immutableReferences"] == committed["immutableReferences"]


def test_the_code_check_masks_the_immutables_and_nothing_else(ledger):
    art = load_artifact()
    code = bytes(ledger.w3.eth.get_code(ledger.address))
    assert code_matches(code, art) and ledger.code_is_registry()
    w3 = ledger.w3                                   # another registry: other aggregator, address, deploy block
    other = Ledger._deploy(w3, art, None, w3.eth.accounts[1], w3.eth.accounts[2], "eth-tester", None)
    assert bytes(w3.eth.get_code(other.address)) != code and other.code_is_registry()
    start = art["immutableReferences"][-1][0] + 40   # a byte of real code after the last immutable
    patched = bytearray(code)
    patched[start] ^= 1
    assert not code_matches(bytes(patched), art)
    assert not code_matches(code, load_artifact(os.path.join(REPO, "bench", "baseline", "UpdateRegistry.v1.json")))


def test_two_roles_the_admin_deploys_and_names_an_aggregator_that_is_not_itself(ledger):
    w3 = ledger.w3
    assert ledger.admin_address() == w3.eth.accounts[1] and ledger.aggregator_address() == w3.eth.accounts[0]
    assert ledger.registry_deploy_block() == ledger.deploy_block > 0
    factory = w3.eth.contract(abi=load_artifact()["abi"], bytecode=load_artifact()["bytecode"])
    with pytest.raises(_revert_types()):      # the admin cannot be the aggregator
        factory.constructor(w3.eth.accounts[2]).transact({"from": w3.eth.accounts[2]})
    f, outsider = ledger.contract.functions, signing.simulation_account(40).address
    for sender in (w3.eth.accounts[0], w3.eth.accounts[3]):    # the aggregator and anyone else cannot enrol
        with pytest.raises(_revert_types()):
            f.enrol([outsider]).transact({"from": sender})
    with pytest.raises(_revert_types()):      # nor can the admin write rounds
        f.openRun(123, b"\1" * 32, b"\2" * 32).transact({"from": w3.eth.accounts[1]})
    admin = ledger.admin()
    assert admin.enrol([outsider]) == [outsider] and admin.enrol([outsider]) == []   # idempotent
    assert ledger.is_enrolled(outsider) and outsider.lower() in ledger.enrolled_signers()
    assert admin.revoke([outsider]) == [outsider] and not ledger.is_enrolled(outsider)
    events = [(e["event"], e["signer"]) for e in ledger.enrolment_events() if e["signer"] == outsider]
    assert events == [("Enrolled", outsider), ("Revoked", outsider)]
    with pytest.raises(LedgerError, match="administered by"):   # a key that is not the admin's
        ledger.admin(private_key=signing.simulation_account(41).key.to_0x_hex())


def test_rounds_records_aggregate_and_reads(ledger):
    run = ledger.get_run(RUN)
    assert run["run-hash"] == "0x" + "11" * 32 and run["initial-global"] == run["current-global"] == G0
    assert run["current-round"] == 0 and run["opened-at"] > 0
    ledger.open_run(RUN, "0x" + "11" * 32, G0)                 # already open with the same record: no tx
    with pytest.raises(LedgerError, match="already open .* another run document"):
        ledger.open_run(RUN, "0x" + "12" * 32, G0)
    ledger.open_round(RUN, 1)
    entries = [entry(ledger, i, 1) for i in range(5)]
    n_tx = len(ledger.tx_log)
    ledger.record_updates(RUN, 1, entries)
    assert len(ledger.tx_log) == n_tx + 1, "one transaction for the whole batch"
    ledger.commit_aggregate(RUN, 1, AGG, DOC)
    rnd = ledger.get_round(RUN, 1)
    assert rnd["count"] == 5 and rnd["committed"] and rnd["aggregate-hash"] == AGG
    assert rnd["document-hash"] == DOC
    assert ledger.get_run(RUN)["current-global"] == AGG        # round 2 starts from round 1's aggregate
    assert ledger.update_hash_of(RUN, 1, entries[2].client) == entries[2].update_hash
    assert ledger.update_hash_of(RUN, 1, signing.simulation_account(99).address) is None
    events = ledger.events(RUN)
    assert [e["event"] for e in events][:2] == ["RunOpened", "RoundOpened"] and events[1]["global-hash"] == G0
    ups = [e for e in events if e["event"] == "UpdateRecorded"]
    assert [e["client"] for e in ups] == [e.client for e in entries]
    assert [e["index"] for e in ups] == list(range(5))
    assert records_digest(ups) == rnd["records-digest"]
    committed = [e for e in events if e["event"] == "AggregateCommitted"]
    assert [(c["round"], c["num-records"], c["document-hash"]) for c in committed] == [(1, 5, DOC)]
    assert committed[0]["records-digest"] == rnd["records-digest"]
    # the contract's EIP-712 digest is the one clients sign
    c = commitment(ledger, 3, 1)
    digest = ledger.contract.functions.updateDigest(RUN, 1, bytes.fromhex(G0[2:]), bytes.fromhex(c.update_hash[2:]),
                                                    c.num_examples).call()
    assert bytes(digest) == c.digest()
    # reads by client
    mine = ledger.events(RUN, client=entries[3].client)
    assert len(mine) == 1 and mine[0]["update-hash"] == entries[3].update_hash and mine[0]["num-examples"] == 13


def test_idempotent_writes_send_nothing_twice(ledger):
    ledger.open_round(RUN, 2)
    entries = [entry(ledger, i, 2, global_hash=AGG) for i in range(3)]
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


def test_contract_rejects_duplicates_out_of_order_outsiders_and_signers_not_enrolled(ledger):
    f = ledger.contract.functions
    aggregator, admin, other = ledger.sender, ledger.w3.eth.accounts[1], ledger.w3.eth.accounts[3]
    e = entry(ledger, 0, 3)
    with pytest.raises(_revert_types()):                       # skipping round 3
        f.openRound(RUN, 4).transact({"from": aggregator})
    with pytest.raises(_revert_types()):                       # record into a closed (committed) round
        f.recordUpdates(*_args(RUN, 2, [e])).transact({"from": aggregator})
    for sender in (other, admin):                              # only the aggregator opens, records, commits
        with pytest.raises(_revert_types()):
            f.openRound(RUN, 3).transact({"from": sender})
    ledger.open_round(RUN, 3)
    with pytest.raises(_revert_types()):                       # round 4 before round 3 is committed
        f.openRound(RUN, 4).transact({"from": aggregator})
    for sender in (other, admin):
        with pytest.raises(_revert_types()):
            f.recordUpdates(*_args(RUN, 3, [e])).transact({"from": sender})
        with pytest.raises(_revert_types()):
            f.commitAggregate(RUN, 3, b"\1" * 32, b"\2" * 32).transact({"from": sender})
    with pytest.raises(_revert_types()):                       # a round document is always committed
        f.commitAggregate(RUN, 3, b"\1" * 32, b"\0" * 32).transact({"from": aggregator})
    with pytest.raises(_revert_types()):                       # duplicate inside one batch
        f.recordUpdates(*_args(RUN, 3, [e, e])).transact({"from": aggregator})
    with pytest.raises(_revert_types()):                       # record for an older round
        f.recordUpdates(*_args(RUN, 1, [e])).transact({"from": aggregator})
    stranger = UpdateEntry(signing.simulation_account(30).address, e.update_hash, 10, e.signature)
    with pytest.raises(_revert_types()):                       # a signer the admin never enrolled
        f.recordUpdates(*_args(RUN, 3, [stranger])).transact({"from": aggregator})
    with pytest.raises(LedgerError, match="NotEnrolled"):
        ledger.record_updates(RUN, 3, [stranger])
    with pytest.raises(_revert_types()):                       # a run that was never opened
        f.openRound(RUN + 1, 1).transact({"from": aggregator})
    f.recordUpdates(*_args(RUN, 3, [e])).transact({"from": aggregator})
    with pytest.raises(_revert_types()):                       # duplicate across batches
        f.recordUpdates(*_args(RUN, 3, [e])).transact({"from": aggregator})
    with pytest.raises(LedgerError, match="appears twice"):
        ledger.record_updates(RUN, 3, [e, e])
    assert ledger.get_round(RUN, 3)["count"] == 1


def test_an_enrolled_client_contests_a_committed_round_once_with_its_own_signature(ledger):
    run_id, rnd = RUN + 10, 1
    ledger.open_run(run_id, "0x" + "21" * 32, G0)
    ledger.open_round(run_id, rnd)
    ledger.record_updates(run_id, rnd, [entry(ledger, 0, rnd, run_id)])
    dropped = commitment(ledger, 1, rnd, run_id)              # client 1 sent this; the aggregator left it out
    signature = signing.sign(signing.simulation_account(1), dropped)
    ledger.admin().enrol([ledger.w3.eth.accounts[5]])
    client = ledger.writer(sender=ledger.w3.eth.accounts[5])   # any enrolled account may post it
    args = (run_id, rnd, dropped.global_hash, dropped.update_hash, dropped.num_examples, signature,
            signing.simulation_account(1).address)
    with pytest.raises(LedgerError, match="RoundNotCommitted"):
        client.contest(*args)
    ledger.commit_aggregate(run_id, rnd, AGG, DOC)
    with pytest.raises(LedgerError, match="NotEnrolled"):      # an account that is not enrolled cannot contest
        ledger.writer(sender=ledger.w3.eth.accounts[6]).contest(*args)
    forged = signing.sign(signing.simulation_account(33), dropped)   # not enrolled: the registry recovers it
    with pytest.raises(LedgerError, match="NotEnrolled"):
        client.contest(*args[:5], forged, signing.simulation_account(33).address)
    recorded = commitment(ledger, 0, rnd, run_id)              # client 0's update is in the round
    with pytest.raises(LedgerError, match="AlreadyRecorded"):
        client.contest(run_id, rnd, G0, recorded.update_hash, recorded.num_examples,
                       signing.sign(signing.simulation_account(0), recorded), signing.simulation_account(0).address)
    client.contest(*args)
    client.contest(*args)                                      # idempotent: the second call sends nothing
    (event,) = [e for e in ledger.events(run_id) if e["event"] == "Contested"]
    assert event["client"] == signing.simulation_account(1).address and event["sender"] == ledger.w3.eth.accounts[5]
    assert (event["update-hash"], event["num-examples"], event["signature"]) == \
        (dropped.update_hash, dropped.num_examples, signature)
    assert sum(t["label"] == "contest" for t in client.tx_log) == 1


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
        ledger.open_run(77, "0x" + "77" * 32, G0)
        ledger.open_round(77, 1)
        ledger.record_updates(77, 1, [entry(ledger, i, 1, run_id=77) for i in range(3)])
        ledger.commit_aggregate(77, 1, "0x" + "11" * 32, DOC)
    finally:
        ledger._send = real
    assert len(ledger.tx_log) == n_tx + 4 and calls["n"] == 4
    assert ledger.get_round(77, 1)["count"] == 3 and ledger.get_round(77, 1)["committed"]
