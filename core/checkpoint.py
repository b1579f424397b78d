"""Checkpoints of a :class:`~fedledger.core.pipeline.RoundPipeline`: what a resumed run needs.

After every completed round (trained, aggregated, committed by the audit trail), the pipeline
given a :class:`Checkpoint` writes one file, atomically (a temporary file, fsync, ``os.replace``,
the folder fsynced): a crash leaves either the previous checkpoint or the new one, never half of
one. It holds:

- ``round``: the last completed round, and ``global``: the global adapter after it;
- ``strategy``: the state of the wrapped Flower strategy, as *attributes*
  (:data:`STATE_ATTRS`: FedAdam/FedYogi/FedAdagrad's moments ``m_t``/``v_t``, FedAvgM's
  ``momentum_vector``, their ``current_arrays``), or the strategy's own ``state_dict()`` when it
  has one. Not the pickled object: a strategy holds callables (a user's metric or evaluation
  functions, lambdas and closures that do not pickle), and its configuration must come from the
  run's settings again (the caller checks they are unchanged), not from a file;
- ``trust``: the trust stage's ``state`` (PageRank trust history), if it has one;
- ``trail``: the audit trail's ``position()`` (the ledger run id, chain, registry, run hash);
- ``reports``: every round's :class:`RoundReport` so far; ``extra``: the caller's (the fedledger
  ServerApp keeps its central evaluation results and run-config there).

The file is a pickle: load only checkpoints of your own runs. :func:`resume` puts a checkpoint
back into a freshly built pipeline; ``RoundPipeline.start(..., first_round=r + 1)`` goes on.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

CHECKPOINT_FILE = "checkpoint.pkl"
FORMAT = 1
#: the attributes Flower's stateful rules change from round to round
STATE_ATTRS = ("current_arrays", "m_t", "v_t", "momentum_vector")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message is one line naming the fix."""


class Checkpoint:
    """``<folder>/checkpoint.pkl``; ``extra_fn()`` adds the caller's fields to each save."""

    def __init__(self, folder: str, extra_fn=None):
        self.path = os.path.join(os.path.abspath(folder), CHECKPOINT_FILE)
        self.extra_fn = extra_fn

    def save(self, pipeline, server_round: int, global_arrays: Mapping[str, np.ndarray]) -> None:
        state = {"format": FORMAT, "round": int(server_round),
                 "global": {k: np.array(v, copy=True) for k, v in global_arrays.items()},
                 "strategy": strategy_state(pipeline.strategy),
                 "trust": getattr(pipeline.trust, "state", None) if pipeline.trust is not None else None,
                 "trail": pipeline.trail.position() if hasattr(pipeline.trail, "position") else None,
                 "reports": dict(pipeline.reports),
                 "extra": self.extra_fn() if self.extra_fn is not None else {}}
        atomic_pickle(self.path, state)

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def load(self) -> dict:
        if not os.path.exists(self.path):
            raise CheckpointError(f"no checkpoint at {self.path}: the run completed no round, or it is not a "
                                  f"resumable run folder; start the run again instead")
        try:
            with open(self.path, "rb") as fh:
                state = pickle.load(fh)
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
            raise CheckpointError(f"{self.path} cannot be read ({type(exc).__name__}); the checkpoint is "
                                  f"damaged") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CheckpointError(f"{self.path} is not a checkpoint of this version (format {FORMAT})")
        return state


def atomic_pickle(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strategy_state(strategy) -> dict:
    if hasattr(strategy, "state_dict") and hasattr(strategy, "load_state_dict"):
        return {"state_dict": strategy.state_dict()}
    return {k: getattr(strategy, k) for k in STATE_ATTRS if hasattr(strategy, k)}


def load_strategy_state(strategy, state: Mapping) -> None:
    if "state_dict" in state:
        strategy.load_state_dict(state["state_dict"])
        return
    for k, v in state.items():
        setattr(strategy, k, v)


def resume(pipeline, state: Mapping) -> None:
    """Put ``state`` (:meth:`Checkpoint.load`) back into a pipeline built as the run built it."""
    load_strategy_state(pipeline.strategy, state["strategy"])
    if pipeline.trust is not None and state.get("trust") is not None and hasattr(pipeline.trust, "state"):
        pipeline.trust.state = dict(state["trust"])
    if pipeline.trail is not None:
        if state.get("trail") is None or not hasattr(pipeline.trail, "resume"):
            raise CheckpointError("the checkpoint has no audit-trail position, or this trail cannot resume; resume "
                                  "with the settings the run had")
        pipeline.trail.resume(state["trail"], int(state["round"]))
    pipeline.reports.update(state["reports"])
    pipeline.mark_begun()


__all__ = ["CHECKPOINT_FILE", "Checkpoint", "CheckpointError", "STATE_ATTRS", "resume", "strategy_state"]
