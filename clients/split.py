"""Split-FedLLM's ML: a peft-wrapped Llama cut after decoder block ``k`` (torch).

    client: embeddings -> blocks [0, k) (+ their LoRA)             -> activations h (B, T, d)
    server: h -> blocks [k, L) (+ their LoRA) -> final norm -> LM head -> loss -> dL/dh

Both halves build the causal mask and the rotary position embeddings from the attention mask
(it travels with ``h``) exactly as ``LlamaModel.forward`` does, so the two halves compute the
unsplit model's loss and gradients (checked to fp32 round-off in the tests).

**The simple form** is implemented: the labels travel to the server with the activations. In
the **U-shaped** variant the client also keeps the LM head (and the labels): the server returns
the hidden state after block L-1, the client computes logits and loss and sends the gradient
back through the server; labels never leave the client, at the price of a third message per
step and the head's compute on the client. **Split learning is no privacy guarantee**: the
activations at the cut (and the gradients sent back) can be inverted to recover the input text,
the more easily the earlier the cut (after block 2 of 30 they are close to the embeddings).

No autograd graph survives between two Flower messages (a ClientApp may run each message in a
new process), so a client *recomputes* the forward pass of a step when its activation gradient
arrives (same adapter, same batch, same dropout seed: the same graph) and then back-propagates:
two forwards and one backward of its k blocks per step (:func:`client_flops`).
"""

from __future__ import annotations

import re

import numpy as np
import torch

from .cost import TRAIN_FACTOR, ModelCost, causal_lm
from .data import collate

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class SplitError(ValueError):
    """A cut that cannot be placed in this model; the message names the allowed values."""


def layer_of(name: str) -> int | None:
    m = LAYER.search(name)
    return int(m.group(1)) if m else None


def side_names(names, k: int) -> tuple[list[str], list[str]]:
    """(client-side names: blocks < k, server-side names: everything else), each in the given order."""
    client = [n for n in names if (layer_of(n) is not None and layer_of(n) < k)]
    return client, [n for n in names if n not in set(client)]


class SplitModel:
    """The two halves of ``model`` (a peft-wrapped ``*ForCausalLM`` with ``model.layers``) at ``k``."""

    def __init__(self, model, k: int):
        self.peft, self.lm = model, causal_lm(model)
        self.num_layers = len(self.lm.model.layers)
        if not 1 <= int(k) <= self.num_layers - 1:
            raise SplitError(f"split-layer={k} cannot cut a model with {self.num_layers} decoder blocks; "
                             f"choose 1..{self.num_layers - 1}")
        self.k = int(k)

    def _context(self, h: torch.Tensor, attention_mask: torch.Tensor):
        from transformers.masking_utils import create_causal_mask

        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(config=self.lm.config, inputs_embeds=h, attention_mask=attention_mask, cache=None,
                                  position_ids=position_ids)
        return mask, self.lm.model.rotary_emb(h, position_ids=position_ids), position_ids

    def _blocks(self, h, attention_mask, layers):
        mask, rope, position_ids = self._context(h, attention_mask)
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=rope, position_ids=position_ids)
        return h

    def client_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.lm.model.embed_tokens(input_ids)
        return self._blocks(h, attention_mask, self.lm.model.layers[:self.k])

    def server_loss(self, h: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self._blocks(h, attention_mask, self.lm.model.layers[self.k:])
        logits = self.lm.lm_head(self.lm.model.norm(h))
        return self.lm.loss_function(logits=logits, labels=labels, vocab_size=self.lm.config.vocab_size)

    def trainable(self, side: str) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable (LoRA) parameters of the ``"client"`` or ``"server"`` side."""
        out = []
        for name, p in self.peft.named_parameters():
            if not p.requires_grad:
                continue
            layer = layer_of(name)
            on_client = layer is not None and layer < self.k
            if on_client == (side == "client"):
                out.append((name, p))
        return out


# ---------------------------------------------------------------------------- the client's step
def step_batch(examples: list[dict], pad_id: int, batch_size: int, seed: int) -> dict:
    """The batch of one local step (drawn with the step's seed: the same batch when recomputed)."""
    idx = np.random.default_rng(seed).choice(len(examples), size=min(batch_size, len(examples)), replace=False)
    return collate([examples[i] for i in idx], pad_id)


def activations(split: SplitModel, batch: dict, seed: int, dtype: str) -> dict[str, np.ndarray]:
    """What the client sends at a step: ``hidden`` (wire dtype), ``attention-mask``, ``labels`` (int32)."""
    split.peft.train()
    torch.manual_seed(seed)
    with torch.no_grad():
        h = split.client_forward(batch["input_ids"], batch["attention_mask"])
    return {"hidden": h.to(WIRE_DTYPES[dtype]).cpu().numpy(),
            "attention-mask": batch["attention_mask"].to(torch.int32).numpy(),
            "labels": batch["labels"].to(torch.int32).numpy()}


def backward_step(split: SplitModel, batch: dict, seed: int, grad: np.ndarray, optimizer_state: dict, lr: float
                  ) -> dict[str, np.ndarray]:
    """Recompute the step's forward, back-propagate ``grad`` (dL/dh from the server), clip, take one
    AdamW step on the client-side LoRA; returns the optimizer state to keep (see :func:`load_adamw`)."""
    named = split.trainable("client")
    optimizer = load_adamw([p for _, p in named], [n for n, _ in named], optimizer_state, lr)
    split.peft.train()
    torch.manual_seed(seed)
    h = split.client_forward(batch["input_ids"], batch["attention_mask"])
    optimizer.zero_grad(set_to_none=True)
    h.backward(torch.as_tensor(np.asarray(grad, dtype=np.float32)).to(h.dtype))
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
    optimizer.step()
    return adamw_state(optimizer, named)


def client_flops(cost: ModelCost, tokens: int, seq_len: int, k: int) -> float:
    """Forward to send + recomputed forward + backward of blocks [0, k)."""
    return (1.0 + TRAIN_FACTOR) * cost.forward(tokens, seq_len, 0, k, head=False)


# ---------------------------------------------------------------------------- the server part
class SplitServer:
    """The shared server part: one model, its own AdamW, one step per client step (in the order
    the runner calls it; the runner fixes that order)."""

    def __init__(self, model, k: int, lr: float):
        self.split = SplitModel(model, k)
        self.named = self.split.trainable("server")
        self.optimizer = torch.optim.AdamW([p for _, p in self.named], lr=lr, weight_decay=0.0)
        self.cost = ModelCost.of(model)
        self.flops = 0.0

    def step(self, hidden: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray, seed: int
             ) -> tuple[np.ndarray, float]:
        """One server step on a client's activations: (dL/dh in the activations' dtype, loss)."""
        self.split.peft.train()
        torch.manual_seed(seed)
        h = torch.as_tensor(np.asarray(hidden, dtype=np.float32)).requires_grad_(True)
        mask = torch.as_tensor(np.asarray(attention_mask, dtype=np.int64))
        loss = self.split.server_loss(h, mask, torch.as_tensor(np.asarray(labels, dtype=np.int64)))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in self.named], 1.0)
        self.optimizer.step()
        tokens = int(mask.sum())
        self.flops += self.cost.train(tokens, int(mask.shape[1]), self.split.k, None, head=True)
        return h.grad.numpy().astype(np.asarray(hidden).dtype), float(loss.detach())

    def arrays(self) -> dict[str, np.ndarray]:
        """The server part's LoRA tensors (adapter names, as ``model.get_adapter`` names them)."""
        from .model import get_adapter

        _, server = side_names(list(get_adapter(self.split.peft)), self.split.k)
        full = get_adapter(self.split.peft)
        return {n: full[n] for n in server}


# ---------------------------------------------------------------------------- optimizer state
def adamw_state(optimizer: torch.optim.AdamW, named) -> dict[str, np.ndarray]:
    """AdamW's moments and step count as plain arrays (to keep between Flower messages)."""
    out: dict[str, np.ndarray] = {}
    step = 0.0
    for name, p in named:
        st = optimizer.state.get(p)
        if not st:
            continue
        out[f"{name}::exp_avg"] = st["exp_avg"].detach().cpu().numpy().copy()
        out[f"{name}::exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().numpy().copy()
        step = float(st["step"])
    out["::step"] = np.array([step], dtype=np.float32)
    return out


def load_adamw(params, names, state: dict, lr: float) -> torch.optim.AdamW:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    step = float(np.asarray(state.get("::step", [0.0]))[0]) if state else 0.0
    if step > 0:
        for name, p in zip(names, params):
            optimizer.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                                  "exp_avg": torch.as_tensor(np.array(state[f"{name}::exp_avg"])),
                                  "exp_avg_sq": torch.as_tensor(np.array(state[f"{name}::exp_avg_sq"]))}
    return optimizer


__all__ = ["SplitError", "SplitModel", "SplitServer", "activations", "adamw_state", "backward_step", "client_flops",
           "layer_of", "load_adamw", "side_names", "step_batch"]
