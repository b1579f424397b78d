"""Canonical update hashing against raw ``hashlib.sha256`` on the same bytes, on the paths that run.

Inputs: the real SmolLM2-135M LoRA adapters (peft, r=8 and r=16 on q/k/v/o: 240 tensors,
3.7 / 7.4 MB), a 240-tensor r=128 adapter of the same model (59 MB) and one 64 MiB tensor.
Each is sent as a Flower train reply (npy-serialised Arrays) and decoded by the round
pipeline's boundary (``core.update.decode_reply``: zero-copy views of the received bytes).

Timed, best and median of interleaved single calls:

- **raw**: ``hashlib.sha256`` of the same tensor bytes pre-concatenated in one buffer (the
  baseline: one call, no per-tensor work at all);
- **server path**: what ``LedgerTrail.verify`` runs on every signed reply:
  ``LayoutHasher.hexdigest(update.arrays)`` (prefix hashed once per layout, then one
  ``hashlib`` update per tensor straight from the received bytes);
- **update_hash(views)**: the generic function on the same decoded views (checks and converts
  every value; the audit and the clients use it);
- **deserialise + hash**: ``update_hash(ArrayRecord)`` (``Array.numpy()`` copies every tensor
  first), what the audit path cost before replies were decoded once.

    PYTHONPATH=. python bench/bench_hashing.py [--repeats 41] [--no-write]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import machine_info, machine_line, write_results  # noqa: E402

from fedledger.chain.hashing import LayoutHasher, update_hash  # noqa: E402
from fedledger.core import Layout  # noqa: E402
from fedledger.core.update import decode_reply  # noqa: E402
from tests.replies import node_ids, record, reply  # noqa: E402


def smollm2_adapter(r: int) -> dict[str, np.ndarray]:
    """The real SmolLM2-135M LoRA adapter (peft names and shapes, fp32), random values."""
    from fedledger.clients import model as model_lib

    base, _ = model_lib.load_model("smollm2", device="cpu")
    peft_model = model_lib.add_lora(base, r=r)
    rng = np.random.default_rng(r)
    return {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in model_lib.get_adapter(peft_model).items()}


def one_tensor(nbytes: int) -> dict[str, np.ndarray]:
    return {"weight": np.random.default_rng(0).standard_normal(nbytes // 4, dtype=np.float32)}


def bench_case(name: str, arrays: dict[str, np.ndarray], repeats: int) -> dict:
    rec = record(arrays)
    msg = reply(node_ids(1)[0], rec)
    layout = Layout.of({k: v for k, v in arrays.items()})
    update = decode_reply(msg, layout, max_examples=10**9)
    views = update.arrays
    raw = b"".join(views[k].tobytes() for k in sorted(views))
    hasher = LayoutHasher(layout.specs)
    assert hasher.hexdigest(views) == update_hash(views) == update_hash(rec) == update_hash(arrays)
    fns = {
        "raw": lambda: hashlib.sha256(raw).digest(),
        "server": lambda: hasher.hexdigest(views),
        "generic": lambda: update_hash(views),
        "deserialise": lambda: update_hash(rec),
    }
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    order = list(fns)
    for i in range(repeats):  # interleaved, the order rotated each time: no variant always follows another
        for k in order[i % len(order):] + order[:i % len(order)]:
            t = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t)
    mb = len(raw) / 1e6
    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"case": name, "tensors": len(arrays), "MB": mb,
            "MB/s-best": {k: mb / v for k, v in best.items()}, "MB/s-median": {k: mb / v for k, v in med.items()},
            "ratio-best": {k: best["raw"] / v for k, v in best.items()},
            "ratio-median": {k: statistics.median(r / x for r, x in zip(times["raw"], times[k])) for k in times},
            "seconds": times}


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [("server", "server path (LayoutHasher on received bytes)"), ("generic", "update_hash(views)"),
            ("deserialise", "deserialise + hash")]
    x = np.arange(len(rows))
    w = 0.27
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (k, label) in enumerate(keys):
        ax.bar(x + (i - 1) * w, [r["ratio-best"][k] for r in rows], w, label=label)
    ax.axhline(0.95, color="k", ls=":", label="goal 0.95x")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set(xticks=x, xticklabels=[f"{r['case']}\n{r['MB']:.1f} MB" for r in rows], ylabel="x raw hashlib.sha256 (best)",
           title="Canonical hash throughput / raw hashlib on the same bytes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict], info: dict, repeats: int) -> str:
    lines = ["# Canonical hashing vs raw hashlib.sha256 (`bench/bench_hashing.py`)", "",
             machine_line(info) + f" 1-min load average at start: {info['load-average-1min']:.2f}.", "",
             f"Best (and median of per-repetition ratios) of {repeats} interleaved single calls, their order "
             "rotated each repetition; throughput in MB/s and as a ratio to raw "
             "`hashlib.sha256` of the same tensor bytes pre-concatenated in one buffer.", "",
             "| input | tensors | MB | raw MB/s | server path MB/s | ratio (goal >= 0.95) | update_hash(views) ratio | "
             "deserialise + hash ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b, m = r["ratio-best"], r["ratio-median"]
        lines.append(f"| {r['case']} | {r['tensors']} | {r['MB']:.2f} | {r['MB/s-best']['raw']:.0f} | "
                     f"{r['MB/s-best']['server']:.0f} | **{b['server']:.3f}** ({m['server']:.3f}; "
                     f"{'met' if b['server'] >= 0.95 else 'NOT met'}) | {b['generic']:.3f} ({m['generic']:.3f}) | "
                     f"{b['deserialise']:.3f} ({m['deserialise']:.3f}) |")
    lines += ["", "Server path = `LedgerTrail.verify` on a decoded reply: `LayoutHasher.hexdigest(update.arrays)`. "
                  "Plot: `hashing.png`.", ""]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=41)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    info = machine_info()
    info["load-average-1min"] = os.getloadavg()[0]
    cases = [("SmolLM2 LoRA r=8", smollm2_adapter(8)), ("SmolLM2 LoRA r=16", smollm2_adapter(16)),
             ("SmolLM2 LoRA r=128", smollm2_adapter(128)), ("one 64 MiB tensor", one_tensor(64 * 2**20))]
    rows = [bench_case(name, arrays, args.repeats) for name, arrays in cases]
    payload = {"repeats": args.repeats, "results": rows, "machine": info}
    md = markdown(rows, info, args.repeats)
    if not args.no_write:
        write_results("hashing", payload, md)
        plot(rows, os.path.join(HERE, "results", "hashing.png"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
