"""Causal-LM loss without the full logits: only the positions that have a label, in chunks.

Hugging Face's ``model(**batch, labels=...)`` computes ``lm_head`` over *every* position of the
batch (batch x length x vocabulary fp32 logits: 8 x 128 x 49,152 x 4 B = 201 MB for SmolLM2),
keeps them and their log-softmax for the backward pass, although the loss only reads the
positions whose next token is a label (the answer; prompts are masked with -100). Here:

1. the decoder runs as usual (``model.get_decoder()``), giving the last hidden states;
2. only the hidden states of labelled positions are kept (``M`` rows instead of batch x length);
3. :class:`FusedLinearCrossEntropy` runs ``lm_head`` + cross-entropy over those rows in chunks:
   each chunk's logits are computed, turned into the loss and into the gradient of the hidden
   states (``(softmax - onehot) @ W``) at once, and dropped. The full logits never exist.

Same loss as Hugging Face's (mean over labelled tokens), same gradients to float rounding
(``tests/test_train_fast.py``). It needs a plain ``nn.Linear`` head that is not trained (LoRA
freezes it) and no logit soft-capping; any other model gets Hugging Face's own loss
(:func:`fused_loss_supported` says which).
"""

from __future__ import annotations

import torch

IGNORE = -100
CHUNK = 256  # rows of logits at a time: 256 x 49,152 x 4 B = 50 MB for SmolLM2


class FusedLinearCrossEntropy(torch.autograd.Function):
    """mean_i CE(hidden_i @ weight.T, target_i); the gradient w.r.t. ``hidden`` is computed in the
    forward pass, chunk by chunk, so no logits are kept for the backward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int):
        rows = hidden.shape[0]
        need_grad = hidden.requires_grad
        grad = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, rows, chunk):
            h = hidden[start:start + chunk]
            t = target[start:start + chunk]
            logits = (h @ weight.t()).float()                       # (c, V), this chunk only
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_grad:
                probs = logits.sub_(lse[:, None]).exp_()             # softmax, in place
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                grad[start:start + chunk] = (probs @ weight.float()).to(hidden.dtype)
            del logits
        ctx.save_for_backward(grad if need_grad else torch.empty(0))
        ctx.rows = rows
        return total / max(rows, 1)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * (grad_output / max(ctx.rows, 1)), None, None, None


def _parts(model):
    """(decoder, lm_head) of a (peft-wrapped) causal LM, or None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder, head = base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None:
        return None
    return base, decoder, head


def fused_loss_supported(model) -> bool:
    """Whether :func:`causal_lm_loss` computes this model's loss (else Hugging Face's is used)."""
    parts = _parts(model)
    if parts is None:
        return False
    base, _, head = parts
    config = getattr(base, "config", None)
    return (type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            and not getattr(config, "final_logit_softcapping", None) and not getattr(config, "logit_scale", None)
            and getattr(config, "model_type", "") in ("llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo", "phi3"))


def labelled_hidden(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear]:
    """(hidden states of the positions whose next token is a label, those labels, lm_head)."""
    _, decoder, head = _parts(model)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE
    return hidden[keep], target[keep], head


def causal_lm_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                   chunk: int = CHUNK) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens, as ``model(..., labels=labels).loss``, without the
    full logits (see the module docstring). Call only when :func:`fused_loss_supported`."""
    hidden, target, head = labelled_hidden(model, input_ids, attention_mask, labels)
    return FusedLinearCrossEntropy.apply(hidden, head.weight, target, chunk)


@torch.no_grad()
def summed_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                chunk: int = CHUNK) -> tuple[float, int]:
    """(sum of the token cross-entropies, number of labelled tokens), for evaluation."""
    total, count, _ = summed_loss_and_hits(model, input_ids, attention_mask, labels, chunk)
    return total, count


@torch.no_grad()
def summed_loss_and_hits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                         chunk: int = CHUNK) -> tuple[float, int, int]:
    """(sum of the token cross-entropies, number of labelled tokens, how many of them are the
    top-1 prediction), for evaluation. With the fused path the arg-max is taken chunk by chunk
    from the same ``CHUNK`` x vocabulary logits as the loss: the full fp32 logits never exist."""
    if fused_loss_supported(model):
        hidden, target, head = labelled_hidden(model, input_ids, attention_mask, labels)
        total, hits = 0.0, 0
        for start in range(0, hidden.shape[0], chunk):
            logits = (hidden[start:start + chunk] @ head.weight.t()).float()
            t = target[start:start + chunk]
            total += float((torch.logsumexp(logits, -1) - logits.gather(1, t[:, None]).squeeze(1)).sum())
            hits += int((logits.argmax(-1) == t).sum())
            del logits
        return total, int(target.numel()), hits
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    target = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), target.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    answer = target != IGNORE
    return float(loss), int(answer.sum()), int(((logits.argmax(-1) == target) & answer).sum())
