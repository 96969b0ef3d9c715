"""The stage ladder: one effect at a time, in data-flow order, from the float output to what
torch really returned. Each stage's ``delta`` is the difference of two consecutive states, so
the deltas add up (telescope) exactly to the total error.

States (float64 output tensors), for the seed case's single output element:

====================  =====================================================  ==========
state after           computed as                                            seed case
====================  =====================================================  ==========
float                 conv(x, w) + b                                         803.69
input_clipping        conv(clip(x), w) + b                                   803.69
input_rounding        conv(dequant(x_codes), w) + b                          803.75
weight_clipping       conv(dequant(x_codes), clip(w)) + b                    564.43
weight_rounding       acc_exact * in_s * w_s + b                             564.62
bias_quantization     acc_exact * in_s * w_s + bias as the engine adds it    564.62
accumulation          acc_engine * in_s * w_s + bias as the engine adds it   564.62
output_rounding       (rint(requantized) + zp - zp) * out_s, unclamped       565
output_clipping       (clamp(...) - zp) * out_s: the emulated output         255
module_state          the quantized module's own weight/bias/qparams         0
backend_residual      torch's real output                                    0
====================  =====================================================  ==========
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .case import ConvCase, Geometry
from .emulate import Emulation
from .metrics import (
    CHUNK,
    ErrorAccumulator,
    SummaryAccumulator,
    chunked_energy,
    dot,
    merged,
    over_chunks,
    over_groups,
    shares_from_energies,
)
from .qparams import QParams, clip_bounds, dequantize
from .report import Metrics, OutputSummary, StageResult

STAGE_IDS = (
    "input_clipping",
    "input_rounding",
    "weight_clipping",
    "weight_rounding",
    "bias_quantization",
    "accumulation",
    "output_rounding",
    "output_clipping",
    "module_state",
    "backend_residual",
)


@dataclass(frozen=True, eq=False)
class Ladder:
    stages: tuple[StageResult, ...]
    float_output: np.ndarray
    """float64 reference output."""
    states: dict[str, np.ndarray]
    """Cumulative output after each applicable stage (float64); empty unless kept."""
    deltas: dict[str, np.ndarray]
    """Each stage's delta (float64); empty unless kept."""
    final: np.ndarray | None
    """The quantized output the ladder ends at (torch's when it ran, else the emulation);
    kept only with the states (``keep``)."""
    final_summary: OutputSummary
    """min / max / mean / abs_max and the first values of ``final``."""
    total: Metrics
    output_scale: float
    weight_error_rmse: float | None = None
    """RMSE of conv(x, dequant(w_codes) - w): the weight's whole quantization error alone."""


#: torch's float64 conv unfolds the whole input (im2col); above this many bytes of im2col the
#: reference is summed over chunks of input channels instead, to bound memory.
IM2COL_BYTES = 16 * 2**20


def conv64(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: Geometry) -> np.ndarray:
    """The float reference: conv in float64 (input channels chunked when im2col would be big)."""
    from .case import output_shape

    out_sp = output_shape(x.shape, w.shape, g)[2:]
    taps = int(np.prod(w.shape[2:]))
    per_channel = taps * int(np.prod(out_sp)) * 8
    cin = w.shape[1]
    if g.groups != 1 or cin * per_channel <= IM2COL_BYTES:
        return _conv(x, w, b, g, np.float64)
    chunk = max(1, IM2COL_BYTES // per_channel)
    out = None
    for start in range(0, cin, chunk):
        part = _conv(x[:, start:start + chunk], w[:, start:start + chunk],
                     b if start == 0 else None, g, np.float64)
        out = part if out is None else out + part
    assert out is not None
    return out


def conv_diff(x: np.ndarray | DequantizedInput, w: np.ndarray, g: Geometry) -> np.ndarray:
    """``conv_diff_any`` as a dense array."""
    out = conv_diff_any(x, w, g)
    assert isinstance(out, np.ndarray)
    return out


def conv_diff_any(x: np.ndarray | DequantizedInput, w: np.ndarray, g: Geometry,
                  compact: bool = False) -> np.ndarray | ChannelSparse:
    """conv of a (usually small or sparse) difference tensor: a float32 conv, returned as
    float32 (its own precision; consumers add it into float64), or, for a mostly-zero
    difference, a float64 scatter.

    Stage states are built as ``previous state + conv_diff(change)``: linearity makes that the
    same conv, and float32 (oneDNN) is several times faster than float64. The float32 rounding
    (~1e-7 relative to the change) lands in the next exact state's delta, so deltas still add
    up exactly to the total. An all-zero change costs nothing and adds exactly 0.
    ``x`` may be a ``DequantizedInput``: its float64 values are formed only where needed.
    ``compact``: a weight scatter that touches few output channels comes back as a
    ``ChannelSparse`` (only those channels stored).
    """
    from .case import output_shape

    shape = output_shape(x.shape, w.shape, g)
    nx, nw = _count_nonzero(x), np.count_nonzero(w)
    if not nx or not nw:
        return np.zeros(shape, dtype=np.float64)
    out_elems = int(np.prod(shape))
    dense_macs = out_elems * int(np.prod(w.shape[1:]))
    taps = int(np.prod(w.shape[2:]))
    # A difference that is mostly zero (a few clipped weights or inputs) costs far less as a
    # scatter of its nonzeros, accumulated in float64, than as a dense conv.
    if nw <= SPARSE_WEIGHT_MAX and nw * (out_elems // shape[1]) * SPARSE_GAIN <= dense_macs:
        return _conv_sparse_weight(x, w, g, shape, compact)
    if isinstance(x, DequantizedInput):
        if nx * taps * shape[1] * SPARSE_GAIN <= dense_macs:
            return _conv_sparse_input(x.dense64(), w, g, shape)
        return _conv(x.dense32(), w, None, g, np.float32)
    if nx * taps * shape[1] * SPARSE_GAIN <= dense_macs:
        return _conv_sparse_input(x, w, g, shape)
    return _conv(x, w, None, g, np.float32)


class DequantizedInput:
    """``dequant(codes)`` of an input, formed in float64 only per channel or per block, so no
    full-size float64 copy exists: a conv gets it as float32 (each value the float64 one
    rounded once, as a cast would give), a scatter gets float64 channels."""

    def __init__(self, codes: np.ndarray, qp: QParams) -> None:
        self.codes, self.qp = codes, qp
        self.shape: tuple[int, ...] = tuple(codes.shape)

    def _per_tensor(self) -> tuple[float, int] | None:
        if self.qp.per_channel:
            return None
        return float(self.qp.scales().reshape(-1)[0]), int(self.qp.zero_points().reshape(-1)[0])

    def count_nonzero(self) -> int:
        pt = self._per_tensor()
        if pt is None:
            return int(np.count_nonzero(self.dense64()))
        if pt[0] == 0:
            return 0
        return int(self.codes.size - np.count_nonzero(self.codes == pt[1]))

    def channel(self, c: int) -> np.ndarray:
        """Channel ``c`` in float64, shape (N, 1, *spatial)."""
        pt = self._per_tensor()
        if pt is None:
            return self.dense64()[:, c:c + 1]
        out = np.subtract(self.codes[:, c:c + 1], pt[1], dtype=np.float64)
        out *= pt[0]
        return out

    def at(self, flat: np.ndarray) -> np.ndarray:
        """float64 values at flat indices."""
        pt = self._per_tensor()
        if pt is None:
            return self.dense64().reshape(-1)[flat]
        out = np.subtract(np.ascontiguousarray(self.codes).reshape(-1)[flat], pt[1],
                          dtype=np.float64)
        out *= pt[0]
        return out

    def dense64(self) -> np.ndarray:
        return dequantize(self.codes, self.qp)

    def dense32(self, minus: np.ndarray | None = None) -> np.ndarray:
        """float32(dequant(codes) [- minus]), the difference taken in float64."""
        pt = self._per_tensor()
        if pt is None:
            d = self.dense64()
            if minus is not None:
                d -= minus
            return d.astype(np.float32)
        s, zp = pt
        codes = np.ascontiguousarray(self.codes).reshape(-1)
        sub = None if minus is None else np.ascontiguousarray(minus).reshape(-1)
        out = np.empty(codes.size, dtype=np.float32)

        def work(parts: list[slice]) -> None:  # chunks on two threads
            buf = np.empty(max((p.stop - p.start for p in parts), default=0), dtype=np.float64)
            for sl in parts:
                t = np.subtract(codes[sl], zp, out=buf[:sl.stop - sl.start], dtype=np.float64)
                t *= s
                if sub is not None:
                    t -= sub[sl]
                out[sl] = t

        over_chunks(codes.size, work)
        return out.reshape(self.shape)


def _count_nonzero(x: np.ndarray | DequantizedInput) -> int:
    if isinstance(x, DequantizedInput):
        return x.count_nonzero()
    return int(np.count_nonzero(x))


#: A scatter is used when it does at most 1/SPARSE_GAIN of a dense conv's multiply-adds.
SPARSE_GAIN = 16
#: The weight scatter loops over nonzero weights in Python: at most this many.
SPARSE_WEIGHT_MAX = 4096
#: Nonzero inputs scattered at once (bounds the (nonzeros, output channels) temporary).
SPARSE_INPUT_BLOCK = 4096


def _conv_sparse_weight(x: np.ndarray | DequantizedInput, w: np.ndarray, g: Geometry,
                        shape: tuple[int, ...], compact: bool = False
                        ) -> np.ndarray | ChannelSparse:
    """conv(x, w) for a weight with few nonzeros: one scaled input slice per nonzero. Only the
    input channels those nonzeros read are padded, one at a time. With ``compact``, when the
    nonzeros feed at most half of the output channels, only those channels are stored."""
    from .emulate import _pad, _tap_views

    og, cin_g = shape[1] // g.groups, w.shape[1]
    nz = np.nonzero(w)
    touched = np.unique(nz[0])
    sparse = compact and touched.size * 2 <= shape[1]
    slot = np.full(shape[1], -1, dtype=np.int64)
    slot[touched] = np.arange(touched.size)
    out = np.zeros((shape[0], touched.size if sparse else shape[1], *shape[2:]), np.float64)
    by_channel: dict[int, list[tuple[int, tuple[int, ...], np.float64]]] = {}
    for idx in zip(*nz, strict=True):
        o, c = int(idx[0]), int(idx[1])
        by_channel.setdefault((o // og) * cin_g + c, []).append(
            (int(slot[o]) if sparse else o, tuple(int(t) for t in idx[2:]), np.float64(w[idx])))
    for cx, uses in by_channel.items():
        xc = x.channel(cx) if isinstance(x, DequantizedInput) else x[:, cx:cx + 1]
        views = _tap_views(_pad(xc, g.padding, 0), w.shape, g, tuple(shape[2:]))
        for o, tap, v in uses:
            # a float64 scalar makes the product float64 whatever the input's dtype
            out[:, o] += views[tap][:, 0] * v
    return ChannelSparse(shape, touched, out) if sparse else out


class ChannelSparse:
    """An output-sized float64 array that is zero outside a few output channels: ``values``
    holds those channels, shape (N, len(channels), *spatial)."""

    def __init__(self, shape: tuple[int, ...], channels: np.ndarray, values: np.ndarray) -> None:
        self.shape, self.channels, self.values = tuple(shape), channels, values
        self.size = int(np.prod(shape))
        # row (n * O + o) of the output -> row of values, or -1
        slot = np.full(shape[1], -1, dtype=np.int64)
        slot[channels] = np.arange(channels.size)
        n = np.arange(shape[0])[:, None]
        self._row = np.where(slot[None, :] >= 0, n * channels.size + slot[None, :], -1
                             ).reshape(-1)
        self._values_r = values.reshape(shape[0] * channels.size, -1)

    def dense(self) -> np.ndarray:
        out = np.zeros(self.shape, dtype=np.float64)
        out[:, self.channels] = self.values
        return out

    def block(self, k: Block) -> np.ndarray:
        """The block ``k`` of the output as (rows, columns)."""
        rows = self._row[k.rows]
        hit = rows >= 0
        cols = self._values_r.shape[1] if k.cols.stop is None else k.cols.stop
        out = np.zeros((rows.size, len(range(*k.cols.indices(cols)))), dtype=np.float64)
        if hit.any():
            out[hit] = self._values_r[rows[hit], k.cols]
        return out

    def row_energy_added(self, base_rows: np.ndarray) -> float:
        """sum((base + self)^2) - sum(base^2) over this array's rows (base given as rows)."""
        rows = np.flatnonzero(self._row >= 0)
        b = base_rows[rows].astype(np.float64)
        v = self._values_r[self._row[rows]]
        return float(np.einsum("ij,ij->", b + v, b + v) - np.einsum("ij,ij->", b, b))


def _conv_sparse_input(x: np.ndarray, w: np.ndarray, g: Geometry,
                       shape: tuple[int, ...]) -> np.ndarray:
    """conv(x, w) for an input with few nonzeros: each one scattered to the outputs it feeds."""
    import itertools

    n_out, o_total = shape[0], shape[1]
    out_sp = tuple(shape[2:])
    og, cin_g = o_total // g.groups, w.shape[1]
    acc = np.zeros((n_out, *out_sp, o_total), dtype=np.float64)  # channels last for scatter
    nz = np.nonzero(x)
    vals = x[nz].astype(np.float64)
    n_i, c_i, sp_i = nz[0], nz[1], nz[2:]
    grp, cg = c_i // cin_g, c_i % cin_g
    same_group = (np.arange(o_total)[None, :] // og) == grp[:, None] if g.groups > 1 else None
    for tap in itertools.product(*(range(k) for k in w.shape[2:])):
        valid = np.ones(vals.shape, dtype=bool)
        coords = []
        for d, t in enumerate(tap):
            num = sp_i[d] + g.padding[d] - t * g.dilation[d]
            q = num // g.stride[d]
            valid &= (num >= 0) & (num % g.stride[d] == 0) & (q < out_sp[d])
            coords.append(q)
        sel = np.flatnonzero(valid)
        for start in range(0, sel.size, SPARSE_INPUT_BLOCK):
            part = sel[start:start + SPARSE_INPUT_BLOCK]
            contrib = w[(slice(None), cg[part], *tap)].T.astype(np.float64) * vals[part, None]
            if same_group is not None:
                contrib *= same_group[part]
            np.add.at(acc, (n_i[part], *(c[part] for c in coords)), contrib)
    return np.ascontiguousarray(np.moveaxis(acc, -1, 1))


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: Geometry, dtype: type
          ) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    dims = w.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    with torch.no_grad():
        out = conv(
            torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)),
            torch.from_numpy(np.ascontiguousarray(w, dtype=dtype)),
            None if b is None else torch.from_numpy(np.asarray(b, dtype=dtype)),
            g.stride, g.padding, g.dilation, g.groups,
        )
    return out.numpy()


def input_steps(case: ConvCase, qp: QParams, codes: np.ndarray
                ) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """(conv(clip(x) - x, w) or None when nothing clips, conv(dequant(codes) - clip(x), w),
    whether anything clips).

    The clipping part is usually sparse (a scatter in float64), the rounding part is bounded
    by half a step (a float32 conv). Computed once per diagnosis for the same codes."""
    from .memo import memoized

    def compute() -> tuple[np.ndarray | None, np.ndarray, bool]:
        x, w, g = case.input, case.weight, case.geometry
        lo, hi = (np.float64(v.reshape(-1)[0]) for v in clip_bounds(qp))
        deq = DequantizedInput(codes, qp)
        # compared in float64 (the bounds are float64), without a float64 copy of the input;
        # the min and max settle the usual case where nothing clips
        inside = not x.size or (lo <= float(x.min()) and float(x.max()) <= hi)
        outside = np.empty(0, np.intp) if inside else np.flatnonzero((x < lo) | (x > hi))
        if not outside.size:
            # nothing clips: the rounding difference alone
            return None, conv_diff(deq.dense32(minus=x), w, g), False
        xf = np.ascontiguousarray(x).reshape(-1)
        x_out = xf[outside].astype(np.float64)
        x_clip = np.clip(x_out, lo, hi)
        dx_clip = np.zeros(x.shape, dtype=np.float64)
        dx_clip.reshape(-1)[outside] = x_clip - x_out
        rounding = deq.dense32(minus=x)  # dequant(codes) - clip(x): fixed where x clips
        rounding.reshape(-1)[outside] = deq.at(outside) - x_clip
        return conv_diff(dx_clip, w, g), conv_diff(rounding, w, g), True

    return memoized("input_steps", (codes, case.input, case.weight), _qsig(qp), compute)


def weight_clip_step(case: ConvCase, x_qp: QParams, x_codes: np.ndarray, w_qp: QParams,
                     w_codes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray | ChannelSparse | None]:
    """(clip(w) - w, conv(dequant(x_codes), clip(w) - w) or None when nothing clips)."""
    from .memo import memoized

    def compute() -> tuple[np.ndarray, np.ndarray | ChannelSparse | None]:
        w = case.weight
        axis = None if w_qp.axis is None else w_qp.axis % w.ndim
        dw_clip = _clip_tensor(w, w_qp, axis) - w
        if not dw_clip.any():
            return dw_clip, None
        return dw_clip, conv_diff_any(DequantizedInput(x_codes, x_qp), dw_clip, case.geometry,
                                      compact=True)

    return memoized("weight_clip_step", (x_codes, w_codes, case.input, case.weight),
                    (_qsig(x_qp), _qsig(w_qp)), compute)


def _qsig(qp: QParams) -> tuple[Any, ...]:
    return (qp.scale, qp.zero_point, qp.dtype, qp.axis)


def float_reference(case: ConvCase, x_qp: QParams, x_codes: np.ndarray, w_qp: QParams,
                    w_codes: np.ndarray) -> np.ndarray:
    """The float output conv(x, w) + b, about 1e-8 of the output accurate, for one float32 conv.

    With any quantization grid, conv(x, w) = conv(x_q, w_q) + conv(x - x_q, w)
    + conv(x_q, w - w_q), where x_q, w_q are the dequantized codes. The first term is exact
    (the integer accumulator, times in_s * w_s); the two others are the grid's clipping
    (usually sparse: a float64 scatter) and rounding differences (at most half a step: a
    float32 conv whose rounding is ~1e-8 of the output, measured against a float64 conv). The
    input differences are the stage ladder's own steps for that grid, shared; a float64 conv
    would cost 4-5 float32 convs. ``w_qp`` must be per tensor or per output channel (axis 0)
    with zero points in range, else the float64 conv is used.
    """
    from .emulate import shared_exact_accumulator

    g = case.geometry
    zx = int(x_qp.zero_point[0])
    if (x_qp.per_channel or (w_qp.per_channel and (w_qp.axis or 0) % w_codes.ndim != 0)
            or not w_qp.dtype_min <= min(w_qp.zero_point) <= max(w_qp.zero_point)
            <= w_qp.dtype_max or not x_qp.dtype_min <= zx <= x_qp.dtype_max):
        return conv64(case.input, case.weight, case.bias, g)
    o = w_codes.shape[0]
    zw = np.broadcast_to(np.asarray(w_qp.zero_point, dtype=np.int64), (o,))
    acc = shared_exact_accumulator(x_codes, zx, w_codes, zw, g, zx)
    w_s = np.broadcast_to(np.asarray(w_qp.scale, dtype=np.float64), (o,))
    acc_scale = w_s * float(x_qp.scale[0])
    clip_in, round_in, _ = input_steps(case, x_qp, x_codes)
    dw_clip, clip_w = weight_clip_step(case, x_qp, x_codes, w_qp, w_codes)
    round_w = conv_diff(DequantizedInput(x_codes, x_qp),
                        dequantize(w_codes, w_qp) - (case.weight + dw_clip), g)
    parts = [_reader(p) for p in (clip_in, round_in, clip_w, round_w) if p is not None]
    bias = None if case.bias is None else np.asarray(case.bias, dtype=np.float64)
    y = np.empty(acc.shape, dtype=np.float64)
    y_r, acc_r = _as_rows(y), _as_rows(acc)

    def work(blocks: list[Block]) -> None:  # y = acc * in_s * w_s - parts + b, per block
        for k in blocks:
            out = k.of(y_r)
            np.multiply(k.of(acc_r), k.per_channel(acc_scale), out=out)
            for read in parts:
                out -= read(k)
            if bias is not None:
                out += k.per_channel(bias)

    over_groups(_blocks(y.shape), work)
    return y


def _clip_tensor(t: np.ndarray, qp: QParams, axis: int | None) -> np.ndarray:
    lo, hi = clip_bounds(qp)
    if axis is None or lo.size == 1:
        return np.clip(t.astype(np.float64), float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]))
    shape = [1] * t.ndim
    shape[axis] = -1
    return np.clip(t.astype(np.float64), lo.reshape(shape), hi.reshape(shape))


@dataclass(frozen=True, eq=False)
class LadderInputs:
    """What the ladder needs from a path."""

    input_qparams: QParams
    weight_qparams: QParams
    """As the user wrote them (axis included), for the clipping bounds."""
    weight_exec_qparams: QParams
    """As the engine applies them (scales per output channel)."""
    output_qparams: QParams
    input_codes: np.ndarray
    weight_codes: np.ndarray
    bias: np.ndarray | None
    emulation: Emulation
    module_emulation: Emulation | None
    module_output_qparams: QParams | None
    module_reason: str
    torch_codes: np.ndarray | None
    torch_reason: str
    torch_same: bool | None = None
    """Whether torch's codes equal the final emulation's (None: not compared yet)."""


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


def _blocks(shape: tuple[int, ...]) -> list[Block]:
    """Cache-sized blocks (about CHUNK elements) covering an output of ``shape``."""
    o = shape[1]
    rows, cols = shape[0] * o, int(np.prod(shape[2:], dtype=np.int64))
    if cols >= CHUNK:
        return [Block(slice(r, r + 1), slice(c, min(c + CHUNK, cols)), o)
                for r in range(rows) for c in range(0, cols, CHUNK)]
    step = max(1, CHUNK // max(cols, 1))
    return [Block(slice(r, min(r + step, rows)), slice(None), o) for r in range(0, rows, step)]


def _reader(a: np.ndarray | ChannelSparse) -> Callable[[Block], np.ndarray]:
    """Reads one block of an output-sized array, dense or channel-sparse."""
    if isinstance(a, ChannelSparse):
        return a.block
    rows = _as_rows(a)
    return lambda k: k.of(rows)


def _as_rows(a: np.ndarray) -> np.ndarray:
    """An output-sized array as (batch x channels, spatial), a view when contiguous."""
    return np.ascontiguousarray(a).reshape(a.shape[0] * a.shape[1], -1)


Fill = Callable[[np.ndarray, np.ndarray, Block], Any]
"""Writes one block of a stage's state: fill(out, previous state, block)."""


def _ladder_states(case: ConvCase, li: LadderInputs, y0: np.ndarray,
                   reasons: dict[str, str], measured: dict[str, float]
                   ) -> Iterator[tuple[str, Fill | None, object]]:
    """Yield (stage id, fill, isolated) in data-flow order: ``fill(out, previous, block)``
    writes a block of the state; isolated is an output-sized array, a ``PerChannel``
    constant, an ``Elementwise`` function of the reference, or DELTA (the effect alone is the
    step itself)."""
    g = case.geometry
    x, w, b = case.input, case.weight, case.bias
    em = li.emulation
    out_qp = li.output_qparams
    out_s, out_zp = float(out_qp.scale[0]), int(out_qp.zero_point[0])
    acc_scale = np.asarray(em.acc_scale, dtype=np.float64).reshape(-1)
    rows = _as_rows

    # Everything up to weight rounding depends only on the input and weight qparams and codes,
    # not on the engine: with several engines it is computed once (memo).
    from .memo import memoized

    kin, kw = _qsig(li.input_qparams), _qsig(li.weight_qparams)

    def weight_side() -> tuple[np.ndarray | ChannelSparse, np.ndarray | ChannelSparse | None,
                               np.ndarray, float]:
        dw_clip, step_w = weight_clip_step(case, li.input_qparams, li.input_codes,
                                           li.weight_qparams, li.weight_codes)
        # isolated: each effect on the float input; rounding is that of the in-range weight,
        # so clipping + rounding is the weight's whole quantization error, whose output RMSE
        # QCD023 compares with per-channel weights
        iso_wclip = conv_diff_any(x, dw_clip, g, compact=True)
        w_round = dequantize(li.weight_codes, li.weight_qparams) - (w + dw_clip)
        iso_wround = conv_diff(x, w_round, g)
        c = iso_wround.reshape(-1)
        if isinstance(iso_wclip, ChannelSparse):
            energy = chunked_energy(lambda sl: c[sl].astype(np.float64), c.size)
            energy += iso_wclip.row_energy_added(_as_rows(iso_wround))
        else:
            a = iso_wclip.reshape(-1)
            energy = chunked_energy(lambda sl: np.add(a[sl], c[sl], dtype=np.float64), c.size)
        return iso_wclip, step_w, iso_wround, float(np.sqrt(energy / max(c.size, 1)))

    # rounding alone is the rounding of the in-range (clipped) input: the step itself (DELTA)
    iso_clip, step_in, _ = input_steps(case, li.input_qparams, li.input_codes)
    y0r, step_in_r = rows(y0), rows(step_in)
    if iso_clip is None:
        yield "input_clipping", SAME, DELTA
    else:
        iso_clip_r = rows(iso_clip)
        yield ("input_clipping",
               lambda out, prev, k: np.add(k.of(y0r), k.of(iso_clip_r), out=out), iso_clip)
    yield "input_rounding", lambda out, prev, k: np.add(prev, k.of(step_in_r), out=out), DELTA
    iso_wclip, step_w, iso_wround, w_rmse = memoized(
        "ladder_weight", (li.input_codes, li.weight_codes), (kin, kw), weight_side)
    measured["weight_error_rmse"] = w_rmse
    if step_w is None:
        yield "weight_clipping", lambda out, prev, k: np.copyto(out, prev), iso_wclip
    else:
        step_w_at = _reader(step_w)
        yield ("weight_clipping", lambda out, prev, k: np.add(prev, step_w_at(k), out=out),
               iso_wclip)
    acc_exact_r = rows(em.acc_exact)
    yield ("weight_rounding",
           lambda out, prev, k: _scaled(out, k.of(acc_exact_r), k.per_channel(acc_scale),
                                        None if b is None else k.per_channel(b)),
           iso_wround)
    bias_real = None if b is None else np.asarray(em.bias_real, dtype=np.float64).reshape(-1)
    if bias_real is None:
        reasons["bias_quantization"] = "the layer has no bias"
    else:
        bias_shift = bias_real - np.asarray(b, dtype=np.float64).reshape(-1)
        yield ("bias_quantization",
               lambda out, prev, k: _scaled(out, k.of(acc_exact_r), k.per_channel(acc_scale),
                                            k.per_channel(bias_real)),
               PerChannel(bias_shift))
    exact_acc = (em.saturated_pairs == 0 and em.saturated_row_sums == 0
                 and em.acc_exact.dtype == np.int32)  # nothing saturated or wrapped
    acc_r = rows(em.acc)
    yield ("accumulation", SAME if exact_acc else lambda out, prev, k: _scaled(
        out, k.of(acc_r), k.per_channel(acc_scale),
        None if bias_real is None else k.per_channel(bias_real)), DELTA)
    unclamped_r = rows(em.unclamped)
    yield ("output_rounding",
           lambda out, prev, k: _dequantized(out, k.of(unclamped_r), out_zp, out_s),
           Elementwise(_rounding_error(out_s)))
    lo, hi = (out_qp.dtype_min - out_zp) * out_s, (out_qp.dtype_max - out_zp) * out_s
    in_range = em.unclamped.size == 0 or (
        out_qp.dtype_min <= int(em.unclamped.min()) and int(em.unclamped.max()) <= out_qp.dtype_max)
    codes_r = rows(em.output_codes)
    yield ("output_clipping", SAME if in_range else lambda out, prev, k: _dequantized(
        out, k.of(codes_r), out_zp, out_s), Elementwise(_clipping_error(lo, hi)))
    final_qp = out_qp
    if li.module_emulation is not None and li.module_output_qparams is not None:
        final_qp = li.module_output_qparams
        mem_r = rows(li.module_emulation.output_codes)
        ms, mzp = float(final_qp.scale[0]), int(final_qp.zero_point[0])
        yield ("module_state", lambda out, prev, k: _dequantized(out, k.of(mem_r), mzp, ms),
               DELTA)
    else:
        reasons["module_state"] = li.module_reason
    fs, fzp = float(final_qp.scale[0]), int(final_qp.zero_point[0])
    if li.torch_codes is not None:
        codes = li.torch_codes
        final = li.module_emulation if final_qp is not out_qp else em
        same = final is not None and (li.torch_same if li.torch_same is not None
                                      else np.array_equal(codes, final.output_codes))
        torch_r = rows(codes)
        yield ("backend_residual", SAME if same else
               lambda out, prev, k: _dequantized(out, k.of(torch_r), fzp, fs), DELTA)
    else:
        reasons["backend_residual"] = li.torch_reason


def _rounding_error(s: float) -> Callable[[np.ndarray], np.ndarray]:
    """Output rounding alone: rint(r / s) * s - r (the zero point cancels exactly)."""
    def error(r: np.ndarray) -> np.ndarray:
        t = np.divide(r, s)
        np.rint(t, out=t)
        t *= s
        t -= r
        return t
    return error


def _clipping_error(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    """Output clipping alone: clip(r, lo, hi) - r."""
    def error(r: np.ndarray) -> np.ndarray:
        t = np.clip(r, lo, hi)
        t -= r
        return t
    return error


def _scaled(out: np.ndarray, acc: np.ndarray, scale: np.ndarray, bias: np.ndarray | None
            ) -> np.ndarray:
    """out = acc * scale (+ bias), in float64; scale and bias broadcast against ``acc``."""
    np.multiply(acc, scale, out=out)
    if bias is not None:
        out += bias
    return out


def _dequantized(out: np.ndarray, codes: np.ndarray, zp: int, scale: float) -> np.ndarray:
    """out = (codes - zp) * scale, in float64."""
    np.subtract(codes, zp, out=out)
    out *= scale
    return out


@dataclass(frozen=True, eq=False)
class Elementwise:
    """An isolated effect that is a function of the float output alone, element by element
    (evaluated chunk by chunk on the reference)."""

    error: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class PerChannel:
    """An isolated effect that is one constant per output channel (the bias's)."""

    values: np.ndarray


SAME = None
"""In place of a state's fill: the state is the previous one (the stage changes nothing)."""

ENGINE_FREE_STAGES = ("input_clipping", "input_rounding", "weight_clipping")
"""Stages whose states depend on the codes and qparams only, not on the engine (weight
rounding already uses the engine's exact accumulator: qnnpack wraps zero points)."""

DELTA = object()
"""Marker: a stage's isolated effect is its own delta."""

Triple = tuple[ErrorAccumulator, ErrorAccumulator, ErrorAccumulator]


def run_ladder(case: ConvCase, li: LadderInputs, y0: np.ndarray | None = None,
               keep: bool = False) -> Ladder:
    """The ladder for one path; ``y0`` is the float reference when already computed.

    The output is walked in cache-sized blocks (on two threads): in each block every stage's
    state is written and measured (delta, cumulative, isolated) while it is in cache, so no
    full-size state exists but the final one, unless ``keep`` (for --save-outputs and the
    tests) keeps every state and delta.
    """
    if y0 is None:
        y0 = conv64(case.input, case.weight, case.bias, case.geometry)
    out_s = float(li.output_qparams.scale[0])
    fs = float((li.module_output_qparams if li.module_emulation is not None
                and li.module_output_qparams is not None else li.output_qparams).scale[0])
    rr = dot(y0.reshape(-1), y0.reshape(-1))
    reasons: dict[str, str] = {}
    measured: dict[str, float] = {}
    ladder = list(_ladder_states(case, li, y0, reasons, measured))
    # The stages before weight rounding do not depend on the engine: with several engines their
    # metrics are measured once per grid and output step (memo; nothing to share otherwise).
    from .memo import by_content, memoized

    shared: dict[str, tuple[tuple[Metrics, Metrics, Metrics | None], float]] = {}
    if by_content() and not keep:
        shared = memoized("ladder_prefix", (li.input_codes, li.weight_codes, y0),
                          (_qsig(li.input_qparams), _qsig(li.weight_qparams), out_s), dict)
    prefix_known = all(sid in shared for sid in ENGINE_FREE_STAGES)

    def lsb_of(sid: str) -> float:
        return fs if sid in ("module_state", "backend_residual") else out_s

    # A stage that changes nothing (SAME) after a measured one, at the same output step, has a
    # zero delta and the previous cumulative error: no pass over its state.
    unchanged = {sid for pos, (sid, fill, _iso) in enumerate(ladder)
                 if fill is SAME and pos > 0 and lsb_of(sid) == out_s}
    skip = set(ENGINE_FREE_STAGES) if prefix_known else set()
    # up to the first stage that changes anything the previous state is the reference itself,
    # so that stage's cumulative error is its delta: measured once
    first_change = next((sid for sid, fill, _ in ladder if fill is not SAME), None)
    y0r = _as_rows(y0)
    kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    final: np.ndarray | None = None
    if keep:
        kept = {sid: (np.empty(y0r.shape), np.empty(y0r.shape)) for sid, _, _ in ladder}
        final = np.empty(y0.shape, dtype=np.float64)
    isos = {sid: (_reader(iso) if isinstance(iso, (np.ndarray, ChannelSparse)) else None)
            for sid, _, iso in ladder}

    def work(blocks: list[Block]) -> tuple[dict[str, Triple], SummaryAccumulator]:
        accs = {sid: (ErrorAccumulator(), ErrorAccumulator(), ErrorAccumulator())
                for sid, _, _ in ladder}
        final_acc = SummaryAccumulator()
        size = max((k.of(y0r).size for k in blocks), default=0)
        bufs = [np.empty(size), np.empty(size)]
        d_buf, c_buf = np.empty(size), np.empty(size)
        for k in blocks:
            ref2 = k.of(y0r)
            shape2, n = ref2.shape, ref2.size
            r = ref2.reshape(-1)
            prev2 = ref2
            turn = 0
            for sid, fill, iso in ladder:
                d_acc, c_acc, i_acc = accs[sid]
                if fill is SAME:
                    cur2 = prev2
                else:
                    cur2 = bufs[turn][:n].reshape(shape2)
                    turn ^= 1
                    fill(cur2, prev2, k)
                if keep:
                    np.copyto(k.of(kept[sid][0]), cur2)
                    np.subtract(cur2, prev2, out=k.of(kept[sid][1]))
                lazy = iso.error if isinstance(iso, Elementwise) else None
                if sid in unchanged:
                    if lazy is not None:
                        i_acc.add(lazy(r), r)
                elif sid not in skip:
                    cur = cur2.reshape(-1)
                    if fill is SAME:
                        d_acc.n += n  # a zero delta
                    else:
                        d_acc.add(np.subtract(cur, prev2.reshape(-1), out=d_buf[:n]), r)
                    if sid != first_change:
                        c_acc.add(np.subtract(cur, r, out=c_buf[:n]), r)
                    iso_at = isos[sid]
                    if iso_at is not None:
                        i_acc.add(iso_at(k).reshape(-1), r)
                    elif lazy is not None:
                        i_acc.add(lazy(r), r)
                prev2 = cur2
            final_acc.add(prev2.reshape(-1))
            if final is not None:
                np.copyto(k.of(final.reshape(y0r.shape)), prev2)
        return accs, final_acc

    results_by_group = over_groups(_blocks(y0.shape), work)
    groups = [accs for accs, _ in results_by_group]
    final_summary = results_by_group[0][1]
    for _, other in results_by_group[1:]:
        final_summary.merge(other)
    channel_sums: np.ndarray | None = None
    energies: dict[str, float] = {}
    metrics: dict[str, tuple[Metrics, Metrics, Metrics | None]] = {}
    cumulative_prev: Metrics | None = None
    for sid, _fill, iso in ladder:
        lsb = lsb_of(sid)
        d_acc, c_acc, i_acc = (merged([grp[sid][j] for grp in groups]) for j in range(3))
        if sid in skip:
            metrics[sid], energies[sid] = shared[sid]
        elif sid in unchanged:
            assert cumulative_prev is not None
            zero = ErrorAccumulator().metrics(rr, lsb)
            alone = i_acc.metrics(rr, lsb) if isinstance(iso, Elementwise) else zero
            metrics[sid], energies[sid] = (zero, cumulative_prev, alone), 0.0
        else:
            if isinstance(iso, PerChannel):
                if channel_sums is None:
                    channel_sums = y0.sum(axis=tuple(i for i in range(y0.ndim) if i != 1))
                i_acc.add_per_channel(iso.values, channel_sums, y0.size // y0.shape[1])
            energies[sid] = d_acc.energy
            delta = d_acc.metrics(rr, lsb)
            metrics[sid] = (delta, delta if sid == first_change else c_acc.metrics(rr, lsb),
                            delta if iso is DELTA else i_acc.metrics(rr, lsb))
            if sid in ENGINE_FREE_STAGES and not prefix_known:
                shared[sid] = (metrics[sid], energies[sid])
        cumulative_prev = metrics[sid][1]
    shares = shares_from_energies(energies)
    results = []
    for sid in STAGE_IDS:
        if sid not in metrics:
            results.append(StageResult(sid, False, reasons.get(sid, "does not apply"),
                                       None, None, None, None))
            continue
        d, c, i = metrics[sid]
        results.append(StageResult(sid, True, None, d, c, i, shares[sid]))
    total = metrics[[s for s in STAGE_IDS if s in metrics][-1]][1]
    states = {sid: st.reshape(y0.shape) for sid, (st, _) in kept.items()}
    deltas = {sid: dl.reshape(y0.shape) for sid, (_, dl) in kept.items()}
    return Ladder(tuple(results), y0, states, deltas, final, final_summary.result(), total, fs,
                  measured.get("weight_error_rmse"))
