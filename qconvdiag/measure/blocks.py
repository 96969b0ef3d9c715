"""The output walked in cache-sized blocks: every output-sized array is read block by block
as (rows = batch x output channels, columns = spatial positions), so a stage's state and its
metrics are formed while the block is in cache."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..arithmetic.float_conv import ChannelSparse
from ..parallel import Block, blocks  # noqa: F401


def reader(a: np.ndarray | ChannelSparse) -> Callable[[Block], np.ndarray]:
    """Reads one block of an output-sized array, dense or channel-sparse."""
    if isinstance(a, ChannelSparse):
        return a.block
    rows = as_rows(a)
    return lambda k: k.of(rows)


def as_rows(a: np.ndarray) -> np.ndarray:
    """An output-sized array as (batch x channels, spatial), a view when contiguous."""
    return np.ascontiguousarray(a).reshape(a.shape[0] * a.shape[1], -1)
