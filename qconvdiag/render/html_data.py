"""What the HTML report draws, as plain numbers: numpy only, no plotting library, no torch.

Everything here is read from a finished diagnosis (the report, each path's run and the case's
tensors); nothing is recomputed by running a conv. The chart builders (``html_charts``) turn
these values into Vega-Lite specs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..measure.evidence import PathRun
from ..quantization.qparams import QParams, clip_bounds
from ..report import PathReport

#: Largest side of an error heatmap (cells); a longer side is downsampled in blocks.
HEATMAP_SIDE = 64
#: Largest length of a conv1d error strip (cells).
HEATMAP_STRIP = 512
#: Worst output channels that get a heatmap, per path.
WORST_CHANNELS = 3
#: Histogram bins over the shown range (the clipping bounds are always bin edges).
HISTOGRAM_BINS = 60
#: Most quantization levels drawn as grid lines; past it every k-th level is drawn.
GRID_LINES = 64
#: Significant digits of the values written into the page (the tooltips show them).
DIGITS = 5


def rounded(values: np.ndarray, digits: int = DIGITS) -> list[float]:
    """Plain floats with ``digits`` significant digits: 0.123456789 -> 0.12346 (a short JSON
    text for each of thousands of heatmap cells)."""
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return [float(f"{v:.{digits}g}") for v in flat.tolist()]


@dataclass(frozen=True, eq=False)
class PathErrors:
    """One path's output error, element by element (float units, output's shape)."""

    quantized: np.ndarray
    """The dequantized output torch returned (the emulation's when torch did not run)."""
    error: np.ndarray
    """quantized - float output (the float output after a fused ReLU)."""


def path_errors(run: PathRun) -> PathErrors | None:
    """quantized - float for every output element, from the codes the diagnosis kept: torch's
    own output when it ran, else what the emulation says ran (the ladder's last state). None
    when the path could not run at all."""
    codes = run.torch_codes
    if codes is None:
        ran = run.module_emulation if run.module_emulation is not None else run.emulation
        codes = None if ran is None else ran.output_codes
    reference = run.output_reference
    if codes is None or reference is None:
        return None
    qp = run.spec.final_output_qparams
    quantized = (np.asarray(codes, dtype=np.float64) - qp.zero_point[0]) * qp.scale[0]
    return PathErrors(quantized, np.subtract(quantized, reference, dtype=np.float64))


@dataclass(frozen=True)
class ChannelErrors:
    """Per output channel (axis 1 of the output): RMSE and largest |error|, float units."""

    rmse: np.ndarray
    max_abs: np.ndarray

    def worst(self, k: int = WORST_CHANNELS) -> list[int]:
        """Up to ``k`` channels with the largest RMSE (ties: the lower index), none whose
        error is exactly 0."""
        order = sorted(range(self.rmse.size), key=lambda c: (-float(self.rmse[c]), c))
        return [c for c in order[:k] if self.rmse[c] > 0]


def channel_errors(error: np.ndarray) -> ChannelErrors:
    """Over every batch element and position (one output-sized temporary at a time)."""
    others = (0, *range(2, error.ndim))
    return ChannelErrors(np.sqrt(np.mean(np.square(error), axis=others)),
                         np.max(np.abs(error), axis=others))


@dataclass(frozen=True)
class Heatmap:
    """The error of one output channel over its positions: one (N, D) slice, H x W cells (a
    conv1d's output is one row), each cell the element with the largest |error| of its block
    when downsampled."""

    channel: int
    batch: int
    """The batch element shown: the one holding the channel's largest |error|."""
    depth: int | None
    """conv3d: the depth slice shown (the one holding the largest |error|)."""
    shape: tuple[int, int]
    """(H, W) of the full map (H = 1 for conv1d)."""
    block: tuple[int, int]
    """Output positions per cell along H and W: (1, 1) when not downsampled."""
    positions: np.ndarray
    """(cells, ndim) int: the exact output index (N, C, [D,] [H,] W) each cell shows."""
    error: np.ndarray
    """(cells,) quantized - float at those positions."""
    quantized: np.ndarray
    """(cells,) the quantized output at those positions."""

    @property
    def downsampled(self) -> bool:
        return self.block != (1, 1)

    @property
    def cells(self) -> tuple[int, int]:
        return (math.ceil(self.shape[0] / self.block[0]), math.ceil(self.shape[1] / self.block[1]))


def heatmap(errors: PathErrors, channel: int) -> Heatmap:
    """The channel's error map at its worst batch element (and depth), blocks of at most
    HEATMAP_SIDE cells a side (HEATMAP_STRIP for a conv1d strip)."""
    err = errors.error
    ch = err[:, channel]  # (N, *spatial)
    worst = np.unravel_index(int(np.argmax(np.abs(ch))), ch.shape)
    batch, depth = int(worst[0]), (int(worst[1]) if ch.ndim == 4 else None)
    index: tuple[int | slice, ...] = (batch,) if depth is None else (batch, depth)
    plane = np.atleast_2d(ch[index])  # (H, W); conv1d: (1, W)
    h, w = plane.shape
    side = HEATMAP_STRIP if ch.ndim == 2 else HEATMAP_SIDE
    block = (math.ceil(h / side), math.ceil(w / side))
    rows, cols = block_argmax(np.abs(plane), block)
    spatial = [rows, cols] if ch.ndim >= 3 else [cols]
    prefix = [np.full(rows.size, batch), np.full(rows.size, channel)]
    if depth is not None:
        prefix.append(np.full(rows.size, depth))
    positions = np.stack(prefix + spatial, axis=1).astype(np.int64)
    at = tuple(positions.T)
    return Heatmap(channel, batch, depth, (h, w), block, positions, err[at],
                   errors.quantized[at])


def block_argmax(magnitude: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the largest entry of each block of a 2-D array, blocks in row-major
    order; edge blocks may be smaller. E.g. a 4x4 array in 2x2 blocks gives 4 positions."""
    bh, bw = block
    h, w = magnitude.shape
    ch, cw = math.ceil(h / bh), math.ceil(w / bw)
    padded = np.full((ch * bh, cw * bw), -1.0)
    padded[:h, :w] = magnitude
    tiles = padded.reshape(ch, bh, cw, bw).transpose(0, 2, 1, 3).reshape(ch, cw, bh * bw)
    k = np.argmax(tiles, axis=2)
    rows = np.arange(ch)[:, None] * bh + k // bw
    cols = np.arange(cw)[None, :] * bw + k % bw
    return rows.reshape(-1), cols.reshape(-1)


@dataclass(frozen=True)
class Histogram:
    """Counts of a tensor's values over the shown range, with its quantization marks."""

    edges: np.ndarray
    """(bins + 1,) bin edges; the clipping bounds are edges when inside the range."""
    counts: np.ndarray
    """(bins,) values per bin."""
    clipped: np.ndarray
    """(bins,) bool: the bin lies outside the clipping range."""
    low: float
    """Smallest representable value (float units, or a code for ``codes``)."""
    high: float
    zero: float | None
    """Where the zero point sits (0.0 in float units; None when it differs per channel)."""
    grid: np.ndarray
    """Quantization levels drawn as lines (every ``grid_every``-th level in the range)."""
    grid_every: int
    below: int
    """Values below ``low`` (clipped up to it)."""
    above: int
    total: int
    codes: bool
    """Values are in quantization steps (value / channel scale + zero point): per-channel
    qparams, whose grid differs per channel."""


def value_histogram(values: np.ndarray, qp: QParams) -> Histogram:
    """The values against their qparams: float units per tensor, codes (value / scale +
    zero point, before rounding) per channel."""
    codes = qp.per_channel and qp.scales().size > 1
    if codes:
        assert qp.axis is not None
        axis = qp.axis % values.ndim
        shape = [1] * values.ndim
        shape[axis] = -1
        x = (values.astype(np.float64) / qp.scales().reshape(shape)
             + qp.zero_points().reshape(shape))
        low, high, zero, step = float(qp.qmin), float(qp.qmax), None, 1.0
        first_level = float(qp.qmin)
    else:
        x = values.astype(np.float64)
        lo, hi = clip_bounds(qp)
        low, high, zero = float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]), 0.0
        step, first_level = float(qp.scales()[0]), low
    x = x.reshape(-1)
    view_lo, view_hi = _view(x, low, high)
    edges = _edges(view_lo, view_hi, low, high)
    counts = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)[0]
    centers = (edges[:-1] + edges[1:]) / 2
    grid, every = _grid(first_level, step, max(view_lo, low), min(view_hi, high))
    return Histogram(edges, counts, (centers < low) | (centers > high), low, high,
                     zero if zero is not None and view_lo <= zero <= view_hi else None,
                     grid, every, int(np.count_nonzero(x < low)),
                     int(np.count_nonzero(x > high)), int(x.size), codes)


def _view(x: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """The shown range: the data's, widened to take in the clipping bounds when they are
    near it (up to one data span beyond it on each side), plus a 2% margin so that a bin of
    clipped values just beyond a bound stays visible."""
    lo, hi = (float(x.min()), float(x.max())) if x.size else (low, high)
    span = hi - lo or max(abs(hi), 1e-12)
    view_lo = max(min(lo, low), lo - span)
    view_hi = min(max(hi, high), hi + span)
    margin = 0.02 * (view_hi - view_lo) or 0.5
    return view_lo - margin, view_hi + margin


def _edges(view_lo: float, view_hi: float, low: float, high: float) -> np.ndarray:
    edges = np.linspace(view_lo, view_hi, HISTOGRAM_BINS + 1)
    inside = [b for b in (low, high) if view_lo < b < view_hi]
    return np.unique(np.concatenate([edges, inside]))


def _grid(first: float, step: float, lo: float, hi: float) -> tuple[np.ndarray, int]:
    """The levels first + k * step inside [lo, hi], thinned to at most GRID_LINES."""
    if not (step > 0 and hi >= lo):
        return np.empty(0), 1
    k0, k1 = math.ceil((lo - first) / step - 1e-9), math.floor((hi - first) / step + 1e-9)
    count = max(k1 - k0 + 1, 0)
    every = max(1, math.ceil(count / GRID_LINES))
    return first + step * np.arange(k0, k1 + 1, every, dtype=np.float64), every


@dataclass(frozen=True)
class ChannelRanges:
    """Per channel of per-channel qparams: the values' range against the clipping range."""

    axis: int
    data_min: np.ndarray
    data_max: np.ndarray
    low: np.ndarray
    """Smallest representable value per channel, float units."""
    high: np.ndarray
    clipped: np.ndarray
    """Values outside the channel's range, per channel."""


def channel_ranges(values: np.ndarray, qp: QParams) -> ChannelRanges | None:
    """None for per-tensor qparams."""
    if not qp.per_channel or qp.axis is None:
        return None
    axis = qp.axis % values.ndim
    per = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).astype(np.float64)
    lo, hi = (np.broadcast_to(b.reshape(-1), (per.shape[0],)) for b in clip_bounds(qp))
    clipped = np.count_nonzero((per < lo[:, None]) | (per > hi[:, None]), axis=1)
    return ChannelRanges(axis, per.min(axis=1), per.max(axis=1), lo, hi, clipped)


@dataclass(frozen=True)
class WaterfallRow:
    """One stage on the way from the float output to the quantized one (RMSE, float units)."""

    id: str
    applies: bool
    start: float
    """The error before this stage (the previous stage's cumulative RMSE)."""
    end: float
    """The error after it (cumulative RMSE)."""
    delta_rmse: float | None
    """RMSE of what this stage adds on the ladder."""
    delta_max: float | None
    isolated_rmse: float | None
    """RMSE of this effect alone, applied to the float path."""
    share: float | None
    floor: float | None
    """RMSE this stage would add at the floor (the error budget)."""
    exact: bool
    reason: str | None


def waterfall(path: PathReport) -> list[WaterfallRow]:
    """The ladder in data-flow order: each row starts where the previous one ended, the last
    ends at the path's total RMSE."""
    rows, level = [], 0.0
    budget = {s.id: s for s in path.budget.stages} if path.budget is not None else {}
    for s in path.stages:
        sb = budget.get(s.id)
        if not s.applies or s.cumulative is None or s.delta is None:
            rows.append(WaterfallRow(s.id, False, level, level, None, None, None, None, None,
                                     False, s.reason))
            continue
        end = s.cumulative.rmse
        rows.append(WaterfallRow(
            s.id, True, level, end, s.delta.rmse, s.delta.max_abs,
            None if s.isolated is None else s.isolated.rmse, s.share,
            None if sb is None else sb.floor, bool(sb is not None and sb.exact), None))
        level = end
    return rows
