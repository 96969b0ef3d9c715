"""The output walked in cache-sized blocks: every output-sized array is read block by block
as (rows = batch x output channels, columns = spatial positions), so a stage's state and its
metrics are formed while the block is in cache."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..arithmetic.float_conv import ChannelSparse
from .metrics import CHUNK


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
    """Cache-sized blocks (about CHUNK elements) covering an output of ``shape``."""
    o = shape[1]
    rows, cols = shape[0] * o, int(np.prod(shape[2:], dtype=np.int64))
    if cols >= CHUNK:
        return [Block(slice(r, r + 1), slice(c, min(c + CHUNK, cols)), o)
                for r in range(rows) for c in range(0, cols, CHUNK)]
    step = max(1, CHUNK // max(cols, 1))
    return [Block(slice(r, min(r + step, rows)), slice(None), o) for r in range(0, rows, step)]


def reader(a: np.ndarray | ChannelSparse) -> Callable[[Block], np.ndarray]:
    """Reads one block of an output-sized array, dense or channel-sparse."""
    if isinstance(a, ChannelSparse):
        return a.block
    rows = as_rows(a)
    return lambda k: k.of(rows)


def as_rows(a: np.ndarray) -> np.ndarray:
    """An output-sized array as (batch x channels, spatial), a view when contiguous."""
    return np.ascontiguousarray(a).reshape(a.shape[0] * a.shape[1], -1)
