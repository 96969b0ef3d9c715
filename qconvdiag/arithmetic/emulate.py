"""Integer-exact model of torch's quantized conv on each engine, on plain integer arrays.

No quantized dtypes inside (deprecated from torch 2.13). Three kernels cover the four engines:

* ``fbgemm`` (engines fbgemm, and x86 when it does not hand the conv to oneDNN): the raw
  ``u8 * s8`` products are summed pairwise in saturating int16 (``vpmaddubsw``) along
  K = (kernel taps, channels of the group), channels fastest, pairs (0,1), (2,3)... on CPUs
  without AVX512-VNNI; exactly with VNNI. Zero points are corrected exactly afterwards, so
  saturation depends on the raw codes. Requantization in float32:
  ``atws = f32(w_s * in_s)``, ``M = f32(atws / out_s)``; per-tensor bias enters as
  ``fma(bias, f32(1/atws), f32(acc))``, per-channel as ``f32(acc) + f32(bias / atws)``; then
  ``q = clamp(rint(f32(x * M)) + zp)``.
* ``onednn`` (engine onednn, and x86 on VNNI CPUs for symmetric weights): saturating int16
  pairs of adjacent input channels of the same tap without VNNI; float32 rescaling with
  reciprocal-of-reciprocal scales (oneDNN stores 1/scale):
  ``q = rint(f32(f32(f32(f32(acc * s_src) * w_s) + bias) * f32(1 / out_s)) + zp)``.
* ``x86_inductor`` (PT2E: ``onednn.qconv_pointwise``, what inductor lowers a ``convert_pt2e``
  conv to): the oneDNN kernels above, handed the scales themselves (``direct_scales``), with a
  uint8 or float32 output; which oneDNN implementation runs a layer (and so the order of its
  float32 scale operations) is probed per layer (``engines.onednn_arithmetic``).
* ``qnnpack``: exact int32 accumulation; the bias quantized to int32 at ``in_s * w_s`` and added
  to the accumulator, which wraps past the int32 range (a bias near it: a weight scale clamped
  to float32's eps); ``q = clamp(rint(f32(acc * M)) + zp)``.

Every formula here is checked bit for bit against torch's kernels by the test suite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import Geometry
from ..fp32 import add32, div32, f32, fma32, mul32, recip32
from ..quantization.qparams import QParams, quantize
from .accumulate import (
    EXACT,
    INT32_MAX,
    INT32_MIN,
    pair_saturation,
    row_sum_saturation,
    shared_exact_accumulator,
)


@dataclass(frozen=True)
class Kernel:
    """What really runs for one engine on this CPU, for one layer."""

    engine: str
    """Engine name as torch knows it (``x86``, ``fbgemm``, ``onednn``, ``qnnpack``)."""
    kernel: str
    """Arithmetic family: ``fbgemm``, ``onednn`` or ``qnnpack``."""
    accumulation: str
    """``exact``, ``int16_pairs_k`` or ``int16_pairs_channels``."""
    combined_scales: bool = False
    """oneDNN only: the source and weight scales are applied as one precomputed product (its
    channel-pairing kernels, without VNNI), not one after the other (its VNNI brgemm kernels);
    measured."""
    row_sums_int16: bool = False
    """fbgemm's depthwise kernel only: the sum of each window's raw input codes, which the
    weight zero point multiplies in the correction, is accumulated in saturating int16
    (FBGEMM src/GenerateI8Depthwise.cc: ``vpaddsw``), so it stops at 32767; that happens
    from 129 taps on (a 7x5x5 kernel), and only matters with a nonzero weight zero point."""
    direct_scales: bool = False
    """oneDNN only: torch hands oneDNN the scales themselves (``onednn.qconv_pointwise``, the
    ``x86_inductor`` engine), not their reciprocals (``quantized.conv2d``), so oneDNN's float32
    source scale is ``f32(in_s)`` and it multiplies by ``f32(1 / f32(out_s))``."""
    divides_dst_scale: bool = False
    """oneDNN with ``direct_scales``: the output side divides by ``f32(out_s)`` instead of
    multiplying by its float32 reciprocal (oneDNN's reference convolution, ``ref:any``, which
    it runs where no optimised kernel takes the layer, e.g. grouped 1x1 convs without VNNI)."""


@dataclass(frozen=True, eq=False)
class Emulation:
    """Every intermediate of one emulated quantized conv (arrays have the output's shape)."""

    kernel: Kernel
    acc_exact: np.ndarray
    """int32 (int64 when out of range): sum over K of (x - x_zp) * (w - w_zp), exact."""
    acc: np.ndarray
    """int32: the accumulator the engine really holds (int16 pair saturation included)."""
    saturated_pairs: int
    """How many int16 pair sums saturated."""
    bias_real: np.ndarray | None
    """(O,) float64: the bias as the engine effectively adds it, in float units."""
    bias_int32: np.ndarray | None
    """(O,) int64: qnnpack's int32 bias (scale in_s * w_s); None for other kernels."""
    multiplier: np.ndarray
    """(O,) float32 requantization multiplier (accumulator units -> output steps)."""
    pre_round_fn: Callable[[], np.ndarray]
    """Recomputes ``pre_round32`` from ``acc`` (only the trace needs it: not kept)."""
    unclamped: np.ndarray
    """int32 (int64 if out of range): rint(pre_round) + zero point, before the clamp."""
    output_codes: np.ndarray
    """int32: final output codes."""
    acc_scale: np.ndarray
    """(O,) float64: in_s * w_s, one accumulator step in float units."""
    pre_round_offset: int = 0
    """Subtracted from ``pre_round32`` to give ``pre_round`` (oneDNN adds the zero point
    before rounding)."""
    saturated_row_sums: int = 0
    """How many (output position, channel) input-code sums stopped at 32767
    (``Kernel.row_sums_int16``)."""
    output_float32: np.ndarray | None = None
    """float32: what a kernel with a float32 output writes (``x86_inductor``'s fp32 output:
    the rescaled accumulator plus bias, after the fused ReLU); its codes are then those of
    output scale 1.0 and zero point 0, which no kernel writes."""

    @property
    def pre_round32(self) -> np.ndarray:
        """float32: the engine's float32 value right before rounding (see ``pre_round``)."""
        return self.pre_round_fn()

    @property
    def pre_round(self) -> np.ndarray:
        """float64: value in output steps right before rounding (zero point not yet added)."""
        return self.pre_round32.astype(np.float64) - self.pre_round_offset




# ------------------------------------------------------------------------------------------
# requantization


def _bcast(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _per_out(values: tuple[float, ...] | np.ndarray, o: int) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    return np.broadcast_to(arr, (o,)).copy() if arr.size == 1 else arr


def _cvt_rint(y: np.ndarray) -> np.ndarray:
    """``_mm256_cvtps_epi32``: round half to even; out of int32 range gives INT32_MIN."""
    y32 = np.asarray(y, dtype=np.float32)
    r = np.rint(y32)  # float32 rint is exact
    if r.size:
        lo, hi = float(r.min()), float(r.max())  # NaN propagates into both
        if lo >= -(2.0**31) and hi < 2.0**31:
            return r.astype(np.int64)
    with np.errstate(invalid="ignore"):
        bad = ~((r >= np.float32(-(2.0**31))) & (r < np.float32(2.0**31)))  # NaN included
    if bad.any():
        r = np.where(bad, np.float32(INT32_MIN), r)
    return r.astype(np.int64)


def requantize_fbgemm(
    acc: np.ndarray, bias: np.ndarray | None, in_scale: float, w_scales: np.ndarray,
    out_scale: float, out_zp: int, per_channel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Returns (pre_round float32, unclamped int64, multiplier, bias_real)."""
    o = acc.shape[1]
    atws = mul32(f32(w_scales), f32(in_scale))  # (O,)
    mult = div32(atws, f32(out_scale))
    acc32 = f32(acc)
    bias_real = None
    if bias is not None:
        if per_channel:
            b_steps = div32(f32(bias), atws)
            x = add32(acc32, _bcast(b_steps, acc.ndim))
            bias_real = b_steps.astype(np.float64) * atws.astype(np.float64)
        else:
            rcp = recip32(atws[0])
            x = fma32(_bcast(f32(bias), acc.ndim), rcp, acc32)
            bias_real = mul32(f32(bias), rcp).astype(np.float64) * float(atws[0])
    else:
        x = acc32
    y = mul32(x, _bcast(np.broadcast_to(mult, (o,)), acc.ndim))
    r = _cvt_rint(y)
    return y, r + out_zp, mult, bias_real


def requantize_qnnpack(
    acc: np.ndarray, bias: np.ndarray | None, in_scale: float, w_scales: np.ndarray,
    out_scale: float, out_zp: int, per_channel: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    o = acc.shape[1]
    bias_scale = w_scales.astype(np.float64) * float(in_scale)
    bias_int = None
    if bias is not None:
        qp = QParams(tuple(float(s) for s in bias_scale), (0,) * o, "qint32", 0, "engine")
        bias_int = quantize(f32(bias), qp)
        acc = acc + _bcast(bias_int, acc.ndim)
    acc = _wrap_int32(acc)  # qnnpack's int32 accumulator, started at the bias: a sum past the
    # int32 range wraps (a bias near it: a weight scale torch's observer clamps to eps)
    mult = mul32(f32(mul32(f32(w_scales), f32(in_scale))), recip32(f32(out_scale)))
    y = mul32(f32(acc), _bcast(np.broadcast_to(mult, (o,)), acc.ndim))
    r = np.rint(y.astype(np.float64)).astype(np.int64)
    bias_real = None if bias_int is None else bias_int * bias_scale
    return y, r + out_zp, mult, bias_real, bias_int


def requantize_onednn(
    acc: np.ndarray, bias: np.ndarray | None, in_scale: float, w_scales: np.ndarray,
    out_scale: float, out_zp: int, per_channel: bool, combined_scales: bool = False,
    direct_scales: bool = False, divides_dst_scale: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    o = acc.shape[1]
    # torch hands oneDNN reciprocal scales (1 / scale, double -> float) and oneDNN inverts them
    # in float32; measured on 65,536 outputs placed within an ulp of a .5 tie (for about one
    # scale in five the result is one ulp away from f32(scale), which moves such outputs).
    # qconv_pointwise (x86_inductor) hands it the scales themselves.
    s_src = f32(in_scale) if direct_scales else recip32(f32(1.0 / in_scale))
    s_w = f32(w_scales)
    scale = mul32(s_src, s_w)  # (O,): the combined scale, and the report's multiplier
    # VNNI (brgemm) kernels apply the source scale, then the weight scale (measured: the
    # combined scale rounds differently, e.g. 208.50002 -> 209 where torch gives 208); the
    # kernels that pair channels (no VNNI) multiply by the precomputed product (measured on
    # near-tie outputs).
    if combined_scales:
        x = mul32(f32(acc), _bcast(np.broadcast_to(scale, (o,)), acc.ndim))
    else:
        x = mul32(mul32(f32(acc), s_src), _bcast(np.broadcast_to(s_w, (o,)), acc.ndim))
    bias_real = None
    if bias is not None:
        x = add32(x, _bcast(f32(bias), acc.ndim))
        bias_real = f32(bias).astype(np.float64)
    # the output side: float(1 / output_scale) inverted twice in float32, then multiplied
    # (measured: dividing by the scale rounds a tie the other way, 80.500008 vs 80.5; using
    # float(1 / output_scale) as it is misses one output in ten near a tie on some scales)
    dst_mult = (recip32(f32(out_scale)) if direct_scales
                else recip32(recip32(f32(1.0 / out_scale))))
    y = div32(x, f32(out_scale)) if divides_dst_scale else mul32(x, dst_mult)
    y = add32(y, f32(out_zp))
    r = _cvt_rint(y)
    mult = mul32(scale, dst_mult)
    return y, r, np.broadcast_to(mult, (o,)).copy(), bias_real


def _requantize_split(requantize: Callable[..., tuple[Any, ...]], args: tuple[Any, ...],
                      qmin: int, qmax: int
                      ) -> tuple[np.ndarray, np.ndarray, Any, Any, Any]:
    """``requantize(*args)`` over two halves of the output channels on two threads (every
    output channel is requantized on its own): (unclamped, output codes, multiplier,
    bias_real, bias_int). The pre-rounding values are dropped (``pre_round_fn``)."""
    from ..parallel import over_groups

    acc, bias, in_scale, w_scales, out_scale, out_zp, per_channel = args
    o = acc.shape[1]
    unclamped = np.empty(acc.shape, dtype=np.int64)
    codes = np.empty(acc.shape, dtype=np.int32)
    half = (o + 1) // 2

    def work(ranges: list[tuple[int, int]]) -> list[tuple[Any, ...]]:
        parts = []
        for a, b in ranges:
            _pre, u, *rest = requantize(acc[:, a:b], None if bias is None else bias[a:b],
                                        in_scale, w_scales[a:b], out_scale, out_zp, per_channel)
            unclamped[:, a:b] = u
            codes[:, a:b] = np.clip(u, qmin, qmax)
            parts.append(tuple(rest))
        return parts

    halves = [(0, half), (half, o)] if o > 1 else [(0, o)]
    parts = [p for grp in over_groups(halves, work) for p in grp]

    def joined(j: int) -> Any:
        vals = [p[j] for p in parts if j < len(p)]
        if not vals or vals[0] is None:
            return None
        return np.concatenate([np.asarray(v).reshape(-1) for v in vals])

    lo, hi = (int(unclamped.min()), int(unclamped.max())) if unclamped.size else (0, 0)
    if qmin <= lo and hi <= qmax:
        unclamped = codes  # nothing saturates: the same values, one array
    elif INT32_MIN <= lo and hi <= INT32_MAX:
        unclamped = unclamped.astype(np.int32)  # half the memory; int64 only when needed
    return unclamped, codes, joined(0), joined(1), joined(2)


@dataclass(frozen=True)
class ZeroPoints:
    """The zero points as the engine really stores and applies them."""

    input: int
    weight: np.ndarray
    """(O,) int64."""
    output: int
    pad_code: int
    """Raw code of padded input positions in the exact accumulation (the input zero point)."""
    pair_pad_code: int
    """Raw code of padded positions inside int16 pair sums (oneDNN pads raw 0)."""


def engine_zero_points(kernel: Kernel, x_zp: int, w_zp: np.ndarray, out_zp: int) -> ZeroPoints:
    """qnnpack keeps every zero point in a uint8 (the weight's as zp + 128), so out-of-range zero
    points wrap (measured: weight 135 acts as -121, input 300 as 44, output -20 as 236); fbgemm
    pads im2col with the input zero point stored as uint8 (an out-of-range zero point, which
    torch accepts from _make_per_tensor_quantized_tensor, pads with its wrapped value)."""
    w_zp = np.asarray(w_zp, dtype=np.int64)
    if kernel.kernel == "qnnpack":
        w_zp = (w_zp + 128) % 256 - 128
        x_zp %= 256
        out_zp %= 256
    pad_code = x_zp % 256 if kernel.kernel == "fbgemm" else x_zp
    pair_pad = pad_code if kernel.kernel == "fbgemm" else 0
    return ZeroPoints(x_zp, w_zp, out_zp, pad_code, pair_pad)


def engine_weight_codes(kernel: Kernel, w_codes: np.ndarray, w_qp: QParams) -> np.ndarray:
    """oneDNN takes quint8 weights (zero point 0) and reads their bytes as int8 (measured)."""
    if kernel.kernel == "onednn" and w_qp.dtype == "quint8":
        return np.where(w_codes > 127, w_codes - 256, w_codes)
    return w_codes


def relu_floor(kernel: Kernel, zero_point: int, engine_zero_point: int) -> int:
    """The code a fused ReLU clamps at: the output zero point, as each kernel holds it when it
    lies outside 0..255 (measured): fbgemm keeps a uint8 (284 -> 28), qnnpack saturates it
    (284 -> 255)."""
    if kernel.kernel == "fbgemm":
        return zero_point % 256
    if kernel.kernel == "qnnpack":
        return min(max(zero_point, 0), 255)
    return engine_zero_point


def _engine_accumulator(kernel: Kernel, x_codes: np.ndarray, w_codes: np.ndarray,
                        zps: ZeroPoints, g: Geometry) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(exact accumulator, the int32 accumulator the engine holds, saturated int16 pairs,
    saturated int16 row sums): the exact sum plus what the engine's int16 steps lose, then
    wrapped to int32 like the hardware does."""
    acc_exact = shared_exact_accumulator(x_codes, zps.input, w_codes, zps.weight, g,
                                         zps.pad_code)
    saturated = 0
    acc = acc_exact
    if kernel.accumulation != EXACT:
        corr, saturated = pair_saturation(x_codes, zps.input, w_codes, g, kernel.accumulation,
                                          zps.pair_pad_code)
        acc = acc_exact + corr
    saturated_row_sums = 0
    if kernel.row_sums_int16:
        row_corr, saturated_row_sums = row_sum_saturation(
            x_codes, zps.weight, g, tuple(w_codes.shape[2:]), zps.pair_pad_code)
        if row_corr is not None:
            acc = acc + row_corr
    return acc_exact, _wrap_int32(acc), saturated, saturated_row_sums


def _wrap_int32(acc: np.ndarray) -> np.ndarray:
    """The accumulator as int32, wrapped modulo 2^32 (a plain cast when nothing wraps: the exact
    accumulator's own array when it is int32 already)."""
    if acc.size and (int(acc.min()) < INT32_MIN or int(acc.max()) > INT32_MAX):
        return (((acc - INT32_MIN) % 2**32) + INT32_MIN).astype(np.int32)
    return acc.astype(np.int32, copy=False)


def _requantizer(kernel: Kernel) -> Callable[..., tuple[Any, ...]]:
    """The kernel family's requantization, with its oneDNN options bound."""
    if kernel.kernel == "qnnpack":
        return requantize_qnnpack
    if kernel.kernel == "onednn":
        return functools.partial(requantize_onednn,
                                 combined_scales=kernel.combined_scales,
                                 direct_scales=kernel.direct_scales,
                                 divides_dst_scale=kernel.divides_dst_scale)
    return requantize_fbgemm


def _float32_output(requantize: Callable[..., tuple[Any, ...]], args: tuple[Any, ...],
                    relu: bool) -> np.ndarray:
    """The value before the dst scale (1.0) and zero point (0), which oneDNN skips; the fused
    ReLU is an eltwise post-op on it."""
    output_float32 = np.asarray(requantize(*args)[0], dtype=np.float32)
    if relu:
        output_float32 = np.maximum(output_float32, np.float32(0))
    return output_float32


def emulate(
    kernel: Kernel,
    x_codes: np.ndarray,
    x_qp: QParams,
    w_codes: np.ndarray,
    w_qp: QParams,
    bias: np.ndarray | None,
    out_qp: QParams,
    g: Geometry,
    relu: bool = False,
    float_output: bool = False,
) -> Emulation:
    """The engine's quantized conv on these codes, every intermediate kept. ``relu``: a fused
    ReLU (ConvReLU modules), which every engine applies as a lower clamp at the output zero
    point. ``float_output``: the kernel writes float32 (x86_inductor only; ``out_qp`` is then
    ignored: scale 1.0 and zero point 0, as inductor passes them)."""
    if float_output:
        if not kernel.direct_scales:
            raise ValueError("float32 outputs are only written by the x86_inductor engine")
        out_qp = QParams((1.0,), (0,), "quint8", None, "engine")
    o = w_codes.shape[0]
    w_codes = engine_weight_codes(kernel, w_codes, w_qp)
    zps = engine_zero_points(kernel, int(x_qp.zero_point[0]), _per_out(w_qp.zero_point, o),
                             int(out_qp.zero_point[0]))
    in_scale = float(x_qp.scale[0])
    w_scales = _per_out(w_qp.scale, o)
    acc_exact, acc, saturated, saturated_row_sums = _engine_accumulator(
        kernel, x_codes, w_codes, zps, g)
    requantize = _requantizer(kernel)
    args = (acc, bias, in_scale, w_scales, float(out_qp.scale[0]), zps.output, w_qp.per_channel)
    qmin = max(out_qp.dtype_min, relu_floor(kernel, int(out_qp.zero_point[0]), zps.output)) \
        if relu else out_qp.dtype_min
    unclamped, codes, mult, bias_real, bias_int = _requantize_split(
        requantize, args, qmin, out_qp.dtype_max)
    return Emulation(
        kernel, acc_exact, acc, saturated, bias_real, bias_int,
        np.asarray(mult, dtype=np.float32),
        lambda: np.asarray(requantize(*args)[0], dtype=np.float32), unclamped, codes,
        w_scales * in_scale, zps.output if kernel.kernel == "onednn" else 0, saturated_row_sums,
        _float32_output(requantize, args, relu) if float_output else None,
    )
