"""Load benchmark: 100 simulated clients x 20 rounds on the tiny model, FedAvg, audited on anvil.

Run as a user runs it: ``fedledger run`` (so ``flwr run`` with the Ray simulation backend,
``--num-supernodes N``, backend resources sized for this machine: ``init-args-num-cpus`` = the
CPUs here and one CPU per ClientApp, so as many Ray actors as cores), ``audit='anvil'`` on an
anvil this bench starts itself (``fedledger.chain.devnet``, stopped by PID at the end), then the
audit of that run (``fedledger.chain.audit.audit_run`` on the live chain, in this process, timed).

Measured, in one run:

- **wall**: from starting ``fedledger run`` to its exit; **per round**: between the ServerApp's
  ``fedledger: round i/N`` lines as they arrive here (round 1 counts from the ``round 0/N`` line:
  it holds the roster's identity query of every node);
- **peak RSS** by sampling ``/proc`` (psutil) of the whole process tree under ``fedledger run``
  every ``--sample`` seconds: the *server* process is ``flwr-simulation`` (the ServerApp, the
  ledger writes and the simulation engine: Flower runs them in one process), the *clients* are
  Ray's worker processes (``ray::ClientAppActor``; one per actor, each runs many virtual
  clients in turn); Ray's own daemons and the flwr CLI / SuperLink / SuperExec are reported apart.
  A peak shorter than the sampling interval can be missed;
- **chain**: the transactions anvil mined for the run (it mines one block per transaction) and
  the journal's writes; the records the audit verified; the audit's wall time;
- the **10,000-record audit** of ``bench_chain.py`` (40 rounds x 250 signing clients through the
  round pipeline in this process, then ``audit_run``), re-measured on the same anvil, same run.

    python bench/bench_load.py [--quick] [--clients 100 --rounds 20] [--out DIR]

Writes load.json, load.md and load.png to ``--out`` (default bench/results). Fixed seeds (run-config
``seed=42``, the audit bench's seed 1). ``--quick``: 10 clients x 3 rounds, a 1,000-record audit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from common import machine_info, machine_line, write_results  # noqa: E402

from fedledger.chain import devnet  # noqa: E402

ROUND_LINE = re.compile(r"fedledger: round (\d+)/(\d+)\b")
RUN_STATUS = re.compile(r"^fedledger: run \S+ status (\S+)")


# ------------------------------------------------------------------------------ process tree
def process_class(cmdline: str) -> str:
    """Which part of the simulation one process of the tree is (see the module)."""
    if "flwr-simulation" in cmdline:
        return "server"
    if cmdline.startswith("ray::") and not cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "clients"
    if "/ray/" in cmdline or cmdline.startswith("ray::"):
        return "ray daemons"
    return "flwr cli + superlink"


class TreeSampler(threading.Thread):
    """RSS of every process under ``root_pid``, every ``interval`` seconds, until stopped."""

    def __init__(self, root_pid: int, interval: float, t0: float):
        super().__init__(daemon=True)
        self.root_pid, self.interval, self.t0 = root_pid, interval, t0
        self.samples: list[dict] = []             # {"t", "load", class -> summed RSS bytes, "total"}
        self.peak: dict[int, tuple[str, int, str]] = {}   # pid -> (class, peak RSS, cmdline head)
        self.seen: dict[int, tuple[float, str]] = {}      # pid -> (create_time, cmdline), to stop leftovers
        self.halt = threading.Event()

    def run(self) -> None:
        import psutil

        while not self.halt.is_set():
            try:
                root = psutil.Process(self.root_pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            sums: dict[str, int] = {}
            n_clients = 0
            for p in procs:
                try:
                    cmd = " ".join(p.cmdline())
                    rss = p.memory_info().rss
                    self.seen.setdefault(p.pid, (p.create_time(), cmd))
                except psutil.Error:
                    continue
                cls = process_class(cmd)
                sums[cls] = sums.get(cls, 0) + rss
                n_clients += cls == "clients"
                if rss > self.peak.get(p.pid, ("", 0, ""))[1]:
                    self.peak[p.pid] = (cls, rss, cmd[:80])
            self.samples.append({"t": time.perf_counter() - self.t0, "load": os.getloadavg()[0], **sums,
                                 "total": sum(sums.values()), "clients-processes": n_clients})
            self.halt.wait(self.interval)

    def stop_leftovers(self) -> list[int]:
        """SIGKILL, by PID, any process of the tree still alive (the same process: its start time matches)."""
        import psutil

        killed = []
        for pid, (created, _) in self.seen.items():
            try:
                p = psutil.Process(pid)
                if abs(p.create_time() - created) < 0.01:
                    p.kill()
                    killed.append(pid)
            except psutil.Error:
                pass
        return killed

    def summary(self) -> dict:
        mb = 1 / 2**20
        by_class: dict[str, list[int]] = {}
        for cls, rss, _ in self.peak.values():
            by_class.setdefault(cls, []).append(rss)
        out = {cls: {"processes": len(v), "peak-rss-mb-largest-process": round(max(v) * mb, 1),
                     "peak-rss-mb-sum-at-one-sample": round(max((s.get(cls, 0) for s in self.samples), default=0) * mb, 1)}
               for cls, v in sorted(by_class.items())}
        out["tree"] = {"peak-rss-mb-sum-at-one-sample": round(max((s["total"] for s in self.samples), default=0) * mb, 1)}
        return out


# ------------------------------------------------------------------------------ the run
def fedledger_run(clients: int, rounds: int, url: str, devnet_dir: str, tmp: str, timeout: float,
                  sample: float, local_steps: int) -> dict:
    """``fedledger run`` of an audited FedAvg run; wall, per-round walls from its round lines, RSS samples."""
    os.makedirs(tmp, exist_ok=True)
    run_dir, flwr_home = os.path.join(tmp, "runs"), os.path.join(tmp, "flwr")
    cpus = os.cpu_count() or 1
    run_config = (f"model='tiny' strategy='fedavg' audit='anvil' rpc-url='{url}' num-rounds={rounds} "
                  f"partitioner='iid' local-steps={local_steps} seed=42 run-dir='{run_dir}'")
    federation = f"init-args-num-cpus={cpus}"
    cmd = [sys.executable, "-m", "fedledger.cli", "run", "--app", ROOT, "--flwr-home", flwr_home,
           "--num-supernodes", str(clients), "--federation-config", federation, "--no-audit",
           "--timeout", str(timeout), "--run-config", run_config]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "FLWR_TELEMETRY_ENABLED": "0",
           "FEDLEDGER_DEVNET_DIR": devnet_dir}
    print("$ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    sampler = TreeSampler(proc.pid, sample, t0)
    sampler.start()
    marks: dict[int, float] = {}
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
            m = ROUND_LINE.search(line)
            if m:
                marks.setdefault(int(m.group(1)), time.perf_counter() - t0)
        proc.wait(timeout=120)
        wall = time.perf_counter() - t0
    finally:
        sampler.halt.set()
        sampler.join(timeout=30)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)   # its own session: the process group is its id
            proc.wait(timeout=60)
        from fedledger.flwr_runner import stop_local_superlink

        stop_local_superlink(flwr_home)
        leftovers = sampler.stop_leftovers()
    folder = next((l.split("results in ", 1)[1].strip() for l in lines if "fedledger: results in " in l), None)
    status = next((m.group(1) for l in lines if (m := RUN_STATUS.match(l))), "unknown")
    per_round = [{"round": r, "end-s": round(marks[r], 2), "wall-s": round(marks[r] - marks[r - 1], 2)}
                 for r in sorted(marks) if r >= 1 and r - 1 in marks]
    return {"command": cmd, "returncode": proc.returncode, "status": status, "folder": folder,
            "wall-s": round(wall, 1), "rounds": per_round, "memory": sampler.summary(),
            "samples": [{k: (round(v, 2) if isinstance(v, float) else v) for k, v in s.items()}
                        for s in sampler.samples],
            "leftover-processes-killed": leftovers, "log-tail": "".join(lines[-15:])}


def chain_counts(url: str, first_block: int) -> dict:
    """Transactions anvil mined since ``first_block`` (exclusive), and their blocks."""
    last = int(devnet.rpc_call(url, "eth_blockNumber"), 16)
    txs = sum(int(devnet.rpc_call(url, "eth_getBlockTransactionCountByNumber", [hex(b)]), 16)
              for b in range(first_block + 1, last + 1))
    return {"transactions": txs, "blocks": last - first_block}


def audit_of(folder: str) -> dict:
    from fedledger.chain.audit import audit_run

    t0 = time.perf_counter()
    report = audit_run(folder)
    seconds = time.perf_counter() - t0
    updates = [r for r in report.rows if r.kind == "update"]
    aggregates = [r for r in report.rows if r.kind == "aggregate"]
    with open(os.path.join(folder, "audit", "journal.jsonl")) as fh:
        journal = [json.loads(l) for l in fh if l.strip()]
    ops: dict[str, int] = {}
    for entry in journal:
        ops[entry.get("op", "?")] = ops.get(entry.get("op", "?"), 0) + 1
    return {"audit-s": round(seconds, 2), "ok": report.ok, "verdict": report.verdict,
            "records": len(updates), "records-ok": sum(r.status == "OK" for r in updates),
            "aggregates": len(aggregates), "aggregates-recomputed": sum(r.status == "OK" for r in aggregates),
            "statuses": sorted({r.status for r in report.rows}), "journal-writes": len(journal), "journal-ops": ops}


def audit_10k(url: str, records: int, tmp: str) -> dict:
    """bench_chain's audit figure (``records`` in rounds of 250 signing clients), on this anvil."""
    from bench_chain import bench_audit

    from fedledger.chain import signing

    os.environ[signing.KEY_DIR_ENV] = os.path.join(tmp, "keys")
    return bench_audit(url, records, 250, tmp)


# ------------------------------------------------------------------------------ report
def to_markdown(res: dict) -> str:
    run, a, m = res["run"], res.get("audit"), res["memory"]
    info = res["machine"]
    walls = [r["wall-s"] for r in run["rounds"]]
    lines = ["# Load (`bench/bench_load.py`)", "",
             machine_line(info) + f" {info.get('memory-gb')} GiB RAM. 1-min load average at start "
             f"{res['load']['start']:.2f}, during the run mean {res['load']['mean']:.2f} / max {res['load']['max']:.2f} "
             "(the 2 cores were shared with other jobs and a benchmark that ran the whole time: walls are noisy).", "",
             f"`fedledger run --num-supernodes {res['clients']} --federation-config \"{res['federation-config']}\"` "
             f"(the real `flwr run` simulation, Ray backend: {res['ray-actors']} ClientApp actors of 1 CPU each), "
             f"tiny model, FedAvg, {res['rounds']} rounds of {res['local-steps']} local step(s), IID partitions, "
             f"audited on anvil (`audit='anvil'`), seed 42; then the audit of that run on the live chain.", "",
             f"Status: **{run['status']}** (exit {run['returncode']}).", "",
             "| measure | value |", "|---|---:|",
             f"| clients x rounds | {res['clients']} x {res['rounds']} |",
             f"| wall, `fedledger run` start to exit | {run['wall-s']:.1f} s ({run['wall-s'] / 60:.1f} min) |"]
    if walls:
        lines += [f"| wall per round: median / min / max | {sorted(walls)[len(walls) // 2]:.1f} / {min(walls):.1f} / "
                  f"{max(walls):.1f} s |",
                  f"| rounds done; their walls summed | {len(walls)} of {res['rounds']}; {sum(walls):.1f} s (start-up "
                  f"to the round-0 line: Ray, SuperLink, model, registry: {run['rounds'][0]['end-s'] - walls[0]:.1f} s) |"]
    for cls, label in (("server", "server process (`flwr-simulation`: ServerApp + ledger + engine)"),
                       ("clients", "client processes (Ray `ClientAppActor` workers)"),
                       ("ray daemons", "Ray's daemons (gcs, raylet, dashboard, agents)"),
                       ("flwr cli + superlink", "`fedledger run`, `flwr run`, SuperLink, SuperExec")):
        if cls in m:
            c = m[cls]
            lines.append(f"| peak RSS, {label} | {c['peak-rss-mb-largest-process']:,.0f} MB largest process; "
                         f"{c['peak-rss-mb-sum-at-one-sample']:,.0f} MB all {c['processes']} together |")
    lines.append(f"| peak RSS, the whole tree at one sample | {m['tree']['peak-rss-mb-sum-at-one-sample']:,.0f} MB |")
    if a:
        lines += [f"| chain: transactions mined for the run / journal writes | {res['chain']['transactions']} / "
                  f"{a['journal-writes']} ({', '.join(f'{k} {v}' for k, v in a['journal-ops'].items())}) |",
                  f"| chain: update records verified | {a['records-ok']} of {a['records']} OK; "
                  f"{a['aggregates-recomputed']} of {a['aggregates']} aggregates recomputed bit-exactly |",
                  f"| audit of the run (`audit_run`, live chain) | **{a['audit-s']:.1f} s**, \"{a['verdict']}\" |"]
    big = res.get("audit-10k")
    if big:
        lines.append(f"| audit of {big['records']:,} records (bench_chain's: {big['rounds']} rounds x "
                     f"{big['clients-per-round']} signing clients, same anvil, same run) | **{big['audit-seconds']} s** "
                     f"({big['audit-records-per-second']:,} records/s), all OK: {big['ok']}; writing them took "
                     f"{big['write-seconds']} s |")
    lines += ["", f"RSS sampled from `/proc` (psutil) of every process under `fedledger run` every {res['sample-s']} s "
              "(a peak shorter than that can be missed); Ray's workers are the client processes: each runs many "
              "virtual clients one after another. Per-round walls are taken between the ServerApp's round lines as "
              "they arrive; round 1 also holds the roster's identity query of every node and the enrolment.", "",
              "Plot: `load.png` (wall per round; RSS of server, clients and the whole tree over time).", ""]
    if run["status"] != "finished:completed":
        lines += [f"The run did not complete ({len(walls)} of {res['rounds']} rounds done); the last lines it printed:", "", "```", run["log-tail"].rstrip(), "```", ""]
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = res["run"]
    fig, (ax_r, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.bar([r["round"] for r in run["rounds"]], [r["wall-s"] for r in run["rounds"]])
    ax_r.set(xlabel="round", ylabel="wall (s)", title=f"wall per round, {res['clients']} clients")
    ax_r.grid(True, axis="y", alpha=0.3)
    t = [s["t"] for s in run["samples"]]
    for key, style in (("server", "-"), ("clients", "-"), ("ray daemons", ":"), ("total", "--")):
        ax_m.plot(t, [s.get(key, 0) / 2**20 for s in run["samples"]], style,
                  label="whole tree" if key == "total" else key)
    for r in run["rounds"]:
        ax_m.axvline(r["end-s"], color="grey", lw=0.3)
    ax_m.set(xlabel="seconds since `fedledger run` started (grey: round ends)", ylabel="RSS (MB, summed per part)",
             title="memory over the run")
    ax_m.legend(fontsize=8)
    ax_m.grid(True, alpha=0.3)
    fig.suptitle(f"fedledger load: {res['clients']} clients x {res['rounds']} rounds, tiny model, FedAvg, audited on anvil")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 clients x 3 rounds, a 1,000-record audit (a smoke run)")
    ap.add_argument("--clients", type=int, default=None, help="simulated clients (SuperNodes); default 100")
    ap.add_argument("--rounds", type=int, default=None, help="FedAvg rounds; default 20")
    ap.add_argument("--local-steps", type=int, default=1)
    ap.add_argument("--audit-records", type=int, default=None,
                    help="records of the separate audit figure (default 10,000; --quick 1,000; 0 = skip)")
    ap.add_argument("--sample", type=float, default=1.0, help="seconds between RSS samples")
    ap.add_argument("--timeout", type=float, default=3 * 3600, help="seconds the run may take")
    ap.add_argument("--out", default=None, help="folder for load.json / load.md / load.png (default bench/results)")
    ap.add_argument("--render", default=None, metavar="LOAD_JSON",
                    help="only write load.md and load.png again from a load.json (e.g. the raw one of a stopped run)")
    args = ap.parse_args(argv)
    quick = {"clients": 10, "rounds": 3, "audit_records": 1000}
    full = {"clients": 100, "rounds": 20, "audit_records": 10_000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.clients < 1 or args.rounds < 1 or args.audit_records < 0:
        ap.error("--clients and --rounds must be >= 1 and --audit-records >= 0")
    return args


def _dump_raw(res: dict, out: str | None) -> None:
    from common import RESULTS

    os.makedirs(out or RESULTS, exist_ok=True)
    with open(os.path.join(out or RESULTS, "load.json"), "w") as fh:
        json.dump(res, fh, indent=2, default=float)


def render(path: str, out: str | None) -> None:
    """load.md + load.png from a load.json; a raw one (the run stopped before its audit) gets what it lacks."""
    with open(path) as fh:
        res = json.load(fh)
    run = res["run"]
    res.setdefault("memory", run["memory"])
    loads = [s["load"] for s in run["samples"]] or [res["load"]["start"]]
    res["load"].setdefault("mean", sum(loads) / len(loads))
    res["load"].setdefault("max", max(loads))
    md = to_markdown(res)
    jpath, _ = write_results("load", res, md, out or os.path.dirname(os.path.abspath(path)))
    plot(res, os.path.join(os.path.dirname(jpath), "load.png"))
    print(md)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        render(args.render, args.out)
        return 0
    info = machine_info()
    info["memory-gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    cpus = os.cpu_count() or 1
    res: dict = {"machine": info, "clients": args.clients, "rounds": args.rounds, "local-steps": args.local_steps,
                 "federation-config": f"init-args-num-cpus={cpus}", "ray-actors": cpus, "sample-s": args.sample,
                 "seeds": {"run-config seed": 42, "audit": 1}, "load": {"start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        d = os.path.join(tmp, "devnet")
        from bench_chain import free_port

        port = free_port()
        url = devnet.start(port=port, state_dir=d)["rpc-url"]
        try:
            first = int(devnet.rpc_call(url, "eth_blockNumber"), 16)
            for attempt in range(2):   # flwr's local SuperLink can miss its 15 s start-up window on a loaded machine
                run = fedledger_run(args.clients, args.rounds, url, d, os.path.join(tmp, f"try{attempt}"), args.timeout,
                                    args.sample, args.local_steps)
                if run["status"] != "not-started":
                    break
                print("bench_load: the run did not start (flwr's SuperLink start-up window); trying once more", flush=True)
            res["attempts"] = attempt + 1
            _dump_raw({**res, "run": run}, args.out)   # what the run measured, before anything else can fail
            res["chain"] = chain_counts(url, first)
            if run["folder"] and run["status"] == "finished:completed":
                res["audit"] = audit_of(run["folder"])
                print(json.dumps(res["audit"]), flush=True)
            if args.audit_records:
                res["audit-10k"] = audit_10k(url, args.audit_records, tmp)
        finally:
            devnet.stop(d)
    loads = [s["load"] for s in run["samples"]] or [res["load"]["start"]]
    res["load"].update({"mean": sum(loads) / len(loads), "max": max(loads)})
    res["memory"] = run["memory"]
    res["run"] = run
    md = to_markdown(res)
    jpath, _ = write_results("load", res, md, args.out)
    plot(res, os.path.join(os.path.dirname(jpath), "load.png"))
    print(md)
    return 0 if run["status"] == "finished:completed" and res.get("audit", {}).get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
