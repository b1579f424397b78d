"""``OnChainAudit.from_context``: ledger, store and run folder from any app's run-config (absent keys
take fedledger's defaults), the run found again by ``fedledger audit --run-id``, and unsigned
clients accepted on request and shown as such."""

from __future__ import annotations

import logging
import os
import re

import pytest
from flwr.app import Context, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedledger.chain import OnChainAudit, audit_run
from fedledger.chain.ledger import LedgerError
from fedledger.chain.run_config import LedgerConfig
from fedledger.chain.store import ArtifactStore
from fedledger.cli_chain import main as cli
from fedledger.config import pyproject_defaults

from .test_chain_audit import Federation, flip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def server_context(run_id: int, **run_config) -> Context:
    return Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


def test_absent_keys_take_fedledgers_defaults_but_audit_is_on():
    config = LedgerConfig.from_run_config({"num-server-rounds": 3, "lr": 0.1})   # an app's own keys only
    assert config == LedgerConfig()
    ours = pyproject_defaults(ROOT)
    shared = {k: v for k, v in config.to_run_config().items() if k != "audit"}
    assert shared == {k: ours[k] for k in shared}, "chain/run_config.py and pyproject.toml disagree on a default"
    assert config.audit == "anvil" and ours["audit"] == "none"


def test_run_config_values_are_read_as_the_fedledger_app_reads_them():
    unquoted = 0x5FbDB2315678afecb367f032d93F642f64180aa3   # registry-address=0x5FbD... without quotes: a TOML integer
    config = LedgerConfig.from_run_config({"audit": "eth-tester", "registry-address": unquoted, "chain-id": 31337.0,
                                           "run-dir": "/tmp/x"}, rpc_url="http://node:8545")
    assert config.registry_address == "0x5fbdb2315678afecb367f032d93f642f64180aa3"
    assert config.chain_id == 31337 and config.rpc_url == "http://node:8545" and config.run_dir == "/tmp/x"


@pytest.mark.parametrize("run_config, expected", [
    ({"audit": "none"}, "run-config audit='none' is not valid: choose \"anvil\" or \"eth-tester\""),
    ({"rpc-url": "localhost"}, "run-config rpc-url='localhost' is not valid: must be an http"),
    ({"registry-address": "0x12"}, "run-config registry-address='0x12' is not valid"),
    ({"chain-id": -1}, "run-config chain-id=-1 is not valid: must be >= 0"),
    ({"chain-id": "1"}, "run-config chain-id='1' is not valid: must be a whole number"),
    ({"run-dir": " "}, "run-config run-dir=' ' is not valid: must not be empty"),
])
def test_bad_values_are_one_line_naming_the_key(run_config, expected):
    with pytest.raises(LedgerError) as info:
        OnChainAudit.from_context(FedAvg(), server_context(1, **run_config))
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_an_unreachable_chain_is_one_line_before_any_folder_is_made(tmp_path):
    with pytest.raises(LedgerError, match=r"cannot reach the JSON-RPC node at http://127.0.0.1:9; start one with "
                                          r"`fedledger devnet start`"):
        OnChainAudit.from_context(FedAvg(), server_context(1, **{"rpc-url": "http://127.0.0.1:9",
                                                                 "run-dir": str(tmp_path)}))
    assert os.listdir(tmp_path) == []


def test_from_context_makes_the_run_folder_logs_it_and_audit_run_id_finds_it(tmp_path, caplog, capsys):
    fed = Federation(run_id=9_000_000_001)
    context = server_context(fed.run_id, **{"audit": "eth-tester", "run-dir": str(tmp_path / "runs"),
                                            "num-server-rounds": 2})
    with caplog.at_level(logging.INFO, logger="flwr"):
        strategy = OnChainAudit.from_context(FedAvg(), context)
    (folder,) = [os.path.join(tmp_path / "runs", n) for n in os.listdir(tmp_path / "runs")]
    assert re.fullmatch(r"\d{8}-\d{6}-run9000000001", os.path.basename(folder))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fedledger: run")]
    assert folder in line and strategy.trail.ledger.address in line
    assert f"fedledger audit --run-id {fed.run_id} --runs {tmp_path / 'runs'}" in line
    fed.drive(strategy)
    _, run = ArtifactStore(folder).read_document(ArtifactStore(folder).run_path)
    assert run["registry-address"] == strategy.trail.ledger.address and run["kind"] == "eth-tester"
    assert run["run-config"] == context.run_config
    # the eth-tester chain ended with the "ServerApp": the CLI finds the run and reads its copy of the events
    assert cli(["audit", "--run-id", str(fed.run_id), "--runs", str(tmp_path / "runs")]) == 3
    assert "the events are the aggregator's own copy" in capsys.readouterr().out
    assert audit_run(folder, ledger=strategy.trail.ledger).ok       # while the chain lives, everything verifies


def test_audit_run_id_says_what_it_looked_for(tmp_path, capsys):
    assert cli(["audit", "--run-id", "77", "--runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"no audited run 77 under {tmp_path}" in err and "pass --runs" in err and err.count("\n") == 1
    assert cli(["audit", str(tmp_path), "--run-id", "77"]) == 2
    assert "pass either a run folder or --run-id" in capsys.readouterr().err
    for name in ("20260101-000000-run77", "20260102-000000-run77"):
        os.makedirs(tmp_path / name / "audit")
        (tmp_path / name / "audit" / "run.json").write_text("{}")
    assert cli(["audit", "--run-id", "77", "--runs", str(tmp_path)]) == 2
    assert "run 77 has 2 audited folders" in capsys.readouterr().err


def test_unsigned_clients_are_accepted_on_request_and_the_audit_says_nobody_signed_them(tmp_path):
    """A fleet adopting signing gradually: client 1 does not sign yet. Its update is used, stored and
    bound to the round document, but the audit does not call it verified (exit 3), and an
    aggregator that changes its bytes afterwards is caught."""
    fed = Federation(run_id=9_000_000_002)
    context = server_context(fed.run_id, **{"audit": "eth-tester", "run-dir": str(tmp_path)})
    strategy = OnChainAudit.from_context(FedAvg(), context, require_audit_record=False)
    fed.drive(strategy, tamper=lambda rnd, i, arrays, audit: (arrays, None if i == 1 else audit))
    (folder,) = [os.path.join(tmp_path, n) for n in os.listdir(tmp_path)]
    report = audit_run(folder)
    assert report.exit_code == 3 and "2 update(s) UNSIGNED" in report.verdict, report.table()
    unsigned = [r for r in report.rows if r.status == "UNSIGNED"]
    assert [r.client for r in unsigned] == [f"node-{fed.nodes[1]}"] * 2
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2
    flip(ArtifactStore(folder).update_path(2, f"node-{fed.nodes[1]}"), -1)
    assert [(r.round, r.status) for r in audit_run(folder).problems] == [(2, "MISMATCH")]


def test_without_the_request_unsigned_replies_are_refused_with_their_reason(tmp_path):
    fed = Federation(run_id=9_000_000_003)
    strategy = OnChainAudit.from_context(FedAvg(), server_context(fed.run_id, audit="eth-tester"),
                                         run_dir=str(tmp_path))
    fed.drive(strategy, rounds=1, tamper=lambda rnd, i, arrays, audit: (arrays, None if i == 1 else audit))
    (refused,) = strategy.trail.info()["rejected-replies"]["1"]
    assert refused["reason"] == "no 'audit' ConfigRecord: the client does not sign its updates"
