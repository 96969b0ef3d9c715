"""Layers that take fbgemm's specialised conv kernels, checked against torch, bit for bit.

fbgemm picks a kernel per layer (FBGEMM src/FbgemmConv.cc, ``ConvFastPath``): its depthwise
kernel, its groupwise kernel (``fbgemmOptimizedGConv``: 3x3 or 3x3x3, padding 1, as many
output as input channels per group, 2, 4, 8 or 16 of them, including groups=1), or a GEMM.
Random layers almost never land on the specialised ones, so these do on purpose: the three
mismatches reported in issue 17 (item 15) with the ISA forced to AVX2, and the depthwise shapes
outside the old rule (mixed strides, 3D kernels whose first side differs), one of them with
window code sums past int16.
Prints one JSON line: per case and engine, mismatched outputs of how many, and on the fbgemm
kernels how many an exact accumulation and int16 pairs along K would give instead (and exact
window code sums, on the depthwise kernel).

    python -m tests.fbgemm_paths
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import numpy as np

from qconvdiag.arithmetic.accumulate import EXACT, PAIRS_K
from qconvdiag.arithmetic.emulate import emulate
from qconvdiag.arithmetic.engines import fbgemm_conv_path, probe, select_kernel
from qconvdiag.arithmetic.torch_ref import run_conv
from qconvdiag.case import Geometry
from qconvdiag.quantization.qparams import QParams, per_tensor


@dataclass(frozen=True)
class PathCase:
    name: str
    groups: int
    cin_g: int
    out_g: int
    kernel: tuple[int, ...]
    spatial: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    input_zero_point: int
    weight_zero_point: int
    per_channel: bool
    weight_scale: float
    fbgemm_path: str
    """The kernel fbgemm runs (``fbgemm_conv_path``)."""


CASES = (
    # issue 17, item 15: 200 outputs, weight zero point -128, dense 8 -> 8, 3x3, padding 1
    PathCase("dense_weight_zp_-128", 1, 8, 8, (3, 3), (5, 5), (1, 1), (1, 1), 100, -128,
             False, 0.01, "groupwise"),
    # 720 outputs, per-channel weight zero points 3, tiny scales
    PathCase("per_channel_weight_zp_3", 1, 8, 8, (3, 3), (9, 10), (1, 1), (1, 1), 10, 3,
             True, 1e-4, "groupwise"),
    # 1440 outputs, input zero point -3 (padding holds its byte, 253), 4 groups of 4 channels
    PathCase("input_zp_-3_groups_4", 4, 4, 4, (3, 3), (9, 10), (1, 1), (1, 1), -3, 0,
             False, 0.01, "groupwise"),
    PathCase("groups_16_3d_stride_2", 2, 16, 16, (3, 3, 3), (4, 6, 6), (3, 2, 2), (1, 1, 1),
             30, 5, False, 0.005, "groupwise"),
    # depthwise shapes fbgemm's rule accepts: strides 1 or 2 each, kernel (t, k, k)
    PathCase("depthwise_stride_1_2", 8, 1, 1, (3, 3), (7, 7), (1, 2), (1, 1), 10, 0,
             False, 0.01, "depthwise"),
    PathCase("depthwise_3d_5x3x3", 8, 1, 2, (5, 3, 3), (5, 5, 5), (2, 1, 1), (2, 1, 1), 10, 0,
             False, 0.01, "depthwise"),
    # 175 taps: the window's code sum (padding holds the input zero point) passes 32767 (the
    # kernel keeps it in int16), which the weight zero point multiplies
    PathCase("depthwise_3d_7x5x5_weight_zp_3", 8, 1, 1, (7, 5, 5), (7, 5, 5), (1, 2, 2),
             (3, 2, 2), 200, 3, False, 0.01, "depthwise"),
    # not specialised: padding 0 (GEMM on im2col), channels per group 3
    PathCase("dense_padding_0", 1, 8, 8, (3, 3), (7, 7), (1, 1), (0, 0), 100, -128,
             False, 0.01, "gemm"),
    PathCase("grouped_3_channels", 4, 3, 3, (3, 3), (6, 6), (1, 1), (1, 1), -3, 0,
             False, 0.01, "gemm"),
)


def _codes(case: PathCase, seed: int
           ) -> tuple[np.ndarray, QParams, np.ndarray, QParams, np.ndarray, QParams, Geometry]:
    rng = np.random.default_rng(seed)
    o = case.groups * case.out_g
    x = rng.integers(0, 256, (1, case.groups * case.cin_g, *case.spatial))
    x = np.where(rng.random(x.shape) < 0.5, 255, x)  # many pair sums leave int16
    w = rng.integers(-128, 128, (o, case.cin_g, *case.kernel))
    w = np.where(rng.random(w.shape) < 0.4, 127, w)
    xq = per_tensor(0.02, case.input_zero_point, "quint8", "t")
    if case.per_channel:
        scales = tuple(float(s) for s in rng.uniform(0.5, 2.0, o) * case.weight_scale)
        wq = QParams(scales, (case.weight_zero_point,) * o, "qint8", 0, "t")
    else:
        wq = per_tensor(case.weight_scale, case.weight_zero_point, "qint8", "t")
    g = Geometry(case.stride, case.padding, (1,) * len(case.kernel), case.groups)
    # output qparams spanning the exact result's range, so that what saturated pairs lose
    # (up to 32,000 accumulator steps) moves output codes
    real = _float_conv(x, xq, w, wq, g)
    bias = (rng.standard_normal(o) * float(real.std()) * 0.1).astype(np.float32)
    real += bias.reshape((1, -1) + (1,) * len(case.kernel))
    lo, hi = min(float(real.min()), 0.0), max(float(real.max()), 0.0)
    out_scale = (hi - lo) / 255
    oq = per_tensor(out_scale, int(np.clip(round(-lo / out_scale), 0, 255)), "quint8", "t")
    return x, xq, w, wq, bias, oq, g


def _float_conv(x: np.ndarray, xq: QParams, w: np.ndarray, wq: QParams, g: Geometry
                ) -> np.ndarray:
    """The dequantized conv in float64 (torch's, independent of the emulator)."""
    import torch
    import torch.nn.functional as F

    per_out = (w.shape[0],) + (1,) * (w.ndim - 1)
    w_zp = np.broadcast_to(np.asarray(wq.zero_point), w.shape[:1]).reshape(per_out)
    w_real = (w - w_zp) * np.broadcast_to(np.asarray(wq.scale), w.shape[:1]).reshape(per_out)
    x_real = (x - xq.zero_point[0]) * xq.scale[0]
    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[x.ndim]
    return conv(torch.from_numpy(x_real.astype(np.float64)),
                torch.from_numpy(w_real.astype(np.float64)), None, g.stride, g.padding,
                g.dilation, g.groups).numpy()


def check(seed: int = 0) -> dict[str, object]:
    profiles = probe()
    engines = [e for e, p in profiles.items() if p.available]
    result: dict[str, object] = {}
    for case in CASES:
        x, xq, w, wq, bias, oq, g = _codes(case, seed)
        per_engine: dict[str, dict[str, object]] = {
            "path": {"fbgemm": fbgemm_conv_path(case.groups, case.cin_g, case.out_g, g,
                                                case.kernel)}}
        for e in engines:
            r = run_conv(e, x, xq, w, wq, bias, oq.scale[0], oq.zero_point[0], g)
            if not r.ran or r.output_codes is None:
                continue
            kernel = select_kernel(e, wq, case.groups, case.cin_g, case.out_g, g, case.kernel)
            em = emulate(kernel, x, xq, w, wq, bias, oq, g)
            stats: dict[str, object] = {
                "kernel": f"{kernel.kernel}/{kernel.accumulation}",
                "mismatched": int(np.count_nonzero(em.output_codes != r.output_codes)),
                "outputs": int(r.output_codes.size),
            }
            if kernel.kernel == "fbgemm":  # what the other accumulations would give
                alternatives = {acc: replace(kernel, accumulation=acc) for acc in (EXACT, PAIRS_K)}
                if kernel.row_sums_int16:
                    alternatives["exact_row_sums"] = replace(kernel, row_sums_int16=False)
                for name, alt_kernel in alternatives.items():
                    alt = emulate(alt_kernel, x, xq, w, wq, bias, oq, g)
                    stats[f"mismatched_if_{name}"] = int(
                        np.count_nonzero(alt.output_codes != r.output_codes))
                stats["saturated_row_sums"] = em.saturated_row_sums
            per_engine[e] = stats
        result[case.name] = per_engine
    return result


if __name__ == "__main__":
    print(json.dumps(check()))
