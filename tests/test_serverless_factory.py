"""Factory, FedAvg accounting on the same network, and one run with the real tiny model."""

import time

import numpy as np
import pytest
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from fedledger.strategies import topology as T
from fedledger.strategies.async_gossip import AsyncGossip
from fedledger.strategies.gossip import Gossip
from fedledger.strategies.kernels import as_numpy_dict, to_arrayrecord
from fedledger.strategies.ring import RingAllReduce
from fedledger.strategies.serverless import NetworkAccounting, build_serverless_strategy

from .test_serverless_helpers import adapter, expected_fedavg, fake_app, fake_train_local, grid


def test_factory_reads_run_config(tmp_path):
    assert isinstance(build_serverless_strategy("ring", {"ring-order": "naive"}, 3), RingAllReduce)
    g = build_serverless_strategy("gossip", {"gossip-k": 3, "gossip-steps": 2, "topology": "geometric"}, 5)
    assert isinstance(g, Gossip) and g.k == 3 and g.steps == 2
    assert isinstance(build_serverless_strategy("async-gossip", {}, 4), AsyncGossip)
    with pytest.raises(ValueError):
        build_serverless_strategy("fedavg", {}, 3)
    with pytest.raises(ValueError):
        build_serverless_strategy("ring", {"ring-order": "best"}, 3)
    f = tmp_path / "topo.txt"
    f.write_text("0 1 0.01 1e6\n")  # 3 peers connected, node 2 isolated
    s = build_serverless_strategy("ring", {"topology": str(f)}, 3)
    with pytest.raises(T.TopologyError, match="not connected"):
        s.start(grid=grid(3), initial_arrays=to_arrayrecord(adapter(0)), num_rounds=1)


def test_fedavg_accounting_on_the_same_network():
    app = fake_app()

    @app.train()
    def _train(msg: Message, context):
        arrays, metrics = fake_train_local(msg, context)
        return Message(RecordDict({"arrays": to_arrayrecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

    topo = T.complete(4, latency=0.01, bandwidth=1e5)
    s = NetworkAccounting(FedAvg(fraction_evaluate=0.0, min_available_nodes=4), topo, server=0, local_steps=2)
    res = s.start(grid=grid(4, app), initial_arrays=to_arrayrecord(adapter(0)), num_rounds=1)
    h = s.history[0]
    nb = sum(v.nbytes for v in adapter(0).values())
    assert h["server-node"] == 0 and h["total-peer-bytes"] == pytest.approx(6 * nb)
    assert h["sim-network-seconds"] == pytest.approx(2 * (0.01 + 3 * nb / 1e5))
    exp = expected_fedavg(adapter(0), range(4))
    out = as_numpy_dict(res.arrays)
    assert max(float(np.abs(out[k] - exp[k]).max()) for k in exp) < 1e-5


def test_ring_with_the_real_tiny_model_matches_fedavg_quality():
    """The lead's ClientApp (real tiny Llama + LoRA training) with the ring handlers."""
    from fedledger.client_app import app as client_app
    from fedledger.config import Settings
    from fedledger.inprocess import InProcessGrid
    from fedledger.server_app import make_evaluate_fn
    from fedledger.task import get_task

    from .conftest import TINY

    cfg = {**TINY, "num-rounds": 1, "local-steps": 3, "strategy": "ring"}
    settings = Settings.from_run_config(cfg)
    task = get_task(settings, 3)  # the same cached Task the 3 peers use: one model load
    history = {}
    s = build_serverless_strategy("ring", settings.to_dict(), 3)
    t0 = time.perf_counter()
    res = s.start(grid=InProcessGrid(client_app, 3, cfg), initial_arrays=to_arrayrecord(task.initial_adapter),
                  num_rounds=1, evaluate_fn=make_evaluate_fn(task, settings, history))
    assert history[1]["central"]["eval-loss"] < history[0]["central"]["eval-loss"]
    assert s.history[0]["participants"] == [0, 1, 2]
    assert time.perf_counter() - t0 < 60
