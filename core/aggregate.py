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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy

from .update import Layout
from .workers import map_ordered

#: elements per block: a float32 block (256 KiB) plus its scratch stay in a core's L2 cache
BLOCK = 1 << 16

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


__all__ = ["BLOCK", "FAST_RULES", "fast_rule", "flower_factors", "weighted_mean"]
