"""LoRA / QLoRA training throughput of the SmolLM2-135M architecture on a CUDA GPU.

Runs the project's own loading and training code (`clients.model.load_model`, `add_lora`,
`clients.train.train_steps`) with quantization none / 4bit / 8bit on chatterbot-corpus text.

Weights: the real SmolLM2-135M weights when `--model` names a folder holding them; otherwise
the SmolLM2-135M *architecture and tokenizer* with random weights (`--random-from CONFIG_DIR`).
Throughput does not depend on weight values; loss values do, so only tokens/s and memory are
reported in that case.

    python bench/bench_qlora_gpu.py --random-from .gpu --steps 30 --out bench/results/qlora_gpu
    python bench/bench_qlora_gpu.py --model tiny --device cpu --steps 1 --warmup 1 --out /tmp/qlora   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--random-from", default="")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--out", default="bench/results/qlora_gpu")
    p.add_argument("--device", default="cuda", help="cuda (what this bench measures) or cpu (a smoke run)")
    args = p.parse_args()

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from fedledger.clients import data as data_lib
    from fedledger.clients import model as model_lib
    from fedledger.clients import train as train_lib

    path = args.model
    if not path:
        path = "/tmp/smollm2-random"
        config = AutoConfig.from_pretrained(args.random_from)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        AutoTokenizer.from_pretrained(args.random_from).save_pretrained(path)
    cuda = args.device == "cuda"
    rows = []
    for quant in ("none", "4bit", "8bit"):
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        model, tok = model_lib.load_model(path, quantization=quant, device=args.device)
        model = model_lib.add_lora(model, r=8, alpha=16, dropout=0.05)
        examples = data_lib.tokenize(data_lib.load_corpus("chatterbot")[:2000], tok, args.max_length)
        train_lib.train_steps(model, examples, tok.pad_token_id, args.warmup, args.batch_size, 5e-4, seed=0)
        stats = train_lib.train_steps(model, examples, tok.pad_token_id, args.steps, args.batch_size, 5e-4, seed=1)
        t = time.perf_counter()
        ev = train_lib.evaluate(model, examples[:256], tok.pad_token_id, batch_size=32)
        eval_s = time.perf_counter() - t
        row = {"quantization": quant, "train-tokens-per-second": stats["tokens-per-second"],
               "seconds-per-step": stats["train-seconds"] / args.steps, "eval-seconds-256-examples": eval_s,
               "peak-gpu-mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None, "train-loss": stats["train-loss"],
               "eval-loss": ev["eval-loss"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
    info = {"gpu": torch.cuda.get_device_name(0) if cuda else "no GPU (CPU smoke run)", "torch": torch.__version__,
            "model": args.model or "SmolLM2-135M", "weights": "the model's own" if args.model else "random (SmolLM2-135M architecture)",
            "steps": args.steps, "batch-size": args.batch_size, "max-length": args.max_length}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as fh:
        json.dump({"info": info, "rows": rows}, fh, indent=2)
    md = [f"# LoRA / QLoRA throughput on {info['gpu']}", "",
          f"{info['model']} ({info['weights']} weights), LoRA r=8 on q/k/v/o, batch {args.batch_size}, max {args.max_length} tokens, "
          f"{args.steps} timed steps after {args.warmup} warm-up; torch {info['torch']}.", "",
          "| quantization | train tokens/s | s/step | peak GPU MiB |", "|---|---|---|---|"]
    for r in rows:
        peak = "-" if r["peak-gpu-mb"] is None else f"{r['peak-gpu-mb']:.0f}"
        md.append(f"| {r['quantization']} | {r['train-tokens-per-second']:.0f} | {r['seconds-per-step']:.3f} | {peak} |")
    with open(args.out + ".md", "w") as fh:
        fh.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
