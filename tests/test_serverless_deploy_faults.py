"""A SuperNode SIGKILLed mid-round in a real deployment of the serverless ring (flower-superlink
+ 3 flower-supernodes on loopback, `flwr run`): the round completes over the three others (the
SuperLink answers for the dead node once its heartbeats lapse, the ring re-forms), the run
completes, the run folder names the missing peer in that round, and the node, restarted under a
new node id, takes its partition back and trains from the current model. Every process is
stopped by PID (process group), also when the test fails."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time

import psutil
import pytest

from fedledger.flwr_runner import _flwr_bin, flwr_env, free_port, run_simulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES, VICTIM, ROUNDS = 3, 1, 3
PER_ROUND = 1 + 2 * (NODES - 1) + 1          # train.ring messages a peer gets per round


def _start_supernode(dep, partition: int) -> None:
    """One more flower-supernode for ``partition``, as LocalDeployment starts them (its process
    joins ``dep.procs``, which ``dep.stop()`` stops by process group)."""
    env = flwr_env(dep.flwr_home)
    dep._spawn([_flwr_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{dep.port}",
                "--port", str(free_port()), "--node-config", f"partition-id={partition} num-partitions={NODES}"],
               env, f"supernode-{partition}-restarted.log")


def _ring_messages(path: str) -> int:
    try:
        with open(path, errors="replace") as fh:
            return len(re.findall(r"Receiving: train\.ring", fh.read()))
    except FileNotFoundError:
        return 0


def _descendants(procs) -> list[psutil.Process]:
    """Every live descendant of ``procs`` (the SuperLink's superexec and ServerApp run in their
    own process group: stopping the SuperLink's group alone would orphan them)."""
    out = []
    for proc in procs:
        try:
            out += psutil.Process(proc.pid).children(recursive=True)
        except psutil.Error:
            continue
    return out


def _kill_left(processes: list[psutil.Process]) -> list[int]:
    """SIGKILL (by PID) those of ``processes`` still running after a 30 s grace (the superexec
    leaves on its own once its SuperLink is gone); returns their PIDs."""
    _, alive = psutil.wait_procs(processes, timeout=30)
    left = []
    for p in alive:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p.pid)
                p.kill()
        except psutil.Error:
            continue
    return left


def _group_pids(proc) -> list[int]:
    """Every live process of ``proc``'s process group (the SuperNode and its superexec children)."""
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == proc.pid:
                out.append(p.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return out


@pytest.mark.deployment
def test_a_supernode_killed_mid_ring_is_routed_around_named_missing_and_rejoins(tmp_path):
    from fedledger.deployment import LocalDeployment

    run_dir = tmp_path / "runs"
    config = (f"model='tiny' strategy='ring' num-rounds={ROUNDS} local-steps=2 learning-rate=0.005 eval-batches=1 "
              f"min-available-nodes={NODES - 1} run-dir='{run_dir}'")
    killed, lines, children = {}, [], []
    with LocalDeployment(str(tmp_path / "deploy"), num_supernodes=NODES) as dep:
        try:
            started = list(dep.procs)
            victim = dep.procs[1 + VICTIM]                       # procs[0] is the SuperLink
            victim_log = os.path.join(dep.workdir, f"supernode-{VICTIM}.log")

            def kill_mid_round_two():
                """SIGKILL the victim's SuperNode once it holds round 2's first reduce-scatter chunk;
                restart it (new node id, empty state) 5 s later."""
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline and "t" not in killed:
                    seen = _ring_messages(victim_log)
                    if seen >= PER_ROUND + 3:                    # round 2: train, steps 0 and 1 received
                        os.killpg(victim.pid, signal.SIGKILL)
                        killed.update(t=time.monotonic(), seen=seen)
                        time.sleep(5)
                        _start_supernode(dep, VICTIM)
                        return
                    time.sleep(0.2)

            killer = threading.Thread(target=kill_mid_round_two, daemon=True)
            killer.start()
            outcome = run_simulation(ROOT, config, flwr_home=dep.flwr_home, superlink="deploy", timeout=1500,
                                     echo=False, progress=lambda line: lines.append((time.monotonic(), line)) and False)
            killer.join(timeout=5)
            all_procs = list(dep.procs)
            assert "t" in killed, f"the victim never reached round 2 (its log: {open(victim_log).read()[-1500:]})"
            assert outcome.ok, outcome.log[-4000:]
        finally:
            children += _descendants(dep.procs)    # stopped after dep.stop(), by PID
    left = _kill_left(children)
    for p in all_procs:                                      # nothing of the deployment outlives it
        assert not _group_pids(p), f"process group {p.pid} still has {_group_pids(p)}"
    assert not left, f"processes {left} outlived the deployment (killed now)"
    assert started[1 + VICTIM] is victim

    with open(os.path.join(run_dir, "LATEST")) as fh:
        folder = fh.read().strip()
    with open(os.path.join(folder, "metrics.json")) as fh:
        m = json.load(fh)
    ex = {int(r): e["exchange"] for r, e in m["rounds"].items() if "exchange" in e}
    survivors = [p for p in range(NODES) if p != VICTIM]
    assert ex[1]["participants"] == list(range(NODES))
    assert ex[2]["participants"] == survivors and ex[2]["dropped"] == [VICTIM] and ex[2]["restarts"] == 1
    back = [r for r in range(3, ROUNDS + 1) if VICTIM in ex[r]["participants"]]
    assert back and ex[ROUNDS]["participants"] == list(range(NODES)), {r: ex[r]["participants"] for r in ex}
    assert re.search(rf"no reply from peers \[{VICTIM}\]", outcome.log)
    assert "rejoined under a new node id" in outcome.log and f"rejoins as partition {VICTIM}" in outcome.log
    central = m["rounds"]
    assert central[str(ROUNDS)]["central"]["eval-loss"] < central["0"]["central"]["eval-loss"]
    # what the README's table reports: the time from the kill to the end of round 2, per round wall
    round_done = [t for t, line in lines if re.search(r"round 2/\d+\s+loss", line)]
    summary = {"kill-after-messages": killed["seen"], "seconds-kill-to-round-2-done":
               round(round_done[0] - killed["t"], 1) if round_done else None,
               "rejoined-in-round": back[0], "round-wall-seconds": {r: round(e["wall-seconds"], 1) for r, e in ex.items()}}
    print("serverless-deploy-fault:", json.dumps(summary))
