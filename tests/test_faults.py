"""Injected faults on a real anvil (``-m faults``; scripts/test.sh faults): the node is SIGKILLed
right after a round committed and restarted from its state file a few seconds later, while the
run goes on. Every process is started here and stopped by its PID."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import pytest

from fedledger.chain import devnet
from fedledger.chain.audit import audit_run
from fedledger.chain.audit_strategy import OnChainAudit, build_ledger
from fedledger.chain.ledger import KEY_ENV
from fedledger.chain.store import ArtifactStore

from .test_chain_anvil import _free_port, needs_anvil
from .test_chain_audit import Federation

pytestmark = [pytest.mark.faults, needs_anvil]
DOWN_SECONDS = 3.0


@pytest.fixture()
def slow_dumping_anvil(tmp_path, monkeypatch):
    """anvil dumping its state every 60 s: a SIGKILL loses everything since the last clean stop."""
    monkeypatch.delenv(KEY_ENV, raising=False)
    port, state_dir = _free_port(), str(tmp_path / "devnet")
    devnet.start(port=port, state_dir=state_dir, state_interval=60)
    node = {"url": f"http://127.0.0.1:{port}", "port": port, "dir": state_dir}
    yield node
    devnet.stop(state_dir)


def _kill(state_dir: str) -> None:
    pid = devnet.status(state_dir)["pid"]
    os.kill(pid, signal.SIGKILL)
    while devnet._pid_alive(pid):
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)


def test_anvil_killed_after_a_round_commits_loses_no_record(slow_dumping_anvil, tmp_path, caplog):
    """Round 1 is on disk (a clean restart dumps it); round 2 commits, then anvil is SIGKILLed:
    its state file ends at round 1. It comes back after 3 s. Round 3's first write waits for it
    (visible back-off), finds the registry refusing the opening of round 3, re-sends round 2 from
    the journal and goes on; the audit passes with every record on chain exactly once."""
    from flwr.serverapp.strategy import FedAvg

    node = slow_dumping_anvil
    fed = Federation(run_id=11)
    ledger = build_ledger("anvil", node["url"], wait=60.0)
    pipeline = OnChainAudit(FedAvg(), ledger, ArtifactStore(str(tmp_path / "run")), fed.run_id)
    times = {}

    def fault(rnd, arrays):
        if rnd == 1:   # a clean stop writes the state file: round 1 survives what follows
            devnet.stop(node["dir"])
            devnet.start(port=node["port"], state_dir=node["dir"], state_interval=60)
        if rnd == 2:
            _kill(node["dir"])
            times["killed"] = time.monotonic()

            def restart():
                time.sleep(DOWN_SECONDS)
                devnet.start(port=node["port"], state_dir=node["dir"], state_interval=60)

            threading.Thread(target=restart, daemon=True).start()
        return arrays

    with caplog.at_level(logging.WARNING, "fedledger.chain"):
        fed.drive(pipeline, rounds=3, next_global=fault)
    recovered = time.monotonic() - times["killed"]
    assert "s left before the run stops" in caplog.text and "answers again" in caplog.text
    assert [(e["op"], e["round"]) for e in pipeline.trail.resent] == [
        ("open-round", 2), ("record-updates", 2), ("commit", 2), ("open-round", 3)]
    records = [(e["round"], e["client"]) for e in ledger.events(fed.run_id) if e["event"] == "UpdateRecorded"]
    assert len(records) == 9 and len(set(records)) == 9
    report = audit_run(str(tmp_path / "run"))
    assert report.ok, report.table()
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 9
    assert DOWN_SECONDS <= recovered < DOWN_SECONDS + 30
    print(f"\nfaults: anvil SIGKILL after round 2: 3 writes re-sent, 0 records lost, 0 rounds lost, "
          f"recovered {recovered:.1f} s after the kill (node down {DOWN_SECONDS:.0f} s)")


def test_what_a_node_lost_after_the_run_is_named_and_resent_by_the_cli(slow_dumping_anvil, tmp_path, capsys):
    from flwr.serverapp.strategy import FedAvg

    from fedledger.cli_chain import main as cli

    node, folder = slow_dumping_anvil, str(tmp_path / "run")
    fed = Federation(run_id=12)
    pipeline = OnChainAudit(FedAvg(), build_ledger("anvil", node["url"]), ArtifactStore(folder), fed.run_id)

    def dump_after_round_1(rnd, arrays):
        if rnd == 1:
            devnet.stop(node["dir"])
            devnet.start(port=node["port"], state_dir=node["dir"], state_interval=60)
        return arrays

    fed.drive(pipeline, rounds=2, next_global=dump_after_round_1)
    assert cli(["resend", folder]) == 0 and "0 not on chain" in capsys.readouterr().out
    _kill(node["dir"])                    # the run is over; the node loses round 2
    devnet.start(port=node["port"], state_dir=node["dir"], state_interval=60)
    report = audit_run(folder)
    assert [(r.round, r.status) for r in report.problems] == [(2, "NOT-ON-CHAIN")], report.table()
    assert cli(["resend", folder]) == 1
    assert "3 not on chain (from the opening of round 2 on)" in capsys.readouterr().out
    assert cli(["resend", folder, "--send"]) == 0
    out = capsys.readouterr().out
    assert out.count("re-sent") == 3 and "re-sent the commit of round 2" in out
    report = audit_run(folder)
    assert report.ok and sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 6, report.table()


@pytest.fixture()
def anvil_node(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    port, state_dir = _free_port(), str(tmp_path / "devnet")
    devnet.start(port=port, state_dir=state_dir)
    yield {"url": f"http://127.0.0.1:{port}", "dir": state_dir}
    devnet.stop(state_dir)


def test_a_serverapp_killed_mid_round_resumes_as_one_audited_run(anvil_node, tmp_path):
    """The real ServerApp and ClientApp in-process, FedAdam, audited on anvil: the ServerApp dies
    in round 3 (after round 2 committed and checkpointed); a new run (new Flower run id, new node
    ids) resumes the run folder. The audit sees one run: every record once, and FedAdam's three
    aggregates recomputed bit-exactly from round 1 (the moments came back from the checkpoint)."""
    from .test_resume import Crash, _only_folder, _run
    from .conftest import TINY

    cfg = {**TINY, "strategy": "fedadam", "num-rounds": 3, "server-lr": 0.05, "local-steps": 2, "audit": "anvil",
           "rpc-url": anvil_node["url"], "run-dir": str(tmp_path / "runs")}
    with pytest.raises(Crash):
        _run(cfg, run_id=21, seed=3, die_in_round=3)
    folder = _only_folder(tmp_path / "runs")
    started = time.monotonic()
    assert _run({**cfg, "resume": folder}, run_id=22, seed=4) == folder
    resumed_seconds = time.monotonic() - started
    report = audit_run(folder)
    assert report.ok and report.run_id == 21, report.table()
    updates = [(r.round, r.client) for r in report.rows if r.kind == "update"]
    assert len(updates) == 6 and len(set(updates)) == 6 and all(
        r.status == "OK" for r in report.rows if r.kind == "update")
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAdam recomputed bit-exactly"] * 3
    print(f"\nfaults: ServerApp killed in round 3: resumed round 3 in {resumed_seconds:.1f} s, 0 records lost, "
          f"0 rounds lost (round 3 trained again)")


def test_a_plain_flower_serverapp_resumes_through_from_context(anvil_node, tmp_path):
    """A third-party app (its own ClientApp with the mod, Flower's FedAvg in OnChainAudit.from_context)
    dies in round 2; the next run sets run-config ``resume`` and starts from ``resume_point``."""
    from flwr.app import Context, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from fedledger.chain import OnChainAudit, audited

    from .replies import record
    from .test_client_mod import MIXED, plain_app
    from .test_resume import Crash, DyingGrid, _only_folder

    run_config = {"audit": "anvil", "rpc-url": anvil_node["url"], "run-dir": str(tmp_path / "runs")}
    app = audited(plain_app("weights"))

    def server(run_id: int, die_in_round=None, **extra):
        cfg = {**run_config, **extra}
        grid = DyingGrid(app, 2, cfg, run_id=run_id, seed=run_id, die_in_round=die_in_round)
        context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config=cfg)
        strategy = OnChainAudit.from_context(FedAvg(fraction_evaluate=0.0), context)
        arrays, first = strategy.resume_point(record(MIXED))
        strategy.start(grid=grid, initial_arrays=arrays, num_rounds=3, first_round=first)
        return strategy

    with pytest.raises(Crash):
        server(31, die_in_round=2)
    folder = _only_folder(tmp_path / "runs")
    resumed = server(32, resume=folder)
    assert resumed.trail.run_id == 31 and sorted(resumed.reports) == [1, 2, 3]
    report = audit_run(folder)
    assert report.ok and report.run_id == 31, report.table()
    assert sum(r.status == "OK" and r.kind == "update" for r in report.rows) == 6
