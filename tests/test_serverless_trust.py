"""PageRank trust inside the serverless exchanges: each peer scores the neighbours it hears from
(its own update is the anchor) and does not merge the ones it distrusts."""

import numpy as np
import pytest
from flwr.clientapp import ClientApp

from fedledger.inprocess import InProcessGrid
from fedledger.strategies.kernels import as_numpy_dict, flatten, to_arrayrecord
from fedledger.strategies.serverless import build_serverless_strategy

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
    return {k: (x[k] + step[k]).astype(np.float32) for k in x}, {"num-examples": 10, "partition-id": pid}


def _run(name, trust, n=6, rounds=2, **cfg):
    from fedledger import client_peer

    app = ClientApp()
    client_peer.register(app, shared_task_train_local)
    run_config = {"trust": trust, "malicious": str(ATTACKER), "seed": 3, "gossip-k": 2, "gossip-steps": 2,
                  "trust-threshold": 0.5, **cfg}
    g = InProcessGrid(app, n, run_config)
    s = build_serverless_strategy(name, run_config, n)
    res = s.start(grid=g, initial_arrays=to_arrayrecord(adapter(0)), num_rounds=rounds)
    return s, flatten(as_numpy_dict(res.arrays))


def _honest_distance(x):
    return float(np.linalg.norm(x - flatten(TARGET)))


@pytest.mark.parametrize("name", ["gossip", "async-gossip"])
def test_peers_distrust_the_sign_flipper_and_stay_closer_to_the_honest_target(name):
    trusted, x_trust = _run(name, "pagerank")
    _, x_plain = _run(name, "none")
    flagged = [h["distrusted"] for h in trusted.history]
    assert any(ATTACKER in f for f in flagged), flagged
    assert all(set(f) <= {ATTACKER} for f in flagged), f"honest peers flagged: {flagged}"
    assert trusted.detection and max(d["f1"] for d in trusted.detection.values()) == 1.0
    assert _honest_distance(x_trust) < 0.7 * _honest_distance(x_plain)


def test_no_trust_no_distrust_record():
    s, _ = _run("gossip", "none", rounds=1)
    assert s.history[0]["distrusted"] == [] and s.detection == {}
