"""Detection metrics: how well a defence's excluded set matches the ground-truth attackers.

Ground truth comes from the run-config (``malicious`` = partition ids), never from what
clients report about themselves; a reply's partition is the one its node's identity was
resolved to once (``fedledger.identity.Roster``), never a metric the reply carries.
"""

from __future__ import annotations

from collections.abc import Iterable


def detection_metrics(excluded: Iterable, malicious: Iterable, participants: Iterable | None = None) -> dict:
    """Precision, recall, F1 of ``excluded`` against ``malicious`` among ``participants``.

    Only participants count (an attacker that did not reply this round cannot be detected).
    Conventions for empty sets (as sklearn's ``zero_division=...`` made explicit):
    nothing excluded -> precision 1.0 if there were no attackers else 0.0; no attackers ->
    recall 1.0; F1 is 1.0 exactly when nothing was excluded and there were no attackers.
    """
    excluded, malicious = set(excluded), set(malicious)
    if participants is not None:
        participants = set(participants)
        excluded &= participants
        malicious &= participants
    tp = len(excluded & malicious)
    fp = len(excluded - malicious)
    fn = len(malicious - excluded)
    precision = tp / (tp + fp) if tp + fp else (1.0 if not malicious else 0.0)
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn,
            "excluded": sorted(excluded), "malicious": sorted(malicious)}


def mean_detection(rounds: Iterable[dict]) -> dict:
    """Mean precision/recall/F1 over rounds (e.g. the values of a ``detection`` history)."""
    rounds = [r for r in rounds if r]
    if not rounds:
        return {"precision": None, "recall": None, "f1": None}
    return {k: sum(r[k] for r in rounds) / len(rounds) for k in ("precision", "recall", "f1")}
