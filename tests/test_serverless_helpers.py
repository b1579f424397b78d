"""Fake (numpy-only) peers for the serverless tests: a real Flower ClientApp whose local
"training" is a deterministic pull towards a per-peer target, and the relay's grid (random
64-bit node ids, as in a real run)."""

from __future__ import annotations

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

SHAPES = (("layer.lora_A.weight", (4, 6)), ("layer.lora_B.weight", (6, 4)), ("bias", (3,)))


def adapter(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (scale * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES}


def examples_of(pid: int) -> int:
    return 10 + 7 * pid


def trained(initial: dict, pid: int) -> dict:
    """What the fake training of partition ``pid`` makes of ``initial`` (float32, as the peer does)."""
    target = adapter(1000 + pid)
    return {k: (v + 0.5 * (target[k] - v)).astype(np.float32) for k, v in initial.items()}


def fake_train_local(msg, context):
    """Move 50 % of the way to this peer's target; num-examples depends on the peer. Like the
    real ClientApp's ``train_local`` it reports its partition id (the peer replies must drop it)."""
    from fedledger.strategies.kernels import as_numpy_dict

    pid = int(context.node_config["partition-id"])
    out = trained(as_numpy_dict(msg.content["arrays"]), pid)
    return out, {"num-examples": examples_of(pid), "train-loss": float(pid), "partition-id": pid}


def fake_app() -> ClientApp:
    from fedledger import client_peer

    app = ClientApp()
    client_peer.register(app, fake_train_local)
    return app


def hub_app() -> ClientApp:
    """The fake peers plus a plain ``train`` handler, for hub (server FedAvg) rounds."""
    from fedledger.strategies.kernels import to_arrayrecord

    app = fake_app()

    @app.train()
    def _train(msg: Message, context):
        arrays, metrics = fake_train_local(msg, context)
        metrics.pop("partition-id")
        return Message(RecordDict({"arrays": to_arrayrecord(arrays), "metrics": MetricRecord(metrics)}), reply_to=msg)

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


def grid(num_nodes: int, app=None, run_config=None, seed: int = 0):
    from fedledger.inprocess import InProcessGrid

    return InProcessGrid(app or fake_app(), num_nodes, run_config or {}, seed=seed)


def run_relay(name: str, n: int, *, g=None, rounds: int = 1, **kw):
    """Run ``build_relay(name, **kw)`` over the fake peers; central evaluation records the round."""
    from fedledger.strategies.kernels import to_arrayrecord
    from fedledger.strategies.relay import build_relay

    g = g if g is not None else grid(n)
    result = build_relay(name, **kw).run(g, g.node_of, to_arrayrecord(adapter(0)), rounds,
                                         evaluate_fn=lambda r, arrays: {"round": r})
    return result, g


def maxdiff(a, b) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in b)


def test_fake_training_is_deterministic():
    class Ctx:
        node_config = {"partition-id": 2}

    class Msg:
        content = {"arrays": adapter(0)}

    a, _ = fake_train_local(Msg, Ctx)
    b, _ = fake_train_local(Msg, Ctx)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_grid_node_ids_are_random_and_partition_i_is_the_i_th_node_created():
    g = grid(6)
    ids = g.node_ids
    assert len(set(ids)) == 6 and all(2 <= i < 2**64 for i in ids)
    assert list(g.get_node_ids()) == sorted(ids) != ids  # id order says nothing about partitions
    assert [g.contexts[nid].node_config["partition-id"] for nid in ids] == list(range(6))
    assert g.partition_of == {nid: i for i, nid in enumerate(ids)}
    assert g.node_of == {i: nid for i, nid in enumerate(ids)}
    assert grid(6, seed=1).node_ids != ids and grid(6).node_ids == ids  # seeded
