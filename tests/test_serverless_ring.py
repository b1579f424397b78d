"""Ring all-reduce relayed through Flower: equals FedAvg, 2(N-1)/N bytes per peer, routes
around drop-outs and malformed chunks. Peers are partitions; node ids are random."""

import logging

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedledger.core.pipeline import RoundPipeline
from fedledger.inprocess import InProcessGrid
from fedledger.strategies import topology as T
from fedledger.strategies.kernels import as_numpy_dict, flatten, to_arrayrecord
from fedledger.strategies.peer import simulate_ring_allreduce, weighted_vector

from .test_serverless_helpers import (
    adapter, expected_fedavg, fake_app, grid, hub_app, maxdiff, run_relay,
)


def _run(n, order="tsp", rounds=1, g=None, topology="complete"):
    return run_relay("ring", n, g=g, rounds=rounds, ring_order=order, topology=topology)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_ring_equals_fedavg(n):
    res, _ = _run(n, topology="geometric" if n > 2 else "complete")
    assert sorted(res.central) == [0, 1]
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(adapter(0), range(n))) < 1e-5
    assert res.history[0]["participants"] == list(range(n))


def test_ring_equals_the_hub_fedavg_of_the_same_peers():
    """Same fake peers, same initial adapter: Flower's own FedAvg through the round pipeline and
    the ring (where the server never averages) end on the same model."""
    n = 5
    hub = RoundPipeline(FedAvg(fraction_evaluate=0.0, min_available_nodes=n))
    hub_result = hub.start(grid=grid(n, hub_app()), initial_arrays=to_arrayrecord(adapter(0)), num_rounds=1)
    ring, _ = _run(n)
    assert hub.reports[1].aggregated == n
    assert maxdiff(as_numpy_dict(ring.arrays), as_numpy_dict(hub_result.arrays)) < 1e-6


def test_every_peer_ends_with_the_average_and_trains_from_it():
    g = grid(4)
    res, _ = _run(4, rounds=2, g=g)
    models = [as_numpy_dict(ctx.state["peer.model"]) for ctx in g.contexts.values()]
    assert len(models) == 4
    for m in models:
        assert maxdiff(m, as_numpy_dict(res.arrays)) < 1e-5
    # round 2 trained from round 1's average: the fake update is affine, so FedAvg twice
    once = expected_fedavg(adapter(0), range(4))
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(once, range(4))) < 1e-5
    assert sorted(res.train_metrics) == [1, 2] and "partition-id" not in res.train_metrics[1]


@pytest.mark.parametrize("n", [3, 5, 10])
def test_bytes_per_peer_is_2_n_minus_1_over_n(n):
    res, _ = _run(n)
    h = res.history[0]
    vec_bytes = (flatten(adapter(0)).size + 1) * 4  # the weighted vector carries one extra value
    expect = 2 * (n - 1) / n * vec_bytes
    for p in range(n):
        assert abs(h["peer-bytes-sent"][str(p)] - expect) <= 2 * (n - 1) * 4  # chunk rounding: <= 1 value per step
    assert h["total-peer-bytes"] == pytest.approx(2 * (n - 1) * vec_bytes, abs=4)
    assert h["relay-bytes"] > 0 and h["relay-messages"] == n * (1 + 2 * (n - 1) + 1)


def test_pure_ring_simulation_matches_weighted_mean():
    rng = np.random.default_rng(0)
    vecs = [weighted_vector({"x": rng.standard_normal(37).astype(np.float32)}, n) for n in (3, 9, 1, 4, 6, 2, 8)]
    bufs, sent = simulate_ring_allreduce(vecs)
    total = np.sum(np.stack(vecs).astype(np.float64), axis=0)
    for b in bufs:
        np.testing.assert_allclose(b, total, rtol=1e-5, atol=1e-5)
    assert sum(sent) == 2 * 6 * 38 * 4


def test_tsp_ring_order_is_used():
    res, _ = _run(9, order="tsp", topology="geometric")
    topo = T.build("geometric", 9, seed=0)  # what the runner builds (seed 0)
    naive = T.ring_cycle_latency(topo, list(range(9)))
    assert sorted(res.history[0]["ring-order"]) == list(range(9))
    assert T.ring_cycle_latency(topo, res.history[0]["ring-order"]) <= naive + 1e-12


def test_peer_that_never_replies_is_routed_around():
    g = grid(5)
    g.drop = {g.node_of[2]}
    res, _ = _run(5, g=g)
    assert res.history[0]["participants"] == [0, 1, 3, 4] and res.history[0]["dropped"] == [2]
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(adapter(0), [0, 1, 3, 4])) < 1e-5


class DropMidRing(InProcessGrid):
    """The node of partition ``victim`` stops replying after ``after`` messages."""

    def __init__(self, *a, victim=1, after=3, **kw):
        super().__init__(*a, **kw)
        self.victim, self.after, self.seen = self.node_of[victim], after, 0

    def _handle(self, msg):
        if msg.metadata.dst_node_id == self.victim:
            self.seen += 1
            if self.seen > self.after:
                self.drop.add(self.victim)
        return super()._handle(msg)


def test_peer_dropping_mid_ring_reforms_the_ring_and_completes():
    g = DropMidRing(fake_app(), 6, {}, victim=1, after=3)
    res, _ = _run(6, g=g)
    h = res.history[0]
    assert h["restarts"] == 1 and h["dropped"] == [1]
    assert h["participants"] == [0, 2, 3, 4, 5]
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(adapter(0), [0, 2, 3, 4, 5])) < 1e-5


class CorruptChunks(InProcessGrid):
    """The node of partition 3 sends NaN chunks."""

    def _handle(self, msg):
        reply = super()._handle(msg)
        if reply is not None and msg.metadata.dst_node_id == self.node_of[3] and "chunk" in reply.content.array_records:
            c = reply.content["chunk"]["chunk"].numpy()
            reply.content["chunk"] = ArrayRecord({"chunk": __import__("torch").full((c.size,), float("nan"))})
        return reply


def test_malformed_chunk_is_dropped_and_sender_routed_around(caplog):
    g = CorruptChunks(fake_app(), 5, {})
    with caplog.at_level(logging.WARNING, logger="fedledger"):
        res, _ = _run(5, g=g)
    assert any("dropped ring chunk" in r.message and "NaN" in r.message for r in caplog.records)
    h = res.history[0]
    assert 3 not in h["participants"] and 3 in h["dropped"] and h["restarts"] >= 1
    out = as_numpy_dict(res.arrays)
    assert all(np.isfinite(v).all() for v in out.values())
    assert maxdiff(out, expected_fedavg(adapter(0), [0, 1, 2, 4])) < 1e-5


def test_handler_never_merges_a_wrong_shape_chunk():
    from fedledger.client_peer import VEC_KEY, handle_ring

    from .test_serverless_helpers import fake_train_local

    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(), run_config={})
    first = Message(RecordDict({"arrays": to_arrayrecord(adapter(0)), "config": ConfigRecord({"phase": "train"})}),
                    dst_node_id=1, message_type="train.ring")
    handle_ring(first, ctx, fake_train_local)
    before = ctx.state[VEC_KEY]["buf"].numpy().copy()
    bad = Message(RecordDict({"chunk": to_arrayrecord({"chunk": np.ones(3, np.float32)}),
                              "config": ConfigRecord({"phase": "step", "ring-size": 2, "in-index": 0, "in-op": "add",
                                                      "out-index": 1})}), dst_node_id=1, message_type="train.ring")
    reply = handle_ring(bad, ctx, fake_train_local)
    assert reply.content["metrics"]["rejected"] == 1
    assert "wrong shape" in reply.content["status"]["reason"]
    np.testing.assert_array_equal(ctx.state[VEC_KEY]["buf"].numpy(), before)
