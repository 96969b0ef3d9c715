"""Chunks and threads: the cache-sized chunks a full-size pass walks, and the fixed split of
those chunks over two threads (numpy's loops and BLAS release the GIL). Used by every layer
that makes a full-size pass (quantization, emulation, measurement)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


#: Elements per chunk when metrics are accumulated: small enough to stay in cache, so the
#: five reductions over a chunk cost one trip through memory instead of five.
CHUNK = 1 << 16


def chunks(n: int, size: int = CHUNK) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


#: The chunks of one pass are cut into this many contiguous groups, each on its own thread
#: (numpy's loops and BLAS release the GIL: measured 1.6x on 2 cores). The cut is fixed, so the
#: numbers do not depend on how many cores the machine has.
SPLIT = 2
_POOL: list[Any] = []
#: ``two_at_a_time``'s threads: a pass on one of them runs its groups on it, one after the
#: other (both cores are busy with a layer each already: handing a group to the one metrics
#: thread made the two layers wait on each other; measured 145 to 126 ms for the screen of a
#: ResNet-18 shape's 20 convs, its capture 10 ms faster). The groups, so the numbers, are the
#: same either way.
_LAYER = threading.local()


def over_chunks(n: int, work: Callable[[list[slice]], T], size: int = CHUNK) -> list[T]:
    """``work`` over the chunks of ``n`` elements (of ``size``), one call per group (see
    SPLIT), in order."""
    return over_groups(chunks(n, size), work)


def over_groups(items: list[Any], work: Callable[[list[Any]], T]) -> list[T]:
    """``work`` over SPLIT contiguous groups of ``items``, on threads, results in order."""
    size = max(1, -(-len(items) // SPLIT))
    groups = [items[i:i + size] for i in range(0, len(items), size)] or [[]]
    if len(groups) == 1 or _cores() < 2 or getattr(_LAYER, "busy", False):
        return [work(g) for g in groups]
    import os

    if not _POOL or _POOL[0][0] != os.getpid():  # a forked child has no worker thread
        from concurrent.futures import ThreadPoolExecutor

        _POOL[:] = [(os.getpid(), ThreadPoolExecutor(SPLIT - 1,
                                                     thread_name_prefix="qconvdiag-metrics"))]
    futures = [_POOL[0][1].submit(work, g) for g in groups[1:]]
    first = work(groups[0])
    return [first, *(f.result() for f in futures)]


def two_at_a_time(work: Callable[[Any], T], items: list[Any]) -> list[T]:
    """``work`` on each item, on two threads taking the next item as they finish (the model
    walk's layers: their single-threaded parts, numpy's and torch's, release the GIL and
    overlap), results in order. Measured on a ResNet-18 shape's 20 convs: the capture's
    per-layer work 45-70 ms faster, the screen 30-40 ms."""
    if len(items) < 2 or _cores() < 2:
        return [work(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    def on_layer_thread(item: Any) -> T:
        _LAYER.busy = True  # both cores are taken: its passes' groups run here, in turn
        return work(item)

    with ThreadPoolExecutor(2, thread_name_prefix="qconvdiag-layers") as pool:
        return list(pool.map(on_layer_thread, items))


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Elements per block when the ladder walks an output (``blocks``): a chunk's worth.
BLOCK = CHUNK


class Block:
    """A block of the output seen as rows (batch x output channel) by columns (spatial
    positions): whole rows, or part of one row when a row alone is bigger than a chunk. Every
    output-sized array is read through ``of``; per-channel values through ``per_channel``."""

    __slots__ = ("rows", "cols", "channels")

    def __init__(self, rows: slice, cols: slice, out_channels: int) -> None:
        self.rows, self.cols = rows, cols
        self.channels = np.arange(rows.start, rows.stop) % out_channels

    def of(self, a: np.ndarray) -> np.ndarray:
        """This block of an output-sized array given as (rows, columns)."""
        return a[self.rows, self.cols]

    def per_channel(self, v: np.ndarray) -> np.ndarray:
        """One value per output channel, as a column matching the block's rows."""
        return np.asarray(v, dtype=np.float64).reshape(-1)[self.channels][:, None]


def blocks(shape: tuple[int, ...]) -> list[Block]:
    """Cache-sized blocks (about BLOCK elements) covering an output of ``shape``."""
    o = shape[1]
    rows, cols = shape[0] * o, int(np.prod(shape[2:], dtype=np.int64))
    if cols >= BLOCK:
        return [Block(slice(r, r + 1), slice(c, min(c + BLOCK, cols)), o)
                for r in range(rows) for c in range(0, cols, BLOCK)]
    step = max(1, BLOCK // max(cols, 1))
    return [Block(slice(r, min(r + step, rows)), slice(None), o) for r in range(0, rows, step)]
