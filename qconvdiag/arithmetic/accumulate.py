"""The integer accumulator of a quantized conv: exact, and as each engine really holds it.

``exact_accumulator`` gives sum((x - x_zp) * (w - w_zp)) per output element, exactly (float32
convs on base-16 digits, or int8 GEMMs where ``torch._int_mm`` is exact). What an engine adds to
it: ``pair_saturation`` (products summed pairwise in saturating int16, ``vpmaddubsw``, on CPUs
without AVX512-VNNI) and ``row_sum_saturation`` (fbgemm's depthwise kernel sums each window's
input codes in saturating int16). Worked example: two products 255 * 127 = 32,385 each pair to
64,770, which int16 holds as 32,767; the accumulator loses 32,003.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from ..case import Geometry, output_shape
from ..torch_calls import conv_function

INT16_MIN, INT16_MAX = -32768, 32767
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

#: Accumulation behaviours.
EXACT = "exact"
PAIRS_K = "int16_pairs_k"
"""Pairs of consecutive K entries (taps x channels of the group, channels fastest)."""
PAIRS_CHANNELS = "int16_pairs_channels"
"""Pairs of adjacent input channels of the same kernel tap."""


def tap_views(xpad: np.ndarray, weight_shape: tuple[int, ...], g: Geometry,
               out_spatial: tuple[int, ...]) -> dict[tuple[int, ...], np.ndarray]:
    """For every kernel tap, the strided view of the padded input it multiplies."""
    views = {}
    for tap in itertools.product(*(range(k) for k in weight_shape[2:])):
        sl = [slice(None), slice(None)]
        for i, t in enumerate(tap):
            start = t * g.dilation[i]
            stop = start + (out_spatial[i] - 1) * g.stride[i] + 1
            sl.append(slice(start, stop, g.stride[i]))
        views[tap] = xpad[tuple(sl)]
    return views


def pad_spatial(x: np.ndarray, padding: tuple[int, ...], value: int) -> np.ndarray:
    """``x`` padded with ``value`` along its spatial dims; ``x`` itself without padding (its
    callers read the result only)."""
    if not any(padding):
        return x
    width = [(0, 0), (0, 0)] + [(p, p) for p in padding]
    return np.pad(x, width, mode="constant", constant_values=value)


def exact_accumulator(
    x_codes: np.ndarray, x_zp: int, w_codes: np.ndarray, w_zp: np.ndarray, g: Geometry,
    pad_code: int | None = None,
) -> np.ndarray:
    """sum((x - x_zp) * (w - w_zp)) per output element, exactly.

    Padded positions hold the raw code ``pad_code`` (the zero point itself unless an engine
    stores it wrapped), so they contribute ``(pad_code - x_zp) * w``: 0 in the normal case.

    float32 convs are exact while every partial sum stays below 2^24 in magnitude (any
    summation order): the shifted input is split into base-16 digits so each digit's conv is
    bounded by K * 15 * max|w|; float64 is the fallback for layers too deep for that.
    """
    fast = _gemm_accumulator(x_codes, x_zp, w_codes, w_zp, g,
                             x_zp if pad_code is None else pad_code)
    if fast is not None:
        return fast
    dims = w_codes.ndim - 2
    shift = 0 if pad_code is None else pad_code - x_zp
    xs = (x_codes - x_zp).astype(np.int64)
    padding = g.padding
    if shift and any(g.padding):
        xs = pad_spatial(xs, g.padding, shift)
        padding = (0,) * dims
    ws = (w_codes - w_zp.reshape((-1,) + (1,) * (w_codes.ndim - 1))).astype(np.int64)
    k = int(np.prod(ws.shape[1:]))
    w_max = int(np.abs(ws).max()) if ws.size else 0
    x_max = int(np.abs(xs).max()) if xs.size else 0
    g2 = Geometry(g.stride, padding, g.dilation, g.groups)
    limit = 2**24
    taps = k // ws.shape[1]
    per_channel_bound = taps * x_max * w_max
    if per_channel_bound == 0 or k * x_max * w_max < limit:
        return _conv_int(xs, ws, g2, np.float32)
    # Split each group's input channels into chunks whose partial sums stay below 2^24: the
    # chunks' convs cost one conv in total, and their int64 sum is exact.
    chunk = (limit - 1) // per_channel_bound
    if chunk >= 1:
        cin_g = ws.shape[1]
        out = None
        for start in range(0, cin_g, chunk):
            stop = min(start + chunk, cin_g)
            channels = np.concatenate([np.arange(grp * cin_g + start, grp * cin_g + stop)
                                       for grp in range(g.groups)])
            part = _conv_int(xs[:, channels], ws[:, start:stop], g2, np.float32)
            out = part if out is None else out + part
        assert out is not None
        return out
    return _conv_int(xs, ws, g2, np.float64)


#: Largest im2col block (bytes of int8) the integer GEMM route builds at once.
IM2COL_BLOCK_BYTES = 16 * 2**20


def _int8_offset(lo: int, hi: int) -> int | None:
    """An offset c with every code - c in int8, or None."""
    for c in (0, 128, -128):
        if lo - c >= -128 and hi - c <= 127:
            return c
    return None


@functools.cache
def int_gemm_exact() -> bool:
    """True when ``torch._int_mm`` sums int8 products exactly in int32 on this CPU.

    oneDNN's int8 GEMM is exact with AVX512-VNNI/AMX; without them it pairs products in
    saturating int16 (measured: 64 products of 127 * 127 give 8160). The same worst case decides
    here, at run time, whatever the CPU; the float32 conv route is used otherwise.
    """
    import torch

    vnni = getattr(torch.cpu, "_is_vnni_supported", None)
    if vnni is None or not vnni():
        return False
    try:
        for v in (127, -128):
            a = torch.full((32, 64), v, dtype=torch.int8)
            got = torch._int_mm(a, a.t().contiguous())
            if int(got.min()) != int(got.max()) or int(got[0, 0]) != 64 * v * v:
                return False
        rng = np.random.default_rng(0)
        a8 = rng.integers(-128, 128, (40, 72)).astype(np.int8)
        b8 = rng.integers(-128, 128, (72, 24)).astype(np.int8)
        prod = torch._int_mm(torch.from_numpy(a8), torch.from_numpy(b8)).numpy()
        return bool(np.array_equal(prod, a8.astype(np.int64) @ b8.astype(np.int64)))
    except (RuntimeError, AttributeError):
        return False


def _gemm_accumulator(
    x_codes: np.ndarray, x_zp: int, w_codes: np.ndarray, w_zp: np.ndarray, g: Geometry,
    pad_code: int,
) -> np.ndarray | None:
    """The exact accumulator as int8 GEMMs (im2col in blocks), or None when not applicable.

    With a = x - cx and b = w - cw in int8 (cx, cw in {0, 128, -128}):
    sum (x - zx)(w - zw) = sum a*b + (cw - zw) sum a + (cx - zx) sum b + K (cx - zx)(cw - zw),
    where sum a runs over the receptive field (padded positions hold pad_code - cx) and K is
    the number of products. int32 holds sum a*b exactly while K * 2^14 < 2^31.
    """
    offsets = _gemm_offsets(x_codes, w_codes, g, pad_code)
    if offsets is None:
        return None
    cx, cw = offsets
    import torch

    o_total, cin_g = w_codes.shape[0], w_codes.shape[1]
    taps = int(np.prod(w_codes.shape[2:]))
    k = cin_g * taps
    out_sp = output_shape(x_codes.shape, w_codes.shape, g)[2:]
    n = x_codes.shape[0]
    og = o_total // g.groups
    a_pad = pad_spatial((x_codes - cx).astype(np.int8), g.padding, pad_code - cx)
    views = list(tap_views(a_pad, w_codes.shape, g, out_sp).values())
    b = (w_codes - cw).astype(np.int8).reshape(o_total, k)
    zw = np.asarray(w_zp, dtype=np.int64).reshape(-1)
    dtype = _gemm_dtype(x_codes, x_zp, w_codes, zw, pad_code, (cx, cw), k)
    row_term = ((cx - x_zp) * (b.astype(np.int64).sum(axis=1) + k * (cw - zw))).astype(dtype)
    col_weight = (cw - zw).astype(dtype)  # (O,): multiplies sum a
    need_col = bool(np.any(col_weight))
    rows = out_sp[0] if out_sp else 1
    per_row = int(np.prod(out_sp[1:], dtype=np.int64))
    row_block = max(1, min(rows, IM2COL_BLOCK_BYTES // max(k * per_row, 1)))
    out = np.empty((n, o_total, *out_sp), dtype=dtype)
    for grp in range(g.groups):
        o_sl = slice(grp * og, (grp + 1) * og)
        c_sl = slice(grp * cin_g, (grp + 1) * cin_g)
        w_g = torch.from_numpy(np.ascontiguousarray(b[o_sl]))
        for i in range(n):
            for r0 in range(0, rows, row_block):
                r1 = min(rows, r0 + row_block)
                cols = _im2col([v[i, c_sl, r0:r1] for v in views], (r1 - r0) * per_row)
                acc: np.ndarray = torch._int_mm(w_g, torch.from_numpy(cols)).numpy().astype(dtype)
                acc += row_term[o_sl, None]
                if need_col:
                    acc += col_weight[o_sl, None] * cols.sum(axis=0, dtype=dtype)[None]
                dest = out[i, o_sl, r0:r1]
                dest[...] = acc.reshape(dest.shape)
    return out


def _gemm_offsets(x_codes: np.ndarray, w_codes: np.ndarray, g: Geometry, pad_code: int
                  ) -> tuple[int, int] | None:
    """The int8 offsets (cx, cw) of the GEMM route, or None when it does not apply: many groups,
    an empty tensor, K too small to pay or too large for int32, an inexact ``torch._int_mm``,
    codes no offset brings into int8."""
    if g.groups > 8 or x_codes.size == 0 or w_codes.size == 0:
        return None
    k = w_codes.shape[1] * int(np.prod(w_codes.shape[2:]))
    if k < 16 or k * 2**14 >= 2**31 or not int_gemm_exact():
        return None
    cx = _int8_offset(min(int(x_codes.min()), pad_code), max(int(x_codes.max()), pad_code))
    cw = _int8_offset(int(w_codes.min()), int(w_codes.max()))
    if cx is None or cw is None:
        return None
    return cx, cw


def _gemm_dtype(x_codes: np.ndarray, x_zp: int, w_codes: np.ndarray, zw: np.ndarray,
                pad_code: int, offsets: tuple[int, int], k: int
                ) -> type[np.int32] | type[np.int64]:
    """int32 when every partial sum of the GEMM route fits it, else int64.

    Every partial sum is bounded by K * max|x - zx| * max|w - zw| (and by K * 2^14,
    K * 255 * |cw - zw|, ...): when that bound fits int32, so does everything, and the
    accumulator is built in int32 without int64 temporaries.
    """
    cx, cw = offsets
    o_total = w_codes.shape[0]
    x_dev = max(abs(min(int(x_codes.min()), pad_code) - x_zp),
                abs(max(int(x_codes.max()), pad_code) - x_zp))
    w_dev = int(np.abs(w_codes.reshape(o_total, -1).astype(np.int64) - zw[:, None]).max())
    terms = max(x_dev * w_dev, 2**14, 255 * int(np.abs(cw - zw).max()),
                abs(cx - x_zp) * (128 + int(np.abs(cw - zw).max())))
    return np.int32 if 4 * k * terms < 2**31 else np.int64


def _im2col(tap_blocks: list[np.ndarray], block: int) -> np.ndarray:
    """(K, block) int8 columns, K = (channels, taps) in the weight's order, from one block of
    every tap's view ((channels, rows, ...) each)."""
    cols = np.empty((tap_blocks[0].shape[0], len(tap_blocks), block), dtype=np.int8)
    for t, part in enumerate(tap_blocks):
        np.copyto(cols[:, t].reshape(part.shape), part)
    return cols.reshape(cols.shape[0] * cols.shape[1], block)


def shared_exact_accumulator(
    x_codes: np.ndarray, x_zp: int, w_codes: np.ndarray, w_zp: np.ndarray, g: Geometry,
    pad_code: int,
) -> np.ndarray:
    """``exact_accumulator``, computed once per diagnosis for the same codes and zero points
    (the float reference, every engine and the trace share it). Never modify the result."""
    from ..memo import memoized

    zps = tuple(int(v) for v in np.asarray(w_zp).reshape(-1))

    def compute() -> np.ndarray:
        acc = exact_accumulator(x_codes, x_zp, w_codes, w_zp, g, pad_code)
        if acc.size and INT32_MIN <= int(acc.min()) and int(acc.max()) <= INT32_MAX:
            return acc.astype(np.int32)  # half the memory; int64 only when needed
        return acc

    return memoized("exact_accumulator", (x_codes, w_codes), (int(x_zp), int(pad_code), zps, g),
                    compute)


def _conv_int(x: np.ndarray, w: np.ndarray, g: Geometry, dtype: type) -> np.ndarray:
    import torch

    conv = conv_function(w.ndim - 2)
    with torch.no_grad():
        out = conv(torch.from_numpy(x.astype(dtype)), torch.from_numpy(w.astype(dtype)), None,
                   g.stride, g.padding, g.dilation, g.groups)
    return np.rint(out.numpy()).astype(np.int64)


def pair_list(accumulation: str, cin_g: int, taps: int) -> list[tuple[tuple[int, int], ...]]:
    """The (tap, channel) entries summed together in int16, per the engine's layout."""
    pairs: list[tuple[tuple[int, int], ...]] = []
    if accumulation == PAIRS_K:
        k = [(t, c) for t in range(taps) for c in range(cin_g)]
        for i in range(0, len(k), 2):
            pairs.append(tuple(k[i:i + 2]))
    elif accumulation == PAIRS_CHANNELS:
        for t in range(taps):
            for c in range(0, cin_g, 2):
                pairs.append(tuple((t, cc) for cc in range(c, min(c + 2, cin_g))))
    return pairs


def pair_saturation(
    x_codes: np.ndarray, x_zp: int, w_codes: np.ndarray, g: Geometry, accumulation: str,
    pad_value: int, count_only: bool = False,
) -> tuple[np.ndarray, int]:
    """sum over pairs of (sat16(P) - P) per output element, and the count of saturated pairs.

    P is the pair sum of raw codes. Pairs that cannot leave int16 for any input value in
    this tensor (bounded by each channel's min/max code) are skipped, so 7-bit activations
    cost nothing. Pair sums of 8-bit codes fit int32 (|P| <= 2 * 255 * 255) and are formed for
    a block of output channels at a time. ``count_only`` returns an empty correction.
    """
    out_sp = output_shape(x_codes.shape, w_codes.shape, g)[2:]
    n = x_codes.shape[0]
    o_total, cin_g = w_codes.shape[0], w_codes.shape[1]
    og = o_total // g.groups
    taps = list(itertools.product(*(range(k) for k in w_codes.shape[2:])))
    correction = np.zeros((0,) if count_only else (n, o_total, *out_sp), dtype=np.int64)
    pairs = [p for p in pair_list(accumulation, cin_g, len(taps)) if len(p) == 2]
    if not pairs:
        return correction, 0
    xpad = _padded_codes(np.asarray(x_codes), g.padding, pad_value)
    channel_codes = xpad.reshape(n, xpad.shape[1], -1)
    code_range = (channel_codes.min(axis=(0, 2)).astype(np.int64),
                  channel_codes.max(axis=(0, 2)).astype(np.int64))
    views = tap_views(xpad, w_codes.shape, g, out_sp)
    w_flat = w_codes.reshape(o_total, cin_g, -1)  # (O, Cg, taps), taps in C order
    pa = np.array([(ta, ca) for (ta, ca), _ in pairs], dtype=np.int64).reshape(-1, 2)
    pb = np.array([(tb, cb) for _, (tb, cb) in pairs], dtype=np.int64).reshape(-1, 2)
    plane = n * int(np.prod(out_sp, dtype=np.int64))
    block = max(1, PAIR_BLOCK_ELEMENTS // max(plane, 1))
    saturated = 0
    for grp in range(g.groups):
        c0 = grp * cin_g
        # every pair's reachable range at once: (outputs of the group, pairs)
        w_g = w_flat[grp * og:(grp + 1) * og]  # a view
        wa_all = w_g[:, pa[:, 1], pa[:, 0]].astype(np.int64)
        wb_all = w_g[:, pb[:, 1], pb[:, 0]].astype(np.int64)
        risky_all = _risky_pairs(wa_all, wb_all, c0 + pa[:, 1], c0 + pb[:, 1], code_range)
        for j in np.flatnonzero(risky_all.any(axis=0)):
            (ta, ca), (tb, cb) = pairs[j]
            xa = views[taps[ta]][:, c0 + ca][:, None]
            xb = views[taps[tb]][:, c0 + cb][:, None]
            saturated += _saturate_pair(xa, xb, wa_all[:, j], wb_all[:, j],
                                        np.flatnonzero(risky_all[:, j]), grp * og, block,
                                        None if count_only else correction)
    return correction, saturated


def _padded_codes(x_codes: np.ndarray, padding: tuple[int, ...], pad_value: int) -> np.ndarray:
    """The raw codes padded with ``pad_value``: uint8 when codes and pad fit a byte (a quarter
    of the memory of int32), else int32."""
    lo_code, hi_code = min(int(x_codes.min()), pad_value), max(int(x_codes.max()), pad_value)
    small = np.uint8 if 0 <= lo_code and hi_code <= 255 else np.int32
    return pad_spatial(x_codes.astype(small), padding, pad_value)


def _risky_pairs(wa: np.ndarray, wb: np.ndarray, channel_a: np.ndarray, channel_b: np.ndarray,
                 code_range: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(outputs, pairs) bool: whether the pair sum can leave int16, from each product's
    reachable range over its input channel's codes (``code_range``: per-channel min, max)."""
    channel_min, channel_max = code_range
    lo, hi = _product_range(wa, channel_min[channel_a], channel_max[channel_a])
    lo_b, hi_b = _product_range(wb, channel_min[channel_b], channel_max[channel_b])
    lo += lo_b
    hi += hi_b
    del lo_b, hi_b
    return (hi > INT16_MAX) | (lo < INT16_MIN)


def _saturate_pair(xa: np.ndarray, xb: np.ndarray, wa: np.ndarray, wb: np.ndarray,
                   rows: np.ndarray, o_start: int, block: int, correction: np.ndarray | None
                   ) -> int:
    """One pair's int16 saturation for the output channels ``o_start + rows`` (``block`` at a
    time): adds sat16(P) - P into ``correction`` (unless None) and counts the saturated sums.
    ``xa``, ``xb``: (N, 1, *out) input codes; ``wa``, ``wb``: the group's weight codes."""
    shape_w = (1, -1) + (1,) * (xa.ndim - 2)
    saturated = 0
    for start in range(0, rows.size, block):
        part = rows[start:start + block]
        p = xa * wa[part].astype(np.int32).reshape(shape_w)
        p += xb * wb[part].astype(np.int32).reshape(shape_w)
        diff = np.clip(p, INT16_MIN, INT16_MAX)
        diff -= p
        saturated += int(np.count_nonzero(diff))
        if correction is not None:
            correction[:, o_start + part] += diff
    return saturated


def row_sum_saturation(
    x_codes: np.ndarray, w_zp: np.ndarray, g: Geometry, kernel_size: tuple[int, ...],
    pad_value: int,
) -> tuple[np.ndarray | None, int]:
    """What fbgemm's depthwise kernel adds to the accumulator by summing each window's raw input
    codes in saturating int16 (one input channel per group), and how many sums saturated.

    The kernel subtracts ``w_zp * min(S, 32767)`` where the exact correction is ``w_zp * S``,
    ``S`` the sum of the window's codes (padding holds ``pad_value``), so it adds
    ``w_zp * max(S - 32767, 0)``: e.g. a 7x5x5 window of codes 255 sums to 44,625, and weight
    zero point 3 adds 3 * 11,858 = 35,574 accumulator steps. None when nothing saturates.
    """
    taps = int(np.prod(kernel_size))
    w_zp = np.asarray(w_zp, dtype=np.int64).reshape(-1)
    if x_codes.size == 0 or not np.any(w_zp) or taps * max(
            int(x_codes.max()), pad_value) <= INT16_MAX:
        return None, 0
    import torch

    channels = x_codes.shape[1]
    xpad = pad_spatial(np.asarray(x_codes, dtype=np.float32), g.padding, pad_value)
    conv = conv_function(len(kernel_size))
    ones = torch.ones((channels, 1, *kernel_size), dtype=torch.float32)
    with torch.no_grad():  # sums below 2^24: exact in float32
        sums = conv(torch.from_numpy(xpad), ones, None, g.stride, 0, g.dilation,
                    channels).numpy().astype(np.int64)
    excess = np.maximum(sums - INT16_MAX, 0)
    out_g = w_zp.size // channels
    excess = np.repeat(excess, out_g, axis=1)  # output channel o reads input channel o // out_g
    return excess * w_zp.reshape((1, -1) + (1,) * len(kernel_size)), int(
        np.count_nonzero(excess[:, ::out_g]))


def _product_range(w: np.ndarray, x_min: np.ndarray, x_max: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of w * x for x in [x_min, x_max] (per pair column), element by element."""
    lo = w * x_min
    hi = w * x_max
    swap = lo > hi
    lo[swap], hi[swap] = hi[swap], lo[swap]
    return lo, hi


#: Pair sums formed at once (output channels x positions): bounds the int32 temporaries.
PAIR_BLOCK_ELEMENTS = 1 << 18
