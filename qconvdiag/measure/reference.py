"""The float reference and the quantization steps of the input and weight it is built from.

``float_reference`` gives conv(x, w) + b about 1e-8 of the output accurate for the cost of one
float32 conv; the input clipping/rounding steps and the weight clipping step it uses are also
the first rungs of the stage ladder (``ladder_plan.py``), computed once per diagnosis (memo).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..arithmetic.float_conv import (
    ChannelSparse,
    DequantizedInput,
    conv64,
    conv_diff,
    conv_diff_any,
)
from ..case import ConvCase
from ..quantization.qparams import QParams, clip_bounds, dequantize
from .blocks import Block, as_rows, blocks, reader
from .metrics import over_groups


def input_steps(case: ConvCase, qp: QParams, codes: np.ndarray
                ) -> tuple[np.ndarray | None, np.ndarray, bool]:
    """(conv(clip(x) - x, w) or None when nothing clips, conv(dequant(codes) - clip(x), w),
    whether anything clips).

    The clipping part is usually sparse (a scatter in float64), the rounding part is bounded
    by half a step (a float32 conv). Computed once per diagnosis for the same codes."""
    from ..memo import memoized

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

    return memoized("input_steps", (codes, case.input, case.weight), qsig(qp), compute)


def weight_clip_step(case: ConvCase, x_qp: QParams, x_codes: np.ndarray, w_qp: QParams,
                     w_codes: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray | ChannelSparse | None]:
    """(clip(w) - w, conv(dequant(x_codes), clip(w) - w) or None when nothing clips)."""
    from ..memo import memoized

    def compute() -> tuple[np.ndarray, np.ndarray | ChannelSparse | None]:
        w = case.weight
        axis = None if w_qp.axis is None else w_qp.axis % w.ndim
        dw_clip = _clip_tensor(w, w_qp, axis) - w
        if not dw_clip.any():
            return dw_clip, None
        return dw_clip, conv_diff_any(DequantizedInput(x_codes, x_qp), dw_clip, case.geometry,
                                      compact=True)

    return memoized("weight_clip_step", (x_codes, w_codes, case.input, case.weight),
                    (qsig(x_qp), qsig(w_qp)), compute)


def qsig(qp: QParams) -> tuple[Any, ...]:
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
    from ..arithmetic.accumulate import shared_exact_accumulator

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
    parts = [reader(p) for p in (clip_in, round_in, clip_w, round_w) if p is not None]
    bias = None if case.bias is None else np.asarray(case.bias, dtype=np.float64)
    y = np.empty(acc.shape, dtype=np.float64)
    y_r, acc_r = as_rows(y), as_rows(acc)

    def work(blocks: list[Block]) -> None:  # y = acc * in_s * w_s - parts + b, per block
        for k in blocks:
            out = k.of(y_r)
            np.multiply(k.of(acc_r), k.per_channel(acc_scale), out=out)
            for read in parts:
                out -= read(k)
            if bias is not None:
                out += k.per_channel(bias)

    over_groups(blocks(y.shape), work)
    return y


def _clip_tensor(t: np.ndarray, qp: QParams, axis: int | None) -> np.ndarray:
    lo, hi = clip_bounds(qp)
    if axis is None or lo.size == 1:
        return np.clip(t.astype(np.float64), float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]))
    shape = [1] * t.ndim
    shape[axis] = -1
    return np.clip(t.astype(np.float64), lo.reshape(shape), hi.reshape(shape))
