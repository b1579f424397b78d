"""Estimated FLOPs of the layers a party runs: the client-compute column of the framework comparison.

An estimate, not a measurement (CPU FLOP counters are not portable). Per token:

- every linear layer (``torch.nn.Linear`` leaves: the base projections, the LoRA A/B matrices,
  the LM head; bitsandbytes' 4/8-bit layers count their unpacked shape) costs ``2 * in * out``;
- attention scores and their weighted sum cost ``2 * T * d`` per decoder block (``4 T d`` for
  ``QK^T`` and ``AV``, halved by the causal mask; ``T`` the sequence length, ``d`` the hidden size);
- embedding look-ups, norms and activations are left out (a few percent at most);
- a training step is forward + backward = **3x** the forward (the usual rule: the backward pass
  costs about twice the forward; with a frozen base the weight gradients are mostly skipped, so
  this is an upper estimate of a LoRA step).

:class:`ModelCost` reads the structure of a (peft-wrapped) Llama-style model once; its methods
count blocks ``[first, last)`` and, when asked, the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRAIN_FACTOR = 3.0  # forward + backward, in forwards


@dataclass(frozen=True)
class ModelCost:
    block_linear: tuple[int, ...]   # per decoder block: sum of in * out over its linear layers
    head_linear: int                # LM head in * out
    hidden: int

    @classmethod
    def of(cls, model) -> "ModelCost":
        lm = causal_lm(model)
        blocks = tuple(_linear(layer) for layer in lm.model.layers)
        head = lm.lm_head
        return cls(blocks, int(head.in_features * head.out_features), int(lm.config.hidden_size))

    @property
    def num_layers(self) -> int:
        return len(self.block_linear)

    def forward(self, tokens: int, seq_len: int, first: int = 0, last: int | None = None, head: bool = True) -> float:
        """Forward FLOPs of blocks ``[first, last)`` (+ the head) over ``tokens`` tokens of
        sequences ``seq_len`` long."""
        last = self.num_layers if last is None else last
        per_token = sum(2.0 * n + 2.0 * seq_len * self.hidden for n in self.block_linear[first:last])
        if head:
            per_token += 2.0 * self.head_linear
        return per_token * float(tokens)

    def train(self, tokens: int, seq_len: int, first: int = 0, last: int | None = None, head: bool = True) -> float:
        return TRAIN_FACTOR * self.forward(tokens, seq_len, first, last, head)


def causal_lm(model):
    """The ``*ForCausalLM`` inside a peft wrapper (or the model itself)."""
    inner = model
    if hasattr(inner, "base_model") and hasattr(inner.base_model, "model"):
        inner = inner.base_model.model
    if not (hasattr(inner, "model") and hasattr(inner.model, "layers") and hasattr(inner, "lm_head")):
        raise ValueError(f"{type(inner).__name__} has no decoder block list (model.layers) and LM head")
    return inner


def _linear(module) -> int:
    total = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            total += int(m.in_features) * int(m.out_features)
    return total


__all__ = ["ModelCost", "TRAIN_FACTOR", "causal_lm"]
