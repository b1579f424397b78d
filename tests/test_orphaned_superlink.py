"""``flwr run`` starts its local SuperLink in a session of its own: a SIGKILL of ``fedledger run``
(or of its terminal) leaves it running. The next ``fedledger run`` stops, by PID, the SuperLinks of
its FLWR_HOME whose ``flwr run`` is gone, and leaves alone one whose ``flwr run`` still runs.
(Stand-in processes with the SuperLink's command line; the real kill is in test_process_faults.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

from fedledger.flwr_runner import stop_orphaned_superlinks

SLEEPER = "import time; time.sleep(300)"


def _superlink_cmd(home: str) -> list[str]:
    return [sys.executable, "-c", SLEEPER, "flower-superlink", "--log-file",
            os.path.join(os.path.abspath(home), "local-superlink", "superlink.log")]


def _wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError("timed out")


def _superlinks(home: str) -> list[psutil.Process]:
    marker = os.path.join(os.path.abspath(home), "local-superlink")
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "flower-superlink" in cmd and marker in cmd:
            out.append(p)
    return out


#: a parent that starts the command in $CHILD (JSON) in a session of its own, and waits for it or not
PARENT = ("import json, os, subprocess, sys; "
          "child = subprocess.Popen(json.loads(os.environ['CHILD']), start_new_session=True); "
          "sys.argv[-1] == 'wait' and child.wait()")


def _parent(home: str, *argv: str) -> subprocess.Popen:
    import json

    return subprocess.Popen([sys.executable, "-c", PARENT, *argv],
                            env={**os.environ, "CHILD": json.dumps(_superlink_cmd(home))})


def test_a_superlink_whose_flwr_run_was_killed_is_stopped_and_a_live_runs_is_kept(tmp_path):
    orphan_home, live_home = str(tmp_path / "killed"), str(tmp_path / "live")
    gone = _parent(orphan_home, "exit")              # exits at once, as a SIGKILLed flwr run: its child is re-parented
    flwr_run = _parent(live_home, "flwr", "run", "wait")
    started = []
    try:
        gone.wait(timeout=60)
        (orphan,) = _wait_for(lambda: _superlinks(orphan_home))
        started.append(orphan)
        (live,) = _wait_for(lambda: _superlinks(live_home))
        started.append(live)
        assert stop_orphaned_superlinks(live_home) == []
        assert stop_orphaned_superlinks(orphan_home) == [orphan.pid]
        psutil.wait_procs([orphan], timeout=30)
        assert not orphan.is_running() and live.is_running()
    finally:
        for p in started:
            try:
                p.kill()
            except psutil.Error:
                pass
        flwr_run.kill()
        flwr_run.wait(timeout=30)
        for p in _superlinks(orphan_home) + _superlinks(live_home):   # one that started after a failed wait
            p.kill()
