"""Speed of PageRank trust vs one GEMM of the same data, on a built matrix and from messages.

Goal (issue #13): the *full* server trust path from the train replies, for N = 64 adapters of
4M fp32 parameters (60 tensors), within 1.5x one GEMM ``X @ X.T`` of the same data (X = the
(N, P) float32 delta matrix). The full path is what ``RoundPipeline`` runs for
``PageRankTrust``: decode every reply at the boundary (``core.update.decode_replies``:
structure, zero-copy views, finiteness), ``PageRankScorer.decide`` (delta matrix in one pass,
the Gram GEMM, anchor dot products, networkx PageRank, norm factors) and
``core.trust.apply_decision`` (exclusion and clipping of the kept updates). The server's
reference update is given (training it on the root split is model work, not trust maths). One
scorer serves every repetition, as it serves every round of a run (the first, untimed round
maps the delta matrix's memory; later rounds reuse it).

Also measured in the same run (medians of interleaved repetitions after a warm-up):
``trust_scores(X, reference)`` on a built matrix (the earlier goal, issue #5), the FedAvg of the
kept contributions that follows, and Flower's own ``FedAvg.aggregate_train`` of the same
replies for scale.

    PYTHONPATH=. python bench/bench_trust_speed.py [--n 64 --params 4000000 --repeats 5] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import machine_info, machine_line, write_results  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402

from fedledger.core import Identity, Layout  # noqa: E402
from fedledger.core.aggregate import weighted_mean  # noqa: E402
from fedledger.core.trust import apply_decision  # noqa: E402
from fedledger.core.update import decode_replies  # noqa: E402
from fedledger.core.workers import thread_count  # noqa: E402
from fedledger.strategies.kernels import gram  # noqa: E402
from fedledger.strategies.pagerank import PageRankScorer, trust_scores  # noqa: E402
from tests.replies import node_ids, reply  # noqa: E402


def shapes(params: int, tensors: int) -> dict[str, tuple[int, int]]:
    cols = -(-params // (tensors * 16))
    return {f"model.layers.{i // 2}.lora_{'AB'[i % 2]}.weight": (16, cols) for i in range(tensors)}


def make_round(n: int, layout: dict, seed: int = 0):
    """Global adapter, N replies (a quarter sign-flipped around the global), a reference adapter."""
    rng = np.random.default_rng(seed)
    glob = {k: rng.standard_normal(s, dtype=np.float32) for k, s in layout.items()}
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in layout.items()}
    replies = []
    for i, node in enumerate(node_ids(n, seed)):
        sign = -1.0 if i < n // 4 else 1.0
        local = {k: glob[k] + sign * (base[k] + rng.standard_normal(s, dtype=np.float32)) for k, s in layout.items()}
        replies.append(reply(node, local, num_examples=int(rng.integers(50, 500))))
    reference = {k: glob[k] + base[k] + rng.standard_normal(s, dtype=np.float32) for k, s in layout.items()}
    return glob, replies, reference


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def full_path(scorer, replies, glob, layout, server_round):
    """One round of the trust path; returns seconds per phase, the decision and contributions.
    The scorer lives across rounds, as in a run (its delta matrix memory is reused)."""
    secs = {}
    secs["decode"], (updates, rejected) = timed(lambda: decode_replies(replies, layout, 10**9))
    updates = [u.with_identity(Identity(u.node_id, i)) for i, u in enumerate(updates)]
    secs["decide"], decision = timed(lambda: scorer.decide(server_round, updates, glob))
    entries = [(u.identity.key, u.arrays, u.num_examples) for u in updates]
    secs["apply"], contributions = timed(lambda: apply_decision(entries, glob, decision))
    secs["aggregate"], _ = timed(lambda: weighted_mean([c.arrays for c in contributions],
                                                      [c.weight for c in contributions], layout))
    return secs, decision, contributions, rejected


def plot(payload: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = payload["median-s"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    parts = [("decode", "decode + finiteness"), ("decide", "PageRankScorer.decide"), ("apply", "apply_decision")]
    left = 0.0
    for key, label in parts:
        ax.barh(1, m[key], left=left, label=label)
        left += m[key]
    ax.barh(0, m["gemm"], color="grey", label="one GEMM X @ X.T")
    ax.barh(2, m["trust_scores"], color="tab:purple", label="trust_scores on a built X")
    ax.axvline(1.5 * m["gemm"], color="k", ls=":", label="goal: 1.5x GEMM")
    ax.set(yticks=[0, 1, 2], yticklabels=["GEMM", "full path\nfrom messages", "built matrix"], xlabel="seconds (median)",
           title=f"PageRank trust, N = {payload['n']} x {payload['params'] / 1e6:.0f}M fp32")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--params", type=int, default=4_000_000)
    ap.add_argument("--tensors", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="N=16, 1M params, 3 repeats")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--out", default=None, help="folder for trust_speed.json / .md (default bench/results)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.params, args.repeats = 16, 1_000_000, 3
    logging.getLogger("flwr").setLevel(logging.WARNING)
    logging.getLogger("fedledger").setLevel(logging.WARNING)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    info = machine_info()
    info["load-average-1min"] = os.getloadavg()[0]
    spec = shapes(args.params, args.tensors)
    glob, replies, reference = make_round(args.n, spec)
    layout = Layout.of(glob)
    n, p = args.n, sum(16 * c for _, c in spec.values())
    names = list(glob)
    gflat = np.concatenate([glob[k].ravel() for k in names])
    x = np.stack([np.concatenate([r.content["arrays"][k].numpy().ravel() for k in names]) - gflat for r in replies])
    ref = np.concatenate([reference[k].ravel() for k in names]) - gflat
    flower = FedAvg(min_available_nodes=1)

    scorer = PageRankScorer(reference_fn=lambda rnd, arrays: reference, reweight=True)
    gram(x), trust_scores(x, ref), full_path(scorer, replies, glob, layout, 0)  # warm-up (round 0)
    rows = {k: [] for k in ("gemm", "trust_scores", "decode", "decide", "apply", "full", "aggregate", "flower")}
    decision = contributions = None
    for rnd in range(1, args.repeats + 1):  # interleaved so load from other processes hits all alike
        rows["gemm"].append(timed(lambda: gram(x))[0])
        rows["trust_scores"].append(timed(lambda: trust_scores(x, ref))[0])
        secs, decision, contributions, rejected = full_path(scorer, replies, glob, layout, rnd)
        for k in ("decode", "decide", "apply", "aggregate"):
            rows[k].append(secs[k])
        rows["full"].append(secs["decode"] + secs["decide"] + secs["apply"])
        rows["flower"].append(timed(lambda: flower.aggregate_train(1, replies))[0])
        contributions = None  # free the clipped updates before the next repetition
    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio_full = statistics.median(f / g for f, g in zip(rows["full"], rows["gemm"]))
    ratio_built = statistics.median(t / g for t, g in zip(rows["trust_scores"], rows["gemm"]))
    flipped = [f"partition-{i}" for i in range(n // 4)]
    scores = decision.scores
    payload = {"n": n, "params": p, "tensors": args.tensors, "repeats": args.repeats, "threads": thread_count(),
               "median-s": med, "ratio-full-path": ratio_full, "ratio-built-matrix": ratio_built, "goal-ratio": 1.5,
               "meets-goal": ratio_full <= 1.5, "gemm-gflops": 2 * n * n * p / med["gemm"] / 1e9,
               "flipped-excluded": set(decision.excluded) == set(flipped),
               "flipped-max-score": max(scores[k] for k in flipped),
               "honest-min-score": min(v for k, v in scores.items() if k not in flipped),
               "seconds": rows, "machine": info}
    md = f"""# Trust speed: PageRank trust vs one GEMM (`bench/bench_trust_speed.py`)

{machine_line(info)} 1-min load average at start: {info['load-average-1min']:.2f} (2 cores; other jobs on them raise it above 0).

N = {n} train replies of P = {p:,} fp32 parameters in {args.tensors} tensors ({n * p * 4 / 2**30:.2f} GiB), a quarter
sign-flipped; the server's reference update given. Median of {args.repeats} interleaved repetitions after a warm-up;
fedledger used {thread_count()} threads (`FEDLEDGER_THREADS`).

| what | median s | vs one GEMM |
|---|---:|---:|
| one GEMM `X @ X.T` (N x P x N, numpy/OpenBLAS) | {med['gemm']:.3f} | 1.00x ({payload['gemm-gflops']:.1f} GFLOP/s) |
| **full path from messages** = decode + decide + apply | {med['full']:.3f} | **{ratio_full:.2f}x** (goal <= 1.5x: {'met' if ratio_full <= 1.5 else 'NOT met'}) |
| &nbsp;&nbsp; decode every reply (structure, zero-copy views, finiteness) | {med['decode']:.3f} | {med['decode'] / med['gemm']:.2f}x |
| &nbsp;&nbsp; `PageRankScorer.decide` (delta matrix, Gram GEMM, anchor dots, PageRank, norms) | {med['decide']:.3f} | {med['decide'] / med['gemm']:.2f}x |
| &nbsp;&nbsp; `apply_decision` (exclusion + clipping of the kept updates) | {med['apply']:.3f} | {med['apply'] / med['gemm']:.2f}x |
| `trust_scores(X, reference)` on a built matrix (issue #5's goal) | {med['trust_scores']:.3f} | {ratio_built:.2f}x |
| then: FedAvg of the kept contributions (`weighted_mean`) | {med['aggregate']:.3f} | {med['aggregate'] / med['gemm']:.2f}x |
| for scale: Flower's own `FedAvg.aggregate_train` of the same replies (no trust) | {med['flower']:.3f} | {med['flower'] / med['gemm']:.2f}x |

Sanity: the sign-flipped quarter is excluded: {payload['flipped-excluded']} (max score of the flipped
{payload['flipped-max-score']:.3f}, min honest score {payload['honest-min-score']:.3f}; uniform = 1).
Plot: `trust_speed.png`.
"""
    if not args.no_write:
        jpath, _ = write_results("trust_speed", payload, md, args.out)
        plot(payload, os.path.join(os.path.dirname(jpath), "trust_speed.png"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
