"""Synchronous gossip relayed through Flower: consensus distance shrinks, drop-outs, bad payloads,
and topology peer i is the node holding partition i (node ids are random, as in a real run)."""

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedledger.inprocess import InProcessGrid
from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord
from fedledger.strategies.peer import gossip_mix, metropolis_weights

from .test_serverless_helpers import (
    adapter, expected_fedavg, fake_app, fake_train_local, grid, maxdiff, run_relay, trained,
)


def _run(n, k=2, steps=1, rounds=1, g=None, topology="complete"):
    return run_relay("gossip", n, g=g, rounds=rounds, gossip_k=k, gossip_steps=steps, topology=topology, seed=1)


def test_consensus_distance_shrinks_to_the_true_fedavg():
    res, _ = _run(8, k=2, steps=12, topology="geometric")
    assert sorted(res.central) == [0, 1]
    cons = res.history[0]["consensus"]
    maxes = [c["consensus-max"] for c in cons]
    means = [c["consensus-mean"] for c in cons]
    assert maxes[-1] < 0.1 * maxes[0] and means[-1] < 0.1 * means[0]
    assert all(b <= a * 1.05 for a, b in zip(means, means[1:]))  # (near-)monotone
    # the relay's reported mean equals FedAvg (mass conserved by the doubly stochastic mixing)
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(adapter(0), range(8))) < 1e-4


def test_each_round_reports_bytes_and_simulated_time():
    res, _ = _run(6, k=1, rounds=6)
    h0 = res.history[0]
    assert res.history[-1]["dissemination-seconds"] is not None  # round-1 updates reached everyone
    assert h0["dissemination-seconds"] is None or h0["dissemination-seconds"] <= h0["sim-time"]
    for h in res.history:
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
    g.drop = {g.node_of[1]}
    res, _ = _run(6, g=g)
    h = res.history[0]
    assert sorted(res.central) == [0, 1] and 1 not in h["participants"] and h["dropped"] == [1]
    assert all(1 not in e for ex in h["exchanges"] for e in ex)
    # the mass-weighted mean is conserved by the mixing: FedAvg of the peers that replied
    assert maxdiff(as_numpy_dict(res.arrays), expected_fedavg(adapter(0), [0, 2, 3, 4, 5])) < 1e-5


class Recording(InProcessGrid):
    """Remembers, per partition, the neighbour models its node was handed in each mix step, and
    every reply a node sent."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.mixed: dict[int, dict[int, dict]] = {}
        self.replies: list[Message] = []

    def _handle(self, msg):
        if str(msg.content["config"].get("phase", "")) == "mix":
            me = self.partition_of[msg.metadata.dst_node_id]
            self.mixed[me] = {int(k[len("peer-"):]): as_numpy_dict(msg.content[k])
                              for k in msg.content.array_records if k.startswith("peer-")}
        reply = super()._handle(msg)
        self.replies.append(reply)
        return reply


def test_topology_peer_i_is_the_node_holding_partition_i(tmp_path):
    """A path 0 - 2 - 3 - 1 (partitions 0 and 1 at the ends): each node is handed exactly its
    path neighbours' models, and the model named after partition 2 is the one the node holding
    partition 2 trained."""
    f = tmp_path / "path.txt"
    f.write_text("0 2 0.01 1e6\n2 3 0.01 1e6\n3 1 0.01 1e6\n")
    g = Recording(fake_app(), 4, {})
    assert [g.partition_of[n] for n in g.get_node_ids()] != [0, 1, 2, 3]  # id order is not partition order
    res, _ = _run(4, k=2, g=g, topology=str(f))
    assert g.mixed.keys() == {0, 1, 2, 3}
    assert {p: sorted(models) for p, models in g.mixed.items()} == {0: [2], 1: [3], 2: [0, 3], 3: [1, 2]}
    for p, models in g.mixed.items():
        for j, model in models.items():
            assert maxdiff(model, trained(adapter(0), j)) == 0.0  # really partition j's own update
    h = res.history[0]
    assert h["exchanges"] == [[[0, 2], [1, 3], [2, 3]]]
    assert set(h["link-bytes"]) == {"0->2", "2->0", "2->3", "3->2", "3->1", "1->3"}
    assert not any("partition-id" in r.content.metric_records["metrics"] for r in g.replies)


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
