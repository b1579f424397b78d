"""``relay.build_relay``: typed arguments, one clear error for bad ones; the runner's checks of its
peers; one run with the real tiny model."""

import pytest

from fedledger.strategies import topology as T
from fedledger.strategies.async_gossip import AsyncGossip
from fedledger.strategies.gossip import Gossip
from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord
from fedledger.strategies.ring import RingAllReduce
from fedledger.strategies.relay import build_relay

from .test_serverless_helpers import adapter, grid


def test_factory_builds_each_runner_from_typed_arguments():
    assert isinstance(build_relay("ring", ring_order="naive"), RingAllReduce)
    g = build_relay("gossip", gossip_k=3, gossip_steps=2, topology="geometric", local_steps=4)
    assert isinstance(g, Gossip) and (g.k, g.steps, g.local_steps, g.topology) == (3, 2, 4, "geometric")
    a = build_relay("async-gossip", staleness_exponent=1.5, gossip_k=1)
    assert isinstance(a, AsyncGossip) and (a.k, a.staleness_exponent) == (1, 1.5)


@pytest.mark.parametrize("kwargs,error,needle", [
    ({"name": "fedavg"}, ValueError, "not serverless"),
    ({"name": "ring", "ring_order": "best"}, ValueError, "ring-order 'best'"),
    ({"name": "gossip", "gossip_k": 0}, ValueError, "gossip-k"),
    ({"name": "gossip", "gossip_steps": 0}, ValueError, "gossip-steps"),
    ({"name": "async-gossip", "staleness_exponent": -1}, ValueError, "staleness-exponent"),
    ({"name": "ring", "local_steps": 0}, ValueError, "local_steps"),
    ({"name": "ring", "step_seconds": 0}, ValueError, "step_seconds"),
    ({"name": "ring", "bandwidth": 0}, ValueError, "bandwidth"),
    ({"name": "ring", "latency": -1}, ValueError, "latency"),
    ({"name": "ring", "heterogeneity": -0.5}, ValueError, "heterogeneity"),
    ({"name": "ring", "topology": "torus"}, T.TopologyError, "'torus' is not 'complete', 'geometric' or an existing"),
])
def test_bad_argument_is_one_clear_error(kwargs, error, needle):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=needle):
        build_relay(kwargs.pop("name"), **kwargs)


def test_topology_that_does_not_fit_the_run_is_a_topology_error(tmp_path):
    f = tmp_path / "topo.txt"
    f.write_text("0 1 0.01 1e6\n")  # 3 peers expected: peer 2 is isolated
    g = grid(3)
    with pytest.raises(T.TopologyError, match="not connected"):
        build_relay("ring", topology=str(f)).run(g, g.node_of, to_arrayrecord(adapter(0)), 1)
    with pytest.raises(T.TopologyError, match="has 4 peers"):
        build_relay("ring", topology=T.complete(4)).run(g, g.node_of, to_arrayrecord(adapter(0)), 1)
    with pytest.raises(T.TopologyError, match="partitions are \\[0, 1, 5\\]"):
        build_relay("ring").run(g, {0: g.node_of[0], 1: g.node_of[1], 5: g.node_of[2]}, to_arrayrecord(adapter(0)), 1)


def test_runner_refuses_peers_it_cannot_relay_to():
    g = grid(2)
    runner = build_relay("gossip")
    with pytest.raises(ValueError, match="no nodes connected"):
        runner.run(g, {}, to_arrayrecord(adapter(0)), 1)
    with pytest.raises(ValueError, match="same Flower node id"):
        runner.run(g, {0: g.node_of[0], 1: g.node_of[0]}, to_arrayrecord(adapter(0)), 1)
    with pytest.raises(ValueError, match="num_rounds"):
        runner.run(g, g.node_of, to_arrayrecord(adapter(0)), 0)


@pytest.mark.parametrize("name", ["ring", "gossip", "async-gossip"])
def test_evaluate_fn_finds_the_entry_of_the_round_it_evaluates_on_the_runner(name):
    g = grid(4)
    runner = build_relay(name)
    seen = []

    def evaluate_fn(server_round, arrays):
        seen.append((server_round, runner.history[-1]["round"] if runner.history else None))

    res = runner.run(g, g.node_of, to_arrayrecord(adapter(0)), 2, evaluate_fn=evaluate_fn)
    assert seen == [(0, None), (1, 1), (2, 2)]
    assert runner.history is res.history and res.central == {}  # evaluate_fn returned nothing to record


def test_ring_with_the_real_tiny_model_lowers_the_heldout_loss():
    """The lead's ClientApp (real tiny Llama + LoRA training) with the ring handlers."""
    from fedledger.client_app import app as client_app
    from fedledger.config import Settings
    from fedledger.inprocess import InProcessGrid
    from fedledger.task import get_task

    from .conftest import TINY

    cfg = {**TINY, "num-rounds": 1, "local-steps": 3, "strategy": "ring"}
    task = get_task(Settings.from_run_config(cfg), 3)  # the same cached Task the 3 peers use: one model load
    g = InProcessGrid(client_app, 3, cfg)
    res = build_relay("ring", local_steps=3).run(
        g, g.node_of, to_arrayrecord(task.initial_adapter), 1,
        evaluate_fn=lambda r, arrays: task.evaluate(as_numpy_dict(arrays), "heldout", max_batches=None))
    assert res.central[1]["eval-loss"] < res.central[0]["eval-loss"]
    assert res.history[0]["participants"] == [0, 1, 2]
    assert "partition-id" not in res.train_metrics[1]
