"""Quality bar of the foundation: does federated LoRA fine-tuning lower held-out perplexity?

SmolLM2-135M-Instruct on chatterbot-corpus, clients split by category (natural non-IID).
Same total optimizer steps in every mode:
- base:        the model before fine-tuning;
- federated:   FedAvg over LoRA adapters, R rounds x K local steps on each of N clients, driven through
               the real ClientApp and the ServerApp's hub round (``build_pipeline``: RoundPipeline
               around FedAvg) over an in-process grid (same code as `flwr run`);
- centralised: one LoRA trained on all client data pooled, N x R x K steps;
- local-only:  each client trains alone for R x K steps; mean (and worst) held-out perplexity.

    python bench/bench_quality.py [--model smollm2] [--clients 4] [--rounds 3] [--local-steps 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import GridPartitions, machine_info, machine_line, write_results  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--eval-batches", type=int, default=6, help="held-out batches of 16 (None = all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--name", default="quality")
    p.add_argument("--out", default=None, help="folder for <name>.json / .md (default bench/results)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from fedledger.client_app import app as client_app
    from fedledger.clients import model as model_lib
    from fedledger.clients import train as train_lib
    from fedledger.config import Settings
    from fedledger.inprocess import InProcessGrid
    from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord
    from fedledger.strategy_factory import build_pipeline
    from fedledger.task import get_task

    cfg = {"model": args.model, "num-rounds": args.rounds, "local-steps": args.local_steps, "batch-size": args.batch_size,
           "learning-rate": args.learning_rate, "seed": args.seed, "strategy": "fedavg"}
    settings = Settings.from_run_config(cfg)
    task = get_task(settings, args.clients)  # one model in memory for every party (in-process)
    initial = task.initial_adapter
    evaluate = lambda adapter: task.evaluate(adapter, "heldout", max_batches=args.eval_batches)
    results, timings = {}, {}

    t = time.perf_counter()
    results["base"] = evaluate(initial)
    timings["base"] = time.perf_counter() - t
    print("base", results["base"], flush=True)

    t = time.perf_counter()
    grid = InProcessGrid(client_app, args.clients, cfg)
    per_round = {}
    pipeline = build_pipeline(settings, args.clients, identities=GridPartitions(grid))
    res = pipeline.start(grid=grid, initial_arrays=to_arrayrecord(initial), num_rounds=args.rounds,
                         evaluate_fn=lambda rnd, arrays: per_round.__setitem__(rnd, evaluate(as_numpy_dict(arrays))))
    results["federated"] = per_round[args.rounds]
    results["federated-per-round"] = per_round
    results["federated-reports"] = {rnd: r.to_dict() for rnd, r in sorted(pipeline.reports.items())}
    timings["federated"] = time.perf_counter() - t
    print("federated", per_round, flush=True)

    total = args.clients * args.rounds * args.local_steps
    t = time.perf_counter()
    pooled = [e for pid in range(args.clients) for e in task.examples("partition", pid)]
    model_lib.set_adapter(task.model, initial)
    train_lib.train_steps(task.model, pooled, task.pad_id, total, args.batch_size, args.learning_rate, args.seed)
    results["centralised"] = evaluate(model_lib.get_adapter(task.model))
    timings["centralised"] = time.perf_counter() - t
    print("centralised", results["centralised"], flush=True)

    t = time.perf_counter()
    local = []
    for pid in range(args.clients):
        model_lib.set_adapter(task.model, initial)
        train_lib.train_steps(task.model, task.examples("partition", pid), task.pad_id, args.rounds * args.local_steps,
                              args.batch_size, args.learning_rate, args.seed + pid)
        local.append(evaluate(model_lib.get_adapter(task.model)))
    results["local-only"] = {"perplexity": float(np.mean([r["perplexity"] for r in local])),
                             "worst-perplexity": float(np.max([r["perplexity"] for r in local])),
                             "eval-loss": float(np.mean([r["eval-loss"] for r in local])), "per-client": local}
    timings["local-only"] = time.perf_counter() - t
    print("local-only", results["local-only"], flush=True)

    info = machine_info()
    base = results["base"]["perplexity"]
    rows = [("base model", results["base"]), ("federated (FedAvg)", results["federated"]),
            ("centralised (pooled data)", results["centralised"]), ("local-only (mean of clients)", results["local-only"])]
    md = [f"# Quality: {args.model} on chatterbot-corpus, {args.clients} clients split by category\n",
          f"{args.rounds} rounds x {args.local_steps} local steps x batch {args.batch_size}, lr {args.learning_rate}; "
          f"same total steps ({total}) for centralised; local-only clients train {args.rounds * args.local_steps} steps each. "
          f"Held-out: {results['base']['num-examples']} examples never trained on (stratified by category). Seed {args.seed}.\n",
          "| mode | held-out loss | perplexity | vs base | wall s |", "|---|---|---|---|---|"]
    keys = ["base", "federated", "centralised", "local-only"]
    for (label, r), key in zip(rows, keys):
        md.append(f"| {label} | {r['eval-loss']:.4f} | {r['perplexity']:.2f} | {r['perplexity'] / base:.3f}x | {timings[key]:.0f} |")
    md.append(f"\nLocal-only worst client: perplexity {results['local-only']['worst-perplexity']:.2f}.")
    md.append("\nFederated per round: " + ", ".join(f"r{k}: {v['perplexity']:.2f}" for k, v in sorted(per_round.items())))
    md.append("\n" + machine_line(info) + "\n")
    write_results(args.name, {"args": vars(args), "results": results, "timings": timings, "machine": info}, "\n".join(md),
                  args.out)
    print("\n".join(md))


if __name__ == "__main__":
    main()
