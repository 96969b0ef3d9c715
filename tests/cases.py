"""Seeded random quantized-conv setups for the bit-exactness tests (an independent generator:
it draws integer codes and qparams directly, it does not use qconvdiag.casefile.generate)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qconvdiag.case import Geometry
from qconvdiag.quantization.qparams import QParams, per_tensor


@dataclass
class CodesCase:
    x: np.ndarray
    x_qp: QParams
    w: np.ndarray
    w_qp: QParams
    bias: np.ndarray | None
    out_qp: QParams
    geometry: Geometry
    label: str


def _fast_path_layer(rng: np.random.Generator
                     ) -> tuple[int, int, int, tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(groups, cin_g, out_g, kernel, stride, padding) of a layer shaped for fbgemm's
    groupwise kernel (3x3 or 3x3x3, padding 1, 2/4/8/16 channels per group in and out) or its
    depthwise kernel (kernel sides 3/5/7, padding (k - 1) / 2, strides 1 or 2). Groups 1, 2, 4
    or 8 are multiples of the groups the groupwise kernel takes at once whenever it takes the
    layer, on AVX2 and AVX512 CPUs (other counts make torch overrun its buffers)."""
    dims = int(rng.choice([2, 2, 3]))
    if rng.random() < 0.6:
        cin_g = int(rng.choice([2, 4, 8, 16]))
        groups = int(rng.choice([1, 2, 4, 8] if cin_g < 16 else [1, 2]))
        hw = int(rng.integers(1, 3))
        stride = (int(rng.integers(1, 4)),) * (dims - 2) + (hw, hw)
        return groups, cin_g, cin_g, (3,) * dims, stride, (1,) * dims
    first = int(rng.choice([3, 5, 7]))
    side = int(rng.choice([3, 5]))
    k = ((first,) if dims == 3 else ()) + (side, side)
    stride = tuple(int(rng.integers(1, 3)) for _ in range(dims))
    return (int(rng.choice([8, 16])), 1, int(rng.choice([1, 2])), k, stride,
            tuple((s - 1) // 2 for s in k))


def random_codes_case(rng: np.random.Generator, i: int = 0) -> CodesCase:
    fast = rng.random() < 0.15  # fbgemm's specialised kernels (random shapes rarely are)
    if fast:
        groups, cin_g, og, k, stride, pad = _fast_path_layer(rng)
        dims = len(k)
        dil = (1,) * dims
    else:
        dims = int(rng.choice([1, 2, 2, 3]))
        depthwise = rng.random() < 0.2
        if depthwise:
            groups, cin_g = int(rng.choice([2, 3, 4, 8, 16])), 1
        else:
            groups = int(rng.choice([1, 1, 2, 3]))
            cin_g = int(rng.choice([1, 2, 3, 4, 5, 8, 12, 16]))
        og = int(rng.choice([1, 2, 3, 4, 8]))
        k = tuple(int(rng.integers(1, 4)) for _ in range(dims))
        stride = tuple(int(rng.integers(1, 3)) for _ in range(dims))
        dil = tuple(int(rng.integers(1, 3)) for _ in range(dims))
        pad = tuple(int(rng.integers(0, 2)) for _ in range(dims))
    c = groups * cin_g
    o = groups * og
    lo, hi = (4, 7) if dims == 3 else (5, 10)
    sp = tuple(int(rng.integers(max(lo, d * (kk - 1) + 1), max(hi, d * (kk - 1) + 2)))
               for kk, d in zip(k, dil))
    n = int(rng.integers(1, 3))
    geometry = Geometry(stride, pad, dil, groups)
    xmax = 255 if rng.random() < 0.7 else 127
    x = rng.integers(0, xmax + 1, (n, c, *sp))
    if rng.random() < 0.4:  # push codes to the top so int16 pairs saturate
        x = np.where(rng.random(x.shape) < 0.6, xmax, x)
    w = rng.integers(-128, 128, (o, cin_g, *k))
    if rng.random() < 0.4:
        w = np.where(rng.random(w.shape) < 0.5, int(rng.choice([127, -128])), w)
    x_qp = per_tensor(float(rng.uniform(0.001, 0.1)), int(rng.integers(0, 256)), "quint8", "t")
    per_channel = rng.random() < 0.4
    if per_channel:
        zps = (0,) * o if rng.random() < 0.7 else tuple(int(z) for z in rng.integers(-5, 6, o))
        w_qp = QParams(tuple(float(s) for s in rng.uniform(0.001, 0.05, o)), zps, "qint8", 0, "t")
    else:
        zp = 0 if rng.random() < 0.6 else int(rng.integers(-20, 21))
        w_qp = per_tensor(float(rng.uniform(0.001, 0.05)), zp, "qint8", "t")
    bias = None
    if rng.random() < 0.7:
        bias = (rng.standard_normal(o) * rng.uniform(0.01, 50)).astype(np.float32)
    fan = cin_g * int(np.prod(k))
    saturate = rng.random() < 0.25
    spread = float(rng.uniform(0.05, 0.5) if saturate else rng.uniform(0.5, 20))
    out_scale = spread * x_qp.scale[0] * float(np.mean(w_qp.scale)) * np.sqrt(fan) * 50
    out_qp = per_tensor(out_scale, int(rng.integers(0, 256)), "quint8", "t")
    if rng.random() < (0.25 if fast else 0.05):  # zero points outside the dtypes' ranges
        x_qp = per_tensor(x_qp.scale[0], int(rng.integers(-20, 300)), "quint8", "t")
        out_qp = per_tensor(out_scale, int(rng.integers(-20, 300)), "quint8", "t")
        if not w_qp.per_channel and w_qp.zero_point[0] != 0:
            w_qp = per_tensor(w_qp.scale[0], int(rng.integers(-200, 200)), "qint8", "t")
    label = (f"#{i} conv{dims}d g={groups} cin_g={cin_g} k={k} s={stride} p={pad} "
             f"{'pc' if per_channel else 'pt'} wzp={'sym' if not any(w_qp.zero_point) else 'asym'}")
    return CodesCase(x, x_qp, w, w_qp, bias, out_qp, geometry, label)
