"""apply_decision, the one place trust changes what is aggregated: the live round (with the trust
stage's workspace of deltas) and the auditor (without one) compute the very same bits."""

from __future__ import annotations

import numpy as np
import pytest

from fedledger.core.trust import TrustDecision, apply_decision, flat, unflat

SHAPES = {"a.lora_A": (8, 37), "a.lora_B": (37, 8), "b": (1001,)}


def _entries(n: int, seed: int):
    rng = np.random.default_rng(seed)
    g = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    entries = [(f"partition-{i}", {k: (g[k] + (0.5 + i) * rng.standard_normal(s)).astype(np.float32)
                                   for k, s in SHAPES.items()}, 10 + i) for i in range(n)]
    return g, entries


def _reference_apply(entries, g, decision):
    """apply_decision as it was written before the workspace existed (the recorded runs' maths)."""
    names = list(g)
    gflat = flat(g, names)
    out = []
    for key, arrays, n in entries:
        if key in set(decision.excluded):
            continue
        weight = float(decision.scores.get(key, 0.0)) * float(n) if decision.reweight else float(n)
        delta = flat(arrays, names) - gflat
        norm = float(np.linalg.norm(delta))
        if norm <= decision.clip_norm or norm == 0.0:
            out.append((key, arrays, weight))
            continue
        delta *= np.float32(decision.clip_norm / norm)
        out.append((key, unflat(gflat + delta, g), weight))
    return out


@pytest.mark.parametrize("use_workspace", [False, True])
def test_clipping_gives_the_same_bits_with_or_without_the_stages_deltas(use_workspace):
    g, entries = _entries(7, seed=1)
    keys = [k for k, _, _ in entries]
    names = list(g)
    norms = [float(np.linalg.norm(flat(a, names) - flat(g, names))) for _, a, _ in entries]
    scores = {k: 0.5 + 0.1 * i for i, k in enumerate(keys)}
    decision = TrustDecision(scores=scores, excluded=(keys[2],), clip_norm=float(np.median(norms)), reweight=True)
    if use_workspace:
        decision = TrustDecision(scores=scores, excluded=(keys[2],), clip_norm=decision.clip_norm, reweight=True,
                                 workspace={k: flat(a, names) - flat(g, names) for k, a, _ in entries})
    got = apply_decision(entries, g, decision)
    want = _reference_apply(entries, g, decision)
    assert [c.key for c in got] == [k for k, _, _ in want]
    assert any(c.changed for c in got) and not all(c.changed for c in got)
    for c, (_, arrays, weight) in zip(got, want):
        assert c.weight == weight
        assert all(c.arrays[n].tobytes() == arrays[n].tobytes() for n in names)


def test_the_workspace_is_not_recorded_and_is_consumed_once():
    g, entries = _entries(3, seed=2)
    names = list(g)
    work = {k: flat(a, names) - flat(g, names) for k, a, _ in entries}
    d = TrustDecision(scores={k: 1.0 for k, _, _ in entries}, clip_norm=0.1, workspace=work)
    assert "workspace" not in d.to_dict() and TrustDecision.from_dict(d.to_dict()).workspace is None
    first = apply_decision(entries, g, d)
    again = apply_decision(entries, g, d)  # the workspace was used up: recomputed from the arrays
    assert work == {}
    for a, b in zip(first, again):
        assert all(a.arrays[n].tobytes() == b.arrays[n].tobytes() for n in names)
