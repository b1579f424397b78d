"""Split-FedLLM's maths (clients/split.py) on the real tiny model: the two halves compute the unsplit
model's loss and LoRA gradients, the client's recomputed step is the step it would have taken
with the graph kept, and a cut that does not exist in the model is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedledger.clients import data as data_lib
from fedledger.clients import model as model_lib
from fedledger.clients import split as S


@pytest.fixture(scope="module")
def tiny():
    net, tok = model_lib.load_model("tiny", seed=3, device="cpu")
    model = model_lib.add_lora(net, 4, 8, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=3)
    with torch.no_grad():  # B = 0 at init would make every A-gradient zero: nothing to compare
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(hash(name) % 2**31))
    examples = data_lib.tokenize(data_lib.load_corpus("chatterbot")[:16], tok, 64)
    return model, tok, examples


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _full_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    return float(out.loss.detach()), _grads(model)


def _split_grads(model, batch, k, wire=torch.float32):
    split = S.SplitModel(model, k)
    model.zero_grad(set_to_none=True)
    h = split.client_forward(batch["input_ids"], batch["attention_mask"])
    cut = h.detach().to(wire).to(torch.float32).requires_grad_(True)  # what crosses the wire
    loss = split.server_loss(cut, batch["attention_mask"], batch["labels"])
    loss.backward()
    h.backward(cut.grad.to(wire).to(torch.float32))
    return float(loss), _grads(model)


def test_split_forward_and_backward_equal_the_unsplit_model(tiny):
    model, tok, examples = tiny
    model.train()
    batch = data_lib.collate(examples[:8], tok.pad_token_id)
    loss, full = _full_grads(model, batch)
    split_loss, split = _split_grads(model, batch, 1)
    assert split_loss == pytest.approx(loss, rel=1e-6)
    assert set(split) == set(full)
    for name, g in full.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(split[name], g, rtol=1e-5, atol=1e-7)


def test_float16_activations_on_the_wire_stay_close(tiny):
    model, tok, examples = tiny
    batch = data_lib.collate(examples[:8], tok.pad_token_id)
    _, full = _full_grads(model, batch)
    _, half = _split_grads(model, batch, 1, wire=torch.float16)
    for name, g in full.items():
        rel = float((half[name] - g).norm() / g.norm())
        assert rel < 2e-2, (name, rel)


def test_sides_partition_the_adapter_at_the_cut(tiny):
    model, _, _ = tiny
    names = list(model_lib.get_adapter(model))
    client, server = S.side_names(names, 1)
    assert client and server and set(client) | set(server) == set(names) and not set(client) & set(server)
    assert all(S.layer_of(n) == 0 for n in client) and all(S.layer_of(n) == 1 for n in server)
    split = S.SplitModel(model, 1)
    assert {S.layer_of(n) for n, _ in split.trainable("client")} == {0}
    assert {S.layer_of(n) for n, _ in split.trainable("server")} == {1}


@pytest.mark.parametrize("k", [0, 2, -1])
def test_a_cut_outside_the_model_is_refused_with_the_allowed_range(tiny, k):
    with pytest.raises(S.SplitError, match=r"split-layer=.* choose 1\.\.1"):
        S.SplitModel(tiny[0], k)


def test_the_recomputed_client_step_is_the_step_with_the_graph_kept(tiny):
    """No graph survives between Flower messages: the client recomputes its forward when the
    gradient arrives. Same adapter, batch and dropout seed: the same AdamW step."""
    model, tok, examples = tiny
    split = S.SplitModel(model, 1)
    start = {n: p.detach().clone() for n, p in split.trainable("client")}
    batch = S.step_batch(examples, tok.pad_token_id, 4, seed=5)
    acts = S.activations(split, batch, seed=11, dtype="float32")
    grad = np.random.default_rng(0).standard_normal(acts["hidden"].shape).astype(np.float32) * 1e-2

    state = S.backward_step(split, batch, 11, grad, {}, lr=1e-2)
    recomputed = {n: p.detach().clone() for n, p in split.trainable("client")}

    with torch.no_grad():  # the same step with the graph of the first forward kept
        for n, p in split.trainable("client"):
            p.copy_(start[n])
    named = split.trainable("client")
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.0)
    torch.manual_seed(11)
    h = split.client_forward(batch["input_ids"], batch["attention_mask"])
    assert np.array_equal(h.detach().numpy(), acts["hidden"])  # what was sent is what the graph holds
    opt.zero_grad()
    h.backward(torch.as_tensor(grad))
    torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
    opt.step()
    for n, p in named:
        torch.testing.assert_close(recomputed[n], p.detach(), rtol=0, atol=0)
    assert state["::step"][0] == 1.0 and any(k.endswith("::exp_avg") for k in state)


def test_the_optimizer_state_carries_over_between_messages(tiny):
    model, tok, examples = tiny
    split = S.SplitModel(model, 1)
    named = split.trainable("client")
    opt = torch.optim.AdamW([p for _, p in named], lr=1e-3)
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    state = S.adamw_state(opt, named)
    again = S.load_adamw([p for _, p in named], [n for n, _ in named], state, 1e-3)
    for (_, p) in named:
        assert torch.equal(again.state[p]["exp_avg"], opt.state[p]["exp_avg"])
        assert float(again.state[p]["step"]) == 1.0
