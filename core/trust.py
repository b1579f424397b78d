"""A trust stage's decision for one round, and the one function that applies it.

A trust stage (``fedledger.strategies.pagerank.PageRankScorer`` or your own) looks at the
round's decoded updates and returns a :class:`TrustDecision`: a score per client (keyed by
``Identity.key``), who is excluded, and how the kept updates are changed before the wrapped
strategy aggregates them. :func:`apply_decision` is the *only* place that change is made: the
pipeline calls it during the round and the auditor calls it again on the recorded updates with
the recorded decision, so what the ledger recorded for a client is, provably, what entered the
aggregate (``docs`` call this "the audit recomputes the clipping from the recorded trust").

Changes, in this order, all in float32 on the adapter's own layout:

1. clients whose key is in ``excluded`` are left out;
2. ``clip_norm``: each kept delta ``d = local - global`` (flattened, in the layout's order) is
   scaled by ``min(1, clip_norm / ||d||)`` and the update becomes ``global + scaled d``;
3. ``reweight``: the weight handed to the wrapped strategy is ``score x num-examples``
   instead of ``num-examples``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .workers import map_ordered


@dataclass(frozen=True)
class TrustDecision:
    """``workspace`` (never recorded): the flat float32 deltas ``flat(local) - flat(global)`` the
    stage already computed, by identity key, lent to :func:`apply_decision` so that it does not
    compute them again. They must be exactly those values (the auditor, who has no workspace,
    recomputes them; a stage that lends wrong ones makes the audit fail). ``apply_decision``
    consumes them: a clipped update is written over its delta, in place."""

    scores: dict[str, float]                       # identity key -> score (client mean = 1)
    excluded: tuple[str, ...] = ()                 # identity keys left out this round
    clip_norm: float | None = None                 # L2 limit of kept deltas (None: no clipping)
    reweight: bool = False                         # weight = score x num-examples
    record: dict = field(default_factory=dict)     # what else the stage wants on the record
    workspace: dict[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict:
        """The canonical, JSON-ready form recorded in the round document (and hashed)."""
        return {"scores": {k: float(v) for k, v in sorted(self.scores.items())},
                "excluded": sorted(self.excluded),
                "clip-norm": None if self.clip_norm is None else float(self.clip_norm),
                "reweight": bool(self.reweight), **self.record}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TrustDecision":
        extra = {k: v for k, v in d.items() if k not in ("scores", "excluded", "clip-norm", "reweight")}
        return cls(scores={str(k): float(v) for k, v in d.get("scores", {}).items()},
                   excluded=tuple(d.get("excluded", ())), clip_norm=d.get("clip-norm"),
                   reweight=bool(d.get("reweight", False)), record=extra)


@dataclass(frozen=True)
class Contribution:
    """What one client contributes to the aggregate after trust: its arrays and its weight.
    ``changed`` is False when the arrays are the client's own, byte for byte."""

    key: str
    arrays: Mapping[str, np.ndarray]
    weight: float
    changed: bool = False


def flat(arrays: Mapping[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """One float32 vector of ``arrays`` in ``names`` order (one copy)."""
    return np.concatenate([np.ravel(arrays[n]).astype(np.float32, copy=False) for n in names]) if names \
        else np.zeros(0, np.float32)


def unflat(vector: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, start = {}, 0
    for name, ref in like.items():
        size = int(ref.size)
        out[name] = vector[start:start + size].reshape(ref.shape).astype(ref.dtype, copy=False)
        start += size
    return out


def apply_decision(entries: Sequence[tuple[str, Mapping[str, np.ndarray], int]],
                   global_arrays: Mapping[str, np.ndarray],
                   decision: TrustDecision | None) -> list[Contribution]:
    """``entries``: (identity key, arrays, num-examples) in record order -> what gets aggregated.

    Clipping per kept entry, in float32: ``d = flat(arrays) - flat(global)`` (or the decision's
    workspace row, the same values), ``norm = np.linalg.norm(d)``; when ``norm > clip_norm`` the
    update becomes ``flat(global) + d * float32(clip_norm / norm)``. Entries are clipped on the
    tensor thread pool; each one's arithmetic does not depend on that.
    """
    if decision is None:
        return [Contribution(k, a, float(n)) for k, a, n in entries]
    names = list(global_arrays)
    excluded = set(decision.excluded)
    kept = [(k, a, n) for k, a, n in entries if k not in excluded]
    weights = [float(decision.scores.get(k, 0.0)) * float(n) if decision.reweight else float(n) for k, _, n in kept]
    if decision.clip_norm is None:
        return [Contribution(k, a, w) for (k, a, _), w in zip(kept, weights)]
    g = flat(global_arrays, names)
    workspace = decision.workspace if decision.workspace is not None else {}
    limit = float(decision.clip_norm)

    def clip(entry) -> Contribution:
        (key, arrays, _), weight = entry
        delta = workspace.pop(key, None)
        if delta is None:
            delta = flat(arrays, names) - g
        norm = float(np.linalg.norm(delta))
        if norm <= limit or norm == 0.0:
            return Contribution(key, arrays, weight)
        np.multiply(delta, np.float32(limit / norm), out=delta)
        np.add(delta, g, out=delta)  # = g + scaled delta (IEEE addition commutes)
        return Contribution(key, unflat(delta, global_arrays), weight, changed=True)

    return map_ordered(clip, list(zip(kept, weights)))
