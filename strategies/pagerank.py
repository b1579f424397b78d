"""``PageRankTrust``: trust weighting by PageRank on an update-similarity graph.

Every round:

1. **Validate first.** Replies that are errors, have wrong keys/shapes, NaN/Inf or no positive
   ``num-examples`` are rejected with a logged reason *before* any similarity is computed.
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
6. **History.** Scores are smoothed over rounds per partition id:
   ``t = w * t_prev + (1 - w) * t_now`` (``history_weight``).
7. **Decision.** Scores are normalised so that the client mean is 1 (uniform trust = 1); nodes
   with a score below ``threshold`` are excluded. Kept nodes are weighted by trust x
   num-examples (self-aggregating), or just filtered (and clipped) before the wrapped strategy.

Usable two ways:

    PageRankTrust()                         # aggregates itself (FedAvg-style configure/evaluate)
    PageRankTrust(inner=Krum(...))          # filters/clips replies, then Krum aggregates

Recorded per round: ``trust_history[round]`` (trust per partition id, excluded, rejected,
cosine to the anchor, norm ratio) and ``detection[round]`` (precision/recall/F1 of the excluded
set vs ``malicious``, the run-config ground truth, when given).

``trust_scores`` is the pure function behind it, for serverless peers scoring their neighbours.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import networkx as nx
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from .detection import detection_metrics
from .kernels import (
    as_numpy_dict, flatten, gram_with_reference, invalid_reason, layout, num_examples, reply_arrays, stack,
    to_arrayrecord, unflatten, weighted_average,
)
from .wrapper import StrategyWrapper

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

    mode = anchor
    if mode == "auto":
        if ref is not None:
            mode = "reference"
        elif pre:
            mode = "pretrusted"
        elif hist is not None and np.any(np.isfinite(hist) & (hist > 0)):
            mode = "history"
        else:
            mode = "median" if n >= 3 else "none"
    if mode == "median":
        ref = np.median(x, axis=0).astype(np.float32)
    if mode == "reference" and ref is None:
        raise ValueError("anchor='reference' needs a reference update")

    # --- one Gram product for every similarity --------------------------------------------
    g, xr, rr = gram_with_reference(x, ref if mode in ("reference", "median") else None)
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


def clip_deltas(x: np.ndarray, limit: float) -> np.ndarray:
    """Scale rows of ``x`` down (in place) so none has an L2 norm above ``limit``."""
    if limit <= 0 or not np.isfinite(limit):
        return x
    norms = np.linalg.norm(x, axis=1)
    scale = np.minimum(1.0, limit / np.maximum(norms, 1e-12)).astype(np.float32)
    x *= scale[:, None]
    return x


class PageRankTrust(StrategyWrapper):
    """PageRank trust weighting; a strategy on its own or a filter in front of another one.

    Parameters
    ----------
    inner : Strategy, optional
        Strategy to delegate to after filtering. None: aggregate here (trust x num-examples
        weighted mean of clipped deltas) and use ``FedAvg(**strategy_kwargs)`` for the
        configure/evaluate steps.
    reference_fn : callable ``(server_round, global_arrays) -> dict[str, ndarray] | None``
        Server reference adapter (trained on the root split from ``global_arrays``); its delta
        anchors trust. None or returning None: fall back to pre-trusted/history/median anchor.
    threshold : float
        Exclude nodes whose normalised trust (client mean = 1) is below this (default 0.5).
    malicious : iterable of partition ids, optional
        Ground truth from the run-config, only for the ``detection`` record.
    pretrusted : iterable of partition ids, optional
        Nodes the teleport vector favours when no reference update is available.
    damping, norm_tol, history_weight, anchor : see :func:`trust_scores`.
    clip : bool
        Clip kept deltas to the reference norm (or the median norm) before aggregating or
        handing replies to ``inner`` (default True).
    reweight_inner : bool
        With ``inner``: also multiply each kept reply's ``num-examples`` by its trust.
    weight_by_examples : bool
        Self-aggregating: weight = trust x num-examples (True) or trust alone.
    **strategy_kwargs
        Passed to FedAvg when ``inner`` is None (fraction_train, min_available_nodes, ...).
    """

    def __init__(
        self,
        inner: Strategy | None = None,
        *,
        reference_fn: Callable[[int, ArrayRecord], Mapping[str, np.ndarray] | None] | None = None,
        threshold: float = 0.5,
        malicious: Iterable[int] | None = None,
        pretrusted: Iterable[int] | None = None,
        damping: float = 0.85,
        norm_tol: float = 3.0,
        history_weight: float = 0.3,
        anchor: str = "auto",
        clip: bool = True,
        reweight_inner: bool = False,
        weight_by_examples: bool = True,
        **strategy_kwargs,
    ) -> None:
        self.aggregates_itself = inner is None
        super().__init__(inner if inner is not None else FedAvg(**strategy_kwargs))
        if inner is not None and strategy_kwargs:
            raise TypeError(f"strategy arguments {sorted(strategy_kwargs)} only apply without inner=")
        if anchor not in ANCHORS:
            raise ValueError(f"anchor {anchor!r} is not valid; choose one of: {', '.join(ANCHORS)}")
        self.reference_fn = reference_fn
        self.threshold = float(threshold)
        self.malicious = sorted({int(m) for m in malicious}) if malicious is not None else None
        self.pretrusted = sorted({int(p) for p in pretrusted}) if pretrusted is not None else None
        self.damping, self.norm_tol, self.history_weight, self.anchor = damping, norm_tol, history_weight, anchor
        self.clip, self.reweight_inner, self.weight_by_examples = clip, reweight_inner, weight_by_examples
        self.global_arrays: dict[str, np.ndarray] | None = None
        self.trust_state: dict[int, float] = {}
        self.trust_history: dict[int, dict] = {}
        self.detection: dict[int, dict] = {}

    # ------------------------------------------------------------------ Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.global_arrays = as_numpy_dict(arrays)
        return self.inner.configure_train(server_round, arrays, config, grid)

    def summary(self) -> None:
        log.info("PageRankTrust(threshold=%s, anchor=%s, clip=%s) around %s", self.threshold, self.anchor,
                 self.clip, type(self.inner).__name__)
        self.inner.summary()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if self.global_arrays is None:  # aggregate_train without configure_train (tests, custom loops)
            first = next((reply_arrays(m) for m in replies if reply_arrays(m) is not None), None)
            if first is None:
                return None, None
            raise RuntimeError("PageRankTrust.aggregate_train needs configure_train first (the global adapter)")
        expected = layout(self.global_arrays)
        kept, rejected = self._validate(replies, expected)
        record = {"trust": {}, "excluded": [], "rejected": rejected, "anchor": None}
        self.trust_history[server_round] = record
        participants = [self._pid(m) for m in replies if not m.has_error()]
        if not kept:
            log.warning("PageRankTrust round %s: no valid update; the global adapter is unchanged", server_round)
            self._record_detection(server_round, [r["partition-id"] for r in rejected], participants)
            return None, None

        pids = [self._pid(m) for m in kept]
        g = flatten(self.global_arrays)
        x = stack([reply_arrays(m) for m in kept])
        x -= g[None, :]
        ref = self._reference(server_round)
        hist = np.array([self.trust_state.get(p, np.nan) for p in pids]) if self.trust_state else None
        pre = [i for i, p in enumerate(pids) if self.pretrusted and p in self.pretrusted] or None
        scores, det = trust_scores(
            x, None if ref is None else ref - g, hist, pretrusted=pre, anchor=self.anchor, damping=self.damping,
            norm_tol=self.norm_tol, history_weight=self.history_weight, return_details=True,
        )
        for p, s in zip(pids, scores):
            self.trust_state[p] = float(s)
        keep = scores >= self.threshold
        excluded = [p for p, k in zip(pids, keep) if not k]
        record.update({
            "trust": {str(p): float(s) for p, s in zip(pids, scores)},
            "excluded": excluded,
            "anchor": det.get("anchor"),
            "norm-ratio": {str(p): float(r) for p, r in zip(pids, det["norm-ratio"])},
            "cos-to-anchor": None if det.get("cos-to-anchor") is None else
            {str(p): float(c) for p, c in zip(pids, det["cos-to-anchor"])},
        })
        if excluded:
            log.info("PageRankTrust round %s: excluded partitions %s (trust %s)", server_round, excluded,
                     [round(float(s), 3) for s, k in zip(scores, keep) if not k])
        self._record_detection(server_round, excluded + [r["partition-id"] for r in rejected], participants)
        if not keep.any():
            log.warning("PageRankTrust round %s: every update is below the trust threshold; global unchanged", server_round)
            return None, None

        idx = np.flatnonzero(keep)
        x = x[idx]
        if self.clip:
            limit = det["reference-norm"] if det.get("reference-norm") else float(np.median(np.linalg.norm(x, axis=1)))
            clip_deltas(x, limit)
        kept = [kept[i] for i in idx]
        if self.aggregates_itself:
            n_ex = np.array([num_examples(m) for m in kept])
            weights = scores[idx] * (n_ex if self.weight_by_examples else 1.0)
            new = g + weighted_average(x, weights)
            metrics = self._metrics(kept, n_ex)
            metrics["trust-excluded"] = len(excluded)
            metrics["trust-rejected"] = len(rejected)
            return to_arrayrecord(unflatten(new, self.global_arrays)), MetricRecord(metrics)
        forwarded = []
        for row, msg, s in zip(x, kept, scores[idx]):
            if self.clip or self.reweight_inner:
                content = RecordDict()
                for key, rec in msg.content.items():
                    content[key] = rec
                akey = next(iter(msg.content.array_records))
                if self.clip:
                    content[akey] = to_arrayrecord(unflatten(g + row, self.global_arrays))
                if self.reweight_inner:
                    mkey = next(iter(msg.content.metric_records))
                    mrec = dict(msg.content.metric_records[mkey])
                    mrec["num-examples"] = float(mrec.get("num-examples", 1.0)) * float(s)
                    content[mkey] = MetricRecord(mrec)
                msg.content = content
            forwarded.append(msg)
        return self.inner.aggregate_train(server_round, forwarded)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _pid(msg: Message) -> int:
        """Partition id from the reply's metrics (experiments), else the node id."""
        if not msg.has_error():
            for rec in msg.content.metric_records.values():
                if "partition-id" in rec:
                    return int(rec["partition-id"])
        return int(msg.metadata.src_node_id)

    def _validate(self, replies: list[Message], expected) -> tuple[list[Message], list[dict]]:
        kept, rejected = [], []
        for msg in replies:
            if msg.has_error():
                log.warning("PageRankTrust: dropped reply from node %s: error %s", msg.metadata.src_node_id, msg.error.reason)
                continue
            reason = invalid_reason(reply_arrays(msg), expected)
            if reason is None and num_examples(msg) <= 0:
                reason = "missing or non-positive 'num-examples' metric"
            if reason is not None:
                log.warning("PageRankTrust: rejected update from node %s: %s", msg.metadata.src_node_id, reason)
                rejected.append({"node-id": int(msg.metadata.src_node_id), "partition-id": self._pid(msg), "reason": reason})
                continue
            kept.append(msg)
        return kept, rejected

    def _reference(self, server_round: int) -> np.ndarray | None:
        if self.reference_fn is None:
            return None
        try:
            ref = self.reference_fn(server_round, to_arrayrecord(self.global_arrays))
        except Exception as exc:  # a failing reference must not stop the round
            log.warning("PageRankTrust: reference_fn failed (%s); trust falls back to other anchors", exc)
            return None
        if ref is None:
            return None
        ref = as_numpy_dict(ref)
        reason = invalid_reason(ref, layout(self.global_arrays))
        if reason is not None:
            log.warning("PageRankTrust: reference update ignored: %s", reason)
            return None
        return flatten(ref)

    def _record_detection(self, server_round: int, excluded: list[int], participants: list[int]) -> None:
        if self.malicious is not None:
            self.detection[server_round] = detection_metrics(excluded, self.malicious, participants)

    @staticmethod
    def _metrics(kept: list[Message], n_ex: np.ndarray) -> dict:
        """Num-examples-weighted mean of every numeric metric (num-examples summed)."""
        out: dict[str, float] = {}
        total = float(n_ex.sum()) or 1.0
        keys = set().union(*(set(rec) for m in kept for rec in m.content.metric_records.values()))
        for key in sorted(keys):
            vals = []
            for m, n in zip(kept, n_ex):
                for rec in m.content.metric_records.values():
                    if key in rec and isinstance(rec[key], (int, float)):
                        vals.append((float(rec[key]), n))
            if not vals or key == "partition-id":
                continue
            out[key] = sum(v for v, _ in vals) if key == "num-examples" else sum(v * n for v, n in vals) / total
        return out


#: run-config keys read by :func:`pagerank_kwargs_from_config` -> constructor argument
RUN_CONFIG_KEYS = {
    "trust-threshold": ("threshold", float),
    "trust-damping": ("damping", float),
    "trust-norm-tol": ("norm_tol", float),
    "trust-history-weight": ("history_weight", float),
    "trust-anchor": ("anchor", str),
    "trust-clip": ("clip", lambda v: str(v).lower() not in ("false", "0", "no", "none")),
    "trust-pretrusted": ("pretrusted", lambda v: [int(x) for x in str(v).replace(" ", "").split(",") if x != ""]),
}


def pagerank_kwargs_from_config(run_config: Mapping, *, with_ground_truth: bool = True) -> dict:
    """``PageRankTrust`` keyword arguments from run-config keys (``trust-*``, ``malicious``).

    ``malicious`` (comma-separated partition ids) becomes the ground truth for the detection
    record only; it never influences trust. Raises ValueError naming the key for bad values.
    """
    out = {}
    for key, (arg, conv) in RUN_CONFIG_KEYS.items():
        if key in run_config:
            try:
                out[arg] = conv(run_config[key])
            except (TypeError, ValueError):
                raise ValueError(f"run-config {key}={run_config[key]!r} is not valid") from None
    if "anchor" in out and out["anchor"] not in ANCHORS:
        raise ValueError(f"run-config trust-anchor={out['anchor']!r} is not valid; choose one of: {', '.join(ANCHORS)}")
    if with_ground_truth and str(run_config.get("malicious", "")).strip():
        try:
            out["malicious"] = [int(x) for x in str(run_config["malicious"]).replace(" ", "").split(",") if x != ""]
        except ValueError:
            raise ValueError(f"run-config malicious={run_config['malicious']!r} must be comma-separated partition ids") from None
    return out
