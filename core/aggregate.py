"""Flower's FedAvg arithmetic, bit for bit, straight from the decoded views (no re-deserialising).

Flower's ``FedAvg`` / ``FedProx`` aggregate with ``aggregate_arrayrecords``: per reply, in reply
order, ``w_i / sum(w)`` as a Python float, and per tensor ``acc = v_0 * f_0`` then
``acc += v_i * f_i``, in the tensor's own dtype (numpy casts the Python float to it). Before
doing so it deserialises every ``Array`` again (``np.load`` copies) and allocates a temporary
per reply and tensor.

:func:`weighted_mean` computes the same floating-point operations in the same order on the
zero-copy views ``core.update`` decoded, so its result is identical to Flower's (tested bit for
bit, odd shapes, many replies, float16/32/64), with

- no copy of any reply: each value is read once, from the bytes that arrived;
- no temporary per reply: ``np.multiply(..., out=scratch)`` into one block-sized scratch
  buffer per task, ``np.add(..., out=acc)`` in place;
- tensors cut into blocks that stay in the CPU cache while every reply is added to them;
- blocks spread over a few threads (``core.workers``); each block is summed by one thread in
  reply order, so the result does not depend on the thread count;
- server memory O(P): the aggregate plus one scratch block per thread.

:func:`fast_rule` says when a strategy's ``aggregate_train`` is exactly this arithmetic (Flower's
own ``FedAvg`` and ``FedProx``, not subclasses that may override it). The round pipeline and the
auditor's replay both call ``core.pipeline.aggregate_contributions``, which uses this path for
those rules, so the audit recomputes the aggregate with the very same function.

:class:`FusedMean` folds the boundary's finiteness check into that sum for a plain FedAvg round
(no trust stage): the one pass over every received value both proves the replies finite and
computes their mean. A weighted sum with positive factors is finite only if every term is
(``inf * f`` is ``inf``, ``nan * f`` and ``inf - inf`` are ``nan``, and a non-finite
accumulator stays non-finite), so a finite sum proves every reply finite; a non-finite one
sends the round to the per-reply check, which names the bad tensor as before (a sum that
overflowed with finite terms finds none). The sum is the aggregate when the round keeps
exactly those replies, unchanged, with the same weights, in the same order; any other outcome
(a duplicate, an unknown node, a bad signature) discards it and the aggregate is computed
again by :func:`weighted_mean` over what was kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from .update import Layout, Update, all_finite, first_non_finite
from .workers import map_ordered

#: elements per block: a float32 block (512 KiB) plus its scratch stay in a core's L2 (or near L3)
#: cache; fewer, larger blocks cost fewer ufunc calls (N = 8 replies of 66k-value tensors: 11 ms
#: with 1 << 17 against 16 ms with 1 << 16, on the 2-core bench machine)
BLOCK = 1 << 17

#: the rules whose ``aggregate_train`` arrays are ``aggregate_arrayrecords`` (exact types only)
FAST_RULES = (FedAvg, FedProx)


def fast_rule(strategy: Strategy) -> bool:
    """Whether ``strategy.aggregate_train`` computes exactly :func:`weighted_mean` for its arrays."""
    return type(strategy) in FAST_RULES


def flower_factors(weights: Sequence[float]) -> list[float]:
    """The per-reply factors as Flower computes them: ``w / sum(weights)`` in Python floats."""
    total = sum(weights)
    return [w / total for w in weights]


def weighted_mean(arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float], layout: Layout
                  ) -> dict[str, np.ndarray]:
    """``sum_i arrays[i] * (weights[i] / sum(weights))`` per tensor of ``layout``, bit for bit as
    Flower's ``aggregate_arrayrecords`` (float dtypes; see the module docstring)."""
    if not arrays:
        raise ValueError("weighted_mean of no arrays")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} adapters but {len(weights)} weights")
    for name, (_, dtype) in layout.specs.items():
        if dtype.kind != "f":
            raise TypeError(f"{name}: weighted_mean needs floating-point tensors, got {dtype}")
    factors = flower_factors(weights)
    out = {name: np.empty(shape, dtype) for name, (shape, dtype) in layout.specs.items()}
    jobs = []
    for name, acc in out.items():
        flat_acc = acc.reshape(-1)
        scale = [acc.dtype.type(f) for f in factors]  # the cast numpy applies to a Python float
        sources = [np.ravel(a[name]) for a in arrays]
        for start in range(0, max(flat_acc.size, 1), BLOCK):
            jobs.append((flat_acc, sources, scale, start, min(start + BLOCK, flat_acc.size)))
    map_ordered(_sum_block, jobs)
    return out


def _sum_block(job) -> None:
    acc_flat, sources, scale, start, stop = job
    if stop <= start:
        return
    acc = acc_flat[start:stop]
    np.multiply(sources[0][start:stop], scale[0], out=acc)
    if len(sources) == 1:
        return
    tmp = np.empty(stop - start, acc.dtype)
    for src, f in zip(sources[1:], scale[1:]):
        np.multiply(src[start:stop], f, out=tmp)
        np.add(acc, tmp, out=acc)


class FusedMean:
    """The finiteness check of ``core.update.decode_replies`` fused with the FedAvg sum (see the
    module docstring). Pass it as ``decode_replies(..., finite_check=fused)``, then
    :meth:`take` the aggregate for the round's contributions (None: compute it again)."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._sum: dict[str, np.ndarray] | None = None
        self._terms: tuple[tuple[Mapping[str, np.ndarray], float], ...] = ()

    def __call__(self, candidates: Sequence[Update]) -> list[str | None]:
        """Per candidate, the first tensor with a NaN/Inf value or None (as the plain check)."""
        self._sum, self._terms = None, ()
        if not candidates:
            return []
        weights = [float(u.num_examples) for u in candidates]
        total = weighted_mean([u.arrays for u in candidates], weights, self.layout)
        if all(map_ordered(all_finite, list(total.values()))):
            self._sum = total
            self._terms = tuple((u.arrays, w) for u, w in zip(candidates, weights))
            return [None] * len(candidates)
        return map_ordered(lambda u: first_non_finite(u.arrays), candidates)

    def take(self, arrays: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]
             ) -> dict[str, np.ndarray] | None:
        """The sum, if ``arrays``/``weights`` are exactly the checked candidates (the same
        objects, in order); None otherwise. Either way the sum is released."""
        total, terms = self._sum, self._terms
        self._sum, self._terms = None, ()
        if total is None or len(arrays) != len(terms):
            return None
        if all(a is checked and float(w) == tw for a, w, (checked, tw) in zip(arrays, weights, terms)):
            return total
        return None


__all__ = ["BLOCK", "FAST_RULES", "FusedMean", "fast_rule", "flower_factors", "weighted_mean"]
