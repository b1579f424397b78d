"""One small thread pool for the per-tensor numpy loops of a round (numpy releases the GIL in them).

The server's hot loops (finiteness of every received tensor, the FedAvg sum) are single-threaded
numpy ufuncs over independent tensors; running them on a few threads uses the cores a round
otherwise leaves idle. The results do not depend on the number of threads: every tensor is
computed by exactly one thread, in the same order.

``FEDLEDGER_THREADS`` sets the number of threads (default: the CPU count, at most 8; 1 = no pool).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_IN_WORKER = threading.local()


def thread_count() -> int:
    """Threads the pool uses: ``FEDLEDGER_THREADS`` if set, else min(CPU count, 8)."""
    raw = os.environ.get("FEDLEDGER_THREADS", "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            raise ValueError(f"FEDLEDGER_THREADS={raw!r} is not a whole number; unset it or give e.g. 2") from None
    return max(1, min(os.cpu_count() or 1, 8))


def _pool(n: int) -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers != n:  # noqa: SLF001  (resize when the setting changes)
            if _POOL is not None:
                _POOL.shutdown(wait=False)
            _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="fedledger-tensor",
                                       initializer=_mark_worker)
        return _POOL


def _mark_worker() -> None:
    _IN_WORKER.active = True


def map_ordered(fn: Callable[[T], R], items: Iterable[T], *, min_items: int = 2) -> list[R]:
    """``[fn(x) for x in items]``, on the pool when there are at least ``min_items`` items.

    Called from inside a pool thread it runs inline (no nested waits on the same pool).
    """
    seq: Sequence[T] = items if isinstance(items, Sequence) else list(items)
    n = thread_count()
    if n == 1 or len(seq) < min_items or getattr(_IN_WORKER, "active", False):
        return [fn(x) for x in seq]
    # one task per thread, each a contiguous run of items: a task per item would cost a future
    # (tens of microseconds) per tensor block, as much as the block's own arithmetic
    size = -(-len(seq) // n)
    runs = _pool(n).map(lambda start: [fn(x) for x in seq[start:start + size]], range(0, len(seq), size))
    return [r for run in runs for r in run]


__all__ = ["map_ordered", "thread_count"]
