import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp.strategy import FedAvg, Krum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedledger.strategies import kernels
from fedledger.strategies.validation import ValidateUpdates

from .conftest import make_reply, random_adapter


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
    replies = [make_reply(u, w, node_id=i + 1).content for i, (u, w) in enumerate(zip(updates, weights))]
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


class _FakeGrid:
    def get_node_ids(self):
        return [1, 2, 3, 4]


@pytest.mark.parametrize("inner", [FedAvg, lambda **kw: Krum(num_malicious_nodes=0, **kw)])
def test_malformed_replies_are_dropped_and_the_round_goes_on(inner, caplog):
    good = [random_adapter(s) for s in range(3)]
    strategy = ValidateUpdates(inner(min_available_nodes=1, min_train_nodes=1))
    global_arrays = kernels.to_arrayrecord(good[0])
    list(strategy.configure_train(1, global_arrays, ConfigRecord(), _FakeGrid()))
    bad_shape = {**good[0], "a.lora_A.weight": np.zeros((2, 2), np.float32)}
    replies = [make_reply(g, 10, node_id=i + 1) for i, g in enumerate(good)]
    replies += [make_reply(bad_shape, 10, node_id=7), make_reply(None, 10, node_id=8),
                make_reply({k: v * np.nan for k, v in good[0].items()}, 10, node_id=9)]
    with caplog.at_level(logging.WARNING, logger="fedledger"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert {r["node-id"] for r in strategy.rejected[1]} == {7, 8, 9}
    text = caplog.text
    assert "node 7" in text and "wrong shape" in text and "node 9" in text and "NaN/Inf" in text
    if isinstance(strategy.inner, FedAvg) and not isinstance(strategy.inner, Krum):
        expected = kernels.weighted_average_arrays(good, [10, 10, 10])
        for k, v in expected.items():
            np.testing.assert_allclose(arrays[k].numpy(), v, rtol=1e-5, atol=1e-6)
    assert strategy.traffic[1]["bytes-received"] > 0
