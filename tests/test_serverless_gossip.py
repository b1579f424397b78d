"""Synchronous gossip relayed through Flower: consensus distance shrinks, drop-outs, bad payloads."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord
from fedledger.strategies.peer import gossip_mix, metropolis_weights
from fedledger.strategies.serverless import build_serverless_strategy

from .test_serverless_helpers import adapter, expected_fedavg, fake_train_local, grid


def _run(n, k=2, steps=1, rounds=1, g=None, topology="complete"):
    g = g or grid(n)
    s = build_serverless_strategy("gossip", {"gossip-k": k, "gossip-steps": steps, "topology": topology, "seed": 1}, n)
    evals = []
    res = s.start(grid=g, initial_arrays=to_arrayrecord(adapter(0)), num_rounds=rounds, evaluate_fn=lambda r, a: evals.append(r))
    return s, res, evals


def test_consensus_distance_shrinks_to_the_true_fedavg():
    s, res, evals = _run(8, k=2, steps=12, topology="geometric")
    assert evals == [0, 1]
    cons = s.history[0]["consensus"]
    maxes = [c["consensus-max"] for c in cons]
    means = [c["consensus-mean"] for c in cons]
    assert maxes[-1] < 0.1 * maxes[0] and means[-1] < 0.1 * means[0]
    assert all(b <= a * 1.05 for a, b in zip(means, means[1:]))  # (near-)monotone
    # the relay's reported mean equals FedAvg (mass conserved by the doubly stochastic mixing)
    exp = expected_fedavg(adapter(0), range(8))
    assert max(float(np.abs(as_numpy_dict(res.arrays)[k] - exp[k]).max()) for k in exp) < 1e-4


def test_each_round_reports_bytes_and_simulated_time():
    s, _, _ = _run(6, k=1, rounds=6)
    assert s.history[-1]["dissemination-seconds"] is not None  # round-1 updates reached everyone
    assert s.history[0]["dissemination-seconds"] is None or s.history[0]["dissemination-seconds"] <= s.history[0]["sim-time"]
    for h in s.history:
        assert h["total-peer-bytes"] == pytest.approx(2 * len(h["exchanges"][0]) * h["adapter-bytes"])
        assert h["sim-network-seconds"] > 0 and h["sim-round-seconds"] > h["sim-network-seconds"]


def test_metropolis_mixing_conserves_weighted_sum():
    rng = np.random.default_rng(0)
    nodes = list(range(5))
    xs = {i: rng.standard_normal(7).astype(np.float32) for i in nodes}
    mass = {i: float(i + 1) for i in nodes}
    edges = [(0, 1), (1, 2), (2, 3), (0, 4)]
    w = metropolis_weights(edges, nodes)
    new = {i: gossip_mix(xs[i], mass[i], w[i][i], [(xs[j], mass[j], w[i][j]) for j in w[i] if j != i]) for i in nodes}
    before = sum(mass[i] * xs[i].astype(np.float64) for i in nodes)
    after = sum(new[i][1] * new[i][0].astype(np.float64) for i in nodes)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_dropped_peer_is_skipped_and_round_completes():
    g = grid(6)
    g.drop = {2}
    s, res, evals = _run(6, g=g)
    assert evals == [0, 1] and 1 not in s.history[0]["participants"]
    assert all(1 not in e for ex in s.history[0]["exchanges"] for e in ex)


def test_malformed_neighbour_model_is_dropped_not_merged(caplog):
    from fedledger.client_peer import MODEL_KEY, handle_gossip

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    handle_gossip(Message(RecordDict({"arrays": to_arrayrecord(adapter(0)), "config": ConfigRecord({"phase": "train"})}),
                          dst_node_id=1, message_type="train.gossip"), ctx, fake_train_local)
    before = as_numpy_dict(ctx.state[MODEL_KEY])
    nan = {k: np.full_like(v, np.nan) for k, v in adapter(1).items()}
    msg = Message(RecordDict({"peer-1": to_arrayrecord(nan), "peer-2": to_arrayrecord({"other": np.ones(2, np.float32)}),
                              "config": ConfigRecord({"phase": "mix", "self-weight": 0.4, "w-1": 0.3, "mass-1": 5.0,
                                                      "w-2": 0.3, "mass-2": 5.0})}), dst_node_id=1, message_type="train.gossip")
    with caplog.at_level(logging.WARNING, logger="fedledger"):
        reply = handle_gossip(msg, ctx, fake_train_local)
    assert reply.content["metrics"]["rejected"] == 2
    after = as_numpy_dict(ctx.state[MODEL_KEY])
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-6)
    assert any("NaN" in r.message for r in caplog.records) and any("wrong keys" in r.message for r in caplog.records)
