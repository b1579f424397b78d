"""Peer-side merge maths for serverless exchanges, as pure numpy (no Flower client imports).

In ring / gossip / async-gossip the ServerApp never averages: it relays payloads along the
topology, and each peer merges what it receives with the functions below (called from the
ClientApp handlers in ``fedledger.client_peer``).

Ring all-reduce works on the *weighted vector* ``[n * flatten(adapter), n]`` (n = examples):
after reduce-scatter + all-gather every peer holds ``[sum n_i x_i, sum n_i]`` and divides, which
is exactly FedAvg weighted by num-examples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .kernels import flatten, unflatten


# ---------------------------------------------------------------------- ring all-reduce
def chunk_bounds(length: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous chunks of a vector of ``length`` (sizes differ by at most one)."""
    base, extra = divmod(length, n)
    out, start = [], 0
    for i in range(n):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size))
        start += size
    return out


def ring_indices(pos: int, n: int, step: int) -> tuple[int, int, str]:
    """(chunk to send, chunk received, how to merge it) for ring position ``pos`` at ``step``.

    Steps ``0..n-2`` are reduce-scatter (received chunk is *added*), ``n-1..2n-3`` all-gather
    (received chunk *overwrites*). The received chunk comes from position ``pos-1``.
    """
    if step < n - 1:
        return (pos - step) % n, (pos - 1 - step) % n, "add"
    s = step - (n - 1)
    return (pos + 1 - s) % n, (pos - s) % n, "set"


def weighted_vector(arrays: Mapping[str, np.ndarray], num_examples: float) -> np.ndarray:
    """``[n * flatten(arrays), n]`` as float32."""
    x = flatten(arrays)
    out = np.empty(x.size + 1, dtype=np.float32)
    out[:-1] = x * np.float32(num_examples)
    out[-1] = num_examples
    return out


def vector_to_adapter(vec: np.ndarray, like: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of :func:`weighted_vector` after the all-reduce: divide by the summed weight."""
    total = float(vec[-1])
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"ring result has non-positive total weight {total}")
    return unflatten((vec[:-1] / np.float32(total)).astype(np.float32), like)


def apply_chunk(buf: np.ndarray, bounds: tuple[int, int], chunk: np.ndarray, op: str) -> None:
    """Merge a received chunk into the peer's buffer in place (``add`` or ``set``)."""
    a, b = bounds
    if op == "add":
        buf[a:b] += chunk
    elif op == "set":
        buf[a:b] = chunk
    else:
        raise ValueError(f"unknown chunk op {op!r}")


def simulate_ring_allreduce(vectors: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """Run the whole ring all-reduce in memory (ring = list order). Returns every peer's final
    buffer and the bytes each peer sent. Used by tests and as the reference for the relay."""
    n = len(vectors)
    bufs = [np.array(v, dtype=np.float32, copy=True) for v in vectors]
    sent = [0] * n
    if n == 1:
        return bufs, sent
    bounds = chunk_bounds(bufs[0].size, n)
    for step in range(2 * (n - 1)):
        outgoing = []
        for p in range(n):
            send, _, _ = ring_indices(p, n, step)
            a, b = bounds[send]
            outgoing.append(bufs[p][a:b].copy())
            sent[p] += outgoing[-1].nbytes
        for p in range(n):
            _, recv, op = ring_indices(p, n, step)
            apply_chunk(bufs[p], bounds[recv], outgoing[(p - 1) % n], op)
    return bufs, sent


# ---------------------------------------------------------------------- synchronous gossip
def metropolis_weights(edges: Sequence[tuple[int, int]], nodes: Sequence[int]) -> dict[int, dict[int, float]]:
    """Symmetric, doubly stochastic mixing weights on the exchange graph:
    ``W_ij = 1 / (1 + max(deg_i, deg_j))``, ``W_ii = 1 - sum_j W_ij``. Because W is doubly
    stochastic, mixing ``(n x, n)`` pairs conserves the examples-weighted sum (push-sum style),
    so every peer converges to the true FedAvg of the round."""
    deg = {i: 0 for i in nodes}
    for i, j in edges:
        deg[i] += 1
        deg[j] += 1
    w: dict[int, dict[int, float]] = {i: {} for i in nodes}
    for i, j in edges:
        v = 1.0 / (1 + max(deg[i], deg[j]))
        w[i][j] = v
        w[j][i] = v
    for i in nodes:
        w[i][i] = 1.0 - sum(v for k, v in w[i].items() if k != i)
    return w


def gossip_mix(own: np.ndarray, own_mass: float, self_weight: float,
               neighbours: Sequence[tuple[np.ndarray, float, float]]) -> tuple[np.ndarray, float]:
    """One push-pull mixing step on flat vectors.

    ``neighbours``: ``(x_j, mass_j, W_ij)``. With ``s = mass * x``: ``s_i' = W_ii s_i + sum W_ij s_j``,
    ``mass_i' = W_ii mass_i + sum W_ij mass_j``; returns ``(s_i' / mass_i', mass_i')``.
    """
    s = own.astype(np.float64) * (self_weight * own_mass)
    m = self_weight * own_mass
    for x, mass, w in neighbours:
        s += x.astype(np.float64) * (w * mass)
        m += w * mass
    if m <= 0:
        return own.copy(), own_mass
    return (s / m).astype(np.float32), float(m)


def consensus_distance(models: np.ndarray, target: np.ndarray) -> dict:
    """L2 distance of each row of ``models`` to ``target``: max, mean, and relative to ||target||."""
    d = np.linalg.norm(models.astype(np.float64) - target.astype(np.float64), axis=1)
    norm = float(np.linalg.norm(target)) or 1.0
    return {"consensus-max": float(d.max()), "consensus-mean": float(d.mean()),
            "consensus-max-rel": float(d.max() / norm), "consensus-mean-rel": float(d.mean() / norm)}


# ---------------------------------------------------------------------- asynchronous gossip
def staleness_weight(tau: float, exponent: float = 0.5) -> float:
    """Down-weight a model that is ``tau`` local iterations behind: ``(1 + tau) ** -exponent``."""
    return float((1.0 + max(0.0, tau)) ** (-exponent))


def async_merge(own: np.ndarray, own_examples: float,
                received: Sequence[tuple[np.ndarray, float, float]], exponent: float = 0.5) -> np.ndarray:
    """Merge received models ``(x_j, n_j, staleness_j)`` into ``own``: weights ``n_i`` and
    ``n_j * staleness_weight(tau_j)``, normalised."""
    weights = [float(own_examples)] + [float(n) * staleness_weight(t, exponent) for _, n, t in received]
    total = sum(weights)
    acc = own.astype(np.float64) * weights[0]
    for (x, _, _), w in zip(received, weights[1:]):
        acc += x.astype(np.float64) * w
    return (acc / total).astype(np.float32)
