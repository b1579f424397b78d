"""Client training throughput: fedledger's local training against plain Hugging Face + peft.

Same model (SmolLM2-135M-Instruct, fp32, LoRA r=8 on q/k/v/o, dropout 0.05), same data (the
chatterbot partition of client 0, chat-formatted, prompts masked), same batches (batch 8,
max 128 tokens, the same seeded draws), same AdamW, same machine, same run: the variants take
turns round by round (a round = a fresh AdamW and ``--steps`` local steps, as a client trains),
so load from other processes hits all alike.

- **plain HF + peft**, written the way a Hugging Face user writes it:
  ``AutoModelForCausalLM.from_pretrained`` + ``get_peft_model``, then per step
  ``loss = model(**batch).loss; loss.backward(); clip_grad_norm_; optimizer.step(); zero_grad()``
  (the same seeded batch draws and dropout seed as ``train_steps``);
- **fedledger**: ``fedledger.clients.train.train_steps`` on the fedledger-loaded model (loss on
  the labelled positions only, chunked lm_head + cross-entropy, no full logits), with
  ``activation-checkpointing`` 0 (default), 2 and 1 (every layer: the memory-saving setting).

tokens/s = non-padding tokens of a round / seconds of its steps (median over the timed rounds).
``--device cuda`` runs the same comparison on a GPU (``--bf16``: fedledger under bf16 autocast);
without a CUDA GPU it says so and exits without writing results.

    PYTHONPATH=. python bench/bench_train_speed.py [--steps 8] [--device cpu|cuda] [--bf16]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from common import machine_info, machine_line, write_results  # noqa: E402


def plain_hf_model(path: str, device: str):
    """How a Hugging Face user loads the model and adds LoRA (same settings as fedledger's)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        task_type="CAUSAL_LM")
    torch.manual_seed(0)
    return get_peft_model(model, config)


def plain_hf_round(model, examples, pad_id: int, steps: int, batch_size: int, lr: float, seed: int, device: str,
                   sync) -> dict:
    """One round of local training as a Hugging Face user writes it (peft's examples): the same
    seeded batch draws, dropout seed and AdamW as ``train_steps``, and the library's own loss."""
    import torch

    from fedledger.clients.data import collate

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, tokens = [], 0
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id).items()}
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(out.loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    sync()
    seconds = time.perf_counter() - start
    return {"train-loss": float(np.mean(losses)), "train-seconds": seconds, "train-tokens": tokens}


def main(argv=None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per variant (after a one-step warm-up round)")
    ap.add_argument("--steps", type=int, default=2, help="local steps per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="fedledger under bf16 autocast (GPU)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--name", default=None, help="results name (default train_speed or train_speed_gpu)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_train_speed: skipped: --device cuda but no CUDA GPU on this machine (nothing written)")
        return None
    from fedledger.clients import data as data_lib
    from fedledger.clients import model as model_lib
    from fedledger.clients import train as train_lib

    info = machine_info()
    info["load-average-1min"] = os.getloadavg()[0]
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    path = model_lib.smollm2_dir() if args.model == "smollm2" else args.model
    ours, tokenizer = model_lib.load_model(path, device=args.device)
    ours = model_lib.add_lora(ours, r=8, alpha=16, dropout=0.05, seed=0)
    plain = plain_hf_model(path, args.device)
    splits = data_lib.federated_splits("chatterbot", 4, "natural", 42)
    examples = data_lib.tokenize(splits["partitions"][0], tokenizer, 128)
    pad = tokenizer.pad_token_id
    checkpointing = {"fedledger": 0, "fedledger, activation-checkpointing=2": 2, "fedledger, activation-checkpointing=1": 1}
    variants = {"plain HF + peft": [], **{k: [] for k in checkpointing}}
    losses = {k: [] for k in variants}
    tokens = []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    start_adapter = model_lib.get_adapter(ours)
    state = {k: dict(start_adapter) for k in variants if k != "plain HF + peft"}  # each variant's own trajectory

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for rnd in range(args.rounds + 1):  # round 0: warm-up, untimed
        steps = 1 if rnd == 0 else args.steps
        seed = 1000 + rnd
        plain_stats = plain_hf_round(plain, examples, pad, steps, args.batch_size, 5e-4, seed, args.device, sync)
        results = {"plain HF + peft": plain_stats}
        for key, every in checkpointing.items():
            model_lib.set_adapter(ours, state[key])
            model_lib.set_activation_checkpointing(ours, every)
            with autocast:
                results[key] = train_lib.train_steps(ours, examples, pad, steps, args.batch_size, 5e-4, seed=seed)
            state[key] = model_lib.get_adapter(ours)
        if rnd == 0:
            continue
        for key, st in results.items():
            variants[key].append(st["train-tokens"] / st["train-seconds"])
            losses[key].append(st["train-loss"])
        tokens.append(plain_stats["train-tokens"] / steps)
        print(f"round {rnd}: " + ", ".join(f"{k} {v[-1]:.0f} tok/s" for k, v in variants.items()), flush=True)
    med = {k: statistics.median(v) for k, v in variants.items()}
    base = med["plain HF + peft"]
    ratios = {k: statistics.median(a / b for a, b in zip(v, variants["plain HF + peft"])) for k, v in variants.items()}
    goal = 1.2 if args.device.startswith("cuda") else 1.0
    payload = {"device": args.device, "bf16": args.bf16, "rounds": args.rounds, "steps": args.steps,
               "batch-size": args.batch_size,
               "median-tokens-per-second": med, "ratio-to-plain": ratios, "goal": goal,
               "mean-tokens-per-batch": float(np.mean(tokens)), "losses": losses, "tokens-per-second": variants,
               "machine": info}
    device = info.get("gpu", "CPU")
    lines = [f"# Client training throughput vs plain Hugging Face + peft (`bench/bench_train_speed.py`, {device})", "",
             machine_line(info) + f" 1-min load average at start: {info['load-average-1min']:.2f}.", "",
             f"SmolLM2-135M fp32, LoRA r=8 q/k/v/o, batch {args.batch_size} x <= 128 tokens (mean "
             f"{np.mean(tokens):.0f} non-padding tokens per batch); {args.rounds} rounds of {args.steps} local steps "
             "per variant on the same seeded batches (the round's draws, dropout seed and a fresh AdamW, as a client "
             "does), rounds interleaved across variants after a one-step warm-up round; each variant keeps its own "
             "adapter" + (", fedledger under bf16 autocast" if args.bf16 else "") + ".", "",
             f"| variant | median tokens/s | vs plain HF (median of per-round ratios; goal >= {goal:.1f}x) | mean loss |",
             "|---|---:|---:|---:|"]
    for k, v in med.items():
        verdict = "" if k == "plain HF + peft" else (" (met)" if ratios[k] >= goal else " (NOT met)")
        lines.append(f"| {k} | {v:.0f} | {ratios[k]:.2f}x{verdict} | {np.mean(losses[k]):.4f} |")
    lines += ["", "The fedledger step computes `lm_head` and the cross-entropy only where a label is (the answer "
                  "tokens), in chunks, and never materialises the batch x length x 49,152 logits.", ""]
    md = "\n".join(lines)
    if not args.no_write:
        write_results(args.name or ("train_speed_gpu" if args.device.startswith("cuda") else "train_speed"), payload, md)
    print(md)
    return payload


if __name__ == "__main__":
    main()
