"""OnChainAudit / LedgerTrail around Flower strategies (eth-tester), and what the audit makes of a
tampered, refused, unsigned or empty round. ``Federation`` drives pipeline rounds without a
ClientApp (also used by tests/test_audit_rules.py)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
from flwr.app import ConfigRecord

from fedledger.chain import signing
from fedledger.chain.audit import audit_run
from fedledger.chain.hashing import bytes_hash, update_hash
from fedledger.chain.audit_strategy import OnChainAudit, build_trail
from fedledger.chain.ledger import Ledger
from fedledger.chain.store import ArtifactStore
from fedledger.chain.trail import ZERO_HASH, LedgerTrail
from fedledger.cli_chain import main as cli
from fedledger.core.pipeline import RoundPipeline

from .replies import NodeGrid, adapter, node_ids, record, reply

RUN_IDS = itertools.count(1000)


class Federation:
    """``n`` clients with random 64-bit node ids and simulation keys; ``drive`` runs rounds.

    Client ``i`` trains ``global + step * noise(seed, round, i)`` on ``10 + 5 i`` examples and
    signs its typed commitment as the client mod does (chain id and registry from the
    instruction's ``audit`` record, the hash of the global it received), so two runs of the same
    federation receive identical updates. ``tamper(round, i, arrays, audit)`` returns the
    (arrays, audit record) actually sent (audit None: unsigned); :meth:`record_for` signs other
    arrays, counts or keys under the round's instruction."""

    def __init__(self, n: int = 3, seed: int = 0, run_id: int | None = None, step: float = 0.05):
        self.nodes = node_ids(n, seed)
        self.accounts = [signing.simulation_account(i) for i in range(n)]
        self.seed, self.step = seed, step
        self.run_id = next(RUN_IDS) if run_id is None else run_id
        self.context: dict = {}   # the round's chain id, registry and global hash, as the client saw them

    def address(self, i: int) -> str:
        return self.accounts[i].address

    @staticmethod
    def examples(i: int) -> int:
        return 10 + 5 * i

    def local(self, global_arrays: dict, rnd: int, i: int) -> dict:
        rng = np.random.default_rng([self.seed, rnd, i])
        return {k: (v + self.step * rng.standard_normal(v.shape)).astype(np.float32) for k, v in global_arrays.items()}

    def commitment(self, rnd: int, update_hash_value: str = ZERO_HASH, num_examples: int = 0) -> signing.Commitment:
        c = self.context
        return signing.Commitment(c["chain-id"], c["registry"], self.run_id, rnd, c["global-hash"], update_hash_value,
                                  num_examples)

    def record_for(self, rnd: int, i: int, arrays: dict, account=None, num_examples: int | None = None) -> dict:
        n = self.examples(i) if num_examples is None else num_examples
        return signing.audit_record(arrays, self.commitment(rnd, num_examples=n), account or self.accounts[i])

    def replies(self, instructions, global_arrays: dict, rnd: int, tamper=None) -> list:
        order = sorted(instructions, key=lambda m: self.nodes.index(m.metadata.dst_node_id))
        out = []
        for ins in order:
            node = ins.metadata.dst_node_id
            i = self.nodes.index(node)
            arrays = self.local(global_arrays, rnd, i)
            told = ins.content.config_records.get("audit")
            audit = None
            if told is not None:
                self.context = {"chain-id": told["chain-id"], "registry": told["registry"],
                                "global-hash": update_hash(global_arrays)}
                audit = self.record_for(rnd, i, arrays)
            if tamper is not None:
                arrays, audit = tamper(rnd, i, arrays, audit)
            extra = {"audit": ConfigRecord(audit)} if audit is not None else None
            out.append(reply(node, arrays, self.examples(i), metrics={"train-loss": 1.5}, extra=extra))
        return out

    def drive(self, pipeline, rounds: int = 2, tamper=None, start=None, next_global=None) -> list:
        """Run ``rounds`` rounds; ``next_global(round, aggregate) -> arrays`` replaces the global
        the next round starts from. Returns each round's aggregate (dict or None)."""
        arrays = dict(start) if start is not None else adapter(self.seed)
        out = []
        for rnd in range(1, rounds + 1):
            instructions = list(pipeline.configure_train(rnd, record(arrays), ConfigRecord(), NodeGrid(self.nodes)))
            agg, _ = pipeline.aggregate_train(rnd, self.replies(instructions, arrays, rnd, tamper))
            agg = {k: v.numpy() for k, v in agg.items()} if agg is not None else None
            out.append(agg)
            arrays = agg if agg is not None else arrays
            if next_global is not None:
                arrays = next_global(rnd, arrays)
        return out


@pytest.fixture()
def chain():
    """A fresh in-process chain and registry for each test (0.1 s; eth-tester reads logs in time
    quadratic in the chain's length, so a chain shared by a module gets slower with every test)."""
    return Ledger.in_process()


def audited(strategy, chain, folder, fed: Federation, **kw) -> OnChainAudit:
    return OnChainAudit(strategy, chain, ArtifactStore(str(folder)), fed.run_id, **kw)


def statuses(report) -> dict:
    return {(r.round, r.client.lower()): r.status for r in report.rows}


def problems(report) -> list[tuple]:
    return [(r.round, r.client, r.status) for r in report.problems]


def flip(path: str, offset: int) -> None:
    """Flip one bit of one byte of a file (the tensor data sit at the end of a safetensors file)."""
    with open(path, "rb") as fh:
        data = bytearray(fh.read())
    data[offset] ^= 0x01
    with open(path, "wb") as fh:
        fh.write(bytes(data))


@pytest.fixture()
def fedavg_run(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation()
    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    fed.drive(pipeline)
    return tmp_path, pipeline, fed


# ---------------------------------------------------------------------------- what a round records
def test_each_round_costs_three_transactions_and_leaves_every_file(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation()
    trail, info = build_trail("eth-tester", str(tmp_path), fed.run_id, run_info={"run-config": {"num-rounds": 2}})
    pipeline = RoundPipeline(FedAvg(), trail=trail)
    aggregates = fed.drive(pipeline)
    d = info()
    # deploy + enrol + openRun, then (openRound, one recordUpdates batch, commitAggregate) per round
    assert d["transactions"] == 3 + 2 * 3 and d["rejected-replies"] == {}
    store, ledger = trail.store, trail.ledger
    with open(store.run_path) as fh:
        run = json.load(fh)
    assert run["rule"]["name"] == "FedAvg" and run["run-id"] == fed.run_id and run["run-config"] == {"num-rounds": 2}
    assert run["aggregator"] == ledger.sender and run["registry-address"] == ledger.address
    assert run["admin"] == ledger.admin_address() != ledger.sender
    assert run["enrolled"] == sorted(fed.address(i).lower() for i in range(3))
    with open(store.run_path, "rb") as fh:
        assert ledger.get_run(fed.run_id)["run-hash"] == bytes_hash(fh.read())
    for rnd in (1, 2):
        r = ledger.get_round(fed.run_id, rnd)
        assert r["count"] == 3 and r["committed"] and r["document-hash"] == trail.document_hashes[rnd]
        with open(store.round_path(rnd)) as fh:
            doc = json.load(fh)
        assert [u["client"] for u in doc["updates"]] == [fed.address(i) for i in range(3)]
        assert [u["node-id"] for u in doc["updates"]] == fed.nodes
        assert [u["num-examples"] for u in doc["updates"]] == [10, 15, 20]
        assert doc["rejected"] == [] and doc["trust"] is None and doc["aggregate-error"] is None
        for path in (store.global_path(rnd), store.aggregate_path(rnd), store.update_path(rnd, fed.address(1))):
            assert os.path.exists(path), path
    live, offline = audit_run(str(tmp_path), ledger=ledger), audit_run(str(tmp_path))
    assert live.exit_code == 0, live.table()
    assert [r.detail for r in live.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2
    assert aggregates[-1] is not None and live.verdict == "audit: OK, every record verified"
    # the events an eth-tester run leaves are the aggregator's own copy: the same findings, never "OK"
    assert offline.exit_code == 3 and offline.rows[0].status == "NO-CHAIN", offline.table()
    assert [(r.round, r.client, r.status) for r in live.rows] == [(r.round, r.client, r.status) for r in offline.rows[1:]]
    assert offline.verdict == ("audit: no problem found, but the events are the aggregator's own copy (no chain to "
                               "check them against)")


def test_stacking_with_pagerank_trust_gives_one_pipeline_in_either_order(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from fedledger.strategies.pagerank import PageRankTrust

    fed = Federation(n=5)
    outer = OnChainAudit(PageRankTrust(FedAvg()), chain, ArtifactStore(str(tmp_path / "a")), fed.run_id)
    inner = PageRankTrust(OnChainAudit(FedAvg(), chain, ArtifactStore(str(tmp_path / "b")), next(RUN_IDS)))
    for p in (outer, inner):
        assert type(p.strategy) is FedAvg and p.trust is not None and isinstance(p.trail, LedgerTrail)

    def attacker(rnd, i, arrays, audit):  # client 4 sends a scaled, sign-flipped update (signed)
        if i == 4:
            arrays = {k: -20 * v for k, v in arrays.items()}
            audit = fed.record_for(rnd, 4, arrays)
        return arrays, audit

    fed.drive(outer, tamper=attacker)
    report = audit_run(str(tmp_path / "a"), ledger=chain)
    assert report.exit_code == 0, report.table()
    with open(outer.trail.store.round_path(2)) as fh:
        doc = json.load(fh)
    assert doc["trust"] == outer.reports[2].trust and doc["trust"]["scores"]


# ---------------------------------------------------------------------------- tampered files
def test_flipped_byte_names_round_and_client(fedavg_run):
    folder, pipeline, fed = fedavg_run
    flip(pipeline.trail.store.update_path(2, fed.address(1)), -3)
    report = audit_run(str(folder))
    assert problems(report) == [(2, fed.address(1), "MISMATCH")], report.table()
    agg = [r for r in report.rows if r.round == 2 and r.kind == "aggregate"][0]
    assert agg.status == "NOT-RECOMPUTED" and "not all verified" in agg.detail
    assert report.exit_code == 1


def test_swapped_and_missing_update_files_are_flagged(fedavg_run):
    folder, pipeline, fed = fedavg_run
    store = pipeline.trail.store
    a, b, c = (fed.address(i) for i in range(3))
    pa, pb = store.update_path(1, a), store.update_path(1, b)
    os.replace(pa, pa + ".x"), os.replace(pb, pa), os.replace(pa + ".x", pb)
    os.remove(store.update_path(2, c))
    status = statuses(audit_run(str(folder)))
    assert status[(1, a.lower())] == status[(1, b.lower())] == "MISMATCH"
    assert status[(1, c.lower())] == "OK" and status[(2, c.lower())] == "MISSING"


def test_tampered_aggregate_file_is_flagged(fedavg_run):
    from safetensors.numpy import save_file

    folder, pipeline, _ = fedavg_run
    path = pipeline.trail.store.aggregate_path(1)
    agg = ArtifactStore.load_arrays(path)
    agg["m.lora_A.weight"][0, 0] += 1.0
    save_file(agg, path)
    report = audit_run(str(folder))
    assert problems(report) == [(1, "aggregate", "MISMATCH")], report.table()


def test_edited_round_document_is_flagged_even_when_only_reformatted(fedavg_run):
    folder, pipeline, _ = fedavg_run
    path = pipeline.trail.store.round_path(2)
    with open(path) as fh:
        doc = json.load(fh)
    with open(path, "w") as fh:
        json.dump(doc, fh, indent=1)                 # same content, other bytes
    assert problems(audit_run(str(folder))) == [(2, "round.json", "MISMATCH")]
    doc["updates"][0]["num-examples"] = 1000
    with open(path, "w") as fh:
        json.dump(doc, fh, sort_keys=True, separators=(",", ":"))
    report = audit_run(str(folder))
    assert problems(report) == [(2, "round.json", "MISMATCH")] and "hashes to" in report.problems[0].detail


def test_edited_run_record_is_flagged(fedavg_run):
    folder, pipeline, _ = fedavg_run
    path = pipeline.trail.store.run_path
    with open(path) as fh:
        run = json.load(fh)
    run["rule"]["name"] = "FedMedian"
    with open(path, "w") as fh:
        json.dump(run, fh, sort_keys=True, separators=(",", ":"))
    report = audit_run(str(folder), ledger=pipeline.trail.ledger)
    assert problems(report) == [(0, "run.json", "MISMATCH")], report.table()
    assert "the chain recorded" in report.problems[0].detail and "not used" in report.problems[0].detail
    assert [r.status for r in report.rows if r.kind == "aggregate"] == ["NOT-RECOMPUTED"] * 2   # not FedMedian's


# ---------------------------------------------------------------------------- refused replies
def test_refused_replies_are_listed_with_their_reasons(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation(n=5)

    def tamper(rnd, i, arrays, audit):
        if i == 0:   # claims the hash of other arrays than it sends
            arrays = {k: v + 1 for k, v in arrays.items()}
        if i == 1:   # names someone else as the signer
            audit = {**audit, "signer": signing.simulation_account(7).address}
        if i == 2:   # no audit record
            audit = None
        if i == 4:   # signs with client 3's key: a second reply of that signer
            audit = fed.record_for(rnd, 4, arrays, account=fed.accounts[3])
        return arrays, audit

    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    fed.drive(pipeline, rounds=1, tamper=tamper)
    reasons = {r["node-id"]: r["reason"] for r in pipeline.reports[1].rejected}
    assert set(reasons) == {fed.nodes[i] for i in (0, 1, 2, 4)}
    assert "is not the received arrays' hash" in reasons[fed.nodes[0]]
    assert "not the claimed signer" in reasons[fed.nodes[1]]
    assert "no 'audit' ConfigRecord" in reasons[fed.nodes[2]]
    assert "already replied" in reasons[fed.nodes[4]]
    assert chain.get_round(fed.run_id, 1)["count"] == 1
    assert pipeline.trail.info()["rejected-replies"]["1"] == pipeline.reports[1].rejected
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.exit_code == 0, report.table()
    assert {r.client: r.status for r in report.rows if r.kind == "rejected"} == {
        f"node-{fed.nodes[i]}": "REJECTED" for i in (0, 1, 2, 4)}
    assert report.verdict == "audit: OK, every record verified (4 replies REJECTED by the aggregator)"


def test_malformed_reply_is_rejected_and_left_out_of_the_aggregate(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation(n=4)

    def nan(rnd, i, arrays, audit):
        if i == 2:
            arrays = {k: v.copy() for k, v in arrays.items()}
            arrays["m.lora_B.weight"][1, 1] = np.nan
            audit = fed.record_for(rnd, 2, arrays)
        return arrays, audit

    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    start = adapter(5)
    instructions = list(pipeline.configure_train(1, record(start), ConfigRecord(), NodeGrid(fed.nodes)))
    replies = fed.replies(instructions, start, 1, tamper=nan)
    got, _ = pipeline.aggregate_train(1, replies)
    clean = RoundPipeline(FedAvg())
    clean.configure_train(1, record(start), ConfigRecord(), NodeGrid(fed.nodes))
    want, _ = clean.aggregate_train(1, [m for m in replies if m.metadata.src_node_id != fed.nodes[2]])
    for k in start:
        np.testing.assert_array_equal(got[k].numpy(), want[k].numpy())
    report = audit_run(str(tmp_path), ledger=chain)
    rejected = [r for r in report.rows if r.status == "REJECTED"]
    assert [r.client for r in rejected] == [f"node-{fed.nodes[2]}"] and "NaN/Inf" in rejected[0].detail
    assert report.exit_code == 0, report.table()


def test_unsigned_replies_are_refused_and_a_run_that_learned_nothing_fails(chain, tmp_path, capsys):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation()
    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    aggregates = fed.drive(pipeline, tamper=lambda rnd, i, arrays, audit: (arrays, None))
    assert aggregates == [None, None]
    assert chain.get_round(fed.run_id, 2)["aggregate-hash"] == ZERO_HASH
    report = audit_run(str(tmp_path))
    assert [(r.round, r.status) for r in report.problems] == [(1, "NO-AGGREGATE"), (2, "NO-AGGREGATE")]
    assert "no update was accepted (3 replies rejected)" in report.problems[0].detail
    assert sum(r.status == "REJECTED" for r in report.rows) == 6
    assert cli(["audit", str(tmp_path)]) == 1
    assert "audit: 2 problem(s) found" in capsys.readouterr().out


def test_unsigned_updates_accepted_on_request_are_shown_as_unsigned(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation()
    pipeline = audited(FedAvg(), chain, tmp_path, fed, require_audit_record=False)
    unsigned = lambda rnd, i, arrays, audit: (arrays, None if i == 1 else audit)  # noqa: E731
    fed.drive(pipeline, tamper=unsigned)
    assert chain.get_round(fed.run_id, 1)["count"] == 2                  # only signed updates go on chain
    report = audit_run(str(tmp_path))
    assert [(r.round, r.status) for r in report.rows if r.kind == "update"].count((1, "UNSIGNED")) == 1
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2
    assert report.exit_code == 3 and "2 update(s) UNSIGNED" in report.verdict, report.table()
    flip(pipeline.trail.store.update_path(1, f"node-{fed.nodes[1]}"), -2)   # its bytes are still bound
    assert problems(audit_run(str(tmp_path))) == [(1, f"node-{fed.nodes[1]}", "MISMATCH")]


# ---------------------------------------------------------------------------- a dishonest aggregator
def test_forged_signature_on_chain_is_bad_signature(chain, tmp_path, monkeypatch):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation()
    forger = signing.simulation_account(9)
    real = chain.record_updates

    def forge(run_id, rnd, entries):
        real(run_id, rnd, [replace(e, signature=signing.sign(forger, fed.commitment(rnd, e.update_hash, e.num_examples)))
                           if e.client == fed.address(0) else e for e in entries])

    monkeypatch.setattr(chain, "record_updates", forge)
    fed.drive(audited(FedAvg(), chain, tmp_path, fed), rounds=1)
    assert problems(audit_run(str(tmp_path), ledger=chain)) == [(1, fed.address(0), "BAD-SIGNATURE")]


def test_round_that_did_not_start_from_the_previous_aggregate_is_flagged(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    fed = Federation()
    pipeline = audited(FedAvg(), chain, tmp_path, fed)
    fed.drive(pipeline, next_global=lambda rnd, arrays: {k: v * 2 for k, v in arrays.items()})
    report = audit_run(str(tmp_path), ledger=chain)
    # the chain opened round 2 from round 1's aggregate; the clients signed for the model they were sent
    assert problems(report) == [(2, fed.address(i), "MISMATCH") for i in range(3)] + [(2, "global", "MISMATCH")], \
        report.table()
    assert all("it was sent another model" in r.detail for r in report.problems[:3])
    assert "but the chain opened it from" in report.problems[3].detail


def test_round_opened_but_never_committed_is_missing(chain, tmp_path, monkeypatch):
    from flwr.serverapp.strategy import FedAvg

    from fedledger.chain.ledger import LedgerError

    fed = Federation()
    real = chain.commit_aggregate

    def lost_in_round_2(run_id, rnd, *hashes):
        if rnd == 2:
            raise LedgerError("the node went away")
        return real(run_id, rnd, *hashes)

    monkeypatch.setattr(chain, "commit_aggregate", lost_in_round_2)
    with pytest.raises(LedgerError):
        fed.drive(audited(FedAvg(), chain, tmp_path, fed), rounds=2)
    report = audit_run(str(tmp_path), ledger=chain)
    assert problems(report) == [(2, "aggregate", "MISSING")], report.table()


def test_verify_refuses_a_signer_other_than_the_nodes_known_one(chain, tmp_path):
    from flwr.serverapp.strategy import FedAvg

    from fedledger.core.update import Identity

    fed = Federation()

    class Known:  # the ServerApp's roster: node -> partition and signer, resolved once
        def refresh(self, grid):
            return None

        def resolve(self, node_id):
            i = fed.nodes.index(node_id)
            return Identity(node_id, i, fed.address(1 if i == 0 else i))

    pipeline = audited(FedAvg(), chain, tmp_path, fed, identities=Known())
    fed.drive(pipeline, rounds=1)
    rejected = pipeline.reports[1].rejected
    assert [r["node-id"] for r in rejected] == [fed.nodes[0]] and "is known as" in rejected[0]["reason"]
    with open(pipeline.trail.store.round_path(1)) as fh:
        assert [u["partition"] for u in json.load(fh)["updates"]] == [1, 2]


# ---------------------------------------------------------------------------- the CLI
def test_cli_audit_table_json_and_exit_codes(fedavg_run, capsys):
    folder, pipeline, fed = fedavg_run
    assert cli(["audit", str(folder)]) == 3                   # an eth-tester run: the aggregator's own copy
    assert "NO-CHAIN" in capsys.readouterr().out
    assert cli(["audit", str(folder), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert not out["ok"] and out["exit-code"] == 3 and out["records"] == 6 and out["problems"] == 0
    assert out["admin"] == pipeline.trail.ledger.admin_address() and out["enrolled"] >= 3   # a shared chain
    flip(pipeline.trail.store.update_path(1, fed.address(0)), -1)
    assert cli(["audit", str(folder)]) == 1
    out = capsys.readouterr().out
    assert fed.address(0) in out and "MISMATCH" in out and "audit: 1 problem(s) found" in out
    assert cli(["audit", str(folder / "nope")]) == 2          # bad input: one clear line
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedledger: error: no audit record")
    shutil.rmtree(folder / "audit")
    assert cli(["audit", str(folder)]) == 2
