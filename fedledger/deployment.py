"""Start a loopback Flower deployment (one SuperLink, N SuperNodes) and stop it by PID.

Used by the deployment test and documented in the README; in a real deployment each process
runs on its own machine with TLS instead of ``--insecure``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from .flwr_runner import _flwr_bin, flwr_env, free_port


@dataclass
class LocalDeployment:
    workdir: str
    num_supernodes: int = 2
    procs: list = field(default_factory=list)
    port: int = 0
    node_config_extra: list = field(default_factory=list)  # per SuperNode, e.g. ['key-file="/keys/0.key"']

    def start(self) -> "LocalDeployment":
        os.makedirs(self.workdir, exist_ok=True)
        self.port = free_port()
        env = flwr_env(os.path.join(self.workdir, "flwr-home"))
        self._spawn([_flwr_bin("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
                     "--host", "127.0.0.1", "--port", str(self.port),
                     "--database", os.path.join(self.workdir, "state.db")], env, "superlink.log")
        time.sleep(3)
        for i in range(self.num_supernodes):
            node_config = f"partition-id={i} num-partitions={self.num_supernodes}"
            if i < len(self.node_config_extra) and self.node_config_extra[i]:
                node_config += " " + self.node_config_extra[i]
            self._spawn([_flwr_bin("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                         "--port", str(free_port()), "--node-config", node_config], env, f"supernode-{i}.log")
        self.write_flwr_config(env["FLWR_HOME"])
        self.wait_until_online(env)
        return self

    def wait_until_online(self, env: dict, timeout: float = 120.0) -> None:
        """Until the SuperLink answers and lists every SuperNode as online (`flwr supernode list`):
        a run started earlier samples only the nodes connected by then, or cannot reach the SuperLink."""
        deadline, online = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            done = subprocess.run([_flwr_bin("flwr"), "supernode", "list", "deploy", "--format", "json"], env=env,
                                  capture_output=True, text=True, timeout=60)
            try:
                answer = json.loads(done.stdout)
                online = sum(n.get("status") == "online" for n in answer.get("nodes", []))
            except ValueError:
                online = 0
            if online >= self.num_supernodes:
                return
            time.sleep(1.0)
        raise RuntimeError(f"{online} of {self.num_supernodes} SuperNodes online after {timeout:.0f} s; see the logs "
                           f"in {self.workdir}")

    def _spawn(self, cmd, env, logname):
        log = open(os.path.join(self.workdir, logname), "w")
        self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def write_flwr_config(self, flwr_home: str) -> None:
        os.makedirs(flwr_home, exist_ok=True)
        with open(os.path.join(flwr_home, "config.toml"), "w") as fh:
            fh.write(f'[superlink]\ndefault = "deploy"\n\n[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')

    @property
    def flwr_home(self) -> str:
        return os.path.join(self.workdir, "flwr-home")

    def stop(self) -> None:
        """Stop everything this deployment started: SIGTERM each process group (SuperNodes first),
        then every descendant wherever its group (the SuperLink starts its superexec and ServerApp
        in sessions of their own: stopping its group alone would orphan them), SIGKILL after a
        grace."""
        import psutil

        family = []
        for p in self.procs:
            try:
                family += psutil.Process(p.pid).children(recursive=True)
            except psutil.Error:
                continue
        for p in reversed(self.procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for q in family:
            try:
                q.terminate()
            except psutil.Error:
                pass
        for q in psutil.wait_procs(family, timeout=15)[1]:
            try:
                q.kill()
            except psutil.Error:
                pass

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()  # nothing we started outlives a failed start
            raise

    def __exit__(self, *exc):
        self.stop()
