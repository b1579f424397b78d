"""Client training close to the machine: the loss without full logits equals Hugging Face's (value
and LoRA gradients), evaluation likewise, activation checkpointing changes memory and not the
result, peft runs without bitsandbytes for full-precision LoRA, and the per-round peak memory
window resets."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedledger.clients import data as data_lib
from fedledger.clients import loss as loss_lib
from fedledger.clients import model as model_lib
from fedledger.clients import train as train_lib


@pytest.fixture(scope="module")
def tiny():
    tok = model_lib.tiny_tokenizer()
    records = data_lib.load_corpus("chatterbot")[:40]
    return tok, data_lib.tokenize(records, tok, 64)


def _lora(tok, seed=0, dropout=0.0):
    return model_lib.add_lora(model_lib.tiny_llama(tok, seed=seed), r=4, dropout=dropout, seed=seed)


def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_chunked_loss_equals_hugging_faces_value_and_lora_gradients(tiny):
    tok, examples = tiny
    model = _lora(tok)
    model.train()
    batch = data_lib.collate(examples[:8], tok.pad_token_id)
    assert loss_lib.fused_loss_supported(model)
    hf_loss, hf_grads = _grads(model, lambda: model(**batch, use_cache=False).loss)
    ours_loss, ours_grads = _grads(model, lambda: loss_lib.causal_lm_loss(
        model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk=7))  # several chunks
    assert ours_loss == pytest.approx(hf_loss, rel=1e-6)
    for name, g in hf_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-4, atol=1e-7)


def test_evaluation_without_full_logits_sums_the_same_token_losses(tiny):
    tok, examples = tiny
    model = _lora(tok)
    model.eval()
    batch = data_lib.collate(examples[:8], tok.pad_token_id)
    total, count = loss_lib.summed_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], chunk=5)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                                ignore_index=-100, reduction="sum")
    assert count == int((target != -100).sum()) and total == pytest.approx(float(ref), rel=1e-6)


def test_top1_accuracy_from_the_chunked_pass_equals_the_full_logits_argmax(tiny, monkeypatch):
    """The accuracy the evaluation reports comes from the same chunks as the loss (no full fp32
    logits), and counts what the full logits' arg-max counts; the full-logit path agrees too."""
    tok, examples = tiny
    model = _lora(tok)
    model.eval()
    batch = data_lib.collate(examples[:8], tok.pad_token_id)
    args = (model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    total, count, hits = loss_lib.summed_loss_and_hits(*args, chunk=5)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        answer = target != -100
        ref_hits = int(((logits.argmax(-1) == target) & answer).sum())
    assert loss_lib.fused_loss_supported(model) and hits == ref_hits and count == int(answer.sum())
    assert loss_lib.summed_loss(*args, chunk=5) == pytest.approx((total, count))
    monkeypatch.setattr(loss_lib, "fused_loss_supported", lambda m: False)   # Hugging Face's full logits
    full = loss_lib.summed_loss_and_hits(*args)
    assert full[1:] == (count, hits) and full[0] == pytest.approx(total, rel=1e-6)
    monkeypatch.undo()
    result = train_lib.evaluate(model, examples[:8], tok.pad_token_id, batch_size=8)
    assert result["accuracy"] == pytest.approx(hits / count)


def test_a_trained_head_gets_hugging_faces_own_loss(tiny):
    tok, _ = tiny
    model = _lora(tok)
    model.get_base_model().get_output_embeddings().weight.requires_grad_(True)
    assert not loss_lib.fused_loss_supported(model)


def test_activation_checkpointing_changes_memory_not_the_update(tiny):
    tok, examples = tiny
    adapters = []
    for every in (0, 1):
        model = _lora(tok, dropout=0.1)  # dropout too: the recompute replays the same masks
        model_lib.set_activation_checkpointing(model, every)
        assert bool(model.get_base_model().is_activation_checkpointing) == bool(every)
        train_lib.train_steps(model, examples, tok.pad_token_id, steps=3, batch_size=4, lr=1e-2, seed=5)
        adapters.append(model_lib.get_adapter(model))
    for name, value in adapters[0].items():
        np.testing.assert_allclose(adapters[1][name], value, rtol=1e-5, atol=1e-7)


def _stock_mlps(model):
    """The same model with Hugging Face's own MLP forward back on every slimmed MLP."""
    for module in model.modules():
        if hasattr(module, "_stock_forward"):
            module.forward = module._stock_forward
    return model


def _saved_bytes(loss_fn) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward pass of ``loss_fn()``."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn()
    return sum(storages.values())


def test_frozen_mlps_keep_less_for_the_backward_pass_and_give_the_same_loss_and_gradients(tiny):
    tok, examples = tiny
    slim, stock = _lora(tok, dropout=0.1), _stock_mlps(_lora(tok, dropout=0.1))
    assert sum(hasattr(m, "_stock_forward") for m in slim.modules()) == model_lib.TINY_LAYERS
    batch = data_lib.collate(examples[:8], tok.pad_token_id)
    runs = []
    for model in (slim, stock):
        model.train()
        torch.manual_seed(7)   # the same LoRA dropout masks
        runs.append(_grads(model, lambda: loss_lib.causal_lm_loss(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"])))
    (slim_loss, slim_grads), (stock_loss, stock_grads) = runs
    assert slim_loss == stock_loss
    for name, g in stock_grads.items():
        torch.testing.assert_close(slim_grads[name], g, rtol=1e-6, atol=1e-9)
    sizes = []
    for model in (slim, stock):
        torch.manual_seed(7)
        sizes.append(_saved_bytes(lambda: loss_lib.causal_lm_loss(
            model, batch["input_ids"], batch["attention_mask"], batch["labels"])))
    tokens, inter = batch["input_ids"].numel(), slim.get_base_model().config.intermediate_size
    assert sizes[1] - sizes[0] >= model_lib.TINY_LAYERS * tokens * inter * 4  # one fp32 tensor per layer less


def test_an_mlp_with_lora_on_it_keeps_hugging_faces_forward(tiny):
    tok, _ = tiny
    model = model_lib.add_lora(model_lib.tiny_llama(tok), r=4, targets=("q_proj", "up_proj"))
    assert not any(hasattr(m, "_stock_forward") for m in model.modules())


def test_full_precision_lora_runs_without_bitsandbytes_and_qlora_still_gets_it(tmp_path):
    pytest.importorskip("bitsandbytes")
    code = """
import sys, tempfile
from fedledger.clients import model as M
net, _ = M.load_model("tiny")
M.add_lora(net, r=4)
print("fp32", "bitsandbytes" in sys.modules)
q, _ = M.load_model("tiny", cache_dir=sys.argv[1], quantization="4bit")
lora = M.add_lora(q, r=4)
from peft.tuners.lora import bnb
print("4bit", sum(isinstance(m, bnb.Linear4bit) for m in lora.modules()))
"""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("fp32", "4bit"))]
    assert lines[0] == "fp32 False" and int(lines[1].split()[1]) > 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-window peak memory needs Linux /proc")
def test_the_peak_memory_window_starts_again_at_each_reset():
    assert train_lib.reset_peak_rss()
    base = train_lib.peak_rss_mb()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    high = train_lib.peak_rss_mb()
    del block
    train_lib.release_memory()
    assert train_lib.reset_peak_rss()
    after = train_lib.peak_rss_mb()
    assert high >= base + 60 and after < high - 50


def _bench_train_speed():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "bench"))
    import bench_train_speed

    return bench_train_speed


def test_the_gpu_throughput_bench_says_so_and_writes_nothing_without_a_gpu(monkeypatch, capsys):
    bench = _bench_train_speed()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--device", "cuda", "--no-write"]) is None
    assert "skipped: --device cuda but no CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_the_throughput_bench_runs_on_a_gpu_with_the_plain_baseline_beside_it(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    tok = model_lib.tiny_tokenizer()
    model_lib.tiny_llama(tok).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out = _bench_train_speed().main(["--device", "cuda", "--bf16", "--model", str(tmp_path), "--rounds", "1",
                                     "--steps", "2", "--no-write"])
    assert out["device"] == "cuda" and out["median-tokens-per-second"]["plain HF + peft"] > 0
    assert all(r > 0 for r in out["ratio-to-plain"].values())


def test_kd_answer_logits_come_from_the_head_on_the_answer_positions_only(tiny):
    """KD's logit replies and distillation take the LM head over the answer rows only (rows x
    vocabulary), the same values as the full logits at those positions."""
    from fedledger.clients import distill

    tok, examples = tiny
    model = _lora(tok)
    model.eval()
    batch = data_lib.collate(examples[:6], tok.pad_token_id)
    with torch.no_grad():
        ours = distill._answer_logits(model, batch)
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    assert loss_lib.fused_loss_supported(model)
    torch.testing.assert_close(ours, full[batch["labels"][:, 1:] != -100], rtol=0, atol=1e-6)
