"""Client memory per round: peak resident memory of a SmolLM2 LoRA client, round after round.

Each variant runs in its own fresh process, as a client does, for ``--rounds`` rounds of
``--steps`` local steps (batch 8, <= 128 tokens, the chatterbot partition of client 0):

- **fedledger client**: the real ClientApp train handler (``fedledger.client_app.train``: a train
  message with the global adapter in, the reply out), so everything a client does per round is
  in it: settings, the cached model and data, loading the adapter, training, the reply;
  with ``activation-checkpointing`` 0 (default), 2 and 1;
- **plain HF + peft**: the training loop a Hugging Face user writes (``bench_train_speed.py``'s
  ``plain_hf_round``), same model, data and batches, with the reply adapter taken the peft way.

Per round: the peak resident set size of that round (Linux VmHWM, reset at the round's start),
the resident size after it, and the process's resident size after its imports and after the
model was loaded. Goal (issue #13): <= 1.5 GB and flat across rounds.

    PYTHONPATH=. python bench/bench_client_memory.py [--rounds 3 --steps 4] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

from common import machine_info, machine_line, write_results  # noqa: E402

GOAL_MB = 1500


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, rounds: int, steps: int, checkpointing: int) -> None:
    """One client process: print one JSON line per event."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    import torch  # noqa: F401
    import transformers  # noqa: F401

    from fedledger.clients import train as train_lib

    def emit(**kw):
        print("RESULT " + json.dumps(kw), flush=True)

    emit(event="imports", rss=rss_mb())
    cfg = {"model": "smollm2", "local-steps": steps, "activation-checkpointing": checkpointing}
    if variant == "fedledger":
        from flwr.supercore.task_identity import TaskIdentity

        from fedledger import client_app
        from fedledger.config import Settings
        from fedledger.core.pipeline import to_record
        from fedledger.task import get_task

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
        context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 4},
                          state=RecordDict(), run_config=cfg)
        task = get_task(Settings.cached(cfg), 4)
        emit(event="model", rss=rss_mb())
        adapter = to_record(task.initial_adapter)
        for rnd in range(1, rounds + 1):
            msg = Message(RecordDict({"arrays": adapter, "config": ConfigRecord({"server-round": rnd})}),
                          dst_node_id=7, message_type="train")
            train_lib.reset_peak_rss()
            reply = client_app.app(msg, context)
            peak = train_lib.peak_rss_mb()
            metrics = reply.content["metrics"]
            adapter = reply.content["arrays"]  # the next round starts from this client's own update
            emit(event="round", round=rnd, peak=peak, reported=float(metrics["peak-rss-mb"]), rss=rss_mb(),
                 tokens_per_second=float(metrics["tokens-per-second"]))
    else:
        from bench_train_speed import plain_hf_model, plain_hf_round
        from peft import get_peft_model_state_dict

        from fedledger.clients import data as data_lib
        from fedledger.clients import model as model_lib

        path = model_lib.smollm2_dir()
        model = plain_hf_model(path, "cpu")
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        splits = data_lib.federated_splits("chatterbot", 4, "natural", 42)
        examples = data_lib.tokenize(splits["partitions"][0], tokenizer, 128)
        emit(event="model", rss=rss_mb())
        for rnd in range(1, rounds + 1):
            train_lib.reset_peak_rss()
            stats = plain_hf_round(model, examples, tokenizer.pad_token_id, steps, 8, 5e-4, rnd, "cpu", lambda: None)
            update = {k: v.detach().cpu().numpy().copy() for k, v in get_peft_model_state_dict(model).items()}
            emit(event="round", round=rnd, peak=train_lib.peak_rss_mb(), rss=rss_mb(),
                 tokens_per_second=stats["train-tokens"] / stats["train-seconds"],
                 update_mb=sum(v.nbytes for v in update.values()) / 2**20)


def run_variant(name: str, variant: str, rounds: int, steps: int, checkpointing: int) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + HERE}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", variant, "--rounds", str(rounds), "--steps", str(steps),
           "--checkpointing", str(checkpointing)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
    events = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not events:
        raise RuntimeError(f"{name}: child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rounds_ = [e for e in events if e["event"] == "round"]
    peaks = [e["peak"] for e in rounds_]
    return {"variant": name, "imports-mb": next(e["rss"] for e in events if e["event"] == "imports"),
            "model-mb": next(e["rss"] for e in events if e["event"] == "model"), "rounds": rounds_,
            "max-peak-mb": max(peaks), "peak-growth-mb": peaks[-1] - peaks[0], "meets-goal": max(peaks) <= GOAL_MB}


def variant_of(spec: str) -> tuple[str, str, int]:
    """``plain`` -> plain HF + peft; an integer -> the fedledger client with that activation-checkpointing."""
    if spec == "plain":
        return "plain HF + peft", "plain", 0
    every = int(spec)
    return ("fedledger client" + (f", activation-checkpointing={every}" if every else "")), "fedledger", every


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for r in rows:
        ax.plot([e["round"] for e in r["rounds"]], [e["peak"] for e in r["rounds"]], "o-", label=r["variant"])
    ax.axhline(GOAL_MB, color="k", ls=":", label=f"goal {GOAL_MB} MB")
    ax.set(xlabel="round", ylabel="peak RSS of the round (MB)", title="SmolLM2 LoRA client: peak memory per round")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default="plain,0,2,1",
                    help="comma-separated: plain (HF + peft) and fedledger activation-checkpointing values")
    ap.add_argument("--out", default=None, help="folder for client_memory.json / .md / .png (default bench/results)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.rounds, args.steps, args.checkpointing)
        return None
    info = machine_info()
    info["load-average-1min"] = os.getloadavg()[0]
    variants = [variant_of(v.strip()) for v in args.variants.split(",") if v.strip()]
    rows, payload = [], None
    for name, variant, every in variants:
        rows.append(run_variant(name, variant, args.rounds, args.steps, every))
        print(name, [round(e["peak"]) for e in rows[-1]["rounds"]], flush=True)
        payload = report(rows, info, args)  # written after every variant: a stopped run keeps what it measured
    return payload


def report(rows: list[dict], info: dict, args) -> dict:
    lines = ["# Client memory per round (`bench/bench_client_memory.py`)", "",
             machine_line(info) + f" 1-min load average at start: {info['load-average-1min']:.2f}.", "",
             f"SmolLM2-135M fp32 + LoRA r=8 (q/k/v/o), {args.rounds} rounds x {args.steps} local steps, batch 8 x <= 128 "
             "tokens, each variant in its own fresh process. Peak = the round's peak resident memory (VmHWM reset at "
             f"the round's start). Goal: <= {GOAL_MB} MB and flat across rounds.", "",
             "| variant | after imports MB | after model load MB | " +
             " | ".join(f"round {i} peak MB" for i in range(1, args.rounds + 1)) +
             " | growth first -> last MB | goal | tokens/s (last round) |",
             "|---|---:|---:|" + "---:|" * args.rounds + "---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['imports-mb']:.0f} | {r['model-mb']:.0f} | " +
                     " | ".join(f"{e['peak']:.0f}" for e in r["rounds"]) +
                     f" | {r['peak-growth-mb']:+.0f} | {'met' if r['meets-goal'] else 'NOT met'} | "
                     f"{r['rounds'][-1]['tokens_per_second']:.0f} |")
    lines += ["", "Plot: `client_memory.png`. tokens/s here are single-process figures under whatever load the "
                  "machine had; the throughput comparison is `train_speed.md` (interleaved).", ""]
    md = "\n".join(lines)
    payload = {"rounds": args.rounds, "steps": args.steps, "goal-mb": GOAL_MB, "results": rows, "machine": info}
    if not args.no_write:
        jpath, _ = write_results("client_memory", payload, md, args.out)
        plot(rows, os.path.join(os.path.dirname(jpath), "client_memory.png"))
    print(md)
    return payload


if __name__ == "__main__":
    main()
