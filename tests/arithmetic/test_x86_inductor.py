"""The x86_inductor engine (the oneDNN kernels inductor lowers a PT2E-quantized conv to) against
torch.ops.onednn.qconv_pointwise, bit for bit: uint8 and float32 outputs, fused ReLU, near ties,
with and without VNNI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from qconvdiag.arithmetic.accumulate import EXACT, PAIRS_CHANNELS
from qconvdiag.arithmetic.emulate import emulate
from qconvdiag.arithmetic.engines import (
    ENGINES,
    LayerAttrs,
    onednn_arithmetic,
    probe,
    probe_pt2e,
    select_kernel,
)
from qconvdiag.arithmetic.torch_ref import run_conv, run_inductor_conv
from qconvdiag.case import Geometry
from qconvdiag.quantization.qparams import QParams, per_tensor
from tests.conftest import CODES_MAX_MISMATCH
from tests.cpu import accumulation
from tests.pt2e_check import check
from tests.repo import ROOT

#: In CI; benchmarks of 500 cases per ISA (python -m tests.pt2e_check 500 SEED) gave 0 too.
CASES = 100
FORCED = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")


def _assert_exact(result: dict) -> None:
    stats = result["engine"]
    assert stats["ran"] == CASES and stats["refused"] == 0, stats["failures"][:5]
    assert stats["mismatched_cases"] <= CODES_MAX_MISMATCH, stats["failures"][:5]
    assert stats["float_cases"] > 10 and stats["relu_cases"] > 10


def _forced(module: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=FORCED,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bit_exact_on_this_cpu():
    _assert_exact(check(CASES, seed=0))


def test_bit_exact_without_vnni():
    """ISA forced down to AVX2: oneDNN pairs channels in saturating int16 (dense convs)."""
    result = _forced("tests.pt2e_check", str(CASES), "1")
    assert result["profile"]["accumulation"]["dense"] == PAIRS_CHANNELS
    _assert_exact(result)


def test_near_ties_without_vnni():
    """Outputs within a float32 ulp of a .5 tie (tests/near_ties.py), every layout, ISA forced
    to AVX2: oneDNN's reference convolution (grouped 1x1 convs there) divides by the output
    scale, its other kernels multiply by the reciprocal (onednn_arithmetic tells them apart)."""
    result = _forced("tests.near_ties", "--engines", "x86_inductor", "0")
    mismatched, total = result["x86_inductor"]
    assert total == 4 * 4 * 512 + 4 * 512 and mismatched <= CODES_MAX_MISMATCH


def test_not_a_torch_backends_engine():
    """x86_inductor is probed on its own: the report's cpu field (probe()) is unchanged."""
    assert "x86_inductor" not in ENGINES and "x86_inductor" not in probe()
    assert probe_pt2e()["x86_inductor"].available


def test_run_conv_routes_to_the_onednn_ops():
    x = np.full((1, 2, 3, 3), 7)
    w = np.ones((2, 2, 3, 3), dtype=np.int64)
    g = Geometry((1, 1), (0, 0), (1, 1), 1)
    xq, wq = per_tensor(0.5, 3, "quint8", "t"), QParams((0.25, 0.5), (0, 0), "qint8", 0, "t")
    r = run_conv("x86_inductor", x, xq, w, wq, None, 1.0, 10, g)
    # 18 taps * (7 - 3) * 1 = 72 steps; * 0.5 * (0.25 | 0.5) = 9, 18; + 10
    assert r.ran and r.output_codes.reshape(-1).tolist() == [19, 28]


def test_fused_relu_and_float_output():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (1, 4, 6, 6))
    w = rng.integers(-128, 128, (6, 4, 3, 3))
    b = rng.standard_normal(6).astype(np.float32)
    g = Geometry((1, 1), (1, 1), (1, 1), 1)
    xq = per_tensor(0.02, 90, "quint8", "t")
    wq = QParams(tuple(float(s) for s in rng.uniform(0.001, 0.01, 6).astype(np.float32)),
                 (0,) * 6, "qint8", 0, "t")
    out = per_tensor(0.05, 40, "quint8", "t")
    relu = run_inductor_conv(x, xq, w, wq, b, 0.05, 40, g, relu=True)
    plain = run_inductor_conv(x, xq, w, wq, b, 0.05, 40, g)
    assert relu.output_codes.min() == 40 and plain.output_codes.min() < 40  # clamp at the zp
    # the kernels as the diagnosis picks them for this layer (diagnosis.layer_kernel): the
    # probe's accumulation (exact with VNNI; without, adjacent channels' products summed in
    # saturating int16 pairs, which these 8-bit inputs saturate) and the implementation oneDNN
    # runs for this shape, with a uint8 or a float32 output
    kernel, float_kernel = (
        select_kernel("x86_inductor", wq, 1, 4, 6, g, (3, 3), x.shape,
                      LayerAttrs(True, not float_output, float_output, relu=True))
        for float_output in (False, True))
    for k in (kernel, float_kernel):
        assert k.direct_scales and k.accumulation == accumulation("x86_inductor")
    assert np.array_equal(emulate(kernel, x, xq, w, wq, b, out, g, True).output_codes,
                          relu.output_codes)
    f = run_inductor_conv(x, xq, w, wq, b, 1.0, 0, g, relu=True, float_output=True)
    assert f.output_float.dtype == np.float32 and f.output_float.min() == 0
    em = emulate(float_kernel, x, xq, w, wq, b, out, g, True, float_output=True)
    assert np.array_equal(em.output_float32, f.output_float)


def test_gemm_convolution_multiplies_by_the_scale_product():
    """On VNNI CPUs oneDNN runs 3D depthwise convs with a dilation on its GEMM-based convolution
    (ONEDNN_VERBOSE: x64:gemm_s8u8s32:jit), which multiplies by the source x weight scale
    product; a 2D depthwise conv runs on brdgmm_dw, which multiplies by each in turn."""
    import torch

    if not torch.cpu._is_vnni_supported():
        return
    attrs = LayerAttrs(True, False, float_output=True)
    dilated = Geometry((1, 1, 1), (1, 1, 0), (1, 1, 2), 2)
    assert onednn_arithmetic("x86_inductor", (1, 2, 5, 5, 5), (2, 1, 3, 2, 1), dilated,
                             EXACT, attrs) == (True, False)
    depthwise = Geometry((1, 1), (1, 1), (1, 1), 16)
    assert onednn_arithmetic("x86_inductor", (1, 16, 8, 8), (16, 1, 3, 3), depthwise,
                             EXACT, attrs) == (False, False)
