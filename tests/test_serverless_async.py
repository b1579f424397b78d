"""Asynchronous gossip: the discrete-event schedule, dissemination time, the Flower relay."""

import math

import numpy as np
import pytest

from fedledger.strategies import topology as T
from fedledger.strategies.async_engine import AsyncEngine, simulate_dissemination
from fedledger.strategies.kernels import as_numpy_dict
from fedledger.strategies.peer import async_merge, staleness_weight

from .test_serverless_helpers import grid, run_relay


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_dissemination_finishes_and_takes_at_least_compute_plus_a_hop(mode):
    topo = T.complete(8, heterogeneity=0.5, seed=0)
    out = simulate_dissemination(topo, mode, k=2, nbytes=1e6, local_steps=2, step_seconds=1.0, seed=0)
    fastest = min(topo.compute_time(p, 2, 1.0) for p in topo.nodes)
    assert math.isfinite(out["seconds"])
    assert out["seconds"] >= fastest + topo.path_time(0, 1, 1e6) - 1e-9


def test_async_beats_barrier_when_speeds_differ_a_lot():
    # one straggler 10x slower: the barrier makes everyone wait for it every round
    topo = T.complete(10, seed=0)
    for p in topo.nodes:
        topo.graph.nodes[p]["speed"] = 0.1 if p == 0 else 1.0
    sync = [simulate_dissemination(topo, "sync", 2, 1e5, 1, 1.0, seed=s)["seconds"] for s in range(3)]
    asyn = [simulate_dissemination(topo, "async", 2, 1e5, 1, 1.0, seed=s)["seconds"] for s in range(3)]
    assert np.mean(asyn) < np.mean(sync)


def test_engine_runs_equal_iterations_without_barrier():
    topo = T.complete(5, heterogeneity=0.8, seed=1)
    eng = AsyncEngine(topo, k=1, nbytes=1e5, local_steps=1, step_seconds=1.0, iterations=3, seed=0).run()
    assert all(v == 3 for v in eng.version.values())
    assert sorted(eng.round_times) == [1, 2, 3]
    # no peer waits for a barrier: the fastest one is done before every peer has finished its 3rd iteration
    fast = max(topo.nodes, key=topo.speed)
    assert eng.finish_times[fast][-1] < eng.round_times[3]


def test_staleness_weighting():
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == pytest.approx(0.5)
    own, other = np.zeros(4, np.float32), np.ones(4, np.float32)
    fresh = async_merge(own, 10, [(other, 10, 0)])
    stale = async_merge(own, 10, [(other, 10, 8)])
    assert fresh[0] == pytest.approx(0.5) and stale[0] < fresh[0]


def test_async_runner_through_flower_evaluates_every_round():
    res, g = run_relay("async-gossip", 6, rounds=3, gossip_k=1, heterogeneity=0.5, seed=2)
    assert sorted(res.central) == [0, 1, 2, 3]
    assert [h["round"] for h in res.history] == [1, 2, 3]
    assert all(ctx.state["peer.meta"]["version"] == 3 for ctx in g.contexts.values())
    assert all(np.isfinite(v).all() for v in as_numpy_dict(res.arrays).values())
    times = [h["sim-time"] for h in res.history]
    assert times == sorted(times) and res.history[-1]["total-peer-bytes"] >= 0
    assert sorted(res.train_metrics) == [1, 2, 3]
    assert res.train_metrics[1]["num-examples"] == sum(10 + 7 * p for p in range(6))
    assert sum(h["relay-messages"] for h in res.history) > 0


def test_async_runner_survives_a_silent_peer():
    g = grid(5)
    g.drop = {g.node_of[3]}
    res, _ = run_relay("async-gossip", 5, g=g, rounds=2, gossip_k=2, seed=0)
    assert sorted(res.central) == [0, 1, 2]
    assert res.history[-1]["participants"] == [0, 1, 2, 4] and res.history[-1]["dropped"] == [3]
