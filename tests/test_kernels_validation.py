import numpy as np
import pytest
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedledger.strategies import kernels

from .conftest import random_adapter
from .replies import reply


def test_flatten_unflatten_round_trip():
    a = random_adapter(0)
    v = kernels.flatten(a)
    assert v.shape == (sum(x.size for x in a.values()),)
    back = kernels.unflatten(v, a)
    assert all(np.array_equal(back[k], a[k]) for k in a)


def test_weighted_average_matches_flower_fedavg():
    updates = [random_adapter(s) for s in range(5)]
    weights = [3, 1, 4, 1, 5]
    ours = kernels.weighted_average_arrays(updates, weights)
    replies = [reply(i + 1, u, num_examples=w).content for i, (u, w) in enumerate(zip(updates, weights))]
    theirs = aggregate_arrayrecords(replies, "num-examples")
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k].numpy(), rtol=1e-5, atol=1e-6)


def test_cosine_matrix_from_one_gram():
    x = np.random.default_rng(0).standard_normal((6, 50)).astype(np.float32)
    c = kernels.cosine_matrix(x)
    expected = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in x] for a in x])
    np.testing.assert_allclose(c, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mutate, needle", [
    (lambda a: {**a, "a.lora_A.weight": a["a.lora_A.weight"][:2]}, "wrong shape"),
    (lambda a: {k: v for k, v in list(a.items())[:1]}, "wrong keys"),
    (lambda a: {**a, "extra": np.zeros(2, np.float32)}, "wrong keys"),
    (lambda a: {**a, "a.lora_B.weight": np.full((8, 4), np.nan, np.float32)}, "NaN/Inf"),
    (lambda a: {**a, "a.lora_B.weight": np.full((8, 4), np.inf, np.float32)}, "NaN/Inf"),
])
def test_invalid_reason(mutate, needle):
    a = random_adapter(0)
    assert kernels.invalid_reason(a, kernels.layout(a)) is None
    assert needle in kernels.invalid_reason(mutate(a), kernels.layout(a))
