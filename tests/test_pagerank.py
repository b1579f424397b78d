"""PageRank trust as a stage of the round pipeline, on synthetic LoRA-shaped updates: exclusion,
anchors, history keyed by the resolved identity, wrapping Flower strategies, clip and reweight."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg, Krum

from fedledger.clients import attacks as A
from fedledger.core import RoundPipeline
from fedledger.strategies import pagerank as pr
from fedledger.strategies.detection import detection_metrics, mean_detection
from fedledger.strategies.kernels import flatten
from fedledger.strategies.pagerank import PageRankScorer, PageRankTrust, trust_scores

from .replies import Partitions, node_ids, reply, run_round

SHAPES = {"m.lora_A.weight": (8, 64), "m.lora_B.weight": (64, 8)}
N, F = 10, 3  # 30 % attackers: partitions 0, 1, 2
ATTACKERS = [f"partition-{p}" for p in range(F)]


def _global(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


def _honest(g, rng, base):
    return {k: g[k] + base[k] + 1.0 * rng.normal(size=s).astype(np.float32) * np.abs(base[k]).mean()
            for k, s in SHAPES.items()}


def _round(attack, seed=0, n=N, f=F, bad=None, claims=None):
    """(global, replies, reference, node ids): partition p is nodes[p]; partitions < f attack."""
    rng = np.random.default_rng(seed)
    nodes = node_ids(n, seed=seed)
    g = _global(seed)
    base = {k: 0.05 * rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    replies, locals_ = [], []
    for pid in range(n):
        local = _honest(g, rng, base)
        if pid < f and attack != "none":
            local = A.apply_update_attack(attack, local, g, rng)
        if bad is not None and pid in bad:
            local = bad[pid](local)
        locals_.append(local)
        metrics = {"partition-id": (claims or {}).get(pid, pid)}  # what a client says about itself: never read
        replies.append(reply(nodes[pid], local, num_examples=20, metrics=metrics))
    reference = _honest(g, rng, base)
    return g, replies, reference, nodes, locals_


def _pipeline(nodes, **kw):
    return RoundPipeline(PageRankTrust(**kw), identities=Partitions(nodes))


@pytest.mark.parametrize("attack", ["sign-flip", "noise", "scale", "free-rider"])
def test_trust_excludes_attackers_with_reference(attack):
    g, replies, ref, nodes, locals_ = _round(attack)
    agg, report = run_round(_pipeline(nodes, reference_fn=lambda rnd, arrays: ref, min_available_nodes=1), g,
                            replies, nodes)
    assert sorted(report.trust["excluded"]) == ATTACKERS, report.trust["scores"]
    assert sorted(d["partition"] for d in report.distrusted) == list(range(F))
    assert detection_metrics([d["partition"] for d in report.distrusted], range(F), range(N))["f1"] == 1.0
    # the aggregate stays close to the honest mean, far from the attackers' pull
    honest_mean = np.mean([flatten(a) for a in locals_[F:]], axis=0)
    assert np.linalg.norm(flatten(agg) - honest_mean) < 0.5 * np.linalg.norm(honest_mean - flatten(g))


def test_no_attack_excludes_nobody():
    g, replies, ref, nodes, _ = _round("none")
    agg, report = run_round(_pipeline(nodes, reference_fn=lambda rnd, arrays: ref), g, replies, nodes)
    assert report.trust["excluded"] == [] and agg is not None and report.aggregated == N


def test_median_anchor_without_reference_catches_colluding_sign_flip():
    g, replies, _, nodes, _ = _round("sign-flip", seed=2)
    _, report = run_round(_pipeline(nodes), g, replies, nodes)
    assert report.trust["anchor"] == "median"
    assert sorted(report.trust["excluded"]) == ATTACKERS


def test_invalid_updates_are_rejected_before_any_similarity(monkeypatch):
    bad = {3: lambda a: {k: np.full_like(v, np.nan) for k, v in a.items()},
           4: lambda a: {k: (np.zeros((2, 2), np.float32) if "lora_A" in k else v) for k, v in a.items()},
           5: lambda a: {**a, "m.lora_B.weight": np.where(np.arange(64 * 8).reshape(64, 8) == 0, np.inf,
                                                          a["m.lora_B.weight"]).astype(np.float32)}}
    g, replies, ref, nodes, _ = _round("none", bad=bad)
    seen = {}
    real = pr.kernels.gram

    def spy(x):
        seen["rows"] = x.shape[0]
        assert np.all(np.isfinite(x))
        return real(x)

    monkeypatch.setattr(pr.kernels, "gram", spy)
    _, report = run_round(_pipeline(nodes, reference_fn=lambda rnd, arrays: ref), g, replies, nodes)
    assert seen["rows"] == N - 3
    reasons = {r["partition"]: r["reason"] for r in report.rejected}
    assert set(reasons) == {3, 4, 5}
    assert "NaN/Inf" in reasons[3] and "shape" in reasons[4] and "NaN/Inf" in reasons[5]


def test_trust_history_is_keyed_by_the_resolved_identity_not_the_partition_a_client_claims():
    """Partition 0 (an attacker) claims to be partition 5 in its metrics: its history stays its own."""
    g, replies, ref, nodes, _ = _round("sign-flip", seed=3, claims={0: 5})
    pipe = _pipeline(nodes, reference_fn=lambda rnd, arrays: ref)
    _, report = run_round(pipe, g, replies, nodes)
    assert "partition-0" in report.trust["excluded"] and "partition-5" not in report.trust["excluded"]
    assert pipe.trust.state["partition-0"] < 0.5 < pipe.trust.state["partition-5"]


@pytest.mark.parametrize("inner", [lambda: FedAvg(min_available_nodes=1, min_train_nodes=1),
                                   lambda: Krum(num_malicious_nodes=F, min_available_nodes=1, min_train_nodes=1)])
def test_trust_in_front_of_flower_strategies(inner):
    g, replies, ref, nodes, locals_ = _round("sign-flip", seed=4)
    agg, report = run_round(RoundPipeline(PageRankTrust(inner(), reference_fn=lambda rnd, arrays: ref),
                                          identities=Partitions(nodes)), g, replies, nodes)
    assert agg is not None and sorted(report.trust["excluded"]) == ATTACKERS
    honest = np.mean([flatten(a) for a in locals_[F:]], axis=0)
    flipped = np.mean([flatten(a) for a in locals_[:F]], axis=0)
    assert np.linalg.norm(flatten(agg) - honest) < np.linalg.norm(flatten(agg) - flipped)
    with pytest.raises(TypeError):
        PageRankTrust(FedAvg(), fraction_train=0.5)


def test_history_carries_trust_across_rounds():
    g, replies, ref, nodes, _ = _round("sign-flip", seed=5)
    scorer = PageRankScorer(reference_fn=lambda rnd, arrays: ref)
    pipe = RoundPipeline(FedAvg(min_available_nodes=1), trust=scorer, identities=Partitions(nodes))
    run_round(pipe, g, replies, nodes, server_round=1)
    assert scorer.state["partition-0"] < 0.5 and scorer.state[f"partition-{F}"] > 1.0
    # round 2: no reference any more; history anchors trust (same nodes, new updates)
    scorer.reference_fn = None
    g2, replies2, _, _, _ = _round("sign-flip", seed=5)
    _, report = run_round(pipe, g2, replies2, nodes, server_round=2)
    assert report.trust["anchor"] == "history"
    assert sorted(report.trust["excluded"]) == ATTACKERS


def test_clip_and_reweight_reach_the_inner_strategy():
    g, replies, ref, nodes, _ = _round("scale", seed=7)
    seen = {}

    class Spy(FedAvg):
        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            seen["n"] = [float(r.content["metrics"]["num-examples"]) for r in replies]
            seen["norms"] = [float(np.linalg.norm(flatten(r.content["arrays"]) - flatten(g))) for r in replies]
            return super().aggregate_train(server_round, replies)

    run_round(RoundPipeline(PageRankTrust(Spy(min_available_nodes=1, min_train_nodes=1),
                                          reference_fn=lambda rnd, arrays: ref, reweight=True),
                            identities=Partitions(nodes)), g, replies, nodes)
    assert len(seen["n"]) == N - F and all(0 < n < 20 * 3 for n in seen["n"]) and len(set(seen["n"])) > 1
    ref_norm = float(np.linalg.norm(flatten(ref) - flatten(g)))
    assert max(seen["norms"]) <= ref_norm * (1 + 1e-4)


def test_scorer_arguments_are_checked():
    for bad in ({"anchor": "bogus"}, {"damping": 5}, {"threshold": -1}, {"norm_tol": 0.5}, {"history_weight": 1}):
        with pytest.raises(ValueError):
            PageRankScorer(**bad)


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


@pytest.mark.parametrize("anchor", ["auto", "median", "history", "none"])
def test_the_scorer_scores_as_the_pure_function_does_on_the_same_deltas(anchor):
    """decide() builds the delta matrix in one pass and reuses the Gram; its scores are
    trust_scores' on the same deltas (to float rounding)."""
    g, replies, ref, nodes, locals_ = _round("sign-flip", seed=4)
    from fedledger.core import Layout
    from fedledger.core.update import decode_replies

    updates, _ = decode_replies(replies, Layout.of(g), 10**6)
    ident = Partitions(nodes)
    updates = [u.with_identity(ident.resolve(u.node_id)) for u in updates]
    scorer = PageRankScorer(anchor=anchor, reference_fn=(lambda r, a: ref) if anchor == "auto" else None)
    if anchor == "history":
        scorer.state = {u.identity.key: 1.0 + 0.1 * i for i, u in enumerate(updates)}
    hist = np.array([scorer.state[u.identity.key] for u in updates]) if scorer.state else None
    decision = scorer.decide(1, updates, g)
    deltas = [flatten(u.arrays) - flatten(g) for u in updates]
    expected = trust_scores(deltas, reference=flatten(ref) - flatten(g) if anchor == "auto" else None,
                            history=hist, anchor=anchor)
    got = np.array([decision.scores[u.identity.key] for u in updates])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
