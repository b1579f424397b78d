"""Local training and evaluation of a LoRA-wrapped causal LM on tokenized chat examples."""

from __future__ import annotations

import math
import resource
import time

import numpy as np
import torch

from .data import collate


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def train_steps(model, examples: list[dict], pad_id: int, steps: int, batch_size: int, lr: float, seed: int,
                proximal_mu: float = 0.0, anchor: dict | None = None) -> dict:
    """``steps`` AdamW steps on batches sampled (seeded) from ``examples``; returns loss/time/tokens.

    With ``proximal_mu > 0`` (FedProx) the loss adds ``mu/2 * ||w - anchor||^2`` over the trainable
    (LoRA) tensors; ``anchor`` maps peft state-dict names to the global adapter.
    """
    if not examples:
        raise ValueError("no training examples on this client")
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # LoRA dropout: same seed, same update
    device = _device(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    prox = []
    if proximal_mu > 0 and anchor is not None:
        for n, p in named:
            key = n.replace(".default.", ".")
            if key in anchor:
                prox.append((p, torch.as_tensor(anchor[key], dtype=p.dtype, device=p.device)))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses, tokens = [], 0
    start = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        batch = _to(collate([examples[i] for i in idx], pad_id), device)
        out = model(**batch)
        loss = out.loss
        if prox:
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in prox)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(out.loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"train-loss": float(np.mean(losses)), "train-seconds": seconds, "train-tokens": tokens,
            "tokens-per-second": tokens / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, batch_size: int = 16, max_batches: int | None = None) -> dict:
    """Token-weighted mean loss over the answer tokens, its perplexity, and top-1 next-token
    accuracy on the same tokens (``accuracy``: the share of answer tokens whose most likely
    prediction is the right one)."""
    model.eval()
    device = _device(model)
    total_loss, total_tokens, correct = 0.0, 0, 0
    chosen = examples[: max_batches * batch_size] if max_batches else examples
    # the same examples, batched by length: far less padding (sums over tokens do not depend on batching)
    chosen = sorted(chosen, key=lambda e: len(e["input_ids"]))
    batches = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    for batch_examples in batches:
        batch = _to(collate(batch_examples, pad_id), device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), labels.reshape(-1), ignore_index=-100, reduction="sum")
        total_loss += float(loss)
        answer = labels != -100
        total_tokens += int(answer.sum())
        correct += int(((logits.argmax(-1) == labels) & answer).sum())
    mean = total_loss / max(total_tokens, 1)
    return {"eval-loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": correct / max(total_tokens, 1),
            "num-examples": len(chosen)}


@torch.no_grad()
def exact_match(model, tokenizer, tasks: list[dict], max_new_tokens: int = 8, batch_size: int = 32) -> float:
    """Share of ``tasks`` whose greedy answer, stripped, is exactly the expected response."""
    if not tasks:
        return float("nan")
    model.eval()
    device = _device(model)
    hits, side = 0, tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues every prompt from its last token
    try:
        for i in range(0, len(tasks), batch_size):
            chunk = tasks[i:i + batch_size]
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": t["prompt"]}], tokenize=False,
                                                     add_generation_prompt=True) for t in chunk]
            enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            hits += sum(a.strip() == t["response"] for a, t in zip(answers, chunk))
    finally:
        tokenizer.padding_side = side
    return hits / len(tasks)
