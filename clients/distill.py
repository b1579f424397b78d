"""KD-FedLLM's ML: top-k logits on the public set, and distillation toward soft labels (torch).

Positions: the *answer* positions of each public example, as in training and evaluation (the
logits at position ``t`` predict token ``t + 1``; a position counts when that token is an
answer token, i.e. its label is not -100). Rows of a logit reply are those positions, example
by example in the order the server named them, left to right. :func:`answer_rows` says how
many there are, so the server knows the shape to expect before any reply arrives.

- :func:`topk_logits`: the k largest logits per row (float16 values, int32 ids).
- :func:`distil_steps`: AdamW steps on the LoRA adapter minimising the cross-entropy of the
  model's ``softmax(logits / T)`` against sparse target distributions (probabilities on a few
  token ids per row), times ``T**2`` (Hinton et al.): the KL divergence up to a constant.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .data import collate


def answer_rows(examples: list[dict]) -> int:
    """Rows a logit reply has for ``examples``: answer tokens after the first position."""
    return int(sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples))


def _row_counts(examples: list[dict]) -> np.ndarray:
    return np.array([sum(1 for label in e["labels"][1:] if label != -100) for e in examples], dtype=np.int64)


def _answer_logits(model, batch: dict) -> torch.Tensor:
    """(rows, vocab) logits at the batch's answer positions, example by example, left to right.
    Where the chunked loss applies (``clients.loss.fused_loss_supported``) the LM head runs on the
    answer positions only (rows x vocabulary, never batch x length x vocabulary)."""
    from .loss import fused_loss_supported, labelled_hidden

    if fused_loss_supported(model):
        hidden, _, head = labelled_hidden(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return head(hidden)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = batch["labels"][:, 1:] != -100
    return logits[mask]


@torch.no_grad()
def topk_logits(model, examples: list[dict], pad_id: int, k: int, batch_size: int = 16
                ) -> tuple[np.ndarray, np.ndarray, int]:
    """(values float16 (rows, k), ids int32 (rows, k), tokens processed) for ``examples``."""
    model.eval()
    device = next(model.parameters()).device
    values, ids, tokens = [], [], 0
    for i in range(0, len(examples), batch_size):
        batch = {key: v.to(device) for key, v in collate(examples[i:i + batch_size], pad_id).items()}
        top = torch.topk(_answer_logits(model, batch).float(), k=k, dim=-1)
        values.append(top.values.to(torch.float16).cpu().numpy())
        ids.append(top.indices.to(torch.int32).cpu().numpy())
        tokens += int(batch["attention_mask"].sum())
    return np.concatenate(values), np.concatenate(ids), tokens


@torch.no_grad()
def probs_at(model, examples: list[dict], pad_id: int, keys: np.ndarray, vocab_size: int, temperature: float,
             batch_size: int = 16) -> np.ndarray:
    """The model's ``softmax(logits / T)`` at (row, token) ``keys`` (``row * vocab + id``, sorted),
    float32: the server's own distribution that trust deltas are taken from."""
    model.eval()
    device = next(model.parameters()).device
    keys = np.asarray(keys, dtype=np.int64)
    rows, ids = keys // vocab_size, keys % vocab_size
    out = np.zeros(keys.size, dtype=np.float32)
    first = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = {key: v.to(device) for key, v in collate(chunk, pad_id).items()}
        p = torch.softmax(_answer_logits(model, batch).float() / temperature, dim=-1)
        last = first + p.shape[0]
        sel = np.flatnonzero((rows >= first) & (rows < last))
        out[sel] = p[torch.as_tensor(rows[sel] - first), torch.as_tensor(ids[sel])].cpu().numpy()
        first = last
    return out


def distil_steps(model, examples: list[dict], probs: np.ndarray, ids: np.ndarray, pad_id: int, steps: int,
                 batch_size: int, lr: float, temperature: float, seed: int) -> dict:
    """``steps`` AdamW steps toward the sparse targets ``(probs, ids)`` (rows of ``examples``).

    Returns {"distil-loss" (mean over steps), "distil-seconds", "distil-tokens"}.
    """
    if len(probs) != answer_rows(examples):
        raise ValueError(f"{len(probs)} target rows for {answer_rows(examples)} answer positions")
    offsets = np.concatenate([[0], np.cumsum(_row_counts(examples))])
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    target_p = torch.as_tensor(np.asarray(probs, dtype=np.float32))
    target_i = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    model.train()
    losses, tokens, start = [], 0, time.perf_counter()
    for _ in range(steps):
        idx = rng.choice(len(examples), size=min(batch_size, len(examples)), replace=False)
        batch = {key: v.to(device) for key, v in collate([examples[i] for i in idx], pad_id).items()}
        rows = torch.as_tensor(np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]))
        if rows.numel() == 0:  # these public examples have no answer token left (cut at max-length)
            continue
        q, where = target_p[rows].to(device), target_i[rows].to(device)
        log_p = torch.log_softmax(_answer_logits(model, batch).float() / temperature, dim=-1)
        loss = -(q * log_p.gather(1, where)).sum(dim=1).mean() * temperature ** 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        tokens += int(batch["attention_mask"].sum())
    return {"distil-loss": float(np.mean(losses)) if losses else float("nan"),
            "distil-seconds": time.perf_counter() - start, "distil-tokens": tokens}


__all__ = ["answer_rows", "distil_steps", "probs_at", "topk_logits"]
