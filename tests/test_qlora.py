"""QLoRA on CPU: LoRA gradients through bitsandbytes 4-bit layers must equal an fp32 reference
that holds the same (dequantised) weights, also after a no-grad evaluation pass (the
AVX512-BF16 repacking trap; see clients.model.fix_bnb_cpu_gradients)."""

import numpy as np
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from fedledger.clients import data as data_lib
from fedledger.clients import model as model_lib


def _fp32_twin(qmodel, tokenizer):
    """A plain fp32 tiny Llama whose Linear weights are the dequantised 4-bit weights."""
    twin = model_lib.tiny_llama(tokenizer, seed=0)
    state = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state[name + ".weight"] = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    for name, p in qmodel.state_dict().items():
        if name in twin.state_dict() and name not in state and p.dtype in (torch.float32, torch.float16, torch.bfloat16):
            state[name] = p.float()
    missing = set(twin.state_dict()) - set(state)
    assert not missing, missing
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("bits", ["4bit"])
def test_qlora_gradients_match_fp32_reference_after_eval(tmp_path, bits):
    qbase, tok = model_lib.load_model("tiny", cache_dir=str(tmp_path), quantization=bits)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in qbase.modules())
    twin = _fp32_twin(qbase, tok)
    q = model_lib.add_lora(qbase, r=4, alpha=8, dropout=0.0, seed=1)
    f = model_lib.add_lora(twin, r=4, alpha=8, dropout=0.0, seed=1)
    rng = np.random.default_rng(0)
    adapter = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in model_lib.get_adapter(q).items()}
    model_lib.set_adapter(q, adapter)
    model_lib.set_adapter(f, adapter)

    records = data_lib.load_corpus("chatterbot")[:8]
    batch = data_lib.collate(data_lib.tokenize(records, tok, 64), tok.pad_token_id)
    q.eval(), f.eval()
    with torch.no_grad():  # the evaluation pass that triggers the CPU repacking
        q(**batch)
    grads = []
    for m in (q, f):
        m.zero_grad()
        m(**batch).loss.backward()
        grads.append({n: p.grad.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        a, b = grads[0][name], grads[1][name]
        rel = float((a - b).norm() / (b.norm() + 1e-12))
        assert rel < 1e-3, f"{name}: relative gradient error {rel:.3g}"


def test_8bit_loads_and_trains(tmp_path):
    base, tok = model_lib.load_model("tiny", cache_dir=str(tmp_path), quantization="8bit")
    m = model_lib.add_lora(base, r=4, alpha=8, dropout=0.0)
    batch = data_lib.collate(data_lib.tokenize(data_lib.load_corpus("chatterbot")[:4], tok, 64), tok.pad_token_id)
    m(**batch).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters() if p.requires_grad)


@pytest.mark.gpu
def test_qlora_on_cuda_runs(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    base, tok = model_lib.load_model("tiny", cache_dir=str(tmp_path), quantization="4bit")
    m = model_lib.add_lora(base.cuda(), r=4, alpha=8, dropout=0.0)
    batch = {k: v.cuda() for k, v in data_lib.collate(data_lib.tokenize(data_lib.load_corpus("chatterbot")[:4], tok, 64), tok.pad_token_id).items()}
    m(**batch).loss.backward()
