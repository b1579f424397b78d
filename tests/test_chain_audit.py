"""OnChainAudit around Flower's own FedAvg (eth-tester), the audit, tampering, the CLI."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from fedledger.chain import signing
from fedledger.chain.audit import audit_run
from fedledger.chain.audit_strategy import OnChainAudit, build_audit
from fedledger.chain.ledger import Ledger, UpdateEntry
from fedledger.chain.store import ArtifactStore
from fedledger.cli_chain import main as cli

RUN = 42


def _arrays(rng):
    return {"l.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
            "l.lora_B.weight": rng.standard_normal((8, 4)).astype(np.float32)}


def _reply(node_id, arrays, num_examples, audit):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples, "train-loss": 1.5})})
    if audit is not None:
        content["audit"] = ConfigRecord(audit)
    instruction = Message(RecordDict(), dst_node_id=node_id, message_type="train")
    return Message(content, reply_to=instruction)


def run_rounds(strategy, rounds=2, clients=3, seed=0, run_id=RUN, tamper=None):
    """Feed constructed train replies to ``strategy``; ``tamper(round, pid, arrays, audit)`` may edit."""
    rng = np.random.default_rng(seed)
    out = []
    for rnd in range(1, rounds + 1):
        replies = []
        for pid in range(clients):
            arrays = _arrays(rng)
            audit = signing.audit_record(arrays, run_id, rnd, signing.simulation_account(pid))
            if tamper:
                arrays, audit = tamper(rnd, pid, arrays, audit)
            replies.append(_reply(100 + pid, arrays, 10 + 5 * pid, audit))
        out.append(strategy.aggregate_train(rnd, replies))
    return out


@pytest.fixture()
def audited_run(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    wrap, info = build_audit("eth-tester", "", "", str(tmp_path), RUN, run_config={"num-rounds": 2})
    strategy = wrap(FedAvg())
    results = run_rounds(strategy)
    return tmp_path, strategy, info, results


def _flip(path, offset):
    """Flip one bit of one byte of a file (the tensor data sit at the end of a safetensors file)."""
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[offset] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(bytes(data))


def _status(report):
    return {(r.round, r.client.lower()): r.status for r in report.rows}


def test_wrapper_records_every_update_and_aggregate(audited_run):
    folder, strategy, info, results = audited_run
    assert isinstance(strategy, OnChainAudit)
    assert strategy.fraction_train == 1.0                      # __getattr__ falls through to FedAvg
    d = info()
    assert d["transactions"] == 1 + 2 * 3                      # deploy + (open, batch, commit) per round
    for rnd in (1, 2):
        r = strategy.ledger.get_round(RUN, rnd)
        assert r["count"] == 3 and r["committed"]
        assert os.path.exists(strategy.store.aggregate_path(rnd))
        manifest = strategy.store.read_round(rnd)
        assert [c["num-examples"] for c in manifest["clients"]] == [10, 15, 20]
    arrays, metrics = results[-1]
    assert arrays is not None and metrics["train-loss"] == pytest.approx(1.5)
    # audit: live chain and exported events agree, FedAvg recomputed bit-exactly
    live = audit_run(str(folder), ledger=strategy.ledger)
    offline = audit_run(str(folder))
    assert live.ok and offline.ok, live.table()
    assert sum(r.client != "aggregate" for r in live.rows) == 6
    assert all("bit-exactly" in r.detail for r in live.rows if r.client == "aggregate")
    assert [(r.round, r.client, r.status) for r in live.rows] == [(r.round, r.client, r.status) for r in offline.rows]


def test_flipped_byte_names_round_and_client(audited_run):
    folder, strategy, _, _ = audited_run
    victim = signing.simulation_account(1).address
    path = strategy.store.update_path(2, victim)
    _flip(path, -3)
    report = audit_run(str(folder), ledger=strategy.ledger)
    assert not report.ok
    bad = [(r.round, r.client, r.status) for r in report.problems]
    assert bad == [(2, victim, "MISMATCH")], report.table()
    assert "not recomputed" in [r for r in report.rows if r.round == 2 and r.client == "aggregate"][0].detail


def test_swapped_files_and_missing_file_are_flagged(audited_run):
    folder, strategy, _, _ = audited_run
    a, b, c = (signing.simulation_account(i).address for i in range(3))
    pa, pb = strategy.store.update_path(1, a), strategy.store.update_path(1, b)
    tmp = pa + ".x"
    os.replace(pa, tmp), os.replace(pb, pa), os.replace(tmp, pb)
    os.remove(strategy.store.update_path(2, c))
    status = _status(audit_run(str(folder), ledger=strategy.ledger))
    assert status[(1, a.lower())] == status[(1, b.lower())] == "MISMATCH"
    assert status[(1, c.lower())] == "OK"
    assert status[(2, c.lower())] == "MISSING"


def test_tampered_aggregate_is_flagged(audited_run):
    folder, strategy, _, _ = audited_run
    from safetensors.numpy import save_file

    path = strategy.store.aggregate_path(1)
    agg = ArtifactStore.load_arrays(path)
    agg["l.lora_A.weight"][0, 0] += 1.0
    save_file(agg, path)
    status = _status(audit_run(str(folder), ledger=strategy.ledger))
    assert status[(1, "aggregate")] == "MISMATCH" and status[(2, "aggregate")] == "OK"


def test_wrapper_refuses_bad_claims(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    wrap, info = build_audit("eth-tester", "", "", str(tmp_path), RUN)
    strategy = wrap(FedAvg())

    def tamper(rnd, pid, arrays, audit):
        if pid == 0:   # claims a hash that is not the one of the arrays sent
            arrays = {k: v + 1 for k, v in arrays.items()}
        if pid == 1:   # signature by someone else
            audit = {**audit, "signer": signing.simulation_account(7).address}
        if pid == 2:   # no audit record
            audit = None
        return arrays, audit

    run_rounds(strategy, rounds=1, clients=4, tamper=tamper)
    refused = strategy.flagged[1]
    reasons = {r["node-id"]: r["reason"] for r in refused}
    assert set(reasons) == {100, 101, 102}
    assert "differs" in reasons[100] and "signature recovers" in reasons[101] and "no 'audit'" in reasons[102]
    assert strategy.ledger.get_round(RUN, 1)["count"] == 1
    assert info()["refused-replies"]["1"] == refused
    assert audit_run(str(tmp_path), ledger=strategy.ledger).ok


def test_bad_signature_on_chain_is_reported(tmp_path):
    """An aggregator that records a forged signature is caught by the audit."""
    from flwr.serverapp.strategy import FedAvg

    ledger = Ledger.in_process()
    store = ArtifactStore(str(tmp_path))
    OnChainAudit(FedAvg(), ledger, store, RUN)  # writes ledger.json
    arrays = _arrays(np.random.default_rng(1))
    from fedledger.chain.hashing import update_hash

    h = update_hash(arrays)
    victim, forger = signing.simulation_account(0), signing.simulation_account(5)
    store.save_update(1, victim.address, arrays)
    ledger.open_round(RUN, 1)
    ledger.record_updates(RUN, 1, [UpdateEntry(victim.address, h, 10, signing.sign_update(forger, RUN, 1, h))])
    ledger.commit_aggregate(RUN, 1, "0x" + "00" * 32)
    report = audit_run(str(tmp_path), ledger=ledger)
    assert [(r.round, r.client, r.status) for r in report.problems] == [(1, victim.address, "BAD-SIGNATURE")]


def test_cli_audit_table_json_and_exit_codes(audited_run, capsys):
    folder, strategy, _, _ = audited_run
    assert cli(["audit", str(folder)]) == 0
    assert "audit: OK" in capsys.readouterr().out
    assert cli(["audit", str(folder), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["records"] == 6 and out["problems"] == 0
    victim = signing.simulation_account(0).address
    path = strategy.store.update_path(1, victim)
    _flip(path, -1)
    assert cli(["audit", str(folder)]) == 1
    out = capsys.readouterr().out
    assert victim in out and "MISMATCH" in out
    # bad input: one clear line, exit 2
    assert cli(["audit", str(folder / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedledger: error: no audit record")
    shutil.rmtree(folder / "audit")
    assert cli(["audit", str(folder)]) == 2


def test_trust_scores_go_on_chain_and_a_tampered_score_is_named(tmp_path):
    """A trust wrapper inside OnChainAudit: its per-round scores are kept in round.json and their
    hash is committed with the aggregate; editing a stored score makes the audit say MISMATCH."""
    from flwr.serverapp.strategy import FedAvg

    class ScoredFedAvg(FedAvg):  # stands in for PageRankTrust: exposes trust_history per round
        trust_history: dict = {}

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            self.trust_history[server_round] = {"trust": {str(i): 1.0 + 0.1 * i for i in range(len(replies))},
                                                "excluded": [0]}
            return super().aggregate_train(server_round, replies)

    wrap, info = build_audit("eth-tester", "", "", str(tmp_path), RUN)
    strategy = wrap(ScoredFedAvg())
    run_rounds(strategy)
    assert info()["transactions"] == 1 + 3 * 2  # still O(1) per round: trust rides on the commit
    report = audit_run(str(tmp_path))
    assert report.ok, report.table()
    assert [(r.round, r.status) for r in report.rows if r.client == "trust"] == [(1, "OK"), (2, "OK")]

    path = os.path.join(str(tmp_path), "audit", "round-0002", "round.json")
    with open(path) as fh:
        manifest = json.load(fh)
    manifest["trust"]["excluded"] = []
    with open(path, "w") as fh:
        json.dump(manifest, fh)
    report = audit_run(str(tmp_path))
    assert [(r.round, r.client, r.status) for r in report.problems] == [(2, "trust", "MISMATCH")]
