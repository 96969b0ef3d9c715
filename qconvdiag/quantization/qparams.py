"""Quantization parameters: the formulas and the validity rules, nothing about convolution.

A worked example, the seed case's weight: values 0..19, the user's formula
``scale = (max - min) / 254 = 0.0708661``, ``zero_point = -(min / scale) = -14.1111`` for qint8.
torch truncates the zero point toward zero (-14.1111 -> -14), multiplies by
``float32(1 / scale)`` and rounds half to even: ``19 * 14.111111 = 268.1 -> 268 - 14 = 254``,
which qint8's range clips to 127, i.e. the value ``(127 + 14) * 0.0708661 = 9.9921``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import QParamsError
from ..fp32 import add32, fma32, mul32
from ..report import QParamsReport

#: Integer range of each quantized dtype torch offers, by name.
DTYPE_RANGES: dict[str, tuple[int, int]] = {
    "quint8": (0, 255),
    "qint8": (-128, 127),
    "qint32": (-(2**31), 2**31 - 1),
}

#: numpy dtype that holds the integer codes of each quantized dtype.
CODE_DTYPES: dict[str, str] = {"quint8": "uint8", "qint8": "int8", "qint32": "int32"}


def dtype_name(dtype: Any) -> str:
    """``torch.qint8``, ``"torch.qint8"`` or ``"qint8"`` -> ``"qint8"``."""
    name = str(dtype).rsplit(".", 1)[-1].strip().lower()
    if name not in DTYPE_RANGES:
        raise QParamsError(
            f"unknown quantized dtype {dtype!r}: use one of {', '.join(DTYPE_RANGES)}"
        )
    return name


@dataclass(frozen=True)
class QParams:
    """Scale(s), zero point(s) and dtype of one quantized tensor, as torch would use them."""

    scale: tuple[float, ...]
    """One scale (per tensor) or one per channel along ``axis``; float units per integer step."""
    zero_point: tuple[int, ...]
    """Integer zero point(s) as torch applies them (a float zero point truncated toward 0)."""
    dtype: str
    """``quint8``, ``qint8`` or ``qint32``."""
    axis: int | None = None
    """Channel axis for per-channel qparams, ``None`` for per-tensor."""
    source: str = "user"
    """``user``, ``default``, ``module``, ``tensor`` or ``observer:<name>``."""
    zero_point_given: tuple[float, ...] | None = None
    """The zero point(s) exactly as written, when that was not an integer (QCD001)."""
    quant_min: int | None = None
    """Lowest code allowed (defaults to the dtype's; 0..127 with reduce_range)."""
    quant_max: int | None = None
    """Highest code allowed."""
    notes: tuple[str, ...] = field(default=())
    """Free-form remarks about how these qparams were made."""
    dtype_given: str | None = None
    """The dtype exactly as written, when torch runs another: output qparams that say qint8 or
    qint32 (torch's quantized convs write quint8 whatever they say)."""

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def scheme(self) -> str:
        return "per_channel_affine" if self.per_channel else "per_tensor_affine"

    @property
    def qmin(self) -> int:
        return DTYPE_RANGES[self.dtype][0] if self.quant_min is None else self.quant_min

    @property
    def qmax(self) -> int:
        return DTYPE_RANGES[self.dtype][1] if self.quant_max is None else self.quant_max

    @property
    def dtype_min(self) -> int:
        return DTYPE_RANGES[self.dtype][0]

    @property
    def dtype_max(self) -> int:
        return DTYPE_RANGES[self.dtype][1]

    def scales(self) -> np.ndarray:
        return np.asarray(self.scale, dtype=np.float64)

    def zero_points(self) -> np.ndarray:
        return np.asarray(self.zero_point, dtype=np.int64)

    def with_source(self, source: str) -> QParams:
        return QParams(
            self.scale, self.zero_point, self.dtype, self.axis, source,
            self.zero_point_given, self.quant_min, self.quant_max, self.notes, self.dtype_given,
        )

    def to_dict(self) -> dict[str, Any]:
        """The case-file form (what ``save_case`` writes and ``from_mapping`` reads)."""
        one = not self.per_channel
        out: dict[str, Any] = {
            "scale": self.scale[0] if one else list(self.scale),
            "zero_point": (
                (self.zero_point_given or self.zero_point)[0]
                if one
                else list(self.zero_point_given or self.zero_point)
            ),
            "dtype": self.dtype,
        }
        if self.axis is not None:
            out["axis"] = self.axis
        return out

    def report(self) -> QParamsReport:
        """The report's view of these qparams (plain values, one description)."""
        return QParamsReport(self.scale, self.zero_point, self.dtype, self.axis, self.source,
                             self.zero_point_given, self.notes)


def _as_float(value: int | float, what: str) -> float:
    try:
        return float(value)
    except OverflowError:  # an integer beyond float's range (1e308)
        raise QParamsError(f"{what} is too large for a float: write a plain float") from None


def _as_float_list(value: Any, what: str) -> list[float]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [_as_float(value, what)]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        out = []
        for v in value:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise QParamsError(f"{what} must be numbers, got {str(v)[:40]!r}: write plain "
                                   "floats")
            out.append(_as_float(v, what))
        return out
    raise QParamsError(f"{what} must be a number or a list of numbers, got {type(value).__name__}")


def truncate_zero_point(value: float) -> int:
    """torch turns a float zero point into an int by truncation toward zero: -14.11 -> -14."""
    return int(math.trunc(value))


def from_mapping(mapping: Mapping[str, Any], what: str, source: str = "user") -> QParams:
    """Build QParams from a case file's dict (``scale``, ``zero_point``, ``dtype``, ``axis``).

    Raises QParamsError with a fix for scale <= 0, NaN/Inf, unknown dtype or missing keys.
    """
    if not isinstance(mapping, Mapping):
        raise QParamsError(
            f"{what} must be a dict with 'scale', 'zero_point' and 'dtype', "
            f"got {type(mapping).__name__}"
        )
    missing = [k for k in ("scale", "zero_point") if k not in mapping]
    if missing:
        raise QParamsError(
            f"{what} is missing {', '.join(repr(m) for m in missing)}: give "
            "{'scale': s, 'zero_point': z, 'dtype': 'quint8'|'qint8'}"
        )
    scale = _as_float_list(mapping["scale"], f"{what}.scale")
    zp_given = _as_float_list(mapping["zero_point"], f"{what}.zero_point")
    dtype = dtype_name(mapping.get("dtype", "quint8"))
    axis_raw = mapping.get("axis")
    axis = None
    if axis_raw is not None:
        if hasattr(axis_raw, "item"):
            axis_raw = axis_raw.item()
        if isinstance(axis_raw, bool) or not isinstance(axis_raw, (int, float)):
            raise QParamsError(f"{what}.axis must be an integer, got {axis_raw!r}")
        axis = int(axis_raw)
    return make_qparams(scale, zp_given, dtype, axis, what, source)


def make_qparams(
    scale: Sequence[float],
    zero_point: Sequence[float],
    dtype: str,
    axis: int | None,
    what: str,
    source: str,
) -> QParams:
    """Validate and build; a float zero point is truncated as torch does and remembered."""
    scale = [float(s) for s in scale]
    zero_point = [float(z) for z in zero_point]
    if not scale or not zero_point:
        raise QParamsError(f"{what}: scale and zero_point must not be empty")
    for s in scale:
        if not math.isfinite(s):
            raise QParamsError(f"{what}.scale is {s}: give a finite positive float")
        if s <= 0:
            raise QParamsError(
                f"{what}.scale is {s:g}: a scale must be > 0 (e.g. (max - min) / 255)"
            )
        if s < 1e-30 or s > 1e30:
            raise QParamsError(
                f"{what}.scale is {s:g}: outside 1e-30..1e30, where float32 arithmetic breaks"
            )
    for z in zero_point:
        if not math.isfinite(z):
            raise QParamsError(f"{what}.zero_point is {z}: give a finite integer")
        if not -(2**31) <= math.trunc(z) <= 2**31 - 1:
            raise QParamsError(f"{what}.zero_point {math.trunc(z)} does not fit in int32 "
                               f"(-2147483648..2147483647): use 0..255")
    if axis is None and (len(scale) > 1 or len(zero_point) > 1):
        if len(scale) != len(zero_point):
            raise QParamsError(
                f"{what}: {len(scale)} scales but {len(zero_point)} zero points: give one each "
                "per channel"
            )
        axis = 0
    if axis is not None:
        if len(zero_point) == 1 and len(scale) > 1:
            zero_point = zero_point * len(scale)
        if len(scale) != len(zero_point):
            raise QParamsError(
                f"{what}: {len(scale)} scales but {len(zero_point)} zero points: give one each "
                "per channel"
            )
    truncated = tuple(truncate_zero_point(z) for z in zero_point)
    given = None if all(float(t) == z for t, z in zip(truncated, zero_point)) else tuple(zero_point)
    return QParams(
        scale=tuple(scale), zero_point=truncated, dtype=dtype, axis=axis, source=source,
        zero_point_given=given,
    )


def per_tensor(scale: float, zero_point: int, dtype: str, source: str) -> QParams:
    return QParams((float(scale),), (int(zero_point),), dtype, None, source)


def round_half_even(x: np.ndarray) -> np.ndarray:
    """``np.rint`` rounds half to even, like the engines' ``nearbyint`` / ``cvtps``."""
    return np.rint(x)


def _broadcast(values: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None:
        return values.reshape(())
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """Integer codes as ``torch.quantize_per_tensor/per_channel`` computes them (int64 array).

    8-bit per-tensor: ``q = clamp(rint(fma32(x, float32(1 / scale), zero_point)))``;
    per-channel and qint32: ``q = clamp(rint(float32(float32(x * float32(1 / scale)) + zp)))``.
    """
    xf = np.asarray(x, dtype=np.float32)
    if qp.per_channel and (qp.axis is None or not -xf.ndim <= qp.axis < xf.ndim):
        raise QParamsError(f"axis {qp.axis} out of range for a tensor of rank {xf.ndim}")
    axis = None if qp.axis is None else qp.axis % xf.ndim
    if axis is not None and xf.shape[axis] != len(qp.scale):
        raise QParamsError(
            f"{len(qp.scale)} per-channel scales for {xf.shape[axis]} channels along axis {axis}"
        )
    inv = (np.float32(1.0) / qp.scales().astype(np.float32)).astype(np.float32)
    inv = _broadcast(inv, xf.ndim, axis)
    zp = _broadcast(qp.zero_points(), xf.ndim, axis)
    with np.errstate(over="ignore", invalid="ignore"):
        # Measured on torch's quantize_per_tensor/per_channel, ties included:
        # 8-bit per-tensor: fma(x, 1/scale, zero_point) in float32, one rounding, then rint;
        # per-channel and qint32: float32(x * (1/scale)), + zero_point in float32, then rint.
        if qp.per_channel or qp.dtype == "qint32":
            scaled = add32(mul32(xf, inv), zp.astype(np.float32))
        else:
            return np.clip(_rint_fma32(xf, inv, zp), qp.qmin, qp.qmax)
    # float32 -> int beyond int64 is undefined; the engines clamp afterwards, so clip first.
    rounded = np.clip(round_half_even(scaled.astype(np.float64)), -(2.0**40), 2.0**40)
    return np.clip(rounded.astype(np.int64), qp.qmin, qp.qmax)


def compact_codes(codes: np.ndarray, qp: QParams) -> np.ndarray:
    """8-bit codes stored as int32 (half the memory of int64) when every zero point is within
    +-2^15: then any code minus a zero point, and the product of two such, stays far inside
    int32. Other codes (qint32, absurd zero points) are returned unchanged."""
    if qp.dtype in ("quint8", "qint8") and max(abs(int(z)) for z in qp.zero_point) <= 2**15:
        return codes.astype(np.int32, copy=False)
    return codes


def wide_codes(codes: np.ndarray, qp: QParams) -> np.ndarray:
    """Codes in a dtype that arithmetic on them may use: ``compact_codes``'s int32, else int64
    (8-bit codes kept in their own dtype, as a model capture keeps them, are widened: their
    difference from a zero point would wrap around in uint8)."""
    c = compact_codes(codes, qp)
    return c if c.dtype.itemsize >= 4 else c.astype(np.int64)


#: Elements quantized per block (the float64 temporaries stay in cache).
QUANTIZE_BLOCK = 1 << 16


def _rint_fma32(x: np.ndarray, inv: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """rint(fma32(x, inv, zp)) as int64, fast: x * inv is exact in float64, so the float64 sum
    only needs the exact float32 treatment where it lies within a float32 step of a .5 tie.
    Per-tensor (scalar ``inv`` and ``zp``) large tensors go block by block."""
    if inv.size == 1 and zp.size == 1 and x.size > QUANTIZE_BLOCK:
        from ..parallel import over_groups

        flat = np.ascontiguousarray(x).reshape(-1)
        out = np.empty(flat.size, dtype=np.int64)
        i1, z1 = inv.reshape(-1)[:1], zp.reshape(-1)[:1]

        def work(starts: list[int]) -> None:  # blocks on two threads
            for start in starts:
                stop = min(start + QUANTIZE_BLOCK, flat.size)
                out[start:stop] = _rint_fma32_block(flat[start:stop], i1, z1)

        over_groups(list(range(0, flat.size, QUANTIZE_BLOCK)), work)
        return out.reshape(x.shape)
    return _rint_fma32_block(x, inv, zp)


def _rint_fma32_block(x: np.ndarray, inv: np.ndarray, zp: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        v = x.astype(np.float64) * inv.astype(np.float64) + zp.astype(np.float64)
        r = np.rint(v)
        near = np.abs(np.abs(v - r) - 0.5) <= np.abs(v) * 2.0**-22 + 2.0**-126
    if near.any():
        idx = np.flatnonzero(near)
        xs = np.broadcast_to(x, v.shape).reshape(-1)[idx]
        ins = np.broadcast_to(inv, v.shape).reshape(-1)[idx]
        zs = np.broadcast_to(zp.astype(np.float32), v.shape).reshape(-1)[idx]
        flat = r.reshape(-1).copy()
        flat[idx] = np.rint(fma32(xs, ins, zs).astype(np.float64))
        r = flat.reshape(v.shape)
    return np.clip(np.nan_to_num(r, nan=0.0), -(2.0**40), 2.0**40).astype(np.int64)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    """``(q - zero_point) * scale`` in float64 (torch does it in float32; see ``dequantize32``)."""
    q = np.asarray(q, dtype=np.int64)
    axis = None if qp.axis is None else qp.axis % q.ndim
    s = _broadcast(qp.scales(), q.ndim, axis)
    zp = _broadcast(qp.zero_points(), q.ndim, axis)
    out = np.subtract(q, zp, dtype=np.float64)  # exact: integers far below 2^53
    out *= s
    return out


def dequantize32(q: np.ndarray, qp: QParams) -> np.ndarray:
    """The float32 values ``tensor.dequantize()`` returns: float32(q - zero_point) * scale."""
    q = np.asarray(q)
    axis = None if qp.axis is None else qp.axis % q.ndim
    s = _broadcast(qp.scales().astype(np.float32), q.ndim, axis)
    zp = _broadcast(qp.zero_points(), q.ndim, axis)
    if compact(q, qp):  # codes, zero points and their difference are exact in float32
        out = q.astype(np.float32)
        out -= zp.astype(np.float32)
        out *= s
        return out
    q = q.astype(np.int64, copy=False)
    return ((q - zp).astype(np.float32) * s).astype(np.float32)


def compact(q: np.ndarray, qp: QParams) -> bool:
    """8-bit codes in an integer array of at most 32 bits, zero points within +-2^15."""
    return (qp.dtype in ("quint8", "qint8") and q.dtype.kind in "iu" and q.dtype.itemsize <= 4
            and max(abs(int(z)) for z in qp.zero_point) <= 2**15)


def clip_bounds(qp: QParams) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest representable float value (per channel if per-channel)."""
    s, zp = qp.scales(), qp.zero_points()
    return (qp.qmin - zp) * s, (qp.qmax - zp) * s


#: The narrowed signed ranges a weight observer's ``quant_min``/``quant_max`` give (n bits,
#: n < 8: -2^(n-1)..2^(n-1)-1, or the symmetric -(2^(n-1)-1)..2^(n-1)-1), by (lowest, highest).
NARROWED_WEIGHT_RANGES = frozenset(
    pair for n in range(2, 8) for pair in ((-(2 ** (n - 1)), 2 ** (n - 1) - 1),
                                           (-(2 ** (n - 1) - 1), 2 ** (n - 1) - 1)))


def narrowed_weight_range(weight: np.ndarray, codes: np.ndarray, qp: QParams) -> QParams:
    """``qp`` with the ``quant_min``/``quant_max`` the codes show a weight observer had (4-bit
    weights: -8..7, pytorch/ao#2138), else ``qp`` itself. The codes span one of
    NARROWED_WEIGHT_RANGES (or lie within one and reach one of its ends, its scale a symmetric
    observer's on it: a per-tensor observer's largest weight on one side), every one the
    float weight's at ``qp`` over the whole qint8 range but those beyond the narrowed range,
    which the module holds clamped at its ends; and that
    clamp, or the scale of a symmetric observer on that range (max|w| / ((quant_max -
    quant_min) / 2) in every channel), shows the range (codes that merely lie inside one, a
    coarse scale's, show neither)."""
    if (qp.dtype != "qint8" or qp.quant_min is not None or qp.quant_max is not None
            or codes.size == 0 or codes.shape != weight.shape):
        return qp
    low, high = int(codes.min()), int(codes.max())
    if (low, high) not in NARROWED_WEIGHT_RANGES:
        # codes that reach one end of a range only (a per-tensor observer's largest weight on
        # one side): the scale of a symmetric observer on that range must show it
        ends = [(a, b) for a, b in NARROWED_WEIGHT_RANGES
                if a <= low and high <= b and (a == low or b == high)
                and _symmetric_fit(weight, qp, (b - a) / 2)]
        if not ends:
            return qp
        low, high = ends[0]
    try:
        full = quantize(weight, qp)
    except QParamsError:
        return qp
    held = codes.astype(np.int64)
    beyond = (full > high) | (full < low)
    clamped = beyond & (held == np.clip(full, low, high))
    # every code beyond the range is held at its end, and every other code is the float
    # weight's own (a weight that moved after convert is not read as a narrowed range)
    if not np.array_equal(clamped, beyond) or not np.array_equal(full[~beyond], held[~beyond]):
        return qp
    if not clamped.any() and not _symmetric_fit(weight, qp, (high - low) / 2):
        return qp
    return QParams(qp.scale, qp.zero_point, qp.dtype, qp.axis, qp.source, qp.zero_point_given,
                   low, high, qp.notes, qp.dtype_given)


def _symmetric_fit(weight: np.ndarray, qp: QParams, half_levels: float) -> bool:
    """Every channel's scale (the tensor's, per tensor) is a symmetric observer's on
    ``half_levels`` each side, max|w| / half_levels (float32's precision), where its weight is
    not all zero."""
    if any(z != 0 for z in qp.zero_point):
        return False
    axis = None if qp.axis is None else qp.axis % weight.ndim
    rows = (weight.reshape(1, -1) if axis is None
            else np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1))
    top = np.abs(rows.astype(np.float64)).max(axis=1)
    live = top > 0
    return bool(live.any()) and bool(np.allclose(qp.scales()[live] * half_levels, top[live],
                                                 rtol=1e-5, atol=0.0))


def narrowed(qp: QParams) -> bool:
    """Codes restricted to fewer levels than the dtype has (``narrowed_weight_range``'s)."""
    return (qp.quant_min, qp.quant_max) in NARROWED_WEIGHT_RANGES
