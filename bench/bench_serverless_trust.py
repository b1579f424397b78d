"""Peer-side PageRank trust in serverless gossip: does it protect the honest peers?

For every seed, attacker fraction and attack, gossip (k=2 neighbours, 2 mixing steps per round)
runs R rounds of the real ClientApp (tiny random Llama + LoRA, chatterbot-corpus split by
category, 10 peers) through the real relay strategy, once with ``trust="none"`` and once with
``trust="pagerank"``. Measured:

- held-out perplexity of the mean of the **honest peers' own models** (read from their ClientApp
  state: what the honest users end up holding), relative to the attack-free run of the same
  seed and mode;
- detection precision/recall/F1 of the peers the relay saw distrusted by a majority of the peers
  that received them, against the ground truth (mean over rounds).

    PYTHONPATH=. python bench/bench_serverless_trust.py            # 3 seeds, 10-45 %, 6 attacks
    PYTHONPATH=. python bench/bench_serverless_trust.py --quick    # 1 seed, 30 %, sign-flip
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import machine_info, machine_line, write_results  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def honest_mean(grid, malicious: list[int]) -> dict[str, np.ndarray]:
    from fedledger.client_peer import MODEL_KEY
    from fedledger.strategies.kernels import as_numpy_dict

    models = [as_numpy_dict(c.state[MODEL_KEY]) for nid, c in grid.contexts.items()
              if grid.partition_of[nid] not in malicious and MODEL_KEY in c.state.array_records]
    return {k: np.mean([m[k] for m in models], axis=0).astype(np.float32) for k in models[0]}


def run_one(task, cfg: dict, n: int, malicious: list[int], args) -> dict:
    from fedledger.client_app import app as client_app
    from fedledger.inprocess import InProcessGrid
    from fedledger.strategies.detection import detection_metrics
    from fedledger.strategies.kernels import to_arrayrecord
    from fedledger.strategies.relay import build_relay

    grid = InProcessGrid(client_app, n, cfg)
    runner = build_relay("gossip", local_steps=args.local_steps, seed=cfg["seed"], gossip_k=cfg["gossip-k"],
                         gossip_steps=cfg["gossip-steps"])
    history = runner.run(grid, grid.node_of, to_arrayrecord(task.initial_adapter), args.rounds).history
    ev = task.evaluate(honest_mean(grid, malicious), "heldout", max_batches=args.eval_batches)
    out = {"perplexity": float(ev["perplexity"])}
    if cfg["trust"] == "pagerank" and malicious:  # the ground truth is the bench's, never the relay's
        dets = [detection_metrics(h["distrusted"], malicious, h["participants"]) for h in history]
        out["detection"] = {k: float(np.mean([d[k] for d in dets])) for k in ("precision", "recall", "f1")}
        out["distrusted-per-round"] = [h["distrusted"] for h in history]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peers", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=2e-2)
    ap.add_argument("--eval-batches", type=int, default=6)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--fractions", default="0.1,0.2,0.3,0.45")
    ap.add_argument("--attacks", default="sign-flip,noise,scale,free-rider,adaptive,label-shuffle")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="folder for serverless_trust.json / .md (default bench/results)")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.fractions, args.attacks = "1", "0.3", "sign-flip"
    logging.basicConfig(level=logging.ERROR)
    for name in ("flwr", "fedledger"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    from fedledger.config import Settings
    from fedledger.task import get_task

    n, t0, results = args.peers, time.perf_counter(), []
    for seed in [int(s) for s in args.seeds.split(",")]:
        base = {"model": "tiny", "num-rounds": args.rounds, "local-steps": args.local_steps, "learning-rate": args.learning_rate,
                "seed": seed, "strategy": "gossip", "gossip-k": 2, "gossip-steps": 2}
        task = get_task(Settings.from_run_config(base), n)
        clean = {}
        for trust in ("none", "pagerank"):
            clean[trust] = run_one(task, {**base, "trust": trust}, n, [], args)["perplexity"]
            results.append({"seed": seed, "trust": trust, "attack": "none", "fraction": 0.0, "perplexity": clean[trust]})
            print(f"seed {seed} clean trust={trust:8s} ppl {clean[trust]:.2f}", flush=True)
        order = np.random.default_rng(1000 + seed).permutation(n)
        for frac in [float(x) for x in args.fractions.split(",")]:
            malicious = sorted(int(p) for p in order[:max(1, int(frac * n + 1e-9))])
            for attack in [a for a in args.attacks.split(",") if a]:
                for trust in ("none", "pagerank"):
                    cfg = {**base, "trust": trust, "attack": attack, "malicious": ",".join(map(str, malicious))}
                    out = run_one(task, cfg, n, malicious, args)
                    out["ppl-vs-clean"] = out["perplexity"] / clean[trust]
                    results.append({"seed": seed, "trust": trust, "attack": attack, "fraction": frac, "malicious": malicious, **out})
                    f1 = out.get("detection", {}).get("f1")
                    print(f"seed {seed} {frac:.1f} {attack:10s} trust={trust:8s} ppl x{out['ppl-vs-clean']:.3f} "
                          f"F1 {'n/a' if f1 is None else '%.2f' % f1}  [{time.perf_counter() - t0:.0f}s]", flush=True)
    info = machine_info()
    md = report(results, args, info, time.perf_counter() - t0)
    write_results("serverless_trust", {"args": vars(args), "results": results, "machine": info}, md, args.out)
    print(md)


def report(results, args, info, wall) -> str:
    rows = []
    keys = sorted({(r["fraction"], r["attack"]) for r in results if r["attack"] != "none"})
    for frac, attack in keys:
        cell = {}
        for trust in ("none", "pagerank"):
            rs = [r for r in results if r["fraction"] == frac and r["attack"] == attack and r["trust"] == trust]
            ppl = [r["ppl-vs-clean"] for r in rs]
            f1 = [r["detection"]["f1"] for r in rs if "detection" in r]
            cell[trust] = (np.mean(ppl), np.max(ppl), np.mean(f1) if f1 else None, np.min(f1) if f1 else None)
        a, b = cell["none"], cell["pagerank"]
        rows.append(f"| {int(frac * 100)}% | {attack} | {a[0]:.3f} ({a[1]:.3f}) | {b[0]:.3f} ({b[1]:.3f}) | "
                    f"{b[2]:.2f} ({b[3]:.2f}) |")
    clean = {t: np.mean([r["perplexity"] for r in results if r["attack"] == "none" and r["trust"] == t]) for t in ("none", "pagerank")}
    return f"""# Peer-side PageRank trust in serverless gossip (`bench/bench_serverless_trust.py`)

{machine_line(info)} Wall {wall:.0f} s.

{args.peers} peers (tiny random Llama + LoRA, chatterbot-corpus by category), gossip k=2, 2 mixing steps per round,
{args.rounds} rounds x {args.local_steps} local steps (lr {args.learning_rate}), seeds {args.seeds}. Perplexity: the mean of the
honest peers' own models on {args.eval_batches} held-out batches, divided by the attack-free run of the same seed and mode
(mean over seeds, worst in brackets). F1: peers distrusted by a majority of the peers that received them vs the
ground truth, mean over rounds (min over seeds in brackets). Attack-free perplexity: no trust {clean['none']:.1f},
with trust {clean['pagerank']:.1f} (trust itself costs {100 * (clean['pagerank'] / clean['none'] - 1):+.1f} %).

| attackers | attack | perplexity, no trust | perplexity, peer trust | detection F1, peer trust |
|---|---|---|---|---|
""" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
