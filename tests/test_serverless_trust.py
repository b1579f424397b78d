"""PageRank trust inside the serverless exchanges: each peer scores the neighbours it hears from
(its own update is the anchor) and does not merge the ones it distrusts."""

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp

from fedledger.inprocess import InProcessGrid
from fedledger.strategies.detection import detection_metrics
from fedledger.strategies.kernels import as_numpy_dict, flatten, to_arrayrecord
from fedledger.strategies.relay import build_relay

from .test_serverless_helpers import adapter

ATTACKER = 0
TARGET = adapter(7)


def shared_task_train_local(msg, context):
    """Honest peers move toward one shared target (+ a little peer-specific noise); the attacker
    sends the sign-flipped, 3x-scaled version of that move."""
    pid = int(context.node_config["partition-id"])
    x = as_numpy_dict(msg.content["arrays"])
    noise = adapter(500 + pid, scale=0.05)
    step = {k: 0.5 * (TARGET[k] - v) + noise[k] for k, v in x.items()}
    if pid == ATTACKER:
        step = {k: -3.0 * s for k, s in step.items()}
    return {k: (x[k] + step[k]).astype(np.float32) for k in x}, {"num-examples": 10}


def _run(name, trust, n=6, rounds=2):
    from fedledger import client_peer

    app = ClientApp()
    client_peer.register(app, shared_task_train_local)
    g = InProcessGrid(app, n, {"trust": trust, "trust-threshold": 0.5})
    res = build_relay(name, seed=3, gossip_k=2, gossip_steps=2).run(g, g.node_of, to_arrayrecord(adapter(0)), rounds)
    honest = [ctx.state[client_peer.MODEL_KEY] for nid, ctx in g.contexts.items() if g.partition_of[nid] != ATTACKER]
    return res, honest


def _honest_distance(models):
    """Mean distance of the honest peers' own models (their ClientApp state) to the honest target."""
    return float(np.mean([np.linalg.norm(flatten(as_numpy_dict(m)) - flatten(TARGET)) for m in models]))


@pytest.mark.parametrize("name", ["gossip", "async-gossip"])
def test_peers_distrust_the_sign_flipper_and_stay_closer_to_the_honest_target(name):
    trusted, honest_trust = _run(name, "pagerank")
    _, honest_plain = _run(name, "none")
    flagged = [h["distrusted"] for h in trusted.history]
    assert any(ATTACKER in f for f in flagged), flagged
    assert all(set(f) <= {ATTACKER} for f in flagged), f"honest peers flagged: {flagged}"
    f1 = [detection_metrics(h["distrusted"], [ATTACKER], h["participants"])["f1"] for h in trusted.history]
    assert max(f1) == 1.0
    assert _honest_distance(honest_trust) < 0.7 * _honest_distance(honest_plain)


def test_no_trust_no_distrust_record():
    res, _ = _run("gossip", "none", rounds=1)
    assert res.history[0]["distrusted"] == [] and res.history[0]["distrusted-votes"] == {}


def _ctx(**run_config):
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                   run_config={"trust": "pagerank", **run_config})


def test_orthogonal_honest_neighbours_are_kept_and_a_flipped_one_is_not():
    """Peer-side scoring: unrelated (near-orthogonal) honest updates are not distrusted just for
    being different from the peer's own; an update against the peer's own direction is."""
    from fedledger.client_peer import START_KEY, _distrusted

    rng = np.random.default_rng(0)
    ctx = _ctx(**{"trust-threshold": 0.5})
    ctx.state[START_KEY] = to_arrayrecord({"w": np.zeros(4000, np.float32)})
    own = {"w": rng.standard_normal(4000).astype(np.float32)}
    a, b = (rng.standard_normal(4000).astype(np.float32) for _ in range(2))
    assert _distrusted(ctx, own, {"1": a, "2": b}) == set()
    assert _distrusted(ctx, own, {"1": a, "2": -3 * own["w"]}) == {"2"}
    assert _distrusted(ctx, own, {"2": -own["w"]}) == {"2"}  # a single neighbour is judged too


def test_scaled_and_free_riding_neighbours_are_not_merged():
    from fedledger.client_peer import START_KEY, _distrusted

    rng = np.random.default_rng(1)
    ctx = _ctx(**{"trust-norm-tol": 3.0})
    ctx.state[START_KEY] = to_arrayrecord({"w": np.zeros(1000, np.float32)})
    own = {"w": rng.standard_normal(1000).astype(np.float32)}
    honest = own["w"] + 0.5 * rng.standard_normal(1000).astype(np.float32)
    assert _distrusted(ctx, own, {"1": honest, "2": 10 * honest, "3": 0.01 * honest}) == {"2", "3"}
    # the tolerance comes from the settings: at 20x the 10x update is merged, the 100x smaller one still is not
    loose = _ctx(**{"trust-norm-tol": 20.0})
    loose.state[START_KEY] = ctx.state[START_KEY]
    assert _distrusted(loose, own, {"1": honest, "2": 10 * honest, "3": 0.01 * honest}) == {"3"}


def test_trust_off_distrusts_nobody():
    from fedledger.client_peer import START_KEY, _distrusted

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"trust": "none"})
    ctx.state[START_KEY] = to_arrayrecord({"w": np.zeros(10, np.float32)})
    own = {"w": np.ones(10, np.float32)}
    assert _distrusted(ctx, own, {"1": -own["w"]}) == set()
