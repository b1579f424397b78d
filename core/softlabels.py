"""KD-FedLLM's soft labels: a client's top-k logit reply decoded once, and the rule that aggregates them.

In ``strategy="kd"`` a client never uploads parameters. The server names a public batch (a
:class:`LogitQuery`: example ids, ``k``, temperature); each client answers with its top-k
next-token logits at every answer position of those examples, in the order the server
tokenised them:

    arrays "logits":  topk-values  float16 (rows, k)   the k largest logits of each position
                      topk-ids     int32   (rows, k)   their token ids, in [0, vocab)
                      public-ids   int32   (batch,)    the example ids it answers (= the query)
    metrics:          num-examples (its private training-set size: the aggregation weight), ...
    audit:            the signed record over these three arrays (when the run is audited)

:func:`decode_logit_reply` accepts a reply only when it is exactly that (one ArrayRecord, one
MetricRecord, the three arrays with those dtypes and shapes, every value finite, every id
inside the vocabulary, no id twice in a row, the asked example ids, ``k`` not larger than
asked); anything else is a :class:`~.update.Rejected` with its reason and the round goes on.
It reuses :mod:`.update`'s array decoding (npy header, dtype, shape, byte count, finiteness):
the arrays are zero-copy read-only views of the bytes that arrived.

The rule (:func:`aggregate`, recorded as ``SoftLabelAverage``): each reply becomes a sparse
distribution, ``softmax(values / T)`` over its k entries (the tail beyond the top k is dropped
and the k entries renormalised; k = 1 is a hard label); the server's soft label of a position
is the examples-weighted mean of the clients' sparse distributions on the union of their ids,
computed in float64 and sent as float16 probabilities + int32 ids, ``(rows, m)`` with m the
largest union of a row (shorter rows are padded with probability 0 and id 0). It is a pure
function of the replies in record order, the weights and the trust decision, so the auditor
replays it bit-exactly (``core.replay``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

from .trust import Contribution
from .update import (
    AUDIT_KEY, NUM_EXAMPLES, BoundaryError, Rejected, Update, decode_array, scalar_metrics, whole_number,
)

VALUES, IDS, PUBLIC_IDS = "topk-values", "topk-ids", "public-ids"
PROBS = "probs"                      # the aggregate: float16 probabilities ...
AGG_IDS = "ids"                      # ... and their int32 token ids
RULE = "SoftLabelAverage"
VALUE_DTYPE, ID_DTYPE, PROB_DTYPE = np.dtype("<f2"), np.dtype("<i4"), np.dtype("<f2")


@dataclass(frozen=True)
class LogitQuery:
    """What the server asks for in one round; what every reply must match."""

    public_ids: tuple[int, ...]       # public examples, in the order of the rows
    rows: int                         # answer positions of those examples (the server tokenised them)
    k: int
    temperature: float
    vocab_size: int

    def __post_init__(self):
        if self.k < 1 or self.rows < 1 or self.vocab_size < 1 or not self.temperature > 0:
            raise ValueError(f"a logit query needs k >= 1, rows >= 1, a vocabulary and temperature > 0, got {self}")

    def to_dict(self) -> dict:
        return {"public-ids": list(self.public_ids), "rows": self.rows, "k": self.k,
                "temperature": self.temperature, "vocab-size": self.vocab_size}


# ---------------------------------------------------------------------------- the boundary
def decode_logit_reply(msg: Message, query: LogitQuery, max_examples: int) -> Update:
    """One logit reply -> ``Update`` (arrays: the three views); raises BoundaryError with the reason."""
    if msg.has_error():
        raise BoundaryError(f"client error: {msg.error.reason}")
    content = msg.content
    records = list(content.array_records.values())
    metrics = list(content.metric_records.values())
    if len(records) != 1:
        raise BoundaryError(f"{len(records)} ArrayRecords (expected exactly 1)")
    if len(metrics) != 1:
        raise BoundaryError(f"{len(metrics)} MetricRecords (expected exactly 1)")
    if NUM_EXAMPLES not in metrics[0]:
        raise BoundaryError(f"no '{NUM_EXAMPLES}' metric")
    n = whole_number(metrics[0][NUM_EXAMPLES], f"'{NUM_EXAMPLES}'", max_examples)
    arrays = decode_logits(records[0], query)
    kept, dropped = scalar_metrics(metrics[0])
    kept.pop(NUM_EXAMPLES, None)
    audit = content.config_records.get(AUDIT_KEY)
    return Update(node_id=int(msg.metadata.src_node_id), arrays=arrays, num_examples=n, metrics=kept,
                  audit=dict(audit) if audit is not None else None, message=msg, dropped_metrics=dropped)


def decode_logits(record, query: LogitQuery) -> dict[str, np.ndarray]:
    """The three arrays of a logit reply, checked against ``query`` (BoundaryError otherwise)."""
    names = set(record.keys())
    if names != {VALUES, IDS, PUBLIC_IDS}:
        raise BoundaryError(f"logit reply holds {sorted(names)}, expected {sorted((VALUES, IDS, PUBLIC_IDS))}")
    batch = len(query.public_ids)
    public = decode_array(PUBLIC_IDS, record[PUBLIC_IDS], (batch,), ID_DTYPE)
    if tuple(int(i) for i in public) != tuple(query.public_ids):
        raise BoundaryError("the reply answers other public examples than the ones asked")
    for name in (VALUES, IDS):
        shape = tuple(getattr(record[name], "shape", ()))
        if len(shape) == 2 and shape[0] == query.rows and shape[1] > query.k:
            raise BoundaryError(f"{name}: k={shape[1]} is larger than the k={query.k} asked")
    values = decode_array(VALUES, record[VALUES], (query.rows, query.k), VALUE_DTYPE)  # finite, checked there
    ids = decode_array(IDS, record[IDS], (query.rows, query.k), ID_DTYPE)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= query.vocab_size):
        raise BoundaryError(f"{IDS}: token ids outside the vocabulary [0, {query.vocab_size})")
    if query.k > 1 and bool((np.diff(np.sort(ids, axis=1), axis=1) == 0).any()):
        raise BoundaryError(f"{IDS}: a token id appears twice in one position's top k")
    return {VALUES: values, IDS: ids, PUBLIC_IDS: public}


def decode_logit_replies(replies: Iterable[Message], query: LogitQuery, max_examples: int
                         ) -> tuple[list[Update], list[Rejected]]:
    """Decode every reply once; keeps the first valid reply per node id (as ``decode_replies``)."""
    updates, rejected, seen = [], [], set()
    for msg in replies:
        node = int(msg.metadata.src_node_id)
        try:
            update = decode_logit_reply(msg, query, max_examples)
        except BoundaryError as exc:
            rejected.append(Rejected(node, str(exc)))
            continue
        if node in seen:
            rejected.append(Rejected(node, "a second reply from this node in the same round"))
            continue
        seen.add(node)
        updates.append(update)
    return updates, rejected


def decode_soft_labels(record, rows: int, vocab_size: int) -> dict[str, np.ndarray]:
    """The aggregated soft labels a client receives (variant "client"): checked like a reply."""
    names = set(record.keys())
    if names != {PROBS, AGG_IDS}:
        raise BoundaryError(f"soft labels hold {sorted(names)}, expected {sorted((PROBS, AGG_IDS))}")
    shape = tuple(getattr(record[PROBS], "shape", ()))
    if len(shape) != 2 or shape[0] != rows:
        raise BoundaryError(f"{PROBS}: shape {shape} does not have the {rows} rows of the public batch")
    probs = decode_array(PROBS, record[PROBS], shape, PROB_DTYPE)
    ids = decode_array(AGG_IDS, record[AGG_IDS], shape, ID_DTYPE)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise BoundaryError(f"{AGG_IDS}: token ids outside the vocabulary [0, {vocab_size})")
    if bool((probs < 0).any()):
        raise BoundaryError(f"{PROBS}: negative probabilities")
    return {PROBS: probs, AGG_IDS: ids}


# ---------------------------------------------------------------------------- the rule
def sparse_distribution(values: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(values / T)`` over each row's k entries, in float64."""
    z = np.asarray(values, dtype=np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def aggregate(contributions: Sequence[Contribution], temperature: float, vocab_size: int
              ) -> dict[str, np.ndarray] | None:
    """The examples-weighted mean of the contributions' sparse distributions (see the module
    docstring); None when nothing is contributed. Contributions are logit-reply arrays."""
    if not contributions:
        return None
    weights = np.array([c.weight for c in contributions], dtype=np.float64)
    if not np.isfinite(weights).all() or weights.sum() <= 0:
        return None
    weights /= weights.sum()
    rows = contributions[0].arrays[IDS].shape[0]
    keys = np.concatenate([_keys(c.arrays[IDS], vocab_size) for c in contributions], axis=1).ravel()
    mass = np.concatenate([sparse_distribution(c.arrays[VALUES], temperature) * w
                           for c, w in zip(contributions, weights)], axis=1).ravel()
    union, inverse = np.unique(keys, return_inverse=True)
    summed = np.bincount(inverse, weights=mass, minlength=union.size)
    row_of = union // vocab_size
    width = int(np.bincount(row_of, minlength=rows).max())
    probs = np.zeros((rows, width), dtype=np.float64)
    ids = np.zeros((rows, width), dtype=np.int64)
    col = np.arange(union.size) - np.searchsorted(row_of, row_of)  # position inside its row
    probs[row_of, col] = summed
    ids[row_of, col] = union % vocab_size
    return {PROBS: probs.astype(PROB_DTYPE), AGG_IDS: ids.astype(ID_DTYPE)}


def _keys(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """(rows, k) token ids -> row * vocab + id (int64): one key per (position, token)."""
    return np.arange(ids.shape[0], dtype=np.int64)[:, None] * vocab_size + ids.astype(np.int64)


def support(replies: Sequence[Mapping[str, np.ndarray]], vocab_size: int) -> np.ndarray:
    """The sorted (position, token) keys (``row * vocab + id``) any of ``replies`` puts mass on."""
    return np.unique(np.concatenate([_keys(a[IDS], vocab_size).ravel() for a in replies]))


def dense_on(keys: np.ndarray, arrays: Mapping[str, np.ndarray], temperature: float, vocab_size: int) -> np.ndarray:
    """One reply's sparse distribution laid out on ``keys`` (:func:`support`; zeros where the
    reply has no mass), flat float32: the vector PageRank trust scores, one per client."""
    out = np.zeros(keys.size, dtype=np.float64)
    out[np.searchsorted(keys, _keys(arrays[IDS], vocab_size).ravel())] = \
        sparse_distribution(arrays[VALUES], temperature).ravel()
    return out.astype(np.float32)


def describe(k: int, temperature: float, vocab_size: int) -> dict:
    """The rule as the run's record names it (what :mod:`.replay` rebuilds)."""
    return {"name": RULE, "module": __name__, "params": {"k": int(k), "temperature": float(temperature),
                                                        "vocab-size": int(vocab_size)}}


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return int(sum(np.asarray(a).nbytes for a in arrays.values()))


__all__ = ["LogitQuery", "RULE", "aggregate", "decode_logit_replies", "decode_logit_reply", "decode_logits",
           "decode_soft_labels", "dense_on", "describe", "sparse_distribution", "support"]
