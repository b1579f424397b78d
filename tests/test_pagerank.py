"""PageRankTrust on synthetic LoRA-shaped updates: exclusion, validation, wrapping, detection."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg, Krum

from fedledger.clients import attacks as A
from fedledger.strategies import pagerank as pr
from fedledger.strategies.detection import detection_metrics, mean_detection
from fedledger.strategies.kernels import as_numpy_dict, flatten, to_arrayrecord
from fedledger.strategies.pagerank import PageRankTrust, trust_scores

from .conftest import make_reply

SHAPES = {"m.lora_A.weight": (8, 64), "m.lora_B.weight": (64, 8)}
N, F = 10, 3  # 30 % attackers: partitions 0, 1, 2


def _global(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _honest(g, rng, base):
    return {k: g[k] + base[k] + 1.0 * rng.normal(size=s).astype(np.float32) * np.abs(base[k]).mean() for k, s in SHAPES.items()}


def _round(attack, seed=0, n=N, f=F, bad=None):
    rng = np.random.default_rng(seed)
    g = _global(seed)
    base = {k: 0.05 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    replies = []
    for pid in range(n):
        local = _honest(g, rng, base)
        if pid < f and attack != "none":
            local = A.apply_update_attack(attack, local, g, rng)
        if bad is not None and pid in bad:
            local = bad[pid](local)
        replies.append(make_reply(local, num_examples=20, node_id=100 + pid, metrics={"partition-id": pid}))
    reference = _honest(g, rng, base)
    return g, replies, reference


def _start(strategy, g, n=N):
    grid = InProcessGrid(app=None, num_nodes=n, run_config={})
    msgs = list(strategy.configure_train(1, to_arrayrecord(g), ConfigRecord(), grid))
    assert len(msgs) == n
    return msgs


from fedledger.inprocess import InProcessGrid  # noqa: E402


@pytest.mark.parametrize("attack", ["sign-flip", "noise", "scale", "free-rider"])
def test_trust_excludes_attackers_with_reference(attack):
    g, replies, ref = _round(attack)
    s = PageRankTrust(reference_fn=lambda rnd, arrays: ref, malicious=range(F), min_available_nodes=1, min_train_nodes=1)
    _start(s, g)
    arrays, metrics = s.aggregate_train(1, replies)
    rec = s.trust_history[1]
    assert sorted(rec["excluded"]) == list(range(F)), rec["trust"]
    assert s.detection[1]["f1"] == 1.0
    assert metrics["trust-excluded"] == F
    # the aggregate stays close to the honest mean, far from the attackers' pull
    honest_mean = np.mean([flatten(as_numpy_dict(r.content["arrays"])) for r in replies[F:]], axis=0)
    new = flatten(as_numpy_dict(arrays))
    assert np.linalg.norm(new - honest_mean) < 0.5 * np.linalg.norm(honest_mean - flatten(g))


def test_no_attack_excludes_nobody():
    g, replies, ref = _round("none")
    s = PageRankTrust(reference_fn=lambda rnd, arrays: ref, malicious=[])
    _start(s, g)
    arrays, _ = s.aggregate_train(1, replies)
    assert s.trust_history[1]["excluded"] == [] and arrays is not None
    assert s.detection[1]["f1"] == 1.0


def test_median_anchor_without_reference_catches_colluding_sign_flip():
    g, replies, _ = _round("sign-flip", seed=2)
    s = PageRankTrust(malicious=range(F))
    _start(s, g)
    s.aggregate_train(1, replies)
    assert s.trust_history[1]["anchor"] == "median"
    assert sorted(s.trust_history[1]["excluded"]) == list(range(F))


def test_invalid_updates_rejected_before_similarity(monkeypatch, caplog):
    bad = {3: lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()},
           4: lambda a: {k: (np.zeros((2, 2), np.float32) if "lora_A" in k else v) for k, v in a.items()},
           5: lambda a: {**a, "m.lora_B.weight": np.where(np.arange(a["m.lora_B.weight"].size).reshape(a["m.lora_B.weight"].shape) == 0, np.inf, a["m.lora_B.weight"]).astype(np.float32)}}
    g, replies, ref = _round("none", bad=bad)
    seen = {}
    real = pr.gram_with_reference

    def spy(x, r=None):
        seen["rows"] = x.shape[0]
        assert np.all(np.isfinite(x))
        return real(x, r)

    monkeypatch.setattr(pr, "gram_with_reference", spy)
    s = PageRankTrust(reference_fn=lambda rnd, arrays: ref, malicious=[])
    _start(s, g)
    with caplog.at_level(logging.WARNING, logger="fedledger"):
        s.aggregate_train(1, replies)
    assert seen["rows"] == N - 3
    reasons = {r["partition-id"]: r["reason"] for r in s.trust_history[1]["rejected"]}
    assert set(reasons) == {3, 4, 5}
    assert "NaN/Inf" in reasons[3] and "wrong shape" in reasons[4] and "NaN/Inf" in reasons[5]
    assert "rejected update from node 103" in caplog.text


@pytest.mark.parametrize("inner", [lambda: FedAvg(min_available_nodes=1, min_train_nodes=1),
                                   lambda: Krum(num_malicious_nodes=F, min_available_nodes=1, min_train_nodes=1)])
def test_wrapper_around_flower_strategies(inner):
    g, replies, ref = _round("sign-flip", seed=4)
    s = PageRankTrust(inner(), reference_fn=lambda rnd, arrays: ref, malicious=range(F))
    _start(s, g)
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and sorted(s.trust_history[1]["excluded"]) == list(range(F))
    new = flatten(as_numpy_dict(arrays))
    honest = np.mean([flatten(as_numpy_dict(r.content["arrays"])) for r in replies[F:]], axis=0)
    flipped = np.mean([flatten(as_numpy_dict(r.content["arrays"])) for r in replies[:F]], axis=0)
    assert np.linalg.norm(new - honest) < np.linalg.norm(new - flipped)
    with pytest.raises(TypeError):
        PageRankTrust(FedAvg(), fraction_train=0.5)


def test_history_carries_trust_across_rounds():
    g, replies, ref = _round("sign-flip", seed=5)
    s = PageRankTrust(reference_fn=lambda rnd, arrays: ref, malicious=range(F))
    _start(s, g)
    s.aggregate_train(1, replies)
    assert s.trust_state[0] < 0.5 and s.trust_state[F] > 1.0
    # round 2: no reference any more; history anchors trust
    s.reference_fn = lambda rnd, arrays: None
    g2, replies2, _ = _round("sign-flip", seed=6)
    s.global_arrays = g2
    s.aggregate_train(2, replies2)
    assert s.trust_history[2]["anchor"] == "history"
    assert sorted(s.trust_history[2]["excluded"]) == list(range(F))


def test_trust_scores_pure_and_equivariant():
    rng = np.random.default_rng(0)
    base = rng.normal(size=500)
    ups = [base + rng.normal(size=500) for _ in range(6)] + [-(base + rng.normal(size=500)) for _ in range(2)]
    ups = [u.astype(np.float32) for u in ups]
    copy = [u.copy() for u in ups]
    ref = (base + rng.normal(size=500)).astype(np.float32)
    a = trust_scores(ups, reference=ref)
    b = trust_scores(ups, reference=ref)
    np.testing.assert_array_equal(a, b)
    for u, c in zip(ups, copy):
        np.testing.assert_array_equal(u, c)
    assert a.mean() == pytest.approx(1.0) and a[6:].max() < 0.05 and a[:6].min() > 0.5
    perm = rng.permutation(8)
    np.testing.assert_allclose(trust_scores([ups[i] for i in perm], reference=ref), a[perm], rtol=1e-6, atol=1e-9)
    # dict updates work too (serverless peers hand adapters around)
    dicts = [{"w": u.reshape(20, 25)} for u in ups]
    np.testing.assert_allclose(trust_scores(dicts, reference={"w": ref.reshape(20, 25)}), a, rtol=1e-6)
    # history smooths: an attacker with perfect history is pulled up, still below uniform
    h = trust_scores(ups, reference=ref, history=np.ones(8), history_weight=0.3)
    assert h[7] == pytest.approx(0.3 + 0.7 * a[7])
    # plain PageRank (no anchor) cannot single out the colluding pair: the note's finding
    plain = trust_scores(ups, anchor="none")
    assert plain[6:].min() > 0.5
    with pytest.raises(ValueError):
        trust_scores(ups, anchor="bogus")


def test_detection_metrics_known_case():
    m = detection_metrics(excluded=[0, 1, 5], malicious=[0, 1, 2], participants=range(10))
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3) and m["f1"] == pytest.approx(2 / 3)
    assert detection_metrics([], [], range(4))["f1"] == 1.0
    assert detection_metrics([], [1], range(4))["f1"] == 0.0
    assert detection_metrics([1], [1, 9], range(4))["recall"] == 1.0  # 9 did not take part
    assert mean_detection([{"precision": 1, "recall": 0.5, "f1": 2 / 3}, {"precision": 0, "recall": 0, "f1": 0}])["recall"] == 0.25


def test_kwargs_from_run_config():
    kw = pr.pagerank_kwargs_from_config({"trust-threshold": 0.4, "trust-anchor": "median", "malicious": "0,3",
                                         "trust-pretrusted": "1,2", "trust-clip": "false", "other": 1})
    assert kw == {"threshold": 0.4, "anchor": "median", "malicious": [0, 3], "pretrusted": [1, 2], "clip": False}
    PageRankTrust(**kw, fraction_train=1.0)  # accepted by the constructor, FedAvg kwargs too
    with pytest.raises(ValueError, match="trust-anchor"):
        pr.pagerank_kwargs_from_config({"trust-anchor": "x"})
    with pytest.raises(ValueError, match="trust-threshold"):
        pr.pagerank_kwargs_from_config({"trust-threshold": "high"})


def test_wrapper_reweight_and_clip_forward_to_inner():
    g, replies, ref = _round("scale", seed=7)
    seen = {}

    class Spy(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen["n"] = [float(r.content["metrics"]["num-examples"]) for r in replies]
            seen["norms"] = [float(np.linalg.norm(flatten(as_numpy_dict(r.content["arrays"])) - flatten(g))) for r in replies]
            return super().aggregate_train(server_round, replies)

    s = PageRankTrust(Spy(min_available_nodes=1, min_train_nodes=1), reference_fn=lambda rnd, arrays: ref,
                      reweight_inner=True)
    _start(s, g)
    s.aggregate_train(1, replies)
    assert len(seen["n"]) == N - F and all(0 < n < 20 * 3 for n in seen["n"]) and len(set(seen["n"])) > 1
    ref_norm = float(np.linalg.norm(flatten(ref) - flatten(g)))
    assert max(seen["norms"]) <= ref_norm * (1 + 1e-4)
