"""The boundary: every train reply is decoded once; a malformed one is rejected with its reason and
never crashes a round, enters an aggregate or changes it. Includes a property-based fuzz
(hypothesis) that throws over 1,000 malformed replies at every hub stack fedledger builds and
at the bare public wrappers."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedledger.core import Layout, RoundPipeline
from fedledger.core.update import BoundaryError, decode_array, decode_replies
from fedledger.strategies.pagerank import PageRankScorer, PageRankTrust

from .replies import SHAPES, adapter, instruction, node_ids, npy, record, reply, run_round

NAMES = list(SHAPES)
GOOD = 4


@pytest.fixture(autouse=True)
def _quiet_flower():
    flwr = logging.getLogger("flwr")
    level = flwr.level
    flwr.setLevel(logging.WARNING)
    yield
    flwr.setLevel(level)


# ---------------------------------------------------------------------------- malformations
def _with_array(arrays: dict, name: str, array: Array) -> ArrayRecord:
    rec = record(arrays)
    rec[name] = array
    return rec


def _raw(name_shape_dtype_data):
    dtype, shape, stype, data = name_shape_dtype_data
    return Array(dtype=dtype, shape=tuple(shape), stype=stype, data=data)


def malformed(kind: str, node: int, good: dict, rng: np.random.Generator) -> Message:
    """One malformed train reply of ``kind`` (each must be rejected at the boundary)."""
    name = NAMES[int(rng.integers(len(NAMES)))]
    shape = SHAPES[name]
    v = good[name]
    if kind == "error":
        return Message(Error(code=0, reason="client crashed"), reply_to=instruction(node))
    if kind == "no-arrays":
        return reply(node, None)
    if kind == "two-arrayrecords":
        return reply(node, good, extra={"more": record(good)})
    if kind == "no-metrics":
        return Message(RecordDict({"arrays": record(good)}), reply_to=instruction(node))
    if kind == "two-metricrecords":
        return reply(node, good, extra={"other": MetricRecord({"num-examples": 3})})
    if kind == "no-num-examples":
        return Message(RecordDict({"arrays": record(good), "metrics": MetricRecord({"loss": 1.0})}),
                       reply_to=instruction(node))
    if kind.startswith("num-examples="):
        value = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "0": 0, "-3": -3, "2.5": 2.5,
                 "1e30": 1e30, "2**64": 2**64, "list": [5, 5], "1e10": 10**10}[kind.split("=", 1)[1]]
        return reply(node, good, num_examples=value)
    if kind == "nan":
        bad = v.copy()
        bad.flat[int(rng.integers(bad.size))] = np.nan
        return reply(node, {**good, name: bad})
    if kind == "inf":
        bad = v.copy()
        bad.flat[int(rng.integers(bad.size))] = -np.inf if rng.random() < 0.5 else np.inf
        return reply(node, {**good, name: bad})
    if kind == "huge-overflows":  # finite values whose sum overflows are fine; an inf hidden among them is not
        bad = np.full(shape, 3e38, np.float32)
        bad.flat[-1] = np.inf
        return reply(node, {**good, name: bad})
    if kind in ("float16", "float64", "int32", "big-endian"):
        dt = {"float16": np.float16, "float64": np.float64, "int32": np.int32, "big-endian": np.dtype(">f4")}[kind]
        return reply(node, {**good, name: v.astype(dt)})
    if kind == "wrong-shape":
        return reply(node, {**good, name: np.ascontiguousarray(v.reshape(-1))})
    if kind == "transposed":
        return reply(node, {**good, name: np.ascontiguousarray(v.T)})
    if kind == "missing-tensor":
        return reply(node, {k: a for k, a in good.items() if k != name})
    if kind == "extra-tensor":
        return reply(node, {**good, "m.extra.weight": np.zeros(3, np.float32)})
    if kind == "renamed-tensor":
        return reply(node, {**{k: a for k, a in good.items() if k != name}, name + ".x": v})
    if kind == "torch-stype":
        return reply(node, _with_array(good, name, _raw(("float32", shape, "torch.Tensor", npy(v)))))
    if kind == "pickle-stype":
        return reply(node, _with_array(good, name, _raw(("float32", shape, "pickle", b"\x80\x04N."))))
    if kind == "garbage-bytes":
        return reply(node, _with_array(good, name, _raw(("float32", shape, "numpy.ndarray",
                                                         rng.bytes(int(rng.integers(1, 200)))))))
    if kind == "truncated":
        data = npy(v)
        return reply(node, _with_array(good, name, _raw(("float32", shape, "numpy.ndarray",
                                                         data[: int(rng.integers(1, len(data) - 1))]))))
    if kind == "extra-bytes":
        return reply(node, _with_array(good, name, _raw(("float32", shape, "numpy.ndarray", npy(v) + b"\0\0\0\0"))))
    if kind == "declared-differs":
        return reply(node, _with_array(good, name, _raw(("float64", shape, "numpy.ndarray", npy(v)))))
    if kind == "object-dtype":
        header = b"{'descr': '|O', 'fortran_order': False, 'shape': (1,), }"
        header += b" " * (117 - len(header)) + b"\n"
        data = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x80\x04N."
        return reply(node, _with_array(good, name, _raw(("object", (1,), "numpy.ndarray", data))))
    if kind == "fortran":
        data = bytearray(npy(np.asfortranarray(v)))
        return reply(node, _with_array(good, name, _raw(("float32", shape, "numpy.ndarray", bytes(data)))))
    if kind == "empty-bytes":
        return reply(node, _with_array(good, name, _raw(("float32", shape, "numpy.ndarray", b""))))
    raise AssertionError(kind)


KINDS = ["error", "no-arrays", "two-arrayrecords", "no-metrics", "two-metricrecords", "no-num-examples",
         *(f"num-examples={v}" for v in ("nan", "inf", "-inf", "0", "-3", "2.5", "1e30", "2**64", "list", "1e10")),
         "nan", "inf", "huge-overflows", "float16", "float64", "int32", "big-endian", "wrong-shape", "transposed",
         "missing-tensor", "extra-tensor", "renamed-tensor", "torch-stype", "pickle-stype", "garbage-bytes",
         "truncated", "extra-bytes", "declared-differs", "object-dtype", "fortran", "empty-bytes"]
MAX_EXAMPLES = 10**6


# ---------------------------------------------------------------------------- unit behaviour
@pytest.mark.parametrize("kind", KINDS)
def test_each_malformed_reply_is_rejected_with_a_reason(kind):
    g = adapter(0)
    nodes = node_ids(2, seed=1)
    rng = np.random.default_rng(0)
    good = reply(nodes[0], adapter(1), num_examples=7)
    bad = malformed(kind, nodes[1], adapter(2), rng)
    updates, rejected = decode_replies([good, bad], Layout.of(g), MAX_EXAMPLES)
    assert [u.node_id for u in updates] == [nodes[0]]
    assert [r.node_id for r in rejected] == [nodes[1]] and rejected[0].reason


def test_decoded_arrays_are_zero_copy_read_only_views_of_the_received_bytes():
    g = adapter(0)
    msg = reply(node_ids(1)[0], adapter(1))
    (u,), _ = decode_replies([msg], Layout.of(g), MAX_EXAMPLES)
    view = u.arrays[NAMES[0]]
    assert not view.flags.writeable
    assert view.base is not None  # a view into the Array's bytes, not a copy
    np.testing.assert_array_equal(view, adapter(1)[NAMES[0]])


def test_finite_values_whose_sum_overflows_are_accepted():
    g = adapter(0)
    big = {k: np.full(s, 3e38, np.float32) for k, s in SHAPES.items()}
    updates, rejected = decode_replies([reply(5, big)], Layout.of(g), MAX_EXAMPLES)
    assert len(updates) == 1 and not rejected


def test_a_second_valid_reply_of_the_same_node_is_rejected():
    g = adapter(0)
    node = node_ids(1)[0]
    updates, rejected = decode_replies([reply(node, adapter(1)), reply(node, adapter(1))], Layout.of(g), MAX_EXAMPLES)
    assert len(updates) == 1 and rejected[0].reason == "a second reply from this node in the same round"


def test_extra_and_non_scalar_metrics_are_dropped_not_fatal():
    g = adapter(0)
    msg = reply(9, adapter(1), metrics={"loss": 1.5, "curve": [1.0, 2.0], "bad": float("nan")})
    (u,), rejected = decode_replies([msg], Layout.of(g), MAX_EXAMPLES)
    assert not rejected and u.metrics == {"loss": 1.5} and set(u.dropped_metrics) == {"curve", "bad"}


def test_a_whole_float_num_examples_is_accepted_as_an_int():
    (u,), _ = decode_replies([reply(9, adapter(1), num_examples=12.0)], Layout.of(adapter(0)), MAX_EXAMPLES)
    assert u.num_examples == 12 and isinstance(u.num_examples, int)


def test_decode_array_names_the_tensor_and_the_problem():
    v = adapter(1)[NAMES[0]]
    with pytest.raises(BoundaryError, match=f"{NAMES[0]}: dtype <f8 is not the adapter's <f4"):
        decode_array(NAMES[0], Array(v.astype(np.float64)), v.shape, np.dtype("<f4"))


def test_metric_keys_that_differ_between_clients_do_not_stop_flowers_fedavg():
    """Flower's own aggregate_metricrecords raises on differing keys; the pipeline hands it the shared ones."""
    g, nodes = adapter(0), node_ids(3, seed=4)
    replies = [reply(nodes[0], adapter(1), metrics={"loss": 1.0, "extra": 3.0}),
               reply(nodes[1], adapter(2), metrics={"loss": 2.0}),
               reply(nodes[2], adapter(3), metrics={})]
    agg, report = run_round(RoundPipeline(FedAvg(min_available_nodes=1)), g, replies, nodes)
    assert agg is not None and report.aggregated == 3 and not report.rejected


def test_a_strategy_that_consumes_its_input_leaves_the_replies_intact():
    """Flower's Bulyan pops the arrays it reads; the pipeline hands it its own records."""
    g, nodes = adapter(0), node_ids(4)
    replies = [reply(n, adapter(i + 1)) for i, n in enumerate(nodes)]
    run_round(RoundPipeline(Bulyan(num_malicious_nodes=0, min_available_nodes=1)), g, replies, nodes)
    assert all(len(r.content["arrays"]) == len(SHAPES) for r in replies)


def test_an_exception_in_the_wrapped_strategy_is_recorded_not_raised():
    class Broken(FedAvg):
        def aggregate_train(self, server_round, replies):
            raise RuntimeError("boom")

    g, nodes = adapter(0), node_ids(2)
    agg, report = run_round(RoundPipeline(Broken(min_available_nodes=1)), g,
                            [reply(n, adapter(i + 1)) for i, n in enumerate(nodes)], nodes)
    assert agg is None and "RuntimeError: boom" in report.aggregate_error and report.aggregated == 0


def test_the_aggregate_keeps_the_adapter_dtype_when_the_rule_computes_in_float64():
    g, nodes = adapter(0), node_ids(3)
    agg, _ = run_round(RoundPipeline(FedAdam(min_available_nodes=1)), g,
                       [reply(n, adapter(i + 1)) for i, n in enumerate(nodes)], nodes)
    assert {v.dtype for v in agg.values()} == {np.dtype(np.float32)}


# ---------------------------------------------------------------------------- the fuzz
def _stacks():
    kw = {"min_available_nodes": 1, "min_train_nodes": 1}
    inner = {
        "fedavg": lambda: FedAvg(**kw), "fedprox": lambda: FedProx(proximal_mu=0.1, **kw),
        "fedadam": lambda: FedAdam(**kw), "fedyogi": lambda: FedYogi(**kw), "fedadagrad": lambda: FedAdagrad(**kw),
        "fedavgm": lambda: FedAvgM(server_momentum=0.9, **kw), "fedmedian": lambda: FedMedian(**kw),
        "fedtrimmedavg": lambda: FedTrimmedAvg(beta=0.2, **kw), "krum": lambda: Krum(num_malicious_nodes=1, **kw),
        "multikrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3, **kw),
        "bulyan": lambda: Bulyan(num_malicious_nodes=0, **kw),
    }
    stacks = {f"pipeline({n})": (lambda f=f: RoundPipeline(f())) for n, f in inner.items()}
    stacks.update({f"pipeline({n})+pagerank": (lambda f=f: RoundPipeline(f(), trust=PageRankScorer()))
                   for n, f in inner.items() if n in ("fedavg", "krum", "fedmedian")})
    stacks["PageRankTrust()"] = lambda: PageRankTrust(**kw)
    stacks["PageRankTrust(FedAvg)"] = lambda: PageRankTrust(FedAvg(**kw))
    stacks["PageRankTrust(Bulyan)"] = lambda: PageRankTrust(Bulyan(num_malicious_nodes=0, **kw))
    return stacks


STACKS = _stacks()


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_fuzz_malformed_replies_never_crash_enter_or_change_the_aggregate(stack):
    make = STACKS[stack]
    thrown = {"n": 0}

    @settings(max_examples=110, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(kinds=st.lists(st.sampled_from(KINDS), min_size=8, max_size=14), seed=st.integers(0, 2**32 - 1),
           positions=st.randoms(use_true_random=False))
    def one_round(kinds, seed, positions):
        rng = np.random.default_rng(seed)
        g = adapter(seed % 1000)
        nodes = node_ids(GOOD + len(kinds), seed=seed)
        good = [reply(nodes[i], {k: g[k] + 0.1 * v for k, v in adapter(seed + i).items()},
                      num_examples=int(rng.integers(1, 50)), metrics={"loss": float(i)}) for i in range(GOOD)]
        bad = [malformed(kind, nodes[GOOD + j], adapter(seed + 100 + j), rng) for j, kind in enumerate(kinds)]
        mixed = list(good)
        for m in bad:
            mixed.insert(positions.randint(0, len(mixed)), m)
        # the good replies in their order among the mixed ones: the record order
        baseline, _ = run_round(make(), g, [m for m in mixed if any(m is x for x in good)], nodes)
        agg, report = run_round(make(), g, mixed, nodes)   # must not raise
        thrown["n"] += len(bad)
        assert {r["node-id"] for r in report.rejected} == set(nodes[GOOD:]), report.rejected
        assert {k["node-id"] for k in report.kept} == set(nodes[:GOOD])
        assert (agg is None) == (baseline is None)
        if agg is not None:
            for k in agg:
                assert np.array_equal(agg[k], baseline[k]), f"aggregate changed by {kinds}"

    quiet = logging.getLogger("fedledger")
    level, quiet.level = quiet.level, logging.ERROR  # ~1,000 rejection warnings are expected here
    try:
        one_round()
    finally:
        quiet.setLevel(level)
    assert thrown["n"] >= 1000, thrown


# ---------------------------------------------------------------------------- the fuzz, audited
SIGNATURE_KINDS = ["unsigned", "bad-signature", "hash-mismatch", "signer-swap", "replayed-round", "other-registry",
                   "other-global", "other-count", "not-enrolled"]
RUN_IDS = itertools.count(10_000)  # one chain for the module: every round of every test is its own run


@pytest.fixture(scope="module")
def chain():
    from fedledger.chain.ledger import Ledger

    return Ledger.in_process()


def _audited_stacks():
    from fedledger.chain.audit_strategy import OnChainAudit

    kw = {"min_available_nodes": 1, "min_train_nodes": 1}
    return {
        "OnChainAudit(FedAvg)": (lambda t: OnChainAudit(FedAvg(**kw), *t), lambda: RoundPipeline(FedAvg(**kw))),
        "OnChainAudit(PageRankTrust(Krum))": (
            lambda t: OnChainAudit(PageRankTrust(Krum(num_malicious_nodes=1, **kw)), *t),
            lambda: PageRankTrust(Krum(num_malicious_nodes=1, **kw))),
    }


@pytest.mark.parametrize("stack", sorted(_audited_stacks()))
def test_fuzz_audited_stacks_record_every_refusal_and_nothing_else(stack, chain, tmp_path):
    from fedledger.chain import signing
    from fedledger.chain.hashing import update_hash
    from fedledger.chain.store import ArtifactStore

    make_audited, make_plain = _audited_stacks()[stack]
    accounts = [signing.simulation_account(i) for i in range(GOOD + 30)]
    outsider = signing.simulation_account(10_000)   # a key the admin never enrols
    thrown = {"n": 0}

    def record_of(arrays, i, run_id, g, n, rnd=1, registry=None, account=None):
        commitment = signing.Commitment(chain.chain_id, registry or chain.address, run_id, rnd, update_hash(g), "", n)
        return signing.audit_record(arrays, commitment, account or accounts[i])

    def signed(node, arrays, n, i, run_id, g):
        return reply(node, arrays, num_examples=n, metrics={"loss": 1.0},
                     extra={"audit": ConfigRecord(record_of(arrays, i, run_id, g, n))})

    def bad_signed(kind, node, arrays, i, run_id, g):
        rec = record_of(arrays, i, run_id, g, 10)
        if kind == "unsigned":
            return reply(node, arrays)
        if kind == "bad-signature":
            rec["signature"] = "0x" + "11" * 65
        elif kind == "hash-mismatch":
            rec = record_of({k: v + 1 for k, v in arrays.items()}, i, run_id, g, 10)
        elif kind == "signer-swap":
            rec["signer"] = accounts[0].address
        elif kind == "replayed-round":
            rec = record_of(arrays, i, run_id, g, 10, rnd=2)
        elif kind == "other-registry":
            rec = record_of(arrays, i, run_id, g, 10, registry="0x" + "12" * 20)
        elif kind == "other-global":
            rec = record_of(arrays, i, run_id, {k: v + 1 for k, v in g.items()}, 10)
        elif kind == "other-count":
            rec = record_of(arrays, i, run_id, g, 11)
        elif kind == "not-enrolled":
            rec = record_of(arrays, i, run_id, g, 10, account=outsider)
        return reply(node, arrays, num_examples=10, extra={"audit": ConfigRecord(rec)})

    @settings(max_examples=65, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(kinds=st.lists(st.sampled_from(KINDS + SIGNATURE_KINDS), min_size=16, max_size=30),
           seed=st.integers(0, 2**32 - 1), positions=st.randoms(use_true_random=False))
    def one_round(kinds, seed, positions):
        run_id = next(RUN_IDS)
        rng = np.random.default_rng(seed)
        g = adapter(seed % 1000)
        nodes = node_ids(GOOD + len(kinds), seed=seed)
        good = [signed(nodes[i], {k: g[k] + 0.1 * v for k, v in adapter(seed + i).items()}, int(rng.integers(1, 50)),
                       i, run_id, g) for i in range(GOOD)]
        bad = []
        for j, kind in enumerate(kinds):
            node, arrays = nodes[GOOD + j], {k: g[k] + 0.1 * v for k, v in adapter(seed + 100 + j).items()}
            bad.append(bad_signed(kind, node, arrays, GOOD + j, run_id, g) if kind in SIGNATURE_KINDS
                       else malformed(kind, node, adapter(seed + 100 + j), rng))
        mixed = list(good)
        for m in bad:
            mixed.insert(positions.randint(0, len(mixed)), m)
        baseline, _ = run_round(make_plain(), g, [m for m in mixed if any(m is x for x in good)], nodes)
        store = ArtifactStore(str(tmp_path / f"run-{run_id}"))
        agg, report = run_round(make_audited((chain, store, run_id)), g, mixed, nodes)
        thrown["n"] += len(bad)
        assert {r["node-id"] for r in report.rejected} == set(nodes[GOOD:]), report.rejected
        assert chain.get_round(run_id, 1)["count"] == GOOD  # on chain: exactly the accepted updates
        assert len(store.read_document(store.round_path(1))[1]["rejected"]) == len(bad)  # every refusal on record
        assert (agg is None) == (baseline is None)
        if agg is not None:
            assert all(np.array_equal(agg[k], baseline[k]) for k in agg), f"aggregate changed by {kinds}"

    quiet = logging.getLogger("fedledger")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        one_round()
    finally:
        quiet.setLevel(level)
    assert thrown["n"] >= 1000, thrown
