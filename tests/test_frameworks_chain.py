"""KD-FedLLM and Split-FedLLM under issue 10's rules, on a real chain (anvil): every client checks
the chain before it trains (enrolled, its last signed record on chain, the received global = the
chain's current global), signs the same EIP-712 commitment as an adapter update, and the audit,
reading the live chain, verifies every record and names the framework. An aggregator that sends
another global than the chain's is refused by every client. The real ServerApp and ClientApp,
in-process, the tiny model."""

from __future__ import annotations

import json
import os

from flwr.app import Context, RecordDict

from fedledger import server_app
from fedledger.chain import audit_run
from fedledger.cli import main as fedledger_cli
from fedledger.client_app import app as client_app
from fedledger.inprocess import InProcessGrid

from .test_chain_anvil import anvil, needs_anvil  # noqa: F401  (fixture)
from .test_frameworks import BASE

pytestmark = needs_anvil


def _run(anvil, tmp_path, cfg, run_id):  # noqa: F811
    cfg = {**BASE, "audit": "anvil", "rpc-url": anvil["url"], "run-dir": str(tmp_path / "runs"), "num-rounds": 2,
           **cfg}
    grid = InProcessGrid(client_app, 3, cfg, run_id=run_id, seed=5)
    folder = server_app.run(grid, Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                                          run_config=cfg), settle=0.0)
    with open(os.path.join(folder, "metrics.json")) as fh:
        return grid, folder, json.load(fh)


def _honest(grid, folder, m, label):
    for rnd in ("1", "2"):
        report = m["rounds"][rnd]["report"]
        assert report["aggregated"] == 3 and not report["rejected"], report["rejected"]
    for ctx in grid.contexts.values():   # each node remembers the commitment it signed last (checked next round)
        assert ctx.state.config_records["fedledger.sent"]["round"] == 2
    report = audit_run(folder)
    assert not report.problems, report.table()
    assert label in report.framework and report.source.startswith("live chain")
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 6
    assert report.exit_code == 3 and "2 server step(s) NOT RECOMPUTED" in report.verdict, report.verdict
    return report


def test_an_audited_kd_run_on_a_chain_every_client_checks_signs_and_the_audit_verifies(anvil, tmp_path,  # noqa: F811
                                                                                         capsys):
    grid, folder, m = _run(anvil, tmp_path, {"strategy": "kd"}, 901)
    report = _honest(grid, folder, m, "KD-FedLLM")
    assert [r.status for r in report.rows if r.client == "soft-labels"] == ["OK", "OK"]
    assert all("signed logit reply" in r.detail for r in report.rows if r.kind == "update")
    capsys.readouterr()
    assert fedledger_cli(["audit", folder]) == 3   # `fedledger audit` names the framework in its header
    header = capsys.readouterr().out.splitlines()[0]
    assert "KD-FedLLM (knowledge distillation), the server distils" in header, header


def test_an_audited_split_run_on_a_chain_every_client_checks_signs_and_the_audit_verifies(anvil, tmp_path):  # noqa: F811
    grid, folder, m = _run(anvil, tmp_path, {"strategy": "split"}, 902)
    report = _honest(grid, folder, m, "Split-FedLLM")
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2


def _another_global(monkeypatch, runner_cls):
    real = runner_cls.run_round

    def swapped(self, run, server_round, tally):
        if server_round == 2:   # round 1 committed its aggregate; round 2 sends another global
            self._global = {k: v + 0.01 for k, v in self._global.items()}
        return real(self, run, server_round, tally)

    monkeypatch.setattr(runner_cls, "run_round", swapped)


def test_kd_clients_sent_another_global_than_the_chains_refuse_to_train(anvil, tmp_path, monkeypatch):  # noqa: F811
    from fedledger.strategies.kd import KDRunner

    _another_global(monkeypatch, KDRunner)
    _, folder, m = _run(anvil, tmp_path, {"strategy": "kd"}, 903)
    reasons = [r["reason"] for r in m["rounds"]["2"]["report"]["rejected"]]
    assert len(reasons) == 3 and all("the global model I received hashes to" in r for r in reasons), reasons
    assert m["rounds"]["2"]["report"]["aggregated"] == 0


def test_split_clients_sent_another_global_than_the_chains_refuse_at_step_one(anvil, tmp_path, monkeypatch):  # noqa: F811
    from fedledger.strategies.split import SplitRunner

    _another_global(monkeypatch, SplitRunner)
    _, folder, m = _run(anvil, tmp_path, {"strategy": "split"}, 904)
    reasons = [r["reason"] for r in m["rounds"]["2"]["report"]["rejected"]]
    assert len(reasons) == 3 and all("step 1" in r and "the global model I received hashes to" in r
                                     for r in reasons), reasons
    assert m["rounds"]["2"]["exchange"]["server-steps"] == 0
