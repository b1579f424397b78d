"""End-to-end: the app through `flwr run` (Ray simulation), and through a loopback deployment."""

import json
import os

import psutil
import pytest

from fedledger.flwr_runner import run_simulation, stop_local_superlink

from .conftest import node_key_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics(run_dir):
    with open(os.path.join(run_dir, "LATEST")) as fh:
        folder = fh.read().strip()
    with open(os.path.join(folder, "metrics.json")) as fh:
        return folder, json.load(fh)


def _tiny_config(run_dir, extra="", model="tiny"):
    return (f"model='{model}' num-rounds=2 local-steps=5 learning-rate=0.005 eval-batches=4 "
            f"run-dir='{run_dir}' {extra}").strip()


def _superlinks_for(flwr_home):
    marker = os.path.join(os.path.abspath(flwr_home), "local-superlink")
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info.get("cmdline") or [])]


def test_flwr_run_simulation_lowers_heldout_loss(tmp_path):
    run_dir, home = tmp_path / "runs", tmp_path / "flwr"
    outcome = run_simulation(ROOT, _tiny_config(run_dir), "num-supernodes=3 client-resources-num-cpus=1",
                             flwr_home=str(home), timeout=600, echo=False)
    assert outcome.ok, outcome.log[-3000:]
    folder, m = _metrics(run_dir)
    losses = [m["rounds"][r]["central"]["eval-loss"] for r in ("0", "1", "2")]
    assert losses[2] < losses[0], losses
    assert m["rounds"]["1"]["traffic"]["bytes-received"] > 0
    exchange = m["rounds"]["1"]["exchange"]  # server FedAvg on the same network model as the serverless modes
    assert exchange["strategy"] == "server-fedavg" and exchange["sim-network-seconds"] > 0
    assert exchange["total-peer-bytes"] > 0
    assert os.path.exists(os.path.join(folder, "adapter", "adapter_model.safetensors"))
    assert not _superlinks_for(home), "the SuperLink started for the run is still running"


def test_failed_run_is_reported_as_failed(tmp_path):
    """`flwr run --stream` exits 0 on failure; the runner must read the real status."""
    run_dir, home = tmp_path / "runs", tmp_path / "flwr"
    outcome = run_simulation(ROOT, _tiny_config(run_dir, model="./no-such-model"), "num-supernodes=2",
                             flwr_home=str(home), timeout=600, echo=False)
    assert outcome.status.startswith("finished:failed"), outcome.status
    assert "neither a local folder" in outcome.log
    assert not _superlinks_for(home)


@pytest.mark.deployment
def test_deployment_superlink_and_two_supernodes(tmp_path):
    """FedAvg in deployment, audited: each SuperNode signs with the key in its own key file."""
    from fedledger.chain.audit import audit_run
    from fedledger.deployment import LocalDeployment

    run_dir = tmp_path / "runs"
    accounts, extra = node_key_files(tmp_path, 2)
    enrol = ",".join(a.address for a in accounts)            # the test bench's admin enrols the key-file nodes
    with LocalDeployment(str(tmp_path / "deploy"), num_supernodes=2, node_config_extra=extra) as dep:
        pids = [p.pid for p in dep.procs]
        outcome = run_simulation(ROOT, _tiny_config(run_dir, f"audit='eth-tester' enrol='{enrol}'"),
                                 flwr_home=dep.flwr_home, superlink="deploy", timeout=600, echo=False)
        assert outcome.ok, outcome.log[-3000:] + open(os.path.join(dep.workdir, "supernode-0.log")).read()[-2000:]
    folder, m = _metrics(run_dir)
    assert m["rounds"]["2"]["central"]["eval-loss"] < m["rounds"]["0"]["central"]["eval-loss"]
    assert m["num-nodes"] == 2
    report = audit_run(folder)      # eth-tester: the aggregator's copy of the events (exit 3), no problem in it
    assert report.exit_code == 3 and not report.problems and report.rows[0].status == "NO-CHAIN", report.table()
    signers = {r.client.lower() for r in report.rows if r.kind == "update"}
    assert signers == {a.address.lower() for a in accounts}
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.deployment
def test_serverless_ring_runs_unchanged_in_deployment(tmp_path):
    """The serverless exchange is the same code in deployment: the ServerApp relays ring chunks
    between two real SuperNodes, which merge them in their ClientApp state."""
    from fedledger.deployment import LocalDeployment

    run_dir = tmp_path / "runs"
    with LocalDeployment(str(tmp_path / "deploy"), num_supernodes=2) as dep:
        outcome = run_simulation(ROOT, _tiny_config(run_dir, "strategy='ring'"), flwr_home=dep.flwr_home,
                                 superlink="deploy", timeout=600, echo=False)
        assert outcome.ok, outcome.log[-3000:] + open(os.path.join(dep.workdir, "supernode-0.log")).read()[-2000:]
    _, m = _metrics(run_dir)
    for r in ("1", "2"):
        ex = m["rounds"][r]["exchange"]
        assert ex["strategy"] == "ring" and ex["participants"] == [0, 1] and ex["relay-bytes"] > 0
    assert m["rounds"]["2"]["central"]["eval-loss"] < m["rounds"]["0"]["central"]["eval-loss"]
