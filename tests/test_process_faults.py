"""Faults injected into real processes (``-m faults``; scripts/test.sh faults): the ``fedledger
run`` CLI and its ServerApp SIGKILLed mid-round, then ``fedledger run --resume``; one of three
SuperNodes of a loopback deployment SIGKILLed mid-round, then restarted. Every process is started
here, recorded by PID and stopped by PID (its process group) in a ``finally``, also when a test
fails. The tests read the run folder, the checkpoint and the audit's rows, not log text."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedledger.chain import devnet
from fedledger.chain.audit import audit_run
from fedledger.chain.audit_strategy import build_ledger
from fedledger.chain.ledger import KEY_ENV
from fedledger.core.checkpoint import CHECKPOINT_FILE
from fedledger.flwr_runner import stop_local_superlink

from .conftest import node_key_files
from .test_chain_anvil import _free_port, needs_anvil

pytestmark = [pytest.mark.faults, needs_anvil]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FEDLEDGER = os.path.join(os.path.dirname(sys.executable), "fedledger")
ROUNDS = 4


@pytest.fixture()
def anvil_node(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)     # the devnet's unlocked accounts write
    port, state_dir = _free_port(), str(tmp_path / "devnet")
    devnet.start(port=port, state_dir=state_dir)
    yield {"url": f"http://127.0.0.1:{port}", "dir": state_dir}
    devnet.stop(state_dir)


# ---------------------------------------------------------------------- processes
def _family(pid: int) -> list[psutil.Process]:
    """The process and every descendant it has now."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cmd(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())
    except psutil.Error:
        return ""


def _alive(procs) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def _kill_groups(pgids, procs, timeout: float = 60.0) -> None:
    """SIGKILL each process group and then each listed process; wait until none is alive (reaping ours)."""
    for g in pgids:
        try:
            os.killpg(g, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in _alive(procs):
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except ProcessLookupError:
        return None


# ---------------------------------------------------------------------- run folder
def _checkpoint_round(folder: str | None) -> int:
    if not folder:
        return 0
    try:
        with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as fh:
            return int(pickle.load(fh)["round"])
    except (OSError, EOFError, pickle.UnpicklingError, KeyError):
        return 0


def _run_folder(run_dir) -> str | None:
    """The run's folder (``LATEST`` is written only when a run ends): the one folder in ``run_dir``."""
    try:
        names = [n for n in os.listdir(run_dir) if os.path.isdir(os.path.join(run_dir, n))]
    except FileNotFoundError:
        return None
    assert len(names) <= 1, names
    return os.path.join(run_dir, names[0]) if names else None


def _journal_ops(folder: str) -> list[tuple[str, int | None]]:
    import json

    with open(os.path.join(folder, "audit", "journal.jsonl")) as fh:
        return [(e["op"], e.get("round")) for e in map(json.loads, fh)]


# ---------------------------------------------------------------------- 1. ServerApp killed, --resume
def test_fedledger_run_killed_mid_round_resumes_with_the_cli_as_one_audited_run(anvil_node, tmp_path):
    """``fedledger run`` (a real ``flwr run`` simulation, 3 SuperNodes, FedAvg audited on anvil)
    in its own process group; once round 2's checkpoint exists (round 3 is being trained), the CLI's
    group and the ServerApp's (flower-superexec, flwr-simulation and Ray) are SIGKILLed. The local
    SuperLink is detached from both (its own session): it survives such a kill, as it does when a
    user's terminal dies. ``fedledger run --resume`` stops that leftover SuperLink, runs rounds
    3-4 and the audit passes as one run: the first run's ledger id, every record once."""
    run_dir, home = tmp_path / "runs", tmp_path / "flwr"
    config = (f"model='tiny' num-rounds={ROUNDS} local-steps=5 eval-batches=4 audit='anvil' "
              f"rpc-url='{anvil_node['url']}' run-dir='{run_dir}'")
    common = ["--app", ROOT, "--num-supernodes", "3", "--flwr-home", str(home)]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen([FEDLEDGER, "run", *common, "--run-config", config], cwd=str(tmp_path), stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
    seen: dict[int, psutil.Process] = {}
    resumed = None
    try:
        deadline = time.monotonic() + 900
        while _checkpoint_round(_run_folder(run_dir)) < 2:
            assert first.poll() is None, open(tmp_path / "first.log").read()[-3000:]
            assert time.monotonic() < deadline, "round 2 did not checkpoint within 900 s"
            seen.update((p.pid, p) for p in _family(first.pid))
            time.sleep(0.2)
        family = _family(first.pid)
        seen.update((p.pid, p) for p in family)
        folder = _run_folder(run_dir)
        serverapp = [p for p in family if "flwr-simulation" in _cmd(p)]
        superlink = [p for p in family if "flower-superlink" in _cmd(p)]
        assert serverapp and superlink, [_cmd(p)[:80] for p in family]
        killed_at = time.monotonic()
        doomed = [p for p in family if p not in superlink]
        _kill_groups({os.getpgid(first.pid), *filter(None, map(_pgid, serverapp))}, doomed)
        first.wait(timeout=60)
        assert not _alive(doomed), [_cmd(p)[:80] for p in _alive(doomed)]
        assert _alive(superlink), "the detached SuperLink is expected to outlive the kill"

        # killed mid-round 3: round 2 is checkpointed and committed, nothing of round 3 is recorded
        assert _checkpoint_round(folder) == 2
        assert _journal_ops(folder)[-1] == ("commit", 2)
        assert not os.path.exists(os.path.join(folder, "metrics.json"))

        resumed = subprocess.run([FEDLEDGER, "run", *common, "--resume", folder], cwd=str(tmp_path),
                                 capture_output=True, text=True, timeout=900, start_new_session=True)
        recovered = time.monotonic() - killed_at
        out = resumed.stdout + resumed.stderr
        assert resumed.returncode == 0, out[-4000:]
        assert f"resuming {folder} after round 2" in out
        assert not _alive(superlink), "the SuperLink the killed run left behind is still running"
        assert "stopped a local SuperLink" in out
    finally:
        _kill_groups(set(), list(seen.values()))
        stop_local_superlink(str(home))       # the resumed run's, had it timed out
        log.close()

    report = audit_run(folder)
    assert report.ok and report.exit_code == 0, report.table()
    with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as fh:
        state = pickle.load(fh)
    ledger_run_id, registry = state["extra"]["ledger-run-id"], state["trail"]["registry"]
    assert report.run_id == ledger_run_id and state["round"] == ROUNDS
    updates = [(r.round, r.client) for r in report.rows if r.kind == "update"]
    assert len(updates) == 3 * ROUNDS and all(r.status == "OK" for r in report.rows if r.kind == "update")
    assert not [r for r in report.rows if r.status in ("NOT-ON-CHAIN", "MISSING")]
    # on chain: every record exactly once, one opening and one commit per round
    events = build_ledger("anvil", anvil_node["url"], registry_address=registry).events(ledger_run_id)
    records = [(e["round"], e["client"].lower()) for e in events if e["event"] == "UpdateRecorded"]
    assert len(records) == len(set(records)) == 3 * ROUNDS
    assert sorted(e["round"] for e in events if e["event"] == "RoundOpened") == list(range(1, ROUNDS + 1))
    assert sorted(e["round"] for e in events if e["event"] == "AggregateCommitted") == list(range(1, ROUNDS + 1))
    assert [op for op in _journal_ops(folder) if op[0] == "open-round"] == [("open-round", r) for r in range(1, ROUNDS + 1)]
    cli = subprocess.run([FEDLEDGER, "audit", folder], capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0 and "audit: OK" in cli.stdout, cli.stdout[-3000:] + cli.stderr[-2000:]
    print(f"\nfaults: fedledger run + ServerApp SIGKILLed in round 3: --resume finished rounds 3-{ROUNDS} "
          f"{recovered:.1f} s after the kill, 0 records lost, 0 rounds lost (round 3 trained again)")


# ---------------------------------------------------------------------- 2. a SuperNode killed, restarted
def _supernode_port_args(args: list[str]) -> list[str]:
    """The same SuperNode command line (same node config: partition, key file) on a fresh Runtime API port."""
    from fedledger.flwr_runner import free_port

    args = list(args)
    args[args.index("--port") + 1] = str(free_port())
    return args


def _rows_of(report, client: str) -> dict[int, str]:
    return {r.round: r.status for r in report.rows if r.client.lower() == client.lower()}


def test_a_supernode_killed_mid_round_is_absent_there_and_rejoins_from_the_current_global(anvil_node, tmp_path):
    """flower-superlink + 3 flower-supernode processes on 127.0.0.1, each signing with its own key
    file, FedAvg audited on anvil, min-available-nodes=2 min-train-nodes=2. SuperNode 2 (and the
    ClientApp process it runs) is SIGKILLed while round 2 trains: round 2 completes with the other
    two once the SuperLink declares the node unavailable (Flower: 2 missed 30 s heartbeats). It is
    started again with the same node config (a new Flower node id, the same key): the roster lets
    it take its partition back, it trains in a later round from that round's global, and the audit
    names it ABSENT exactly in the rounds it missed."""
    import threading

    from fedledger.deployment import LocalDeployment
    from fedledger.flwr_runner import flwr_env, run_simulation

    rounds, victim = 5, 2
    accounts, extra = node_key_files(tmp_path, 3)
    run_dir = tmp_path / "runs"
    config = (f"model='tiny' num-rounds={rounds} local-steps=5 eval-batches=4 audit='anvil' "
              f"rpc-url='{anvil_node['url']}' enrol='{','.join(a.address for a in accounts)}' "
              f"min-available-nodes=2 min-train-nodes=2 run-dir='{run_dir}'")
    outcome, seen, times = {}, {}, {}
    with LocalDeployment(str(tmp_path / "deploy"), num_supernodes=3, node_config_extra=extra) as dep:
        try:
            runner = threading.Thread(target=lambda: outcome.update(run=run_simulation(
                ROOT, config, flwr_home=dep.flwr_home, superlink="deploy", timeout=1500, echo=False)), daemon=True)
            runner.start()
            deadline = time.monotonic() + 900
            while _checkpoint_round(_run_folder(run_dir)) < 1:            # round 2 starts right after
                assert runner.is_alive() and time.monotonic() < deadline, outcome
                for p in dep.procs:
                    seen.update((q.pid, q) for q in _family(p.pid))
                time.sleep(0.2)
            node = dep.procs[1 + victim]
            doomed = _family(node.pid)
            seen.update((q.pid, q) for q in doomed)
            _kill_groups({os.getpgid(node.pid)}, doomed)
            node.wait(timeout=60)
            times["killed"] = time.monotonic()
            assert not _alive(doomed), [_cmd(p)[:80] for p in _alive(doomed)]
            while _checkpoint_round(_run_folder(run_dir)) < 2:            # round 2 goes on without it
                assert runner.is_alive() and time.monotonic() < deadline, outcome
                time.sleep(0.5)
            times["round-2"] = time.monotonic()
            log = open(os.path.join(dep.workdir, f"supernode-{victim}-restarted.log"), "w")
            dep.procs.append(subprocess.Popen(_supernode_port_args(node.args), env=flwr_env(dep.flwr_home),
                                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            runner.join(timeout=1500)
            assert not runner.is_alive(), "the run did not end within 1500 s"
        finally:
            for p in dep.procs:
                seen.update((q.pid, q) for q in _family(p.pid))
            for p in psutil.Process().children(recursive=True):   # the flwr run CLI of run_simulation
                if "flwr" in _cmd(p) and " run " in _cmd(p):
                    seen[p.pid] = p
    _kill_groups(set(), list(seen.values()))     # what the deployment's stop left (orphaned flower-superexec)
    logs = "".join(open(os.path.join(dep.workdir, n)).read()[-1500:] for n in sorted(os.listdir(dep.workdir))
                   if n.endswith(".log"))
    assert outcome["run"].ok, outcome["run"].log[-3000:] + logs

    folder = _run_folder(run_dir)
    report = audit_run(folder)
    assert report.ok and report.exit_code == 0, report.table()
    gone = accounts[victim].address
    mine = _rows_of(report, gone)
    missed = sorted(r for r, s in mine.items() if s == "ABSENT")
    trained = sorted(r for r, s in mine.items() if s == "OK")
    assert missed and missed[0] == 2 and missed == list(range(2, missed[-1] + 1)), mine
    assert trained == [1, *range(missed[-1] + 1, rounds + 1)] and len(trained) >= 2, mine
    assert [(r.round, r.client) for r in report.absent] == [(r, gone) for r in missed]
    for other in (a.address for i, a in enumerate(accounts) if i != victim):
        assert set(_rows_of(report, other).values()) == {"OK"} and len(_rows_of(report, other)) == rounds
    # the round it rejoined: its update is verified against that round's global, which is the
    # aggregate the round before committed (the audit checks both; here the documents say it)
    import json

    rejoin = trained[1]
    with open(os.path.join(folder, "metrics.json")) as fh:
        ids = json.load(fh)["identities"]
    assert len(ids["rejoined"]) == 1 and not ids["refused"], ids
    docs = {r: json.load(open(os.path.join(folder, "audit", f"round-{r:04d}", "round.json"))) for r in (rejoin - 1, rejoin)}
    assert docs[rejoin]["global-hash"] == docs[rejoin - 1]["aggregate-hash"]
    assert gone.lower() in {u["client"].lower() for u in docs[rejoin]["updates"]}
    print(f"\nfaults: SuperNode {victim} of 3 SIGKILLed in round 2: round 2 completed with 2 nodes "
          f"{times['round-2'] - times['killed']:.1f} s after the kill; ABSENT in rounds {missed}; rejoined and "
          f"trained in round {rejoin} from that round's global; 0 records lost, 0 rounds lost")
