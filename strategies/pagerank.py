"""``PageRankTrust``: trust weighting by PageRank on an update-similarity graph.

Every round:

1. **Validated first.** The round pipeline (``fedledger.core``) has already decoded and
   validated every reply once; only well-formed updates are scored.
2. **Deltas.** Each update is turned into its flattened LoRA delta ``d_i = local_i - global``
   (the global adapter sent this round). Why the flattened (A, B) delta and not the effective
   per-layer ``dW = B.A``: every client starts the round from the *same* (A, B), so parameter
   deltas live in one coordinate system and the gauge ambiguity of LoRA factors (``B.A`` =
   ``(B M)(M^-1 A)``) cannot differ between clients; to first order ``dW = dB.A + B.dA`` is a
   fixed linear map of the flattened delta, so similar flattened deltas mean similar ``dW``.
   It costs one (N, P) x (P, N) GEMM over the P adapter values, while ``B.A`` would need a
   d_out x d_in product per layer and client (for SmolLM2: ~100x more values than the adapter).
3. **Similarity graph.** All pairwise cosines from one Gram matrix (``kernels``); edge weight
   ``i -> j`` = ``max(cos, 0)`` (no self loops). Opposite or orthogonal updates give no trust.
4. **Trust anchor.** Plain PageRank gives every node of a closed colluding cluster ~1/N (see
   docs/notes), so PageRank is *personalised* (its teleport vector) toward an anchor:
   - a server **reference update** (FLTrust-style; ``reference_fn`` trains on a small root
     split) added as an extra graph node, linked to each client by ``max(cos(d_i, ref), 0)``;
   - else **pre-trusted** nodes (``pretrusted`` partition ids);
   - else the **trust history** of earlier rounds;
   - else the coordinate-wise **median** update as a pseudo-reference (robust while fewer than
     half the nodes are attackers; serverless peers without a root split use this).
5. **Norms.** Cosine is blind to magnitude, so scores are multiplied by a norm factor
   ``min(1, tol*m/||d_i||, ||d_i||*tol/m)**2`` (``m`` = median client norm, ``tol`` = ``norm_tol``):
   a 10x-scaled update gets <= 0.09, a free rider (delta 0) gets 0. When aggregating, kept
   deltas are additionally clipped to the reference norm (or the median norm).
6. **History.** Scores are smoothed over rounds per client (``Identity.key``: the partition the
   glue resolved for the node, never one a reply reports about itself):
   ``t = w * t_prev + (1 - w) * t_now`` (``history_weight``).
7. **Decision.** Scores are normalised so that the client mean is 1 (uniform trust = 1); clients
   with a score below ``threshold`` are excluded. The result is a ``core.trust.TrustDecision``
   (scores, excluded, clip norm, reweight); ``core.trust.apply_decision`` applies it, so the
   auditor can apply the *recorded* decision to the recorded updates and recompute the aggregate.

Usable two ways (both are a ``RoundPipeline`` with a :class:`PageRankScorer` stage):

    PageRankTrust()                         # FedAvg weighted by trust x num-examples
    PageRankTrust(inner=Krum(...))          # filters/clips updates, then Krum aggregates

Recorded per round in ``reports[round].trust``: scores, excluded, clip norm, anchor, cosine to
the anchor, norm ratio. Detection against a ground truth is ``detection.detection_metrics``.
What the audit checks of it: the aggregate follows from the recorded decision; the scores
themselves are the aggregator's claim (recomputing them needs the server's reference update).

``trust_scores`` is the pure function behind it, for serverless peers scoring their neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import FedAvg, Strategy

from fedledger.core.pipeline import RoundPipeline
from fedledger.core.trust import TrustDecision, flat
from fedledger.core.update import Update

from . import kernels
from .kernels import delta_matrix, flatten, gram_with_reference

log = logging.getLogger("fedledger")

ANCHORS = ("auto", "reference", "pretrusted", "history", "median", "none")


def _as_matrix(updates) -> np.ndarray:
    if isinstance(updates, np.ndarray) and updates.ndim == 2:
        return updates if updates.dtype == np.float32 else updates.astype(np.float32)
    rows = [flatten(u) if isinstance(u, (Mapping, ArrayRecord)) else np.ravel(np.asarray(u, dtype=np.float32)) for u in updates]
    if not rows:
        return np.zeros((0, 0), dtype=np.float32)
    sizes = {r.size for r in rows}
    if len(sizes) != 1:
        raise ValueError(f"updates have different sizes {sorted(sizes)}; validate them first")
    return np.stack(rows)


def trust_scores(
    updates: Sequence[np.ndarray] | np.ndarray,
    reference: np.ndarray | Mapping | None = None,
    history: Sequence[float] | np.ndarray | None = None,
    *,
    pretrusted: Iterable[int] | None = None,
    anchor: str = "auto",
    damping: float = 0.85,
    norm_tol: float = 3.0,
    history_weight: float = 0.3,
    return_details: bool = False,
):
    """Trust score per update (client mean = 1; uniform trust = 1). Pure: no state, no flwr.

    Parameters
    ----------
    updates : N deltas (1-D arrays or name->array dicts, same layout) or an (N, P) matrix.
        Deltas, i.e. ``local - global``; the caller validates them (finite, same shape).
    reference : optional trusted delta (FLTrust root-split update, or a peer's own update).
    history : optional previous trust per update (same order; NaN = unknown).
    pretrusted : indices (into ``updates``) of pre-trusted nodes (teleport targets).
    anchor : "auto" (reference > pretrusted > history > median), or force one of
        "reference", "pretrusted", "history", "median", "none" (plain PageRank, uniform teleport).
    damping : PageRank alpha. norm_tol : allowed norm ratio to the median before penalty.
    history_weight : weight of ``history`` in the smoothed score (0 = ignore history).
    return_details : also return a dict (pagerank, norm factor, cosine to the anchor, ...).
    """
    if anchor not in ANCHORS:
        raise ValueError(f"anchor {anchor!r} is not valid; choose one of: {', '.join(ANCHORS)}")
    x = _as_matrix(updates)
    n = x.shape[0]
    if n == 0:
        out = np.zeros(0)
        return (out, {}) if return_details else out
    ref = None
    if reference is not None:
        ref = flatten(reference) if isinstance(reference, (Mapping, ArrayRecord)) else np.ravel(np.asarray(reference, dtype=np.float32))
        if ref.size != x.shape[1] or not np.all(np.isfinite(ref)):
            log.warning("trust_scores: reference ignored (wrong size or non-finite)")
            ref = None
    hist = None
    if history is not None:
        hist = np.asarray(history, dtype=np.float64).ravel()
        if hist.size != n:
            raise ValueError(f"history has {hist.size} entries for {n} updates")
    pre = sorted({int(i) for i in pretrusted}) if pretrusted is not None else []
    mode = resolve_anchor(anchor, n, ref is not None, pre, hist)
    if mode == "median":
        ref = np.median(x, axis=0).astype(np.float32)
    if mode == "reference" and ref is None:
        raise ValueError("anchor='reference' needs a reference update")
    # --- one Gram product for every similarity --------------------------------------------
    g, xr, rr = gram_with_reference(x, ref if mode in ("reference", "median") else None)
    return scores_from_gram(g, xr, rr, mode, hist, pre, damping=damping, norm_tol=norm_tol,
                            history_weight=history_weight, return_details=return_details)


def resolve_anchor(anchor: str, n: int, has_reference: bool, pretrusted: Sequence[int],
                   history: np.ndarray | None) -> str:
    """The anchor ``"auto"`` stands for: reference > pre-trusted > history > median (>= 3 updates)."""
    if anchor != "auto":
        return anchor
    if has_reference:
        return "reference"
    if pretrusted:
        return "pretrusted"
    if history is not None and np.any(np.isfinite(history) & (history > 0)):
        return "history"
    return "median" if n >= 3 else "none"


def scores_from_gram(g: np.ndarray, xr: np.ndarray | None, rr: float | None, mode: str, hist: np.ndarray | None,
                     pre: Sequence[int], *, damping: float = 0.85, norm_tol: float = 3.0, history_weight: float = 0.3,
                     return_details: bool = False):
    """:func:`trust_scores` from the Gram matrix ``g`` (float64, N x N) of the deltas, their dot
    products ``xr`` with the anchor delta and its squared norm ``rr`` (None without one)."""
    n = g.shape[0]
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    eps = 1e-12
    cos = g / np.maximum(np.outer(norms, norms), eps)
    w = np.clip(cos, 0.0, None)
    np.fill_diagonal(w, 0.0)
    use_ref = xr is not None
    if use_ref:
        cref = xr / np.maximum(norms * np.sqrt(max(rr, 0.0)), eps)
        wr = np.clip(cref, 0.0, None)
        full = np.zeros((n + 1, n + 1))
        full[:n, :n] = w
        full[:n, n] = wr
        full[n, :n] = wr
        personal = {n: 1.0}
    else:
        cref = None
        full = w
        if mode == "pretrusted" and pre:
            personal = {i: 1.0 for i in pre if 0 <= i < n} or None
        elif mode == "history" and hist is not None:
            h = np.where(np.isfinite(hist), np.clip(hist, 0.0, None), 0.0)
            personal = {i: float(v) for i, v in enumerate(h) if v > 0} or None
        else:
            personal = None
    graph = nx.from_numpy_array(full, create_using=nx.DiGraph)
    if personal is not None:
        personal = {k: personal.get(k, 0.0) for k in graph.nodes}
    try:
        pr = nx.pagerank(graph, alpha=damping, personalization=personal, weight="weight", max_iter=200, tol=1e-10)
    except nx.PowerIterationFailedConvergence:
        log.warning("trust_scores: PageRank did not converge; using uniform scores")
        pr = {i: 1.0 / graph.number_of_nodes() for i in graph.nodes}
    raw = np.array([pr[i] for i in range(n)], dtype=np.float64)

    # --- magnitude: cosine cannot see it --------------------------------------------------
    med = float(np.median(norms))
    if med > 0:
        ratio = norms / med
        # squared, so that a clear outlier (10x) falls far below the threshold even after the
        # scores are renormalised and smoothed with history (the linear factor left it near 0.5)
        factor = np.minimum(1.0, np.minimum(norm_tol / np.maximum(ratio, eps), ratio * norm_tol)) ** 2
    else:  # most updates are zero: nothing to compare against
        ratio = np.where(norms > 0, np.inf, 1.0)
        factor = np.where(norms > 0, 1.0, 0.0)
    score = raw * factor
    total = score.sum()
    score = score * n / total if total > 0 else np.zeros(n)
    if hist is not None and history_weight > 0:
        known = np.isfinite(hist)
        score = np.where(known, history_weight * np.where(known, hist, 0.0) + (1 - history_weight) * score, score)
    if not return_details:
        return score
    details = {"anchor": mode, "pagerank": raw, "norm-factor": factor, "norm-ratio": ratio, "norms": norms,
               "cos-to-anchor": cref, "reference-norm": float(np.sqrt(rr)) if use_ref else None, "cosine": cos}
    return score, details


class PageRankScorer:
    """The trust stage (``core.pipeline.TrustStage``): PageRank trust on the round's decoded updates.

    State: the smoothed score of every client, keyed by ``Identity.key`` (the partition the glue
    resolved for the node, never a partition id a reply reports about itself), and the memory of
    the (N, P) delta matrix, reused round after round (the rows lent to ``apply_decision`` as its
    workspace are valid until the next ``decide``).

    Parameters
    ----------
    reference_fn : callable ``(server_round, global_arrays) -> dict[str, ndarray] | None``
        Server reference adapter (trained on the root split from ``global_arrays``); its delta
        anchors trust. None or returning None: fall back to pre-trusted/history/median anchor.
    threshold : float
        Exclude clients whose normalised trust (client mean = 1) is below this (default 0.5).
    pretrusted : iterable of partition ids, optional
        Clients the teleport vector favours when no reference update is available.
    damping, norm_tol, history_weight, anchor : see :func:`trust_scores`.
    clip : bool
        Clip kept deltas to the reference norm (or the median kept norm) before aggregating.
    reweight : bool
        Weight each kept update by trust x num-examples (instead of num-examples).
    """

    def __init__(self, *, reference_fn: Callable[[int, Mapping[str, np.ndarray]], Mapping[str, np.ndarray] | None]
                 | None = None, threshold: float = 0.5, pretrusted: Iterable[int] | None = None, damping: float = 0.85,
                 norm_tol: float = 3.0, history_weight: float = 0.3, anchor: str = "auto", clip: bool = True,
                 reweight: bool = False) -> None:
        if anchor not in ANCHORS:
            raise ValueError(f"anchor {anchor!r} is not valid; choose one of: {', '.join(ANCHORS)}")
        if not 0 < damping < 1:
            raise ValueError(f"damping must be in (0, 1), got {damping}")
        if threshold < 0 or norm_tol < 1 or not 0 <= history_weight < 1:
            raise ValueError("threshold must be >= 0, norm_tol >= 1 and history_weight in [0, 1)")
        self.reference_fn = reference_fn
        self.threshold, self.damping, self.norm_tol = float(threshold), float(damping), float(norm_tol)
        self.history_weight, self.anchor, self.clip, self.reweight = float(history_weight), anchor, bool(clip), bool(reweight)
        self.pretrusted = sorted({int(p) for p in pretrusted}) if pretrusted is not None else []
        self.state: dict[str, float] = {}
        self._rows: np.ndarray | None = None  # the delta matrix's memory, reused round after round

    def describe(self) -> dict:
        return {"name": "PageRankTrust", "threshold": self.threshold, "damping": self.damping,
                "norm-tol": self.norm_tol, "history-weight": self.history_weight, "anchor": self.anchor,
                "clip": self.clip, "reweight": self.reweight, "pretrusted": self.pretrusted,
                "reference": self.reference_fn is not None}

    def decide(self, server_round: int, updates: Sequence[Update], global_arrays: Mapping[str, np.ndarray]
               ) -> TrustDecision:
        keys = [u.identity.key for u in updates]
        names = list(global_arrays)
        g = flat(global_arrays, names)
        ref = self._reference(server_round, global_arrays)
        anchor_delta = None if ref is None else ref - g
        x, xr = delta_matrix([u.arrays for u in updates], names, g, anchor_delta, buffer=self._rows)
        if self._rows is None or x.base is not self._rows:
            self._rows = x  # keep this round's memory for the next round's matrix
        hist = np.array([self.state.get(k, np.nan) for k in keys]) if self.state else None
        pre = [i for i, u in enumerate(updates) if u.identity.partition in self.pretrusted]
        mode = resolve_anchor(self.anchor, len(keys), anchor_delta is not None, pre, hist)
        if mode == "reference" and anchor_delta is None:
            raise ValueError("anchor='reference' needs a reference update")
        if mode == "median":  # no reference from the server: the coordinate-wise median stands in
            anchor_delta = np.median(x, axis=0).astype(np.float32)
            xr = (x @ anchor_delta).astype(np.float64)
        elif mode != "reference":
            anchor_delta, xr = None, None
        gram = kernels.gram(x).astype(np.float64)  # the one GEMM: every pairwise similarity
        rr = None if anchor_delta is None else float(np.dot(anchor_delta, anchor_delta))
        scores, det = scores_from_gram(gram, xr, rr, mode, hist, pre, damping=self.damping, norm_tol=self.norm_tol,
                                       history_weight=self.history_weight, return_details=True)
        for k, sc in zip(keys, scores):
            self.state[k] = float(sc)
        keep = scores >= self.threshold
        excluded = tuple(k for k, ok in zip(keys, keep) if not ok)
        clip_norm = None
        if self.clip and keep.any():
            clip_norm = det["reference-norm"] if det.get("reference-norm") else \
                float(np.median(np.asarray(det["norms"])[keep]))
        if excluded:
            log.info("PageRankTrust round %s: excluded %s (trust %s)", server_round, list(excluded),
                     [round(float(sc), 3) for sc, ok in zip(scores, keep) if not ok])
        if not keep.any():
            log.warning("PageRankTrust round %s: every update is below the trust threshold", server_round)
        cos = det.get("cos-to-anchor")
        return TrustDecision(
            scores={k: float(sc) for k, sc in zip(keys, scores)}, excluded=excluded, clip_norm=clip_norm,
            reweight=self.reweight,
            record={"anchor": det.get("anchor"),
                    "norm-ratio": {k: float(r) for k, r in zip(keys, det["norm-ratio"])},
                    "cos-to-anchor": None if cos is None else {k: float(c) for k, c in zip(keys, cos)}},
            workspace={k: x[i] for i, (k, ok) in enumerate(zip(keys, keep)) if ok} if clip_norm is not None else None)

    def _reference(self, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> np.ndarray | None:
        if self.reference_fn is None:
            return None
        try:
            ref = self.reference_fn(server_round, global_arrays)
        except Exception as exc:  # noqa: BLE001  (a failing reference must not stop the round)
            log.warning("PageRankTrust: reference_fn failed (%s); trust falls back to other anchors", exc)
            return None
        if ref is None:
            return None
        names = list(global_arrays)
        if set(ref) != set(names) or any(np.shape(ref[n]) != np.shape(global_arrays[n]) for n in names):
            log.warning("PageRankTrust: reference update ignored: its tensors differ from the global adapter's")
            return None
        vec = flat(ref, names)
        if not np.isfinite(vec).all():
            log.warning("PageRankTrust: reference update ignored: NaN/Inf values")
            return None
        return vec


class PageRankTrust(RoundPipeline):
    """PageRank trust in front of any Flower strategy (or aggregating itself).

        PageRankTrust(Krum(num_malicious_nodes=1))     # filter + clip, then Krum aggregates
        PageRankTrust(min_available_nodes=4)           # FedAvg weighted by trust x num-examples

    A :class:`fedledger.core.RoundPipeline` with a :class:`PageRankScorer`: replies are decoded
    and validated once, scored, filtered and clipped (``core.trust.apply_decision``), then
    aggregated by ``inner``. Each round's ``reports[round].trust`` holds the scores; stacking it
    with ``OnChainAudit`` (in either order) gives one pipeline whose ledger record includes them.

    Parameters
    ----------
    inner : Strategy, optional
        Strategy that aggregates the kept updates. None: ``FedAvg(**strategy_kwargs)`` with
        weights trust x num-examples (``reweight`` defaults to True then, False otherwise).
    **scorer_args : see :class:`PageRankScorer` (reference_fn, threshold, pretrusted, damping,
        norm_tol, history_weight, anchor, clip, reweight).
    """

    def __init__(self, inner: Strategy | None = None, *, reference_fn=None, threshold: float = 0.5,
                 pretrusted: Iterable[int] | None = None, damping: float = 0.85, norm_tol: float = 3.0,
                 history_weight: float = 0.3, anchor: str = "auto", clip: bool = True, reweight: bool | None = None,
                 max_examples: int | None = None, **strategy_kwargs) -> None:
        if inner is not None and strategy_kwargs:
            raise TypeError(f"strategy arguments {sorted(strategy_kwargs)} only apply without inner=")
        self.scorer = PageRankScorer(reference_fn=reference_fn, threshold=threshold, pretrusted=pretrusted,
                                     damping=damping, norm_tol=norm_tol, history_weight=history_weight, anchor=anchor,
                                     clip=clip, reweight=(inner is None) if reweight is None else reweight)
        super().__init__(inner if inner is not None else FedAvg(**strategy_kwargs), trust=self.scorer,
                         max_examples=max_examples)
