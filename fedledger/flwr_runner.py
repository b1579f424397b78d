"""Run the app with ``flwr run`` the way it should be run, and clean up after it.

``flwr run --stream`` exits 0 even when the run failed and leaves a local SuperLink running.
``run_simulation`` therefore: uses a project-local ``FLWR_HOME`` and free ports, disables
Flower's runtime dependency installation (it would pull a CUDA torch), reads the run's real
status with ``flwr ls --run-id ID --format json``, and stops the SuperLink it started, by PID.

flwr looks ``flower-superlink`` / ``flower-superexec`` up on ``PATH``: :func:`flwr_env` puts the
interpreter's own bin folder first, so ``.venv/bin/fedledger run`` works without an activated venv.

What is echoed depends on the output mode (:data:`MODES`): :func:`keep_line` decides per
streamed line (:class:`LineFilter` carries which record a line continues); the flwr processes
log at the mode's ``FEDLEDGER_LOG_LEVEL``.
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

from .logs import HARMLESS_LIBRARY_LOGS, LEVEL_ENV

#: Output modes of ``fedledger run`` and the level the flwr processes log fedledger's lines at.
MODE_LEVELS = {"quiet": "WARNING", "default": "INFO", "verbose": "DEBUG"}
MODES = tuple(MODE_LEVELS)
#: Python warnings that the flwr processes drop (not in verbose mode); later PYTHONWARNINGS entries win.
LIBRARY_WARNINGS_FILTER = "ignore::DeprecationWarning,ignore::FutureWarning"


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


def flwr_env(flwr_home: str, extra: dict | None = None, mode: str = "default") -> dict:
    """The environment of the flwr processes: this interpreter's bin folder first on PATH, no
    runtime dependency installation, no telemetry, no hub, and the mode's log level and warnings."""
    _check_mode(mode)
    env = dict(os.environ)
    env.update({
        "PATH": _path_with_first(os.path.dirname(sys.executable), env.get("PATH", "")),
        "FLWR_HOME": os.path.abspath(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        LEVEL_ENV: os.environ.get(LEVEL_ENV, "INFO") if mode == "default" else MODE_LEVELS[mode],
    })
    if mode != "verbose":
        env["PYTHONWARNINGS"] = ",".join(f for f in (LIBRARY_WARNINGS_FILTER, os.environ.get("PYTHONWARNINGS")) if f)
        env.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    env.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(free_port()))
    env.setdefault("FLWR_LOCAL_CONTROL_API_PORT", str(free_port()))
    env.update(extra or {})
    return env


def _path_with_first(folder: str, path: str) -> str:
    rest = [p for p in path.split(os.pathsep) if p and p != folder]
    return os.pathsep.join([folder, *rest])


def _check_mode(mode: str) -> None:
    if mode not in MODE_LEVELS:
        raise ValueError(f"output mode {mode!r} is not valid; use one of: {', '.join(MODES)}")


# ---------------------------------------------------------------------------- what is echoed
# The stream is a sequence of records: a Flower log line, a ``fedledger:`` line, a Python
# warning, a traceback, flwr's error box... Each may continue on the lines after it (a
# traceback under an ERROR line, a warning's source line) until the next record starts.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\(\w+(?: pid=\d+)?(?:, ip=[\d.]+)?\)(?:\x1b\[[0-9;]*m)? ?")
_FLWR_LEVEL = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*:")        # Flower's log prefix
_PY_WARNING = re.compile(r"^(?P<path>.+?\.py):\d+: \w*Warning: ")              # /x/y.py:12: FutureWarning: ...
_LIBRARY_FILE = re.compile(r"[/\\](?:site|dist)-packages[/\\](?!fedledger[/\\])"
                           r"|[/\\]lib[/\\]python3\.\d+[/\\](?!(?:site|dist)-packages)")
_ERROR_START = re.compile(r"^(?:Traceback \(most recent call last\):|Fatal Python error|╭"  # ╭: flwr's error box
                          r"|[A-Za-z_][\w.]*(?:Error|Exception)(?:\([\w.]*\))?:)")
_PROGRESS = re.compile(r"(?:\d+it|\d+/\d+) \[\d+:\d+")                         # tqdm: "2055it [00:00, ..."
#: Flower warnings printed on every run of this app that say nothing about it.
HARMLESS_FLOWER_WARNINGS = (
    "Since flwr 1.32, default simulated SuperNodes changed",  # printed even when num-supernodes is set
    "fraction_evaluate is set to 0.0",                        # the app evaluates centrally by design
    "Manually terminating ClientAppActor",                    # Ray actors stopped at the end of every run
)
_HARMLESS_LIBRARY_LINES = tuple(p for prefixes in HARMLESS_LIBRARY_LOGS.values() for p in prefixes)


def plain_text(line: str) -> str:
    """A streamed line without colour codes, Ray's ``(Actor pid=N)`` prefix and the newline."""
    return _ANSI.sub("", _RAY_PREFIX.sub("", line.rstrip("\r\n")))


def _source(line: str) -> str:
    """Which process printed the line, as far as the stream tells (Ray's actor prefix, or "")."""
    m = _RAY_PREFIX.match(line)
    return _ANSI.sub("", m.group(0)).strip() if m else ""


def _record_start(text: str) -> bool | None:
    """True/False: ``text`` starts a record that is shown/hidden in default mode; None: it continues one."""
    if text.startswith("fedledger:"):
        return True
    level = _FLWR_LEVEL.match(text)
    if level:
        return level.group(1) in ("WARNING", "ERROR", "CRITICAL") and not any(h in text for h in HARMLESS_FLOWER_WARNINGS)
    warning = _PY_WARNING.match(text)
    if warning:
        return not _LIBRARY_FILE.search(warning.group("path"))
    if _ERROR_START.match(text):
        return True
    if text.startswith(_HARMLESS_LIBRARY_LINES) or _PROGRESS.search(text):
        return False
    return None


def keep_line(line: str, mode: str = "default", in_shown_record: bool = False) -> bool:
    """Whether ``fedledger run`` echoes one line of ``flwr run --stream`` output.

    verbose: every line. default and quiet: records of fedledger's own ``fedledger:`` lines,
    Flower's WARNING/ERROR/CRITICAL lines (but :data:`HARMLESS_FLOWER_WARNINGS`), tracebacks
    and other error starts, flwr's error box and Python warnings raised outside installed
    libraries; not Flower's INFO chatter, progress bars, library warnings or flwr's CLI
    chatter. A line that starts no record is kept when the record it continues
    (``in_shown_record``) is. (quiet shows fewer ``fedledger:`` lines only because the flwr
    processes log at WARNING.)
    """
    _check_mode(mode)
    if mode == "verbose":
        return True
    start = _record_start(plain_text(line))
    return in_shown_record if start is None else start


class LineFilter:
    """:func:`keep_line` over a stream: remembers, per printing process, whether its current record is shown."""

    def __init__(self, mode: str = "default"):
        _check_mode(mode)
        self.mode = mode
        self._shown: dict[str, bool] = {}

    def __call__(self, line: str) -> bool:
        source = _source(line)
        start = _record_start(plain_text(line))
        keep = keep_line(line, self.mode, self._shown.get(source, False))
        if start is not None:
            self._shown[source] = start
        return keep


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
            killed += _stop_family(proc)
    return killed


def stop_orphaned_superlinks(flwr_home: str) -> list[int]:
    """Stop, by PID, each local SuperLink of ``flwr_home`` whose ``flwr run`` is gone (it was killed:
    ``flwr run`` starts the SuperLink in a session of its own, so a SIGKILL of the CLI, or of its
    terminal, leaves it running, with whatever ServerApp it still runs). Returns their PIDs."""
    import psutil

    marker = os.path.join(os.path.abspath(flwr_home), "local-superlink")
    orphans = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info.get("cmdline") or [])
        if "flower-superlink" in cmd and marker in cmd and not _started_by_live_flwr_run(proc):
            orphans.append(proc)
    for proc in orphans:
        _stop_family(proc)
    return [p.pid for p in orphans]


def _started_by_live_flwr_run(proc) -> bool:
    import psutil

    try:
        parent = proc.parent()
        return parent is not None and "flwr" in " ".join(parent.cmdline())
    except psutil.Error:
        return False


def _stop_family(proc, timeout: float = 10.0) -> list[int]:
    """SIGTERM a process and its descendants, SIGKILL what is left after ``timeout``."""
    import psutil

    try:
        family = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return [p.pid for p in family]


def run_simulation(app_dir: str = ".", run_config: str = "", federation_config: str = "",
                   flwr_home: str = ".flwr", superlink: str | None = None, timeout: float = 3600,
                   echo: bool = True, keep_superlink: bool = False, attempts: int = 2,
                   mode: str = "default", progress=None) -> RunOutcome:
    """``flwr run APP [SUPERLINK] --stream`` + real status check + SuperLink clean-up.

    ``progress``: a ``line -> bool`` (``fedledger.progress.LiveRound.feed``) that sees every
    streamed line first; a line it returns True for is a progress marker and is not echoed. With
    it, the ServerApp is asked for those markers ($FEDLEDGER_PROGRESS=1).

    With ``echo``, the streamed lines that :func:`keep_line` keeps for ``mode`` are printed; the
    outcome's ``log`` always holds every line. A run that never started (the local SuperLink
    missed flwr's 15 s start-up window on a busy machine) is tried again, up to ``attempts`` times.
    """
    _check_mode(mode)
    for attempt in range(attempts):
        outcome = _run_once(app_dir, run_config, federation_config, flwr_home, superlink, timeout, echo,
                            keep_superlink, mode, progress)
        if not _never_started(outcome):
            return outcome
        if echo:
            print(f"fedledger: the run did not start (attempt {attempt + 1}/{attempts})", file=sys.stderr)
    return outcome


#: what flwr prints when its local SuperLink misses the fixed start-up window (a busy machine)
SUPERLINK_START_TIMEOUT = "Failed to start local SuperLink within"


def _never_started(outcome: RunOutcome) -> bool:
    """The run never got an id and flwr reported no error of the run's own (no error at all, or
    only its local SuperLink's start-up timeout): worth trying again."""
    if outcome.run_id is not None:
        return False
    flat = " ".join(outcome.log.replace("\u2502", " ").split())   # flwr boxes its errors in "│"
    return "Error" not in outcome.log or SUPERLINK_START_TIMEOUT in flat


def _run_once(app_dir, run_config, federation_config, flwr_home, superlink, timeout, echo, keep_superlink,
              mode, progress=None) -> RunOutcome:
    os.makedirs(flwr_home, exist_ok=True)
    if not superlink:
        for pid in stop_orphaned_superlinks(flwr_home):
            print(f"fedledger: stopped a local SuperLink (pid {pid}) that a killed run left running in "
                  f"{os.path.abspath(flwr_home)}", file=sys.stderr)
    env = flwr_env(flwr_home, {"FEDLEDGER_PROGRESS": "1"} if progress else None, mode=mode)
    cmd = [_flwr_bin("flwr"), "run", app_dir]
    if superlink:
        cmd.append(superlink)
    cmd.append("--stream")
    if run_config:
        cmd += ["--run-config", run_config]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    lines, run_id, shown = [], None, LineFilter(mode)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + timeout
    try:
        for line in proc.stdout:
            lines.append(line)
            marker = progress(line) if progress else False
            if shown(line) and echo and not marker:
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
