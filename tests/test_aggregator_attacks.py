"""The aggregator (the registry's writer) is the attacker. Each attack of the issue "An audit the
aggregator cannot fool" passed ``fedledger audit`` with exit 0 before; each is caught now, and the
finding names the round, the client and what differs (docs/THREAT_MODEL.md lists them):

- an inflated example count (recorded, or only used in the aggregate);
- clients invented with fresh keys (the registry refuses them; a chain copy that shows them is
  flagged NOT-ENROLLED; an admin the auditor does not trust is flagged);
- a dropped client: it contests (DROPPED, proven on chain), or it can only refuse the next round
  (DROPPED as the round document's refusal claims it);
- an honest run's signed records replayed into another registry or onto another chain;
- every edit of the run folder: run.json (deploy block, strategy), round.json (example counts, a
  client removed, the aggregate hash, invented refusals, the file deleted);
- a zero aggregate hash for a round that has records;
- records replayed into another round or run (forgeries that already failed stay covered; the
  contract's own refusals are in tests/test_chain_contract.py, every rule's forged aggregate in
  tests/test_audit_rules.py).

Fast cases use an in-process eth-tester chain and audit it live (``ledger=``); the ones where a
real node matters (clients reading the chain, contests, a second chain) use anvil."""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import replace

import pytest
from flwr.serverapp.strategy import FedAvg

from fedledger.chain import ArtifactStore, OnChainAudit, audit_run, audited, signing
from fedledger.chain import devnet, inclusion
from fedledger.chain.mods import instruction_round
from fedledger.chain.audit_strategy import build_ledger
from fedledger.chain.hashing import bytes_hash, canonical_json
from fedledger.chain.ledger import Ledger, LedgerError, UpdateEntry
from fedledger.chain.trail import ZERO_HASH, Enrolment, LedgerTrail
from fedledger.core.pipeline import RoundPipeline
from fedledger.inprocess import InProcessGrid

from .replies import record
from .test_chain_anvil import anvil, needs_anvil  # noqa: F401  (fixture)
from .test_chain_audit import Federation, problems
from .test_client_mod import MIXED, plain_app


@pytest.fixture()
def chain():
    return Ledger.in_process()


def honest_run(chain, folder, rounds: int = 2, n: int = 3, **kw) -> tuple[OnChainAudit, Federation]:
    fed = Federation(n=n)
    fedavg = FedAvg(min_available_nodes=n, min_train_nodes=n, fraction_evaluate=0.0)
    pipeline = OnChainAudit(fedavg, chain, ArtifactStore(str(folder)), fed.run_id, **kw)
    fed.drive(pipeline, rounds=rounds)
    return pipeline, fed


def rewrite(path: str, edit) -> None:
    """Edit a canonical JSON document in place and write it back canonically (as the trail would)."""
    with open(path) as fh:
        doc = json.load(fh)
    edit(doc)
    with open(path, "wb") as fh:
        fh.write(canonical_json(doc))


# ---------------------------------------------------------------------------- inflated example counts
def test_an_example_count_raised_on_chain_breaks_the_clients_signature(chain, tmp_path, monkeypatch):
    fed = Federation()
    real = LedgerTrail._recorded

    def inflate(self, rnd, update):   # the aggregator records client 0 with 10**9 examples (on chain and round.json)
        r = real(self, rnd, update)
        return replace(r, num_examples=10**9) if r.client == fed.address(0) else r

    monkeypatch.setattr(LedgerTrail, "_recorded", inflate)
    fed.drive(OnChainAudit(FedAvg(), chain, ArtifactStore(str(tmp_path)), fed.run_id), rounds=1)
    report = audit_run(str(tmp_path), ledger=chain)
    assert problems(report) == [(1, fed.address(0), "BAD-SIGNATURE")], report.table()
    assert "1000000000 examples" in report.problems[0].detail
    (agg,) = [r for r in report.rows if r.kind == "aggregate"]
    assert agg.status == "NOT-RECOMPUTED"              # never recomputed from a record that is not the client's


def test_an_example_count_used_in_the_aggregate_but_not_signed_is_flagged(chain, tmp_path, monkeypatch):
    import fedledger.core.pipeline as pipeline_module

    real = pipeline_module.aggregate_contributions

    def heavier(strategy, rnd, contributions, *args, **kw):   # the aggregator weighs client 0 by 10**9 examples
        contributions = [replace(contributions[0], weight=10**9), *contributions[1:]]
        return real(strategy, rnd, contributions, *args, **kw)

    monkeypatch.setattr(pipeline_module, "aggregate_contributions", heavier)
    pipeline, fed = honest_run(chain, tmp_path, rounds=1)
    report = audit_run(str(tmp_path), ledger=chain)
    assert problems(report) == [(1, "aggregate", "MISMATCH")], report.table()
    assert "their signed example counts" in report.problems[0].detail
    assert [r.status for r in report.rows if r.kind == "update"] == ["OK"] * 3     # the records are honest


# ---------------------------------------------------------------------------- invented clients
def test_clients_invented_with_fresh_keys_are_refused_by_the_registry(chain, tmp_path):
    pipeline, fed = honest_run(chain, tmp_path, rounds=1, n=1)
    invented = [signing.simulation_account(i, str(tmp_path / "fresh-keys")) for i in range(5)]
    chain.open_round(fed.run_id, 2)
    g = chain.get_run(fed.run_id)["current-global"]
    entries = []
    for i, acct in enumerate(invented):
        c = signing.Commitment(chain.chain_id, chain.address, fed.run_id, 2, g, "0x" + f"{i + 1:064x}", 100)
        entries.append(UpdateEntry(acct.address, c.update_hash, 100, signing.sign(acct, c)))
    with pytest.raises(LedgerError, match="NotEnrolled"):
        chain.record_updates(fed.run_id, 2, entries)
    assert chain.get_round(fed.run_id, 2)["count"] == 0


def test_invented_clients_in_the_aggregators_copy_of_the_events_are_not_enrolled(chain, tmp_path):
    pipeline, fed = honest_run(chain, tmp_path, rounds=1, n=1)
    store = pipeline.trail.store
    events = store.read_events()
    (real,) = [e for e in events if e["event"] == "UpdateRecorded"]
    g = next(e["global-hash"] for e in events if e["event"] == "RoundOpened")
    invented = [signing.simulation_account(i, str(tmp_path / "fresh-keys")) for i in range(5)]
    forged = []
    for i, acct in enumerate(invented):   # correctly signed records of keys the admin never enrolled
        c = signing.Commitment(chain.chain_id, chain.address, fed.run_id, 1, g, "0x" + f"{i + 1:064x}", 100)
        forged.append({**real, "client": acct.address, "index": i + 1, "update-hash": c.update_hash,
                       "num-examples": 100, "signature": signing.sign(acct, c), "log-index": real["log-index"] + i + 1})
    os.remove(os.path.join(store.root, "events.jsonl"))
    store.append_events(events[:events.index(real) + 1] + forged + events[events.index(real) + 1:])
    report = audit_run(str(tmp_path))    # an eth-tester run: the aggregator's own copy of the events
    assert report.rows[0].status == "NO-CHAIN"
    flagged = [(r.round, r.client, r.status) for r in report.rows if r.status == "NOT-ENROLLED"]
    assert flagged == [(1, a.address, "NOT-ENROLLED") for a in invented], report.table()
    assert all("the admin had not enrolled" in r.detail for r in report.rows if r.status == "NOT-ENROLLED")


def test_an_admin_the_auditor_does_not_trust_is_flagged(chain, tmp_path):
    pipeline, fed = honest_run(chain, tmp_path, rounds=1)
    trusted = signing.simulation_account(77, str(tmp_path / "the-federation")).address
    report = audit_run(str(tmp_path), ledger=chain, admin=trusted)
    assert problems(report) == [(0, "admin", "MISMATCH")], report.table()
    assert f"not the admin you trust {trusted}" in report.problems[0].detail
    assert audit_run(str(tmp_path), ledger=chain, admin=chain.admin_address()).ok


# ---------------------------------------------------------------------------- dropped clients (anvil)
class DroppingGrid(InProcessGrid):
    """The aggregator never lets node ``victim``'s reply of round ``drop_round`` into the round
    (the client trains and signs; its reply vanishes). ``before_round(r)`` runs before round r."""

    def __init__(self, *a, victim_partition: int, drop_round: int, before_round=None, **kw):
        super().__init__(*a, **kw)
        self.victim, self.drop_round, self.before_round = self.node_of[victim_partition], drop_round, before_round
        self.seen_rounds: set[int] = set()

    def push_messages(self, messages):
        messages = list(messages)
        rounds = {instruction_round(m) for m in messages if m.metadata.message_type == "train"}
        for r in rounds - self.seen_rounds:
            self.seen_rounds.add(r)
            if self.before_round is not None:
                self.before_round(r)
        ids = super().push_messages(messages)
        for m, key in zip(messages, ids, strict=True):
            if m.metadata.message_type == "train" and instruction_round(m) == self.drop_round \
                    and m.metadata.dst_node_id == self.victim:
                self._inbox.pop(key, None)
        return ids


def dropping_run(url: str, folder, calls: list, before_round=None, rounds: int = 2):
    run_id = 424242
    app = audited(plain_app(calls=calls))
    grid = DroppingGrid(app, 3, {"rpc-url": url}, run_id=run_id, victim_partition=1, drop_round=1,
                        before_round=before_round)
    ledger = build_ledger("anvil", url)
    pipeline = OnChainAudit(FedAvg(fraction_evaluate=0.0), ledger, ArtifactStore(str(folder)), run_id)
    pipeline.start(grid=grid, initial_arrays=record(MIXED), num_rounds=rounds)
    return pipeline, grid


@needs_anvil
def test_a_dropped_client_contests_and_the_audit_shows_the_round_dropped_with_the_proof(anvil, tmp_path):  # noqa: F811
    calls: list = []
    pipeline, grid = dropping_run(anvil["url"], tmp_path, calls)
    victim = signing.simulation_account(1).address
    assert calls.count(grid.victim) == 1                   # trained in round 1, refused to train in round 2
    (refused,) = pipeline.reports[2].rejected
    assert refused["node-id"] == grid.victim and "dropped: my signed record of round 1" in refused["reason"]
    assert "contested on chain (tx 0x" in refused["reason"]
    report = audit_run(str(tmp_path))
    dropped = [r for r in report.rows if r.status == "DROPPED"]
    assert [(r.round, r.client) for r in dropped] == [(1, victim)], report.table()
    assert "contested on chain" in dropped[0].detail and "trained from the round's global" in dropped[0].detail
    assert {(r.round, r.client, r.status) for r in report.problems} == {(1, victim, "DROPPED")}
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2


@needs_anvil
def test_a_dropped_client_that_cannot_contest_refuses_and_the_round_document_shows_its_claim(anvil, tmp_path):  # noqa: F811
    victim = signing.simulation_account(1).address

    def no_funds(rnd):     # the client has nothing to pay a contest with
        if rnd == 2:
            devnet.rpc_call(anvil["url"], "anvil_setBalance", [victim, "0x0"])

    calls: list = []
    pipeline, grid = dropping_run(anvil["url"], tmp_path, calls, before_round=no_funds)
    assert calls.count(grid.victim) == 1
    (refused,) = pipeline.reports[2].rejected
    assert "could not contest it" in refused["reason"]
    report = audit_run(str(tmp_path))
    dropped = [r for r in report.rows if r.status == "DROPPED"]
    assert [(r.round, r.client) for r in dropped] == [(1, f"node-{grid.victim}")], report.table()
    assert "claimed in its refusal of round 2" in dropped[0].detail and "not proven" in dropped[0].detail
    assert not [e for e in pipeline.trail.ledger.events(424242) if e["event"] == "Contested"]


# ---------------------------------------------------------------------------- replayed records
def replay_into(source_folder, ledger: Ledger, folder) -> None:
    """The aggregator copies an honest run's signed records into ``ledger``'s registry (other weights:
    every count + 1), with a run folder that names that registry, and commits each round."""
    src = ArtifactStore(str(source_folder), create=False)
    shutil.copytree(src.root, os.path.join(str(folder), "audit"))
    dst = ArtifactStore(str(folder), create=False)
    os.remove(os.path.join(dst.root, "events.jsonl"))
    _, run = dst.read_document(dst.run_path)
    run.update({"registry-address": ledger.address, "chain-id": ledger.chain_id, "admin": ledger.admin_address(),
                "aggregator": ledger.aggregator_address(), "rpc-url": ledger.rpc_url, "kind": ledger.kind})
    ledger.admin().enrol(run["enrolled"])
    run["enrolled"] = sorted(ledger.enrolled_signers())
    run_hash = dst.write_run(run)
    run_id = int(run["run-id"])
    first = dst.read_document(dst.round_path(1))[1]
    ledger.open_run(run_id, run_hash, first["global-hash"])
    for rnd in (1, 2):
        _, doc = dst.read_document(dst.round_path(rnd))
        signed = [e for e in src_events(source_folder) if e["event"] == "UpdateRecorded" and e["round"] == rnd]
        for u in doc["updates"]:
            u["num-examples"] += 1
        doc["run-hash"] = run_hash
        ledger.open_round(run_id, rnd)
        ledger.record_updates(run_id, rnd, [UpdateEntry(e["client"], e["update-hash"], e["num-examples"] + 1,
                                                        e["signature"]) for e in signed])
        ledger.commit_aggregate(run_id, rnd, doc["aggregate-hash"], dst.write_round(rnd, doc))


def src_events(folder) -> list[dict]:
    return ArtifactStore(str(folder), create=False).read_events()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_anvil
def test_records_replayed_into_another_registry_or_onto_another_chain_do_not_verify(anvil, tmp_path):  # noqa: F811
    fed = Federation()
    honest = OnChainAudit(FedAvg(), build_ledger("anvil", anvil["url"]), ArtifactStore(str(tmp_path / "honest")),
                          fed.run_id)
    fed.drive(honest)
    assert audit_run(str(tmp_path / "honest")).ok
    other_registry = build_ledger("anvil", anvil["url"])          # same chain, a registry the aggregator controls
    replay_into(tmp_path / "honest", other_registry, tmp_path / "registry")
    port = _free_port()                                            # another chain: anvil with chain id 31338
    second = devnet.start(port=port, state_dir=str(tmp_path / "devnet2"), chain_id=31338)
    try:
        other_chain = build_ledger("anvil", second["rpc-url"])
        assert other_chain.address == honest.trail.ledger.address  # same deployer, same nonce: same address
        replay_into(tmp_path / "honest", other_chain, tmp_path / "chain")
        for where in ("registry", "chain"):
            report = audit_run(str(tmp_path / where))
            want = [(rnd, fed.address(i), "BAD-SIGNATURE") for rnd in (1, 2) for i in range(3)]
            assert problems(report) == want, (where, report.table())
            assert {r.status for r in report.rows if r.kind == "aggregate"} == {"NOT-RECOMPUTED"}
    finally:
        devnet.stop(str(tmp_path / "devnet2"))


def test_records_replayed_into_another_round_or_run_do_not_verify(chain, tmp_path):
    pipeline, fed = honest_run(chain, tmp_path / "honest", rounds=1)
    signed = [e for e in chain.events(fed.run_id) if e["event"] == "UpdateRecorded"]
    entries = [UpdateEntry(e["client"], e["update-hash"], e["num-examples"], e["signature"]) for e in signed]
    honest = pipeline.trail.store.root
    for run_id, rnd in ((fed.run_id, 2), (fed.run_id + 1, 1)):   # round 2 of the same run, round 1 of another
        folder = tmp_path / f"replayed-{run_id}-{rnd}"
        shutil.copytree(honest, folder / "audit")
        store = ArtifactStore(str(folder), create=False)
        shutil.copytree(os.path.join(honest, "round-0001", "updates"), os.path.join(store.round_dir(rnd), "updates"),
                        dirs_exist_ok=True)
        if run_id != fed.run_id:
            rewrite(store.run_path, lambda run: run.update({"run-id": run_id}))
            with open(store.run_path, "rb") as fh:
                chain.open_run(run_id, bytes_hash(fh.read()), chain.get_run(fed.run_id)["initial-global"])
        chain.open_round(run_id, rnd)
        chain.record_updates(run_id, rnd, entries)
        chain.commit_aggregate(run_id, rnd, ZERO_HASH, "0x" + "d0" * 32)
        report = audit_run(str(folder), ledger=chain)
        flagged = [(r.client, r.status) for r in report.rows if r.kind == "update" and r.round == rnd]
        assert flagged == [(fed.address(i), "BAD-SIGNATURE") for i in range(3)], report.table()
        assert all(f"(round {rnd}, global" in r.detail for r in report.rows if r.status == "BAD-SIGNATURE")


# ---------------------------------------------------------------------------- the run folder is untrusted data
def _edit_deploy_block(run):
    run["deploy-block"] = 10**6        # "start reading at round 2": round 1 would disappear


def _edit_strategy(run):
    run["rule"] = {"name": "Krum", "module": "flwr.serverapp.strategy.krum", "params": {"num_malicious_nodes": 0}}


RUN_EDITS = {"deploy-block": _edit_deploy_block, "strategy": _edit_strategy}


@pytest.mark.parametrize("edit", sorted(RUN_EDITS))
def test_an_edited_run_record_is_flagged_and_never_followed(edit, chain, tmp_path):
    pipeline, fed = honest_run(chain, tmp_path)
    rewrite(pipeline.trail.store.run_path, RUN_EDITS[edit])
    report = audit_run(str(tmp_path), ledger=chain)
    assert problems(report)[0] == (0, "run.json", "MISMATCH"), report.table()
    assert "the chain recorded" in report.problems[0].detail
    assert [r.round for r in report.rows if r.kind == "update"] == [1, 1, 1, 2, 2, 2]   # round 1 is still audited
    assert [r.status for r in report.rows if r.kind == "aggregate"] == ["NOT-RECOMPUTED"] * 2
    assert report.exit_code == 1


def _edit_counts(doc):
    doc["updates"][0]["num-examples"] *= 100


def _remove_client(doc):
    doc["updates"].pop(1)


def _edit_aggregate(doc):
    doc["aggregate-hash"] = "0x" + "ab" * 32


def _invent_refusal(doc):
    doc["rejected"].append({"node-id": 12345, "partition": None, "signer": None, "stage": "boundary",
                            "reason": "NaN/Inf values"})


ROUND_EDITS = {"example counts": _edit_counts, "a client removed": _remove_client,
               "the aggregate hash": _edit_aggregate, "an invented refusal": _invent_refusal, "deleted": None}


@pytest.mark.parametrize("edit", sorted(ROUND_EDITS))
def test_an_edited_round_document_is_flagged(edit, chain, tmp_path):
    pipeline, fed = honest_run(chain, tmp_path)
    path = pipeline.trail.store.round_path(1)
    if ROUND_EDITS[edit] is None:
        os.remove(path)
    else:
        rewrite(path, ROUND_EDITS[edit])
    report = audit_run(str(tmp_path), ledger=chain)
    want = "MISSING" if ROUND_EDITS[edit] is None else "MISMATCH"
    assert problems(report) == [(1, "round.json", want)], report.table()
    assert [r.status for r in report.rows if r.kind == "aggregate" and r.round == 1] == ["NOT-RECOMPUTED"]


# ---------------------------------------------------------------------------- a zero aggregate
def test_a_zero_aggregate_hash_for_a_round_that_has_records_is_flagged(chain, tmp_path):
    class NothingLearned(LedgerTrail):
        def commit(self, server_round, aggregate, report):
            super().commit(server_round, None, report)

    fed = Federation()
    trail = NothingLearned(chain, ArtifactStore(str(tmp_path)), fed.run_id, admin=chain.admin(),
                           enrolment=Enrolment("simulation"))
    fed.drive(RoundPipeline(FedAvg(), trail=trail), rounds=1)
    report = audit_run(str(tmp_path), ledger=chain)
    assert problems(report) == [(1, "aggregate", "MISMATCH")], report.table()
    assert "computes an aggregate from the recorded updates, but none was committed" in report.problems[0].detail
    run = chain.get_run(fed.run_id)
    assert chain.get_round(fed.run_id, 1)["count"] == 3 and run["current-global"] == run["initial-global"]


def test_the_inclusion_state_is_what_the_node_signed():
    """What a node remembers between rounds round-trips through Flower's ConfigRecord."""
    sent = inclusion.Sent(31337, "0x" + "5f" * 20, 3, "0x" + "aa" * 32, "0x" + "bb" * 32, 12, "0x" + "cc" * 65)
    assert inclusion.Sent.from_record(sent.to_record()) == sent
