"""A third-party Flower app (tests/apps/flowerapp: its own ClientApp, torch model and data, written
like Flower's quickstart-pytorch) audited with one line on each side, through the real `flwr run`:
in simulation on a real anvil (then `fedledger audit --run-id` and the standard-library verifier,
which both catch a flipped byte), without the mod (every reply refused, exit 1), and in a
loopback deployment where each SuperNode signs with its own key file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from eth_account import Account

from fedledger.chain import audit_run, signing
from fedledger.chain.store import ArtifactStore, find_run_folders
from fedledger.cli_chain import main as cli
from fedledger.flwr_runner import run_simulation

from .test_chain_anvil import anvil, needs_anvil  # noqa: F401  (fixture)
from .test_chain_audit import flip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
APP = os.path.join(ROOT, "tests", "apps", "flowerapp")
VERIFY = os.path.join(ROOT, "scripts", "verify_run.py")


def run_app(app_dir: str, tmp_path, run_config: str, **kw) -> tuple[str, str]:
    """(run id, run folder) of one `flwr run` of the app."""
    kw.setdefault("flwr_home", str(tmp_path / "flwr"))
    fed = "" if "superlink" in kw else "num-supernodes=2 client-resources-num-cpus=1"
    outcome = run_simulation(app_dir, run_config, fed, timeout=600, echo=False, **kw)
    assert outcome.ok, outcome.log[-4000:]
    (folder,) = find_run_folders(str(tmp_path / "runs"), int(outcome.run_id))
    return outcome.run_id, folder


def verify_run(folder: str) -> tuple[int, str]:
    """scripts/verify_run.py in an interpreter that sees the standard library only (-I -S)."""
    done = subprocess.run([sys.executable, "-I", "-S", VERIFY, folder], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


@needs_anvil
def test_a_third_party_app_audited_with_one_line_each_side_passes_both_audits(anvil, tmp_path, capsys):  # noqa: F811
    runs = tmp_path / "runs"
    run_id, folder = run_app(APP, tmp_path, f"audit='anvil' rpc-url='{anvil['url']}' run-dir='{runs}'")
    assert cli(["audit", "--run-id", run_id, "--runs", str(runs)]) == 0
    assert "audit: OK, every record verified" in capsys.readouterr().out
    report = audit_run(folder)
    updates = [r for r in report.rows if r.kind == "update"]
    assert {r.client.lower() for r in updates} == {signing.simulation_account(p).address.lower() for p in (0, 1)}
    assert len(updates) == 4 and all(r.status == "OK" for r in updates)
    assert [r.detail for r in report.rows if r.kind == "aggregate"] == ["FedAvg recomputed bit-exactly"] * 2
    store = ArtifactStore(folder, create=False)
    rounds = [store.read_document(store.round_path(r))[1] for r in (1, 2)]
    assert rounds[0]["global-hash"] != rounds[1]["global-hash"] == rounds[0]["aggregate-hash"]  # the model learned

    rc, out = verify_run(folder)
    assert rc == 0 and ", 0 failed;" in out and "aggregates not recomputed" in out, out
    header, *checks, summary = out.splitlines()          # the registry's roles, one line per check, the verdict
    assert header.startswith("registry ") and "admin not checked" in header, out
    assert checks and all(" OK " in line for line in checks), out

    victim = sorted(os.listdir(os.path.dirname(store.update_path(2, "x"))))[0]
    flip(os.path.join(os.path.dirname(store.update_path(2, "x")), victim), -3)
    rc, out = verify_run(folder)
    client = victim.removesuffix(".safetensors")
    failed = [line.split() for line in out.splitlines() if "FAILED" in line]
    assert rc == 1 and [(f[0], f[1]) for f in failed] == [("2", client)], out
    assert cli(["audit", "--run-id", run_id, "--runs", str(runs)]) == 1
    assert f"2  {client}" in capsys.readouterr().out.lower()


@pytest.mark.slow
def test_without_the_mod_every_reply_is_refused_and_the_audit_exits_1(tmp_path, capsys):
    app = tmp_path / "flowerapp"
    shutil.copytree(APP, app, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (app / "pyproject.toml").read_text()
    (app / "pyproject.toml").write_text(pyproject.replace('client_app:audited_app"', 'client_app:app"'))
    run_id, folder = run_app(str(app), tmp_path, f"audit='eth-tester' run-dir='{tmp_path / 'runs'}'")
    assert cli(["audit", "--run-id", run_id, "--runs", str(tmp_path / "runs")]) == 1
    assert "audit: 2 problem(s) found" in capsys.readouterr().out
    report = audit_run(folder)
    assert [r.status for r in report.rows] == ["NO-CHAIN"] + ["REJECTED", "REJECTED", "NO-AGGREGATE"] * 2, \
        report.table()
    assert all("no 'audit' ConfigRecord: the client does not sign its updates" in r.detail for r in report.rejected)


@pytest.mark.deployment
def test_in_a_deployment_each_supernode_signs_with_its_own_key_file_and_a_keyless_one_is_refused(tmp_path,
                                                                                               monkeypatch, capsys):
    from fedledger.deployment import LocalDeployment

    hex_acct, store_acct = Account.create(), Account.create()
    (tmp_path / "node-0.key").write_text(hex_acct.key.to_0x_hex())
    (tmp_path / "node-1.json").write_text(json.dumps(Account.encrypt(store_acct.key, "n0de-1", iterations=2)))
    monkeypatch.setenv(signing.PASSWORD_ENV, "n0de-1")   # the SuperNodes inherit it
    extra = [f'key-file="{tmp_path / "node-0.key"}"', f'key-file="{tmp_path / "node-1.json"}"', ""]
    runs = tmp_path / "runs"
    enrol = f"{hex_acct.address},{store_acct.address}"       # the test bench's admin enrols the two key-file nodes
    with LocalDeployment(str(tmp_path / "deploy"), num_supernodes=3, node_config_extra=extra) as dep:
        run_id, folder = run_app(APP, tmp_path, f"audit='eth-tester' run-dir='{runs}' num-server-rounds=3 "
                                                f"enrol='{enrol}'", flwr_home=dep.flwr_home, superlink="deploy")
    # an eth-tester chain lives in the ServerApp's process: the audit reads the aggregator's copy, never "OK"
    assert cli(["audit", "--run-id", run_id, "--runs", str(runs)]) == 3, capsys.readouterr().out
    report = audit_run(folder)
    assert not report.problems and report.rows[0].status == "NO-CHAIN", report.table()
    ok = [r for r in report.rows if r.kind == "update"]
    assert {r.client.lower() for r in ok} == {hex_acct.address.lower(), store_acct.address.lower()}
    assert all(r.status == "OK" for r in ok)
    # the third SuperNode has no key-file: it refuses to sign with a derivable simulation key, and trains nothing
    assert report.rejected, report.table()
    assert all("a deployment does not sign with a simulation key" in r.detail for r in report.rejected)
