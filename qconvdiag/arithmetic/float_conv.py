"""Float convs of the ladder: the float64 reference conv, and convs of (usually small or
sparse) difference tensors, as float32 convs or float64 scatters, with the input's dequantized
values formed only where needed (``DequantizedInput``) and clipped-weight scatters that touch
few output channels kept compact (``ChannelSparse``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..case import Geometry
from ..parallel import over_chunks
from ..quantization.qparams import QParams, dequantize
from ..torch_calls import conv_function
from .accumulate import pad_spatial, tap_views

if TYPE_CHECKING:
    from ..parallel import Block


#: torch's float64 conv unfolds the whole input (im2col); above this many bytes of im2col the
#: reference is summed over chunks of input channels instead, to bound memory.
IM2COL_BYTES = 16 * 2**20


def conv64(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: Geometry) -> np.ndarray:
    """The float reference: conv in float64 (input channels chunked when im2col would be big)."""
    from ..case import output_shape

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
    from ..case import output_shape

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
        views = tap_views(pad_spatial(xc, g.padding, 0), w.shape, g, tuple(shape[2:]))
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

    conv = conv_function(w.ndim - 2)
    with torch.no_grad():
        out = conv(
            torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)),
            torch.from_numpy(np.ascontiguousarray(w, dtype=dtype)),
            None if b is None else torch.from_numpy(np.asarray(b, dtype=dtype)),
            g.stride, g.padding, g.dilation, g.groups,
        )
    return out.numpy()
