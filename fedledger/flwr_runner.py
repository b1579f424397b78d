"""Run the app with ``flwr run`` the way it should be run, and clean up after it.

``flwr run --stream`` exits 0 even when the run failed and leaves a local SuperLink running.
``run_simulation`` therefore: uses a project-local ``FLWR_HOME`` and free ports, disables
Flower's runtime dependency installation (it would pull a CUDA torch), reads the run's real
status with ``flwr ls --run-id ID --format json``, and stops the SuperLink it started, by PID.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass


@dataclass
class RunOutcome:
    run_id: str | None
    status: str
    log: str
    returncode: int

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flwr_env(flwr_home: str, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": os.path.abspath(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    env.setdefault("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    env.update(extra or {})
    return env


def _flwr_bin(name: str) -> str:
    local = os.path.join(os.path.dirname(sys.executable), name)
    return local if os.path.exists(local) else (shutil.which(name) or name)


def run_status(run_id: str, env: dict, superlink: str | None = None) -> str:
    cmd = [_flwr_bin("flwr"), "ls", *( [superlink] if superlink else []), "--run-id", str(run_id), "--format", "json"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout).get("runs", [])
        return runs[0]["status"] if runs else "unknown"
    except (json.JSONDecodeError, KeyError, IndexError):
        return "unknown"


def stop_local_superlink(flwr_home: str) -> list[int]:
    """Kill the SuperLink started for ``flwr_home`` (and its children), by PID."""
    import psutil

    marker = os.path.join(os.path.abspath(flwr_home), "local-superlink")
    killed = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "flower-superlink" in cmd and marker in cmd:
            family = [proc] + proc.children(recursive=True)
            for p in family:
                try:
                    p.send_signal(signal.SIGTERM)
                    killed.append(p.pid)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(family, timeout=10)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
    return killed


def run_simulation(app_dir: str = ".", run_config: str = "", federation_config: str = "",
                   flwr_home: str = ".flwr", superlink: str | None = None, timeout: float = 3600,
                   echo: bool = True, keep_superlink: bool = False, attempts: int = 2) -> RunOutcome:
    """``flwr run APP [SUPERLINK] --stream`` + real status check + SuperLink clean-up.

    A run that never started (the local SuperLink missed flwr's 15 s start-up window on a busy
    machine) is tried again, up to ``attempts`` times.
    """
    for attempt in range(attempts):
        outcome = _run_once(app_dir, run_config, federation_config, flwr_home, superlink, timeout, echo, keep_superlink)
        if outcome.run_id is not None or "Error" in outcome.log:
            return outcome
        if echo:
            print(f"fedledger: the run did not start (attempt {attempt + 1}/{attempts})", file=sys.stderr)
    return outcome


def _run_once(app_dir, run_config, federation_config, flwr_home, superlink, timeout, echo, keep_superlink) -> RunOutcome:
    os.makedirs(flwr_home, exist_ok=True)
    env = flwr_env(flwr_home)
    cmd = [_flwr_bin("flwr"), "run", app_dir]
    if superlink:
        cmd.append(superlink)
    cmd.append("--stream")
    if run_config:
        cmd += ["--run-config", run_config]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    lines, run_id = [], None
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write(line)
                sys.stdout.flush()
            m = re.search(r"started run (\d+)", line)
            if m:
                run_id = m.group(1)
            if time.time() > deadline:
                proc.kill()
                break
        proc.wait(timeout=60)
        status = run_status(run_id, env, superlink) if run_id else "not-started"
    finally:
        if not superlink and not keep_superlink:
            stop_local_superlink(flwr_home)
    return RunOutcome(run_id, status, "".join(lines), proc.returncode)
