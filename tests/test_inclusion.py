"""No silent drop, from the client's side: before it trains, a client (the client mod, and the
fedledger ClientApp through it) reads the chain from its own RPC URL and refuses, in one line,
when it is not enrolled, when the server names another registry or chain than it should, when
the global model it received is not the chain's current global, or when its own signed record
of the last round it sent is missing (then it contests). Real anvil nodes; in-process grids."""

from __future__ import annotations

import json
import os

import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedledger.chain import ArtifactStore, OnChainAudit, audit_run, audited, signing
from fedledger.chain.audit_strategy import build_ledger
from fedledger.chain.trail import Enrolment, LedgerTrail
from fedledger.core.pipeline import RoundPipeline
from fedledger.inprocess import InProcessGrid

from .conftest import TINY
from .replies import record
from .test_aggregator_attacks import DroppingGrid
from .test_chain_anvil import _free_port, anvil, needs_anvil  # noqa: F401  (fixture)
from .test_client_mod import MIXED, plain_app

pytestmark = needs_anvil
RUN = 777


def run_on(url: str, folder, calls: list, rounds: int = 2, strategy_class=OnChainAudit, node_config=None, **kw):
    """``rounds`` audited FedAvg rounds of a plain third-party app (``audited``) on the anvil at ``url``."""
    grid = InProcessGrid(audited(plain_app(calls=calls)), 3, {"rpc-url": url}, run_id=RUN,
                         node_config_extra=node_config)
    pipeline = strategy_class(FedAvg(fraction_evaluate=0.0), build_ledger("anvil", url), ArtifactStore(str(folder)),
                              RUN, **kw)
    pipeline.start(grid=grid, initial_arrays=record(MIXED), num_rounds=rounds)
    return pipeline, grid


def refusals(pipeline, rnd: int) -> list[str]:
    return [r["reason"] for r in pipeline.reports[rnd].rejected]


def test_an_honest_round_trip_every_client_checks_trains_and_the_audit_verifies(anvil, tmp_path):  # noqa: F811
    calls: list = []
    pipeline, grid = run_on(anvil["url"], tmp_path, calls)
    assert sorted(calls) == sorted(grid.node_ids * 2) and not refusals(pipeline, 1) and not refusals(pipeline, 2)
    for node in grid.node_ids:     # each node remembers the commitment it signed last
        sent = grid.contexts[node].state.config_records["fedledger.sent"]
        assert sent["round"] == 2 and sent["registry"] == pipeline.trail.ledger.address
    assert audit_run(str(tmp_path)).ok


class SendsAnotherModel(OnChainAudit):
    """In round 2 the aggregator sends every client a model other than the committed aggregate."""

    def configure_train(self, server_round, arrays, config, grid):
        if server_round == 2:
            arrays = record({k: (v.numpy() * 2).astype(v.numpy().dtype) if v.numpy().dtype.kind == "f" else v.numpy()
                             for k, v in arrays.items()})
        return super().configure_train(server_round, arrays, config, grid)


def test_a_client_sent_another_model_than_the_committed_aggregate_refuses_to_train(anvil, tmp_path):  # noqa: F811
    calls: list = []
    pipeline, grid = run_on(anvil["url"], tmp_path, calls, strategy_class=SendsAnotherModel)
    assert len(calls) == 3                                   # round 1 only
    reasons = refusals(pipeline, 2)
    assert len(reasons) == 3 and all("the global model I received hashes to" in r and "chain's current global"
                                     in r for r in reasons), reasons
    report = audit_run(str(tmp_path))
    assert (2, "global", "MISMATCH") in [(r.round, r.client, r.status) for r in report.problems], report.table()


def test_a_client_that_is_not_enrolled_refuses_to_train(anvil, tmp_path):  # noqa: F811
    calls: list = []
    pipeline, _ = run_on(anvil["url"], tmp_path, calls, rounds=1, enrol="none")
    assert calls == []
    reasons = refusals(pipeline, 1)
    assert len(reasons) == 3 and all("is not enrolled on registry" in r and "ask the federation's admin" in r
                                     for r in reasons), reasons


def test_a_client_that_pins_its_registry_refuses_another(anvil, tmp_path):  # noqa: F811
    calls: list = []
    pipeline, _ = run_on(anvil["url"], tmp_path, calls, rounds=1, node_config={"registry-address": "0x" + "12" * 20})
    assert calls == []
    assert all("this node's node-config registry-address is 0x1212" in r for r in refusals(pipeline, 1))


class NamesAnotherChain(LedgerTrail):
    def instruction(self, server_round, global_arrays, weight_key):
        return {**super().instruction(server_round, global_arrays, weight_key), "chain-id": 1}


def test_a_client_refuses_a_chain_it_cannot_reach_or_that_is_not_the_one_named(anvil, tmp_path):  # noqa: F811
    calls: list = []
    dead = f"http://127.0.0.1:{_free_port()}"
    pipeline, _ = run_on(anvil["url"], tmp_path / "dead", calls, rounds=1, node_config={"rpc-url": dead})
    reasons = refusals(pipeline, 1)
    assert calls == [] and all(f"cannot reach the JSON-RPC node at {dead}" in r and "\n" not in r for r in reasons)
    ledger = build_ledger("anvil", anvil["url"])
    trail = NamesAnotherChain(ledger, ArtifactStore(str(tmp_path / "lying")), RUN + 1, admin=ledger.admin(),
                              enrolment=Enrolment("simulation"))
    grid = InProcessGrid(audited(plain_app(calls=calls)), 3, {"rpc-url": anvil["url"]}, run_id=RUN + 1)
    pipeline = RoundPipeline(FedAvg(fraction_evaluate=0.0), trail=trail)
    pipeline.start(grid=grid, initial_arrays=record(MIXED), num_rounds=1)
    assert calls == [] and all("chain id mismatch" in r for r in refusals(pipeline, 1)), refusals(pipeline, 1)


@pytest.mark.slow
def test_the_fedledger_clientapp_checks_through_the_same_path_and_a_dropped_node_contests(anvil, tmp_path):  # noqa: F811
    """The real fedledger ServerApp and ClientApp (tiny model), in-process, audited on anvil: the
    aggregator loses partition 1's round-1 reply; in round 2 that node refuses and contests."""
    from fedledger import server_app
    from fedledger.client_app import app as client_app

    cfg = {**TINY, "audit": "anvil", "rpc-url": anvil["url"], "run-dir": str(tmp_path / "runs")}
    grid = DroppingGrid(client_app, 3, cfg, run_id=RUN + 2, seed=3, victim_partition=1, drop_round=1)
    folder = server_app.run(grid, Context(run_id=RUN + 2, node_id=0, node_config={}, state=RecordDict(),
                                          run_config=cfg), settle=0.0)
    with open(os.path.join(folder, "metrics.json")) as fh:
        m = json.load(fh)
    (refused,) = m["rounds"]["2"]["report"]["rejected"]
    assert refused["partition"] == 1 and "contested on chain" in refused["reason"]
    report = audit_run(folder)
    dropped = [(r.round, r.client, r.status) for r in report.problems]
    assert dropped == [(1, signing.simulation_account(1).address, "DROPPED")], report.table()
