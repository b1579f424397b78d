"""A local Ethereum devnet: Foundry's anvil on 127.0.0.1 with its state in a file.

``start`` runs ``anvil --silent --prune-history --host 127.0.0.1 --port P --state FILE
--state-interval 1`` detached, writes a pid file and waits until the RPC answers. anvil loads the
state file on start and dumps to it every ``state_interval`` seconds (1: the least it allows) and
on SIGTERM, so blocks and logs (the audit history) survive ``stop``/``start``. A SIGKILL (or a
crash, a power cut) loses what was mined since the last dump: up to ``state_interval`` seconds
of blocks; an audited run's journal (:mod:`.journal`) re-sends them when the node is back. Default folder: ``.fedledger/devnet/`` in the current directory
(``--dir`` or ``$FEDLEDGER_DEVNET_DIR`` to change). Binary: ``$FEDLEDGER_ANVIL``, the repo's
``.tools/`` (``scripts/install_chain_tools.sh``), or ``anvil`` on PATH.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

from .ledger import LedgerError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PORT = 8545
DEFAULT_STATE_INTERVAL = 1   # seconds between anvil's state dumps (its smallest interval)
LOCAL_HOSTS = {"127.0.0.1", "localhost"}


def default_dir() -> str:
    return os.path.abspath(os.environ.get("FEDLEDGER_DEVNET_DIR", os.path.join(".fedledger", "devnet")))


def find_anvil() -> str | None:
    env = os.environ.get("FEDLEDGER_ANVIL")
    if env and os.access(env, os.X_OK):
        return env
    for base in (REPO, os.getcwd()):
        for path in sorted(glob.glob(os.path.join(base, ".tools", "node_modules", "@foundry-rs", "anvil-*", "bin", "anvil"))):
            if os.access(path, os.X_OK):
                return path
    return shutil.which("anvil")


def rpc_call(url: str, method: str, params: list | None = None, timeout: float = 2.0):
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": params or []}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.loads(resp.read())
    if "error" in out:
        raise RuntimeError(out["error"])
    return out["result"]


def is_up(url: str) -> bool:
    try:
        rpc_call(url, "eth_chainId", timeout=1.0)
        return True
    except (OSError, urllib.error.URLError, ValueError, RuntimeError):
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as dead
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return True


def _paths(state_dir: str) -> dict:
    return {"pid": os.path.join(state_dir, "anvil.pid"), "state": os.path.join(state_dir, "state.json"),
            "log": os.path.join(state_dir, "anvil.log"), "info": os.path.join(state_dir, "devnet.json")}


def status(state_dir: str | None = None) -> dict:
    state_dir = os.path.abspath(state_dir or default_dir())
    p = _paths(state_dir)
    info = {"dir": state_dir, "running": False, "pid": None, "state-file": p["state"]}
    if os.path.exists(p["info"]):
        with open(p["info"]) as fh:
            info.update(json.load(fh))
    if os.path.exists(p["pid"]):
        with open(p["pid"]) as fh:
            pid = int(fh.read().strip() or 0)
        if pid and _pid_alive(pid):
            info["pid"], info["running"] = pid, True
    if info["running"] and info.get("rpc-url"):
        try:
            info["block"] = int(rpc_call(info["rpc-url"], "eth_blockNumber"), 16)
            info["chain-id"] = int(rpc_call(info["rpc-url"], "eth_chainId"), 16)
        except Exception:
            info["rpc"] = "not answering"
    return info


def what_a_kill_loses(state_interval: int) -> str:
    return (f"anvil writes its state file every {int(state_interval)} s and on `devnet stop`: a SIGKILL or a crash "
            f"loses the blocks of the last {int(state_interval)} s at most; an audited run re-sends its lost records "
            f"from its journal (`fedledger resend RUN_FOLDER` after the run)")


def start(port: int = DEFAULT_PORT, state_dir: str | None = None, host: str = "127.0.0.1", timeout: float = 15.0,
          state_interval: int = DEFAULT_STATE_INTERVAL, chain_id: int | None = None) -> dict:
    """Start anvil (or report the one already running from this folder); ``chain_id``: anvil's
    ``--chain-id`` (default 31337)."""
    if int(state_interval) < 1:
        raise LedgerError(f"--state-interval {state_interval}: anvil dumps its state every N >= 1 seconds")
    state_dir = os.path.abspath(state_dir or default_dir())
    cur = status(state_dir)
    if cur["running"]:
        return {**cur, "note": "already running"}
    url = f"http://{host}:{port}"
    if is_up(url):
        raise LedgerError(f"port {port} on {host} is already in use by another node; stop it or use --port")
    anvil = find_anvil()
    if anvil is None:
        raise LedgerError("anvil not found; run `bash scripts/install_chain_tools.sh` (or set $FEDLEDGER_ANVIL)")
    os.makedirs(state_dir, exist_ok=True)
    p = _paths(state_dir)
    cmd = [anvil, "--silent", "--prune-history", "--host", host, "--port", str(port), "--state", p["state"],
           "--state-interval", str(state_interval)] + (["--chain-id", str(int(chain_id))] if chain_id else [])
    with open(p["log"], "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=state_dir)
    with open(p["pid"], "w") as fh:
        fh.write(str(proc.pid))
    with open(p["info"], "w") as fh:
        json.dump({"rpc-url": url, "port": port, "host": host, "binary": anvil,
                   "state-interval": int(state_interval)}, fh)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise LedgerError(f"anvil exited at start (code {proc.returncode}); see {p['log']}")
        if is_up(url):
            return {**status(state_dir), "note": "started"}
        time.sleep(0.05)
    stop(state_dir)
    raise LedgerError(f"anvil did not answer on {url} within {timeout:.0f} s; see {p['log']}")


def stop(state_dir: str | None = None, timeout: float = 10.0) -> dict:
    """SIGTERM the anvil of this folder (by its pid file) and wait; it dumps its state on exit."""
    state_dir = os.path.abspath(state_dir or default_dir())
    cur = status(state_dir)
    p = _paths(state_dir)
    if not cur["running"]:
        if os.path.exists(p["pid"]):
            os.remove(p["pid"])
        return {**cur, "note": "not running"}
    pid = cur["pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + timeout
    while time.time() < deadline and _pid_alive(pid):
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    os.remove(p["pid"])
    return {**status(state_dir), "note": "stopped"}


def ensure_running(rpc_url: str = f"http://127.0.0.1:{DEFAULT_PORT}", state_dir: str | None = None) -> str | None:
    """Used by ``fedledger run`` with audit="anvil": None when the node answers; starts a devnet
    when ``rpc_url`` is local and returns a note; raises LedgerError otherwise."""
    if is_up(rpc_url):
        return None
    u = urlparse(rpc_url)
    if u.hostname not in LOCAL_HOSTS:
        raise LedgerError(f"cannot reach {rpc_url}; start that node or pass a reachable rpc-url")
    info = start(port=u.port or DEFAULT_PORT, state_dir=state_dir, host="127.0.0.1")
    return (f"started a devnet (anvil pid {info['pid']}) at {rpc_url}, state in {info['state-file']}; "
            f"{what_a_kill_loses(info.get('state-interval', DEFAULT_STATE_INTERVAL))}")
