"""Attacks: each changes the update exactly as documented; unknown names fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from fedledger.clients import attacks as A


def _pair(seed=0):
    rng = np.random.default_rng(seed)
    g = {"x.lora_A.weight": rng.normal(size=(4, 16)).astype(np.float32), "x.lora_B.weight": rng.normal(size=(16, 4)).astype(np.float32)}
    local = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
    return local, g


def _d(a, g):
    return np.concatenate([(a[k] - g[k]).ravel() for k in g]).astype(np.float64)


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_sign_flip_negates_delta():
    local, g = _pair()
    out = A.apply_update_attack("sign-flip", local, g, np.random.default_rng(0))
    np.testing.assert_allclose(_d(out, g), -_d(local, g), rtol=1e-5, atol=1e-6)
    assert set(out) == set(local) and all(out[k].dtype == np.float32 for k in out)


def test_scale_multiplies_delta():
    local, g = _pair()
    out = A.apply_update_attack("scale", local, g, np.random.default_rng(0), scale=5.0)
    np.testing.assert_allclose(_d(out, g), 5 * _d(local, g), rtol=1e-4, atol=1e-5)


def test_noise_is_random_direction_with_scaled_rms():
    local, g = _pair()
    out = A.apply_update_attack("noise", local, g, np.random.default_rng(0), noise_scale=3.0)
    d, h = _d(out, g), _d(local, g)
    assert abs(_cos(d, h)) < 0.3
    assert 2.0 < np.linalg.norm(d) / np.linalg.norm(h) < 4.0
    again = A.apply_update_attack("noise", local, g, np.random.default_rng(0), noise_scale=3.0)
    np.testing.assert_array_equal(out["x.lora_A.weight"], again["x.lora_A.weight"])  # seeded


def test_free_rider_returns_global():
    local, g = _pair()
    out = A.apply_update_attack("free-rider", local, g, np.random.default_rng(0))
    for k in g:
        np.testing.assert_array_equal(out[k], g[k])
        assert out[k] is not g[k]


def test_adaptive_keeps_norm_and_tilts_against_honest_direction():
    local, g = _pair()
    out = A.apply_update_attack("adaptive", local, g, np.random.default_rng(1), epsilon=0.3)
    d, h = _d(out, g), _d(local, g)
    assert np.linalg.norm(d) == pytest.approx(np.linalg.norm(h), rel=1e-4)
    assert _cos(d, h) == pytest.approx(0.7, abs=0.02)
    mean = {k: g[k] + 2 * (local[k] - g[k]) for k in g}  # a known honest mean along d
    out2 = A.apply_update_attack("adaptive", local, g, np.random.default_rng(1), epsilon=0.3, honest_mean=mean)
    assert _cos(_d(out2, g), h) == pytest.approx(0.7, abs=0.02)


def test_unknown_attack_lists_choices():
    local, g = _pair()
    with pytest.raises(ValueError) as err:
        A.apply_update_attack("bogus", local, g, np.random.default_rng(0))
    for name in ("sign-flip", "scale", "noise", "free-rider", "adaptive", "label-shuffle"):
        assert name in str(err.value)
    with pytest.raises(ValueError):
        A.is_data_attack("bogus")
    with pytest.raises(ValueError, match="data attack"):
        A.apply_update_attack("label-shuffle", local, g, np.random.default_rng(0))
    assert A.check_attack("none") == "none"


def test_layout_mismatch_rejected():
    local, g = _pair()
    with pytest.raises(ValueError):
        A.apply_update_attack("sign-flip", {"other": np.zeros(3, np.float32)}, g, np.random.default_rng(0))


def test_poison_records_shuffle_and_corrupt():
    recs = [{"category": "c", "prompt": f"p{i}", "response": f"answer number {i}"} for i in range(7)]
    shuffled = A.poison_records(recs, "label-shuffle", seed=3)
    assert [r["prompt"] for r in shuffled] == [r["prompt"] for r in recs]
    assert sorted(r["response"] for r in shuffled) == sorted(r["response"] for r in recs)
    assert all(s["response"] != r["response"] for s, r in zip(shuffled, recs))  # a derangement
    assert recs[0]["response"] == "answer number 0"  # input untouched
    corrupt = A.poison_records(recs, "label-corrupt", seed=3)
    assert any(c["response"] != r["response"] for c, r in zip(corrupt, recs))
    assert A.is_data_attack("label-shuffle") and not A.is_data_attack("sign-flip")
    assert A.poison_records(recs, "data-poison", seed=3) == A.poison_records(recs, "label-shuffle", seed=3)
