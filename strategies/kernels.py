"""Shared maths for every strategy: flattening adapters, weighted averages, Gram matrices, and
the layout check serverless peers apply to a neighbour's model. One place for the hot loops,
so they can be made fast once. (Server-side replies are decoded and validated once, in
``fedledger.core.update``.)

Adapters travel as Flower ``ArrayRecord`` objects (name -> fp32 array). Helpers here accept an
``ArrayRecord`` or a plain ``dict[str, np.ndarray]``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from flwr.app import ArrayRecord, Message

from fedledger.core.pipeline import to_record
from fedledger.core.update import payload_nbytes
from fedledger.core.workers import map_ordered


def as_numpy_dict(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Name -> numpy array, in the record's order."""
    if isinstance(arrays, ArrayRecord):
        return {k: v.numpy() for k, v in arrays.items()}
    return {k: np.asarray(v) for k, v in arrays.items()}


def to_arrayrecord(arrays: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Build an ArrayRecord that keeps the names (Flower's list form would lose them)."""
    return to_record(arrays)


def layout(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) for every tensor, in order: two updates are compatible iff layouts match."""
    return [(k, tuple(v.shape)) for k, v in as_numpy_dict(arrays).items()]


def flatten(arrays: ArrayRecord | Mapping[str, np.ndarray], dtype=np.float32) -> np.ndarray:
    """Concatenate every tensor (in record order) into one 1-D vector."""
    parts = [np.ravel(v).astype(dtype, copy=False) for v in as_numpy_dict(arrays).values()]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def unflatten(vector: np.ndarray, like: ArrayRecord | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`flatten` using the names and shapes of ``like``."""
    out, start = {}, 0
    for name, shape in layout(like):
        size = int(np.prod(shape)) if shape else 1
        out[name] = vector[start : start + size].reshape(shape).astype(np.float32, copy=False)
        start += size
    if start != vector.size:
        raise ValueError(f"vector has {vector.size} values, layout needs {start}")
    return out


def stack(updates: Sequence[ArrayRecord | Mapping[str, np.ndarray]]) -> np.ndarray:
    """(N, P) float32 matrix, one flattened update per row, written in place (one copy)."""
    first = flatten(updates[0])
    out = np.empty((len(updates), first.size), dtype=np.float32)
    out[0] = first
    for i, u in enumerate(updates[1:], start=1):
        offset = 0
        for v in as_numpy_dict(u).values():
            n = v.size
            out[i, offset : offset + n] = np.ravel(v)
            offset += n
    return out


def weighted_average(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Weighted mean of the rows of ``vectors`` (weights need not sum to one): one GEMV."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size != vectors.shape[0]:
        raise ValueError("one weight per row is needed")
    total = w.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("weights must be finite and sum to a positive number")
    return (w / total).astype(np.float32) @ vectors


def weighted_average_arrays(
    updates: Sequence[ArrayRecord | Mapping[str, np.ndarray]], weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Weighted mean of whole adapters, returned with the first update's names and shapes."""
    return unflatten(weighted_average(stack(updates), weights), updates[0])


def gram(vectors: np.ndarray) -> np.ndarray:
    """All pairwise dot products of the rows: one (N, P) x (P, N) GEMM."""
    return vectors @ vectors.T


def cosine_matrix(vectors: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """All pairwise cosine similarities from one Gram matrix (no N^2 Python loop)."""
    g = gram(vectors).astype(np.float64)
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    return g / np.maximum(np.outer(norms, norms), eps)


def array_nbytes(arrays: ArrayRecord | Mapping[str, np.ndarray]) -> int:
    """Payload bytes of an adapter (sum of tensor sizes)."""
    return int(sum(v.nbytes for v in as_numpy_dict(arrays).values()))


def message_nbytes(msg: Message) -> int:
    """Bytes of array data a message carries (serialised, counted without decoding)."""
    return payload_nbytes(msg)


def invalid_reason(
    arrays: ArrayRecord | Mapping[str, np.ndarray] | None,
    expected: Iterable[tuple[str, tuple[int, ...]]] | None,
) -> str | None:
    """Why an update must not be merged (wrong keys, wrong shapes, NaN/Inf), or None if fine."""
    if arrays is None:
        return "no ArrayRecord in reply"
    got = as_numpy_dict(arrays)
    if not got:
        return "empty ArrayRecord"
    if expected is not None:
        exp = dict(expected)
        missing = sorted(set(exp) - set(got))
        extra = sorted(set(got) - set(exp))
        if missing or extra:
            return f"wrong keys (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{'...' if len(extra) > 3 else ''})"
        for name, shape in exp.items():
            if tuple(got[name].shape) != tuple(shape):
                return f"wrong shape for {name}: {tuple(got[name].shape)} != {tuple(shape)}"
    for name, v in got.items():
        if not np.issubdtype(v.dtype, np.floating):
            return f"non-float tensor {name} ({v.dtype})"
        if not np.all(np.isfinite(v)):
            return f"NaN/Inf values in {name}"
    return None


def delta_matrix(adapters: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], base: np.ndarray,
                 anchor: np.ndarray | None = None, buffer: np.ndarray | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """(X, X . anchor): row i of the (N, P) float32 matrix X is ``flat(adapters[i]) - base``,
    written in one pass straight from the adapters' tensors (no flattened copy, no second
    subtraction pass); rows are filled on the tensor thread pool. With ``anchor`` (a flat P
    vector), each row's dot product with it is taken tensor by tensor right after each segment is
    written, while it is in the cache (float32 products summed in float64; None without an anchor). ``buffer``: a float32 (M, P)
    array with M >= N to write X into (its first N rows), e.g. last round's: reusing memory that
    is already mapped saves the page faults of a fresh N x P allocation."""
    sizes = [int(np.size(adapters[0][n])) if adapters else 0 for n in names]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int) if sizes else np.zeros(1, int)
    shape = (len(adapters), int(offsets[-1]))
    if buffer is not None and buffer.dtype == np.float32 and buffer.ndim == 2 and buffer.shape[1] == shape[1] \
            and buffer.shape[0] >= shape[0] and buffer.flags.c_contiguous:
        x = buffer[:shape[0]]
    else:
        x = np.empty(shape, dtype=np.float32)

    def fill(i: int) -> float | None:
        row, arrays, dot = x[i], adapters[i], 0.0
        for name, start, stop in zip(names, offsets[:-1], offsets[1:]):
            segment = row[start:stop]
            np.subtract(np.ravel(arrays[name]), base[start:stop], out=segment)
            if anchor is not None:  # while the segment is in the cache
                dot += float(np.dot(segment, anchor[start:stop]))
        return None if anchor is None else dot

    dots = map_ordered(fill, range(len(adapters)))
    return x, (None if anchor is None else np.asarray(dots, dtype=np.float64))


def gram_with_reference(vectors: np.ndarray, reference: np.ndarray | None = None):
    """(Gram of the rows, rows . reference, reference . reference) without stacking a copy.

    One (N, P) x (P, N) GEMM plus one GEMV: the reference row is never concatenated to
    ``vectors`` (that would copy all N x P values). Returns float64 results; the last two are
    None without a reference.
    """
    g = gram(vectors).astype(np.float64)
    if reference is None:
        return g, None, None
    ref = np.asarray(reference, dtype=vectors.dtype).ravel()
    return g, (vectors @ ref).astype(np.float64), float(np.dot(ref.astype(np.float64), ref.astype(np.float64)))
