"""Fake (numpy-only) peers for the serverless tests: a real Flower ClientApp whose local
"training" is a deterministic pull towards a per-peer target, plus the relay's grid."""

from __future__ import annotations

import numpy as np
from flwr.clientapp import ClientApp

SHAPES = (("layer.lora_A.weight", (4, 6)), ("layer.lora_B.weight", (6, 4)), ("bias", (3,)))


def adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES}


def examples_of(pid: int) -> int:
    return 10 + 7 * pid


def fake_train_local(msg, context):
    """Move 50 % of the way to this peer's target; num-examples depends on the peer."""
    from fedledger.strategies.kernels import as_numpy_dict

    pid = int(context.node_config["partition-id"])
    arrays = as_numpy_dict(msg.content["arrays"])
    target = adapter(1000 + pid)
    out = {k: (v + 0.5 * (target[k] - v)).astype(np.float32) for k, v in arrays.items()}
    return out, {"num-examples": examples_of(pid), "train-loss": float(pid), "partition-id": pid}


def fake_app() -> ClientApp:
    from fedledger import client_peer

    app = ClientApp()
    client_peer.register(app, fake_train_local)
    return app


def expected_fedavg(initial: dict, pids) -> dict:
    """What one round of FedAvg (weighted by examples) of the fake peers gives."""
    outs, ws = [], []
    for pid in pids:
        target = adapter(1000 + pid)
        outs.append({k: initial[k] + 0.5 * (target[k] - initial[k]) for k in initial})
        ws.append(examples_of(pid))
    w = np.asarray(ws, dtype=np.float64) / sum(ws)
    return {k: sum(wi * o[k].astype(np.float64) for wi, o in zip(w, outs)) for k in initial}


def grid(num_nodes: int, app=None):
    from fedledger.inprocess import InProcessGrid

    return InProcessGrid(app or fake_app(), num_nodes, {})


def test_fake_training_is_deterministic():
    class Ctx:
        node_config = {"partition-id": 2}

    class Msg:
        content = {"arrays": adapter(0)}

    a, _ = fake_train_local(Msg, Ctx)
    b, _ = fake_train_local(Msg, Ctx)
    assert all(np.array_equal(a[k], b[k]) for k in a)
