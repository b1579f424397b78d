"""The FedAvg fast path (core.aggregate): Flower's own arithmetic bit for bit, straight from the
decoded views, whatever the shapes, dtypes, number of replies or threads; only Flower's own
FedAvg / FedProx take it; configure_train decodes the global adapter once whatever N."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Krum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedledger.core import Layout, RoundPipeline
from fedledger.core import aggregate as agg_lib
from fedledger.core import pipeline as pipeline_lib
from fedledger.core import update as update_lib
from fedledger.core.aggregate import fast_rule, weighted_mean
from fedledger.core.update import encode_array

from .replies import NodeGrid, node_ids, record, reply, run_round

ODD_SHAPES = {"a": (3,), "b": (7, 5), "c": (1,), "empty": (0, 4), "scalar": (), "long": (agg_lib.BLOCK * 2 + 17,),
              "cube": (2, 3, 5)}


@pytest.fixture(autouse=True)
def _quiet_flower():
    flwr = logging.getLogger("flwr")
    level = flwr.level
    flwr.setLevel(logging.WARNING)
    yield
    flwr.setLevel(level)


def _adapters(n: int, dtype, seed: int = 0, shapes=ODD_SHAPES) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (rng.standard_normal(s) * 10 ** rng.uniform(-3, 3)).astype(dtype) for k, s in shapes.items()}
            for _ in range(n)]


def _flower(adapters, weights) -> dict[str, np.ndarray]:
    contents = [RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in a.items()}),
                            "metrics": MetricRecord({"num-examples": w})})
                for a, w in zip(adapters, weights)]
    return {k: v.numpy() for k, v in aggregate_arrayrecords(contents, "num-examples").items()}


def _same_bits(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                        and a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("n", [1, 2, 7, 33])
def test_weighted_mean_is_flowers_aggregate_arrayrecords_bit_for_bit(dtype, n):
    adapters = _adapters(n, dtype, seed=n)
    rng = np.random.default_rng(n)
    weights = [float(w) for w in rng.integers(1, 10_000, size=n)]
    weights[0] = weights[0] * 1e-3 + 0.1  # fractional and very unequal weights too
    layout = Layout.of(adapters[0])
    assert _same_bits(weighted_mean(adapters, weights, layout), _flower(adapters, weights))


def test_weighted_mean_does_not_depend_on_the_thread_count(monkeypatch):
    adapters = _adapters(9, np.float32, seed=5)
    weights = [float(i + 1) for i in range(9)]
    layout = Layout.of(adapters[0])
    monkeypatch.setenv("FEDLEDGER_THREADS", "1")
    one = weighted_mean(adapters, weights, layout)
    monkeypatch.setenv("FEDLEDGER_THREADS", "3")
    three = weighted_mean(adapters, weights, layout)
    assert _same_bits(one, three) and _same_bits(one, _flower(adapters, weights))


def test_weighted_mean_reads_the_views_it_is_given_without_copying_them():
    adapters = [{k: v.copy() for k, v in a.items()} for a in _adapters(3, np.float32)]
    for a in adapters:
        for v in a.values():
            v.setflags(write=False)  # read-only views, as decoded replies are
    out = weighted_mean(adapters, [1.0, 2.0, 3.0], Layout.of(adapters[0]))
    assert all(v.flags.writeable for v in out.values())


def test_weighted_mean_refuses_integer_tensors():
    adapters = [{"i": np.arange(4, dtype=np.int32)}]
    with pytest.raises(TypeError, match="floating-point"):
        weighted_mean(adapters, [1.0], Layout.of(adapters[0]))


def test_only_flowers_own_fedavg_and_fedprox_take_the_fast_path():
    class Subclass(FedAvg):
        pass

    assert fast_rule(FedAvg()) and fast_rule(FedProx(proximal_mu=0.1))
    assert not fast_rule(Subclass()) and not fast_rule(FedAdam()) and not fast_rule(Krum())


@pytest.mark.parametrize("rule", [FedAvg, lambda **kw: FedProx(proximal_mu=0.1, **kw)])
def test_pipeline_round_equals_flowers_own_aggregate_train(rule):
    shapes = {"x.lora_A": (8, 33), "x.lora_B": (33, 8), "y": (5,)}
    nodes = node_ids(6)
    rng = np.random.default_rng(1)
    glob = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    replies = [reply(n, {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()},
                     num_examples=int(rng.integers(1, 500)), metrics={"train-loss": float(rng.random())})
               for n in nodes]
    ours, report = run_round(RoundPipeline(rule()), glob, replies, nodes)
    flower_arrays, flower_metrics = rule().aggregate_train(1, replies)
    assert _same_bits(ours, {k: v.numpy() for k, v in flower_arrays.items()})
    assert report.metrics == dict(flower_metrics)


def test_a_custom_metrics_function_sees_each_replys_arrays_as_flowers_does():
    seen = []

    def metrics_fn(contents, key):
        seen.append([sorted(c["arrays"].keys()) for c in contents])
        return MetricRecord({"n": len(contents)})

    shapes = {"a": (4, 4)}
    nodes = node_ids(3)
    rng = np.random.default_rng(2)
    replies = [reply(n, {"a": rng.standard_normal((4, 4)).astype(np.float32)}) for n in nodes]
    _, report = run_round(RoundPipeline(FedAvg(train_metrics_aggr_fn=metrics_fn)),
                          {"a": np.zeros((4, 4), np.float32)}, replies, nodes)
    assert seen == [[["a"]] * 3] and report.metrics == {"n": 3} and shapes


def test_a_subclass_of_fedavg_aggregates_with_its_own_aggregate_train():
    class Halved(FedAvg):
        def aggregate_train(self, server_round, replies):
            arrays, metrics = super().aggregate_train(server_round, replies)
            return ArrayRecord({k: Array(v.numpy() / 2) for k, v in arrays.items()}), metrics

    nodes = node_ids(2)
    replies = [reply(n, {"a": np.full((3,), 4.0, np.float32)}) for n in nodes]
    ours, _ = run_round(RoundPipeline(Halved()), {"a": np.zeros((3,), np.float32)}, replies, nodes)
    assert ours["a"].tolist() == [2.0, 2.0, 2.0]


def test_encode_array_writes_exactly_flowers_npy_bytes():
    for v in (np.arange(12, dtype=np.float32).reshape(3, 4), np.zeros((0, 5), np.float16),
              np.asarray(np.float64(3.0)), np.ones((2, 3, 4), ">f4"), np.zeros((1,) * 40, np.float32),
              np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))):
        ours, theirs = encode_array(v), Array(np.ascontiguousarray(v))
        assert (ours.data, ours.dtype, ours.shape, ours.stype) == (theirs.data, theirs.dtype, theirs.shape, theirs.stype)


@pytest.mark.parametrize("n", [2, 64])
def test_configure_train_decodes_the_global_adapter_once_whatever_the_number_of_nodes(n, monkeypatch):
    """Counted at the two places a decode happens: npy headers read by fedledger, Array.numpy()."""
    headers, loads = [], []
    real_header, real_numpy = update_lib._npy_header, Array.numpy
    monkeypatch.setattr(update_lib, "_npy_header", lambda data: headers.append(1) or real_header(data))
    monkeypatch.setattr(Array, "numpy", lambda self: loads.append(1) or real_numpy(self))
    glob = {f"t{i}": np.zeros((4, 4), np.float32) for i in range(5)}
    pipeline = RoundPipeline(FedAvg(min_available_nodes=1))
    messages = list(pipeline.configure_train(1, record(glob), ConfigRecord(), NodeGrid(node_ids(n))))
    assert len(messages) == n
    assert len(headers) == len(glob) and loads == []


# ---------------------------------------------------------------------------- the fused finiteness pass
def _count_passes(monkeypatch) -> dict[str, int]:
    """Counts the passes over every received value: FedAvg sums and per-reply finiteness checks."""
    counts = {"sums": 0, "reply-checks": 0}
    real_mean, real_first = agg_lib.weighted_mean, update_lib.first_non_finite

    def mean(*a, **kw):
        counts["sums"] += 1
        return real_mean(*a, **kw)

    def first(arrays):
        counts["reply-checks"] += 1
        return real_first(arrays)

    for module in (agg_lib, pipeline_lib):
        monkeypatch.setattr(module, "weighted_mean", mean)
    for module in (agg_lib, update_lib):
        monkeypatch.setattr(module, "first_non_finite", first)
    return counts


def _round(shapes=None, n=6, seed=3):
    shapes = shapes or {"x.lora_A": (8, 33), "x.lora_B": (33, 8), "long": (agg_lib.BLOCK + 5,)}
    rng = np.random.default_rng(seed)
    nodes = node_ids(n, seed)
    glob = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    arrays = [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in nodes]
    weights = [int(w) for w in rng.integers(1, 500, size=n)]
    return nodes, glob, arrays, weights


def _flower_round(arrays, weights, nodes):
    replies = [reply(node, a, num_examples=w) for node, a, w in zip(nodes, arrays, weights)]
    out, _ = FedAvg().aggregate_train(1, replies)
    return {k: v.numpy() for k, v in out.items()}


def test_a_plain_fedavg_round_reads_every_reply_once(monkeypatch):
    nodes, glob, arrays, weights = _round()
    counts = _count_passes(monkeypatch)
    replies = [reply(node, a, num_examples=w) for node, a, w in zip(nodes, arrays, weights)]
    ours, report = run_round(RoundPipeline(FedAvg()), glob, replies, nodes)
    assert counts == {"sums": 1, "reply-checks": 0}
    assert _same_bits(ours, _flower_round(arrays, weights, nodes)) and len(report.kept) == len(nodes)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_reply_is_named_and_left_out_by_the_fused_pass_as_by_the_plain_check(bad, monkeypatch):
    nodes, glob, arrays, weights = _round()
    arrays[2] = {**arrays[2], "long": arrays[2]["long"].copy()}
    arrays[2]["long"][agg_lib.BLOCK + 1] = bad
    arrays[4] = {**arrays[4], "x.lora_B": np.full((33, 8), -bad, np.float32)}
    replies = [reply(node, a, num_examples=w) for node, a, w in zip(nodes, arrays, weights)]
    plain = update_lib.decode_replies(replies, Layout.of(glob), 10**9)
    ours, report = run_round(RoundPipeline(FedAvg()), glob, replies, nodes)
    assert [(r["node-id"], r["reason"]) for r in report.rejected] == [(r.node_id, r.reason) for r in plain[1]]
    assert [r["reason"] for r in report.rejected] == ["long: NaN/Inf values", "x.lora_B: NaN/Inf values"]
    kept = [i for i in range(len(nodes)) if i not in (2, 4)]
    expected = _flower_round([arrays[i] for i in kept], [weights[i] for i in kept], [nodes[i] for i in kept])
    assert _same_bits(ours, expected)


def test_a_round_that_keeps_other_replies_than_were_checked_sums_them_again(monkeypatch):
    nodes, glob, arrays, weights = _round()
    replies = [reply(node, a, num_examples=w) for node, a, w in zip(nodes, arrays, weights)]
    replies.append(reply(nodes[1], arrays[0], num_examples=weights[0]))  # node 1 again: rejected as a duplicate
    counts = _count_passes(monkeypatch)
    ours, report = run_round(RoundPipeline(FedAvg()), glob, replies, nodes)
    assert counts["sums"] == 2
    assert [r["reason"] for r in report.rejected] == ["a second reply from this node in the same round"]
    assert _same_bits(ours, _flower_round(arrays, weights, nodes))


def test_finite_replies_whose_tensor_sums_overflow_are_accepted_and_averaged_in_one_pass(monkeypatch):
    """A tensor's own sum overflows (the plain check falls back to an element-wise look); FedAvg is
    a convex combination, so its sum stays finite and proves the replies finite in one pass."""
    nodes = node_ids(2)
    replies = [reply(n, {"a": np.full((64,), 3e38, np.float32)}, num_examples=1 + i) for i, n in enumerate(nodes)]
    counts = _count_passes(monkeypatch)
    ours, report = run_round(RoundPipeline(FedAvg()), {"a": np.zeros((64,), np.float32)}, replies, nodes)
    assert counts == {"sums": 1, "reply-checks": 0}
    assert len(report.kept) == 2 and not report.rejected and np.isfinite(ours["a"]).all()
    assert _same_bits(ours, _flower_round([{"a": np.full((64,), 3e38, np.float32)}] * 2, [1, 2], nodes))
