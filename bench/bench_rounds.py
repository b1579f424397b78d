"""Round overhead with SmolLM2: how much longer a round takes than the slowest client's training.

The real fedledger ServerApp and ClientApp on an in-process grid (``fedledger.inprocess``: no
Ray, the nodes run one after another in this process), SmolLM2-135M, 4 clients (chatterbot by
category), FedAvg, ``--rounds`` rounds of ``--steps`` local steps. Per round:

- **round wall**: from the round's train messages going out to the next round's going out (so
  it holds the aggregation, the central evaluation and the next configure_train);
- **clients**: the seconds the nodes spent in their ClientApp for that round (one after another
  here); **slowest train**: the largest ``train-seconds`` a client reported;
- **server overhead** = round wall - clients: what the server adds to the round. In a deployment
  the clients train at the same time on their own machines, so the round takes the slowest
  client's training plus this: **overhead ratio** = server overhead / slowest train (goal <= 10 %).

Variants: the whole held-out split every round (``eval-sample=0``: the earlier behaviour), a fixed
sample of 64 per round + the whole split after the last round (``eval-sample=64``, the default),
and the same with the evaluation overlapped with the next round's training
(``eval-overlap=true``). On one shared CPU the overlapped evaluation competes with the clients
for the cores (their seconds grow); on separate machines it does not. The last round is
reported apart: it ends with the whole-split evaluation the run waits for.

``--pin`` stands in for separate machines on this one: one torch thread, the nodes (and the
server's own sequential work) on CPU 0, the background evaluation thread of ``eval-overlap`` on
CPU 1, so the overlapped evaluation does not take the clients' core (memory bandwidth is still
shared).

    PYTHONPATH=. python bench/bench_rounds.py [--rounds 3 --steps 2 --clients 4] [--pin] [--no-write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import machine_info, machine_line, write_results  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from fedledger import server_app  # noqa: E402
from fedledger.client_app import app as client_app  # noqa: E402
from fedledger.inprocess import InProcessGrid  # noqa: E402


class TimedGrid(InProcessGrid):
    """An in-process grid that notes when each round's train messages go out and what each node
    spent on them."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.round_start: dict[int, float] = {}
        self.client: dict[int, list[tuple[float, float]]] = {}   # round -> [(handler s, train-seconds)]

    def push_messages(self, messages):
        messages = list(messages)
        for m in messages:
            if m.metadata.message_type == "train" and "config" in m.content:
                rnd = int(m.content["config"].get("server-round", 0))
                self.round_start.setdefault(rnd, time.perf_counter())
        return super().push_messages(messages)

    def _handle(self, msg):
        start = time.perf_counter()
        reply = super()._handle(msg)
        if msg.metadata.message_type == "train" and reply is not None and not reply.has_error():
            rnd = int(msg.content["config"].get("server-round", 0))
            train = float(reply.content["metrics"]["train-seconds"])
            self.client.setdefault(rnd, []).append((time.perf_counter() - start, train))
        return reply


class _PinnedEvalPool(concurrent.futures.ThreadPoolExecutor):
    """The ServerApp's background evaluation thread, on CPU 1 (``--pin``); other pools as they are."""

    def __init__(self, *a, thread_name_prefix: str = "", initializer=None, initargs=(), **kw):
        if thread_name_prefix.startswith("fedledger-eval"):
            inner = initializer

            def initializer(*args):
                os.sched_setaffinity(0, {1})
                if inner is not None:
                    inner(*args)
        super().__init__(*a, thread_name_prefix=thread_name_prefix, initializer=initializer, initargs=initargs, **kw)


def pin() -> None:
    """One torch thread; this thread (the nodes, the server's sequential work) on CPU 0; the
    evaluation thread the ServerApp starts for ``eval-overlap`` on CPU 1."""
    import torch

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {0})
    concurrent.futures.ThreadPoolExecutor = _PinnedEvalPool


def run_variant(name: str, extra: dict, args) -> dict:
    run_dir = tempfile.mkdtemp(prefix="bench-rounds-")
    cfg = {"model": args.model, "num-rounds": args.rounds, "local-steps": args.steps, "run-dir": run_dir, **extra}
    grid = TimedGrid(client_app, args.clients, cfg, run_id=11, seed=5)
    start = time.perf_counter()
    folder = server_app.run(grid, Context(run_id=11, node_id=0, node_config={}, state=RecordDict(), run_config=cfg),
                            settle=0.0)
    end = time.perf_counter()
    with open(os.path.join(folder, "metrics.json")) as fh:
        metrics = json.load(fh)
    rounds = []
    for rnd in range(1, args.rounds + 1):
        wall = (grid.round_start.get(rnd + 1, end)) - grid.round_start[rnd]
        clients = sum(h for h, _ in grid.client[rnd])
        slowest = max(t for _, t in grid.client[rnd])
        entry = metrics["rounds"][str(rnd)]
        rounds.append({"round": rnd, "wall-s": wall, "clients-s": clients, "slowest-train-s": slowest,
                       "server-overhead-s": wall - clients, "overhead-ratio": (wall - clients) / slowest,
                       "eval-s": entry["central"]["eval-seconds"],
                       "full-eval-s": entry.get("central-full", {}).get("eval-seconds"),
                       "aggregate-s": entry["report"]["seconds"].get("aggregate"),
                       "last": rnd == args.rounds})
    steady = [r for r in rounds if not r["last"]]
    return {"variant": name, "config": extra, "rounds": rounds, "total-wall-s": end - start,
            "median-overhead-ratio": statistics.median(r["overhead-ratio"] for r in steady) if steady else None,
            "final-perplexity": metrics["rounds"][str(args.rounds)].get("central-full",
                                                                       metrics["rounds"][str(args.rounds)]["central"])
            ["perplexity"]}


def plot(rows, path, clients: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    labels, values = [], []
    for r in rows:
        for e in r["rounds"]:
            labels.append(f"{r['variant']}\nround {e['round']}{' (last)' if e['last'] else ''}")
            values.append(100 * e["overhead-ratio"])
    ax.barh(range(len(values)), values)
    ax.axvline(10, color="k", ls=":", label="goal 10 %")
    ax.set(yticks=range(len(values)), yticklabels=labels, xlabel="server overhead / slowest client's training (%)",
           title=f"Round overhead, SmolLM2, {clients} clients")
    ax.tick_params(axis="y", labelsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--variants", default="whole,sample,overlap", help="comma-separated: whole, sample, overlap")
    ap.add_argument("--pin", action="store_true", help="one torch thread; nodes on CPU 0, the overlapped evaluation on "
                                                        "CPU 1 (a stand-in for separate machines)")
    ap.add_argument("--model", default="smollm2", help=argparse.SUPPRESS)  # "tiny": a smoke run
    ap.add_argument("--name", default="rounds", help="results name (default rounds; e.g. rounds_pinned)")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=None, help="folder for the results (default bench/results)")
    args = ap.parse_args(argv)
    if args.pin:
        pin()
    logging.getLogger("flwr").setLevel(logging.WARNING)
    info = machine_info()
    info["load-average-1min"] = os.getloadavg()[0]
    known = {"whole": ("whole split every round (eval-sample=0)", {"eval-sample": 0}),
             "sample": ("sample of 64 per round (eval-sample=64, default)", {"eval-sample": 64}),
             "overlap": ("sample of 64, overlapped (eval-overlap=true)", {"eval-sample": 64, "eval-overlap": True})}
    variants = [known[v.strip()] for v in args.variants.split(",") if v.strip()]
    rows, payload = [], None
    for name, extra in variants:
        rows.append(run_variant(name, extra, args))
        print(name, [round(r["overhead-ratio"], 3) for r in rows[-1]["rounds"]], flush=True)
        payload = report(rows, info, args)  # written after every variant: a stopped run keeps what it measured
    return payload


def report(rows: list[dict], info: dict, args) -> dict:
    lines = ["# Round overhead at SmolLM2 scale (`bench/bench_rounds.py`)", "",
             machine_line(info) + f" 1-min load average at start: {info['load-average-1min']:.2f}.", "",
             f"Real ServerApp + ClientApp on the in-process grid (no Ray; nodes one after another on this 2-core "
             f"machine), SmolLM2-135M, {args.clients} clients, FedAvg, {args.rounds} rounds x {args.steps} local steps "
             "(batch 8). Server overhead = round wall - the clients' seconds; overhead ratio = server overhead / the "
             "slowest client's train-seconds (what a deployment with clients on their own machines would add to the "
             "round). Goal <= 10 %." + (
                 " Pinned (`--pin`): one torch thread; the nodes and the server's sequential work on CPU 0, the "
                 "overlapped evaluation's thread on CPU 1 (a stand-in for a server on its own machine; memory "
                 "bandwidth still shared)." if args.pin else ""), "",
             "| variant | round | round wall s | clients s | slowest train s | server overhead s | overhead ratio | "
             "eval s | aggregate s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for e in r["rounds"]:
            ev = f"{e['eval-s']:.1f}" + (f" + whole split {e['full-eval-s']:.1f}" if e["full-eval-s"] else "")
            lines.append(f"| {r['variant']} | {e['round']}{' (last)' if e['last'] else ''} | {e['wall-s']:.1f} | "
                         f"{e['clients-s']:.1f} | {e['slowest-train-s']:.1f} | {e['server-overhead-s']:.1f} | "
                         f"**{100 * e['overhead-ratio']:.0f} %** | {ev} | {e['aggregate-s']:.3f} |")
    lines += ["", "| variant | median overhead ratio (rounds before the last) | clients s per round (mean) | "
                  "held-out perplexity at the end (whole split) |", "|---|---:|---:|---:|"]
    for r in rows:
        clients = statistics.mean(e["clients-s"] for e in r["rounds"])
        med = r["median-overhead-ratio"]
        lines.append(f"| {r['variant']} | {100 * med:.0f} % ({'met' if med <= 0.10 else 'NOT met'}) | {clients:.1f} | "
                     f"{r['final-perplexity']:.2f} |")
    lines += ["", f"Plot: `{args.name}.png`.", ""]
    md = "\n".join(lines)
    payload = {"rounds": args.rounds, "steps": args.steps, "clients": args.clients, "pinned": bool(args.pin),
               "results": rows, "machine": info}
    if not args.no_write:
        jpath, _ = write_results(args.name, payload, md, args.out)
        plot(rows, os.path.join(os.path.dirname(jpath), f"{args.name}.png"), args.clients)
    print(md)
    return payload


if __name__ == "__main__":
    main()
