"""KD-FedLLM's soft labels (core.softlabels): logit replies decoded once at the boundary (each
malformed reply rejected with its reason), the examples-weighted aggregate against a dense
reference, the trust vectors, and the auditor's replay of the rule."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedledger.core import softlabels as S
from fedledger.core.replay import Replay
from fedledger.core.trust import Contribution, TrustDecision

from .replies import instruction, node_ids

VOCAB, ROWS, K, T = 50, 6, 4, 2.0
IDS = (3, 0, 7)
QUERY = S.LogitQuery(IDS, ROWS, K, T, VOCAB)


def logits(seed: int, rows: int = ROWS, k: int = K) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(VOCAB, size=k, replace=False) for _ in range(rows)]).astype(np.int32)
    values = np.sort(rng.standard_normal((rows, k)) * 3, axis=1)[:, ::-1].astype(np.float16)
    return {S.VALUES: np.ascontiguousarray(values), S.IDS: ids, S.PUBLIC_IDS: np.asarray(IDS, dtype=np.int32)}


def message(node: int, arrays: dict, num_examples=10, extra_records: dict | None = None) -> Message:
    content = RecordDict({"logits": ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": num_examples})})
    for k, v in (extra_records or {}).items():
        content[k] = v
    return Message(content, reply_to=instruction(node, "query.kd_logits"))


def dense_reference(replies, weights) -> np.ndarray:
    """(rows, vocab): the weighted mean of each reply's softmax(values / T) over its top k."""
    out = np.zeros((ROWS, VOCAB))
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    for a, wi in zip(replies, w):
        z = a[S.VALUES].astype(np.float64) / T
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        for r in range(ROWS):
            out[r, a[S.IDS][r]] += wi * p[r]
    return out


def densify(agg) -> np.ndarray:
    out = np.zeros((ROWS, VOCAB))
    for r in range(ROWS):
        np.add.at(out[r], agg[S.AGG_IDS][r], agg[S.PROBS][r].astype(np.float64))
    return out


def test_the_aggregate_is_the_examples_weighted_mean_of_the_sparse_distributions():
    replies = [logits(s) for s in range(3)]
    weights = [10, 30, 5]
    agg = S.aggregate([Contribution(f"c{i}", a, w) for i, (a, w) in enumerate(zip(replies, weights))], T, VOCAB)
    assert agg[S.PROBS].dtype == np.float16 and agg[S.AGG_IDS].dtype == np.int32
    np.testing.assert_allclose(densify(agg), dense_reference(replies, weights), atol=1e-3)
    np.testing.assert_allclose(agg[S.PROBS].astype(np.float64).sum(1), 1.0, atol=2e-3)
    assert agg[S.PROBS].shape[1] <= 3 * K  # the union of the three supports, padded


def test_k_one_is_a_hard_label_per_position():
    a = logits(0, k=1)
    agg = S.aggregate([Contribution("c", a, 1.0)], T, VOCAB)
    assert agg[S.PROBS].shape == (ROWS, 1) and (agg[S.PROBS] == 1).all()
    assert (agg[S.AGG_IDS][:, 0] == a[S.IDS][:, 0]).all()


def test_nothing_to_aggregate_gives_none():
    assert S.aggregate([], T, VOCAB) is None


def test_the_trust_vector_of_a_reply_is_its_distribution_on_the_union_support():
    replies = [logits(s) for s in range(3)]
    keys = S.support(replies, VOCAB)
    for a in replies:
        v = S.dense_on(keys, a, T, VOCAB)
        assert v.shape == keys.shape and abs(v.sum() - ROWS) < 1e-4  # each row's mass, laid out
    rows, ids = keys // VOCAB, keys % VOCAB
    v0 = S.dense_on(keys, replies[0], T, VOCAB)
    dense = dense_reference([replies[0]], [1])
    np.testing.assert_allclose(v0, dense[rows, ids], atol=1e-5)


def test_a_well_formed_reply_is_decoded_to_read_only_views():
    node = node_ids(1)[0]
    u = S.decode_logit_reply(message(node, logits(0), 12), QUERY, max_examples=100)
    assert u.node_id == node and u.num_examples == 12
    assert set(u.arrays) == {S.VALUES, S.IDS, S.PUBLIC_IDS} and not u.arrays[S.VALUES].flags.writeable


def _bad(kind: str) -> dict:
    a = logits(1)
    if kind == "nan":
        a[S.VALUES] = a[S.VALUES].copy()
        a[S.VALUES][2, 1] = np.nan
    elif kind == "id-outside":
        a[S.IDS] = a[S.IDS].copy()
        a[S.IDS][0, 0] = VOCAB
    elif kind == "negative-id":
        a[S.IDS] = a[S.IDS].copy()
        a[S.IDS][1, 2] = -1
    elif kind == "k-larger":
        a = logits(1, k=K + 1)
    elif kind == "k-smaller":
        a = logits(1, k=K - 1)
    elif kind == "rows":
        a = logits(1, rows=ROWS - 1)
    elif kind == "dtype":
        a[S.VALUES] = a[S.VALUES].astype(np.float32)
    elif kind == "ids-dtype":
        a[S.IDS] = a[S.IDS].astype(np.int64)
    elif kind == "repeated-id":
        a[S.IDS] = a[S.IDS].copy()
        a[S.IDS][3, 1] = a[S.IDS][3, 0]
    elif kind == "other-examples":
        a[S.PUBLIC_IDS] = np.asarray((3, 0, 8), dtype=np.int32)
    elif kind == "extra-tensor":
        a["extra"] = np.zeros(3, np.float32)
    return a


@pytest.mark.parametrize("kind, reason", [
    ("nan", "NaN/Inf"), ("id-outside", "outside the vocabulary"), ("negative-id", "outside the vocabulary"),
    ("k-larger", "larger than the k=4 asked"), ("k-smaller", "shape"), ("rows", "shape"), ("dtype", "dtype"),
    ("ids-dtype", "dtype"), ("repeated-id", "twice"), ("other-examples", "other public examples"),
    ("extra-tensor", "logit reply holds"),
])
def test_a_malformed_logit_reply_is_rejected_with_its_reason(kind, reason):
    good, bad = node_ids(2)
    updates, rejected = S.decode_logit_replies([message(good, logits(0)), message(bad, _bad(kind))], QUERY, 100)
    assert [u.node_id for u in updates] == [good]
    assert [r.node_id for r in rejected] == [bad] and reason in rejected[0].reason, rejected[0].reason


@pytest.mark.parametrize("num_examples, reason", [(0, "outside [1, 100]"), (101, "outside"), (2.5, "whole number"),
                                                  ([10, 11], "single number")])
def test_a_logit_reply_claiming_a_bad_weight_is_rejected(num_examples, reason):
    (node,) = node_ids(1)
    _, rejected = S.decode_logit_replies([message(node, logits(0), num_examples)], QUERY, 100)
    assert len(rejected) == 1 and reason in rejected[0].reason


def test_two_array_records_or_a_second_reply_are_rejected():
    a, b = node_ids(2)
    extra = {"more": ArrayRecord({"x": Array(np.zeros(2, np.float32))})}
    updates, rejected = S.decode_logit_replies([message(a, logits(0), extra_records=extra),
                                                message(b, logits(0)), message(b, logits(1))], QUERY, 100)
    assert [u.node_id for u in updates] == [b]
    reasons = sorted(r.reason for r in rejected)
    assert "2 ArrayRecords" in reasons[0] and "second reply" in reasons[1]


def test_received_soft_labels_are_checked_before_a_client_distils():
    agg = S.aggregate([Contribution("c", logits(0), 1.0)], T, VOCAB)
    rec = ArrayRecord({k: Array(v) for k, v in agg.items()})
    assert set(S.decode_soft_labels(rec, ROWS, VOCAB)) == {S.PROBS, S.AGG_IDS}
    with pytest.raises(S.BoundaryError, match="rows"):
        S.decode_soft_labels(rec, ROWS + 1, VOCAB)
    bad = {**agg, S.AGG_IDS: (agg[S.AGG_IDS] + VOCAB).astype(np.int32)}
    with pytest.raises(S.BoundaryError, match="vocabulary"):
        S.decode_soft_labels(ArrayRecord({k: Array(v) for k, v in bad.items()}), ROWS, VOCAB)


def test_the_auditor_replays_the_rule_bit_for_bit_with_the_recorded_trust_decision():
    replies = [logits(s) for s in range(4)]
    entries = [(f"partition-{i}", 100 + i, a, 10 + i) for i, a in enumerate(replies)]
    decision = TrustDecision(scores={f"partition-{i}": 1.0 for i in range(4)}, excluded=("partition-2",))
    live = S.aggregate([Contribution(k, a, float(n)) for k, _, a, n in entries if k != "partition-2"], T, VOCAB)
    replay = Replay({"rule": S.describe(K, T, VOCAB), "layout": None})
    assert replay.ok and replay.rule == S.RULE
    again, error = replay.round(1, {}, entries, decision.to_dict())
    assert error is None
    assert all(np.array_equal(again[k], live[k]) for k in live)
    everyone, _ = replay.round(1, {}, entries, None)
    assert not np.array_equal(everyone[S.PROBS], live[S.PROBS])  # the exclusion matters
