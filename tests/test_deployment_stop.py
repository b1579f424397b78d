"""LocalDeployment.stop leaves nothing running that the deployment started, including processes
that left its process groups (the SuperLink starts its superexec and ServerApp in sessions of
their own, so signalling the SuperLink's group alone would orphan them)."""

from __future__ import annotations

import os
import sys
import time

import psutil

from fedledger.deployment import LocalDeployment

# a stand-in for flower-superlink: a child in a session of its own, as its superexec is
SPAWNS_OWN_SESSION = ("import os, subprocess, sys, time; "
                      "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'], "
                      "start_new_session=True); "
                      "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(300)")


def _wait_for(path: str, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and open(path).read().strip():
            return int(open(path).read())
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_stop_ends_descendants_that_run_in_sessions_of_their_own(tmp_path):
    dep = LocalDeployment(str(tmp_path))
    pid_file = str(tmp_path / "child.pid")
    dep._spawn([sys.executable, "-c", SPAWNS_OWN_SESSION, pid_file], dict(os.environ), "stand-in.log")
    child = psutil.Process(_wait_for(pid_file))
    assert os.getpgid(child.pid) != os.getpgid(dep.procs[0].pid)   # out of the group stop() signals
    dep.stop()
    gone, alive = psutil.wait_procs([child], timeout=5)
    assert not alive and dep.procs[0].poll() is not None
