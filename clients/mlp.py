"""A frozen SwiGLU MLP that keeps 2 tensors for the backward pass instead of 3.

A Llama-family decoder layer's MLP, ``down(silu(gate(x)) * up(x))``, with frozen projections
keeps ``g = gate(x)`` (for the SiLU's backward), ``silu(g)`` and ``u = up(x)`` (for the
product's) for the backward pass: three intermediate-size tensors per token (1,536 values for
SmolLM2: 6.3 MB each per decoder layer for a batch of 8 x 128 tokens). With LoRA on the
attention only, no MLP weight is trained, and the gradient w.r.t. ``x`` needs ``g`` and ``u``
alone::

    dh = dout @ W_down;   dg = silu'(g) * (u * dh);   du = silu(g) * dh;   dx = dg @ W_gate + du @ W_up

:class:`FrozenSwiGLU` keeps those two and recomputes ``silu(g)`` (elementwise) in the backward
pass: the same forward values bit for bit and the same gradients (bit for bit on the tiny
model, ``tests/test_train_fast.py``), one tensor per layer less (180 MB of saved tensors for
SmolLM2's training batch; 79 MB off the client's measured peak), no recomputed matrix product.
:func:`slim_mlps` switches an MLP to it only when its three projections are plain, frozen
``nn.Linear`` without bias and its activation is SiLU; any other MLP (LoRA on it, a quantized
one, another activation) keeps Hugging Face's forward, and so does every call without
gradients, or under autocast (the GPU's bf16 path).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

SILU_TYPES = ("SiLU", "SiLUActivation")


class FrozenSwiGLU(torch.autograd.Function):
    """``down(silu(gate(x)) * up(x))`` with frozen weights, keeping ``gate(x)`` and ``up(x)`` only."""

    @staticmethod
    def forward(ctx, x, w_gate, w_up, w_down):
        g = F.linear(x, w_gate)
        u = F.linear(x, w_up)
        out = F.linear(F.silu(g) * u, w_down)
        ctx.save_for_backward(g, u, w_gate, w_up, w_down)
        return out

    @staticmethod
    def backward(ctx, dout):
        g, u, w_gate, w_up, w_down = ctx.saved_tensors
        dh = dout.matmul(w_down)
        dg = torch.ops.aten.silu_backward(dh * u, g)
        du = dh * F.silu(g)
        del dh
        return dg.matmul(w_gate) + du.matmul(w_up), None, None, None


def _frozen_linear(module) -> bool:
    return type(module) is torch.nn.Linear and module.bias is None and not module.weight.requires_grad


def slimmable(mlp) -> bool:
    """Whether ``mlp`` is a SwiGLU MLP that :class:`FrozenSwiGLU` computes exactly."""
    parts = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(p is not None and _frozen_linear(p) for p in parts)
            and type(getattr(mlp, "act_fn", None)).__name__ in SILU_TYPES)


def _slim_forward(self, x):
    if torch.is_grad_enabled() and x.requires_grad and not torch.is_autocast_enabled(x.device.type) \
            and slimmable(self):
        return FrozenSwiGLU.apply(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
    return self._stock_forward(x)


def slim_mlps(model) -> int:
    """Switch every slimmable MLP of ``model`` to :class:`FrozenSwiGLU` in training (see the
    module docstring); returns how many. Call it after LoRA is attached (it freezes the base)."""
    count = 0
    for module in model.modules():
        if hasattr(module, "_stock_forward") or not slimmable(module):
            continue
        module._stock_forward = module.forward
        module.forward = types.MethodType(_slim_forward, module)
        count += 1
    return count


__all__ = ["FrozenSwiGLU", "slim_mlps", "slimmable"]
