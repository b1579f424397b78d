"""FedLLM vs KD-FedLLM vs Split-FedLLM side by side: accuracy, communication, client compute and memory.

SmolLM2-135M on chatterbot-corpus, 4 clients split by category (plus generated tasks with
verifiable answers in their private data, ``clients/tasks.py``), the same private data, the
same public set carved out in every mode (``kd-public-size``), the same rounds and local steps.
Every run is the real ServerApp and ClientApp driven in-process (``fedledger.inprocess``: random
64-bit node ids, one process, no Ray); every number comes from the run's ``metrics.json``:

- held-out perplexity and top-1 next-token accuracy (answer tokens, the whole held-out split)
  and exact match on the held-out task set, after every round (KD with client-side
  distillation: the mean of the clients' own models, which they evaluate);
- per client and round: bytes up / down (array payload through the hub), round trips, compute
  seconds and estimated FLOPs (``clients/cost.py``) as the clients report them; the server's
  compute seconds;
- client peak RSS: measured apart, in a fresh process per kind of client, because every client
  of an in-process run shares one process: the process loads what such a client needs (the
  whole model for FedLLM / KD; only the embeddings and the first k blocks for split) and does
  one round of its work (a LoRA step; + top-k logits on a public batch for KD; a split step).

Rows: FedLLM (FedAvg over LoRA), KD-FedLLM k in {1, 8, 64} x {server, client} distillation,
Split-FedLLM cut after block 2, 6 and 15 of 30. Seeds 42, 1, 2 (mean ± sd).

    PYTHONPATH=. python bench/bench_frameworks.py --quick          # 1 seed, 1 round x 1 step, 3 rows: timing
    PYTHONPATH=. python bench/bench_frameworks.py                  # the full grid (hours on 2 CPU cores)
    PYTHONPATH=. python bench/bench_frameworks.py --resume         # go on from bench/results/frameworks.json

Results are written after every run (``"complete": false`` until the grid is done).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

NAME = "frameworks"
ROWS = {
    "fedllm": {"strategy": "fedavg"},
    **{f"kd-{v}-k{k}": {"strategy": "kd", "kd-variant": v, "kd-top-k": k} for v in ("server", "client") for k in (1, 8, 64)},
    **{f"split-{c}": {"strategy": "split", "split-layer": c} for c in (2, 6, 15)},
}
QUICK_ROWS = ("fedllm", "kd-server-k8", "split-6")


def base_config(args, seed: int) -> dict:
    return {"model": args.model, "num-rounds": args.rounds, "local-steps": args.local_steps,
            "learning-rate": args.learning_rate, "batch-size": args.batch_size, "max-length": args.max_length,
            "seed": seed, "kd-public-size": args.public_size, "kd-public-batch": args.public_batch,
            "kd-distil-steps": args.distil_steps, "task-train-size": args.task_train, "task-eval-size": args.task_eval,
            "heldout-fraction": args.heldout_fraction}


# ---------------------------------------------------------------------------- one run
def run_row(row: str, seed: int, args) -> dict:
    """One row, one seed: the ServerApp in-process; the numbers of its metrics.json."""
    from flwr.app import Context, RecordDict

    from fedledger import server_app
    from fedledger.client_app import app as client_app
    from fedledger.inprocess import InProcessGrid

    work = tempfile.mkdtemp(prefix="bench-frameworks-")
    cfg = {**base_config(args, seed), **ROWS[row], "run-dir": work}
    start = time.perf_counter()
    try:
        grid = InProcessGrid(client_app, args.clients, cfg, run_id=1000 + seed, seed=seed)
        folder = server_app.run(grid, Context(run_id=1000 + seed, node_id=0, node_config={}, state=RecordDict(),
                                              run_config=cfg), settle=0.0)
        with open(os.path.join(folder, "metrics.json")) as fh:
            m = json.load(fh)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summarise_run(m, time.perf_counter() - start)


def summarise_run(m: dict, wall: float) -> dict:
    rounds = sorted(int(r) for r in m["rounds"])
    central = {r: m["rounds"][str(r)].get("central", {}) for r in rounds}
    if any(central[r].get("num-examples", 1) == 0 for r in rounds):  # perplexity 1.0 of nothing is no number
        raise SystemExit("the held-out split kept no example (every answer cut off at --max-length after the chat "
                         "template's prompt); raise --max-length (56 or more for SmolLM2) or --heldout-fraction")
    trained = [r for r in rounds if r > 0]
    per_client = [c for r in trained for c in m["rounds"][str(r)].get("clients", {}).values()]

    def mean(key):
        return sum(c[key] for c in per_client) / max(1, len(per_client))

    return {"perplexity": {str(r): central[r].get("perplexity") for r in rounds},
            "accuracy": {str(r): central[r].get("accuracy") for r in rounds},
            "exact-match": {str(r): central[r].get("exact-match") for r in rounds},
            "bytes-up": mean("bytes-up"), "bytes-down": mean("bytes-down"), "round-trips": mean("round-trips"),
            "client-seconds": mean("compute-seconds"), "client-flops": mean("flops"),
            "server-seconds": sum(m["rounds"][str(r)].get("server-seconds", 0.0) for r in trained) / max(1, len(trained)),
            "sim-network-seconds": sum(m["rounds"][str(r)].get("exchange", {}).get("sim-network-seconds", 0.0)
                                       for r in trained) / max(1, len(trained)),
            "rejected": sum(len(m["rounds"][str(r)].get("report", {}).get("rejected", [])) for r in trained),
            "wall-seconds": wall}


# ---------------------------------------------------------------------------- peak RSS, apart
def rss_kinds(rows) -> dict[str, str]:
    """Row -> the kind of client process it needs (FedLLM and both KD variants hold the whole model)."""
    return {row: ("split-" + str(ROWS[row]["split-layer"]) if ROWS[row]["strategy"] == "split"
                  else "kd" if ROWS[row]["strategy"] == "kd" else "fedllm") for row in rows}


def measure_rss(kind: str, args) -> float:
    """Peak RSS (MB) of a fresh process doing one client's work of ``kind``."""
    out = subprocess.run([sys.executable, __file__, "--rss-child", kind, "--model", args.model,
                          "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                          "--public-batch", str(args.public_batch), "--threads", str(args.threads)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": _repo()})
    lines = [l for l in out.stdout.splitlines() if l.startswith("peak-rss-mb ")]
    if not lines:
        raise RuntimeError(f"RSS child {kind} failed: {out.stderr[-2000:]}")
    return float(lines[-1].split()[1])


def rss_child(kind: str, args) -> None:
    """What one client of ``kind`` holds and does, alone in this process; prints its peak RSS."""
    import numpy as np
    import torch

    from fedledger.clients import data as data_lib
    from fedledger.clients import distill, model as model_lib, split as split_lib, train as train_lib

    torch.manual_seed(0)
    if kind.startswith("split-"):
        k = int(kind.split("-")[1])
        net, tok = load_first_blocks(args.model, k)
    else:
        net, tok = model_lib.load_model(args.model, device="cpu")
    model = model_lib.add_lora(net, 8, 16, 0.05)
    records = data_lib.load_corpus("chatterbot")[:64]
    examples = data_lib.tokenize(records, tok, args.max_length)
    if kind.startswith("split-"):
        split = split_lib.SplitModel(model, k)
        batch = split_lib.step_batch(examples, tok.pad_token_id, args.batch_size, 0)
        acts = split_lib.activations(split, batch, 0, "float32")
        split_lib.backward_step(split, batch, 0, np.ones_like(acts["hidden"]) * 1e-3, {}, 1e-3)
    else:
        train_lib.train_steps(model, examples, tok.pad_token_id, 1, args.batch_size, 1e-3, seed=0)
        if kind == "kd":
            distill.topk_logits(model, examples[:args.public_batch], tok.pad_token_id, 64)
    print(f"peak-rss-mb {train_lib.peak_rss_mb():.1f}", flush=True)


def load_first_blocks(model_name: str, k: int):
    """A Llama with only the embeddings and decoder blocks [0, k) of ``model_name`` (what a split
    client needs), read tensor by tensor from the checkpoint: the other blocks are never loaded.
    (One block more is built so that ``SplitModel`` has a server side; it keeps random weights.)"""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from fedledger.clients import model as model_lib

    folder = model_lib.smollm2_dir() if model_name == "smollm2" else model_name
    config = AutoConfig.from_pretrained(folder)
    config.num_hidden_layers = k + 1
    net = LlamaForCausalLM(config)
    wanted = {n for n in net.state_dict() if n.startswith("model.embed_tokens") or
              any(n.startswith(f"model.layers.{i}.") for i in range(k))}
    state = {}
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as fh:
        for name in fh.keys():
            if name in wanted:
                state[name] = fh.get_tensor(name)
    net.load_state_dict(state, strict=False)
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return net, tok


def _repo() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------- the report
def stats(values):
    import numpy as np

    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def fmt(values, spec=".3f", scale=1.0) -> str:
    m, s = stats([None if v is None else v * scale for v in values])
    if m is None:
        return "-"
    return f"{m:{spec}} ± {s:{spec}}" if len(values) > 1 else f"{m:{spec}}"


def report(payload: dict) -> str:
    args, results, rss, info = payload["args"], payload["results"], payload["rss"], payload["machine"]
    rows = [r for r in ROWS if r in results and results[r]]
    seeds = sorted({s for r in rows for s in results[r]}, key=int)
    rounds = sorted({int(k) for r in rows for s in results[r] for k in results[r][s]["perplexity"]})
    last = str(rounds[-1]) if rounds else "0"

    def col(row, key, r=None):
        return [(results[row][s][key][r] if r is not None else results[row][s][key]) for s in sorted(results[row], key=int)]

    head = " | ".join(f"ppl r{r}" for r in rounds)
    quality = [f"| {row} | {len(results[row])} | " + " | ".join(fmt(col(row, 'perplexity', str(r)), '.2f') for r in rounds)
               + f" | {fmt(col(row, 'accuracy', last), '.3f')} | {fmt(col(row, 'exact-match', last), '.3f')} |"
               for row in rows]
    cost = [f"| {row} | {fmt(col(row, 'bytes-up'), '.3f', 1e-6)} | {fmt(col(row, 'bytes-down'), '.3f', 1e-6)} | "
            f"{fmt(col(row, 'round-trips'), '.1f')} | {fmt(col(row, 'client-seconds'), '.1f')} | "
            f"{fmt(col(row, 'client-flops'), '.2f', 1e-12)} | {_rss(rss.get(rss_kinds([row])[row]))} | "
            f"{fmt(col(row, 'server-seconds'), '.1f')} | {fmt(col(row, 'sim-network-seconds'), '.3f')} |" for row in rows]
    status = "complete" if payload.get("complete") else \
        f"**partial**: {sum(len(results[r]) for r in rows)} of {len(ROWS) * len(args['seeds'].split(','))} runs done"
    return f"""# FedLLM vs KD-FedLLM vs Split-FedLLM (`bench/bench_frameworks.py`)

{machine_line(info)} Grid {status}; wall of the runs {payload.get('wall', 0):.0f} s.

Model {args['model']}, {args['clients']} clients (chatterbot-corpus by category + {args['task_train']} generated tasks in the
private data), {args['rounds']} rounds x {args['local_steps']} local steps (batch {args['batch_size']}, lr {args['learning_rate']},
max length {args['max_length']}, held-out fraction {args['heldout_fraction']}); {args['public_size']} records set aside as the public set in every mode (KD names
{args['public_batch']} of them per round and distils {args['distil_steps']} steps); seeds {', '.join(seeds)} (mean ± sd).

## Accuracy (held-out split; exact match on {args['task_eval']} held-out tasks)

r0 is the base model. KD with client-side distillation: the mean of the clients' own models.

| row | seeds | {head} | top-1 accuracy r{last} | exact match r{last} |
|---|---|{'---|' * len(rounds)}---|---|
""" + "\n".join(quality) + f"""

## Communication and compute, per client and round

Bytes: array payload through the hub. Round trips: messages the server sent each client. Client seconds and
TFLOPs: what each client reported (FLOPs estimated from the layers it ran: `clients/cost.py`). Peak RSS: a fresh
process doing one client's work of that kind (split clients load only the embeddings and their k blocks).
Simulated network: the round's exchanges on the network model (complete graph, 20 ms, 100 Mbit/s, server at the
centre peer).

| row | MB up | MB down | round trips | client s | client TFLOPs | client peak RSS MB | server s | sim. network s |
|---|---|---|---|---|---|---|---|---|
""" + "\n".join(cost) + "\n"


def _rss(values) -> str:
    if values is None:
        return "-"
    values = values if isinstance(values, list) else [values]
    return fmt(values, ".0f") + (f" (n={len(values)})" if len(values) > 1 else "")


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = payload["results"]
    rows = [r for r in ROWS if r in results and results[r]]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    last = max(int(k) for r in rows for s in results[r] for k in results[r][s]["perplexity"])
    for row in rows:
        runs = list(results[row].values())
        up = stats([r["bytes-up"] for r in runs])[0] / 1e6
        ppl = stats([r["perplexity"][str(last)] for r in runs])[0]
        flops = stats([r["client-flops"] for r in runs])[0] / 1e12
        marker = "o" if row == "fedllm" else "s" if row.startswith("kd") else "^"
        axes[0].scatter(up, ppl, marker=marker)
        axes[0].annotate(row, (up, ppl), fontsize=7)
        axes[1].scatter(flops, ppl, marker=marker)
        axes[1].annotate(row, (flops, ppl), fontsize=7)
        rounds = sorted(int(k) for k in runs[0]["perplexity"])
        axes[2].plot(rounds, [stats([r["perplexity"][str(k)] for r in runs])[0] for k in rounds], marker=marker,
                     label=row)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("MB up per client per round (log)")
    axes[1].set_xlabel("client TFLOPs per round")
    for ax in axes[:2]:
        ax.set_ylabel(f"held-out perplexity after round {last}")
    axes[2].set_xlabel("round")
    axes[2].set_ylabel("held-out perplexity")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=3)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=96)
    ap.add_argument("--heldout-fraction", type=float, default=0.05)
    ap.add_argument("--public-size", type=int, default=64)
    ap.add_argument("--public-batch", type=int, default=16)
    ap.add_argument("--distil-steps", type=int, default=3)
    ap.add_argument("--task-train", type=int, default=160)
    ap.add_argument("--task-eval", type=int, default=16)
    ap.add_argument("--seeds", default="42,1,2")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 round x 1 step, 3 rows (timing)")
    ap.add_argument("--resume", action="store_true", help="go on from the results file of the same settings")
    ap.add_argument("--out", default=NAME, help="results name in bench/results (default: frameworks), or a folder "
                    "(then frameworks.json/.md/.png go there)")
    ap.add_argument("--rss-repeats", type=int, default=3, help="fresh processes per kind of client (peak RSS is noisy)")
    ap.add_argument("--rss-only", action="store_true", help="(re)measure the peak RSS into the results file and stop")
    ap.add_argument("--merge", default="", help="results names (comma-separated) of the same settings to combine "
                    "into --out, e.g. grids run side by side in several processes; then report and stop")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0 = torch's default; 1 is ~3x faster on an oversubscribed machine)")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads > 0:
        set_threads(args.threads)
    if args.rss_child:
        return rss_child(args.rss_child, args)
    if args.quick:
        args.seeds, args.rounds, args.local_steps, args.rows = "42", 1, 1, ",".join(QUICK_ROWS)
        args.out = args.out if args.out != NAME else NAME + "_quick"
    args.out_dir, args.out = _out(args.out)
    logging.basicConfig(level=logging.ERROR)
    for name in ("flwr", "fedledger"):
        logging.getLogger(name).setLevel(logging.ERROR)
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    path = os.path.join(args.out_dir, f"{args.out}.json")
    payload = {"args": {k: v for k, v in vars(args).items() if k not in ("rss_child", "rss_only", "out_dir")}, "results": {},
               "rss": {},
               "complete": False, "wall": 0.0}
    if args.resume and os.path.exists(path):
        old = load_same(path, args)
        payload.update({"results": old["results"], "rss": old.get("rss", {}), "wall": old.get("wall", 0.0)})
    payload["machine"] = machine_info()  # this invocation's machine and commit (a resumed grid names its own)
    if args.merge:
        for name in [n for n in args.merge.split(",") if n]:
            merge_into(payload, load_same(os.path.join(os.path.dirname(path), f"{name}.json"), args))
        payload["complete"] = all(str(s) in payload["results"].get(r, {}) for r in ROWS for s in seeds)
        save(payload, args)
        print(report(payload))
        return
    for kind in sorted(set(rss_kinds(rows).values())):
        have = payload["rss"].get(kind)
        have = list(have) if isinstance(have, list) else []  # an older file kept one number: measure again
        while len(have) < args.rss_repeats:
            have.append(round(measure_rss(kind, args), 1))
        payload["rss"][kind] = have
        print(f"peak RSS {kind}: {have} MB", flush=True)
    if args.rss_only:
        save(payload, args)
        return
    for seed in seeds:
        for row in rows:
            if str(seed) in payload["results"].get(row, {}):
                continue
            t0 = time.perf_counter()
            res = run_row(row, seed, args)
            payload["results"].setdefault(row, {})[str(seed)] = res
            payload["wall"] += time.perf_counter() - t0
            last = max(res["perplexity"], key=int)
            print(f"{row:16s} seed {seed}: ppl {res['perplexity'][last]:.3f} acc {res['accuracy'][last]:.3f} "
                  f"em {res['exact-match'][last]} up {res['bytes-up'] / 1e6:.3f} MB, {res['wall-seconds']:.0f} s",
                  flush=True)
            save(payload, args)
    payload["complete"] = all(str(s) in payload["results"].get(r, {}) for r in ROWS for s in seeds) and not args.quick
    save(payload, args)
    print(report(payload))


SETTINGS = ("model", "clients", "rounds", "local_steps", "learning_rate", "batch_size", "max_length", "public_size",
            "public_batch", "distil_steps", "task_train", "task_eval", "heldout_fraction")


def load_same(path: str, args) -> dict:
    """A results file run with the settings of ``args`` (else one line and exit)."""
    if not os.path.exists(path):
        raise SystemExit(f"{path} does not exist")
    with open(path) as fh:
        old = json.load(fh)
    other = [k for k in SETTINGS if old["args"].get(k) != getattr(args, k)]
    if other:
        raise SystemExit(f"{path} was run with other settings ({other}); not combining it with these")
    return old


def merge_into(payload: dict, other: dict) -> None:
    """Add ``other``'s runs (a row and seed already in ``payload`` stays) and its RSS samples."""
    for row, runs in other["results"].items():
        for seed, res in runs.items():
            payload["results"].setdefault(row, {}).setdefault(seed, res)
    for kind, values in other.get("rss", {}).items():
        mine = payload["rss"].get(kind) or []
        payload["rss"][kind] = (mine if isinstance(mine, list) else [mine]) + (values if isinstance(values, list) else [values])
    payload["wall"] = payload.get("wall", 0.0) + other.get("wall", 0.0)


def set_threads(n: int) -> None:
    """Run torch (and any child process) on ``n`` threads: with more runnable threads than cores,
    OpenMP's spinning barriers make 2 threads slower than 1 (measured here: 3x on a loaded machine)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def _out(out: str) -> tuple[str, str]:
    """(folder, results name): ``--out`` names a result in bench/results, or is a folder."""
    if os.sep in out or os.path.isdir(out):
        return os.path.abspath(out), NAME
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"), out


def save(payload: dict, args) -> None:
    md = report(payload)
    write_results(args.out, payload, md, args.out_dir)
    try:
        plot(payload, os.path.join(args.out_dir, f"{args.out}.png"))
    except Exception as exc:  # noqa: BLE001  (a plot must not lose the numbers)
        print(f"plot failed: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
