"""Local training and evaluation of a LoRA-wrapped causal LM on tokenized chat examples."""

from __future__ import annotations

import ctypes
import gc
import math
import resource
import time

import numpy as np
import torch

from .data import collate
from .loss import causal_lm_loss, fused_loss_supported, summed_loss_and_hits


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last :func:`reset_peak_rss` (Linux: VmHWM), else of the
    process's whole life (``ru_maxrss``)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reset_peak_rss() -> bool:
    """Start a new peak-memory window (Linux ``/proc/self/clear_refs`` = 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


M_MMAP_THRESHOLD = -3       # glibc mallopt parameter
MMAP_THRESHOLD = 64 * 1024  # bytes: larger blocks are mapped, and unmapped as soon as they are freed


def tune_allocator() -> bool:
    """Serve every block over 64 KiB from its own mapping, returned to the system when freed.

    glibc starts with that behaviour for blocks over 128 KiB but raises the threshold each time
    such a block is freed (up to 32 MiB); a training step's activations are then carved out of
    the heap, which keeps and fragments them: a SmolLM2 client's peak grew by ~300 MB more than
    its live tensors. A fixed threshold (set once; glibc stops adjusting it) keeps the resident
    size at what is alive. False where glibc is not there.
    """
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def release_memory() -> None:
    """Give freed memory back to the operating system (glibc keeps freed heap pages otherwise,
    and a client's resident size would ratchet up round after round)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
    fused = fused_loss_supported(model)
    tune_allocator()
    model.train()
    losses, tokens = [], 0
    start = time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        batch = _to(collate([examples[i] for i in idx], pad_id), device)
        if fused:  # lm_head + cross-entropy on the labelled positions only, in chunks
            task_loss = causal_lm_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        else:
            task_loss = model(**batch, use_cache=False).loss
        loss = task_loss
        if prox:
            loss = loss + 0.5 * proximal_mu * sum(((p - a) ** 2).sum() for p, a in prox)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(task_loss.detach()))
        tokens += int(batch["attention_mask"].sum())
        del batch, task_loss, loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del optimizer
    return {"train-loss": float(np.mean(losses)), "train-seconds": seconds, "train-tokens": tokens,
            "tokens-per-second": tokens / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model, examples: list[dict], pad_id: int, batch_size: int = 16, max_batches: int | None = None) -> dict:
    """Token-weighted mean loss over the answer tokens, its perplexity, and top-1 next-token
    accuracy on the same tokens (``accuracy``: the share of answer tokens whose most likely
    prediction is the right one). No answer token to score (no example, or every answer cut
    off): loss, perplexity and accuracy are NaN, never a perplexity of 1 measured on nothing."""
    model.eval()
    tune_allocator()
    device = _device(model)
    total_loss, total_tokens, correct = 0.0, 0, 0
    chosen = examples[: max_batches * batch_size] if max_batches else examples
    # the same examples, batched by length: far less padding (sums over tokens do not depend on batching)
    chosen = sorted(chosen, key=lambda e: len(e["input_ids"]))
    batches = [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]
    for batch_examples in batches:
        batch = _to(collate(batch_examples, pad_id), device)
        loss, count, hits = summed_loss_and_hits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        total_loss += loss
        total_tokens += count
        correct += hits
    if total_tokens == 0:
        return {"eval-loss": math.nan, "perplexity": math.nan, "accuracy": math.nan, "num-examples": len(chosen)}
    mean = total_loss / total_tokens
    return {"eval-loss": mean, "perplexity": math.exp(min(mean, 50.0)), "accuracy": correct / total_tokens,
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
