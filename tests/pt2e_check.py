"""The ``x86_inductor`` engine (torch.ops.onednn.qconv_prepack + qconv_pointwise, what inductor
lowers a PT2E-quantized conv to) against its emulation on N random PT2E-shaped convs; prints one
JSON summary.

Each case is drawn by tests/cases.py's independent generator (geometries of every kind, fbgemm's
fast-path shapes included), then given PT2E's setup: uint8 activations with a zero point in
0..255, int8 weights per channel on axis 0 (per tensor in one case in five) with zero point 0
and float32 scales, a float32 bias, and one of uint8 output (half of them with a fused ReLU, conv1d
and conv2d: the kernel fuses ReLU only there) or float32 output (also with or without ReLU).
Used in-process by tests/arithmetic/test_x86_inductor.py and in a subprocess with the ISA forced
down.

    python -m tests.pt2e_check N SEED
"""

from __future__ import annotations

import json
import sys

import numpy as np

from qconvdiag.arithmetic.emulate import emulate
from qconvdiag.arithmetic.engines import LayerAttrs, probe_pt2e, select_kernel
from qconvdiag.arithmetic.torch_ref import run_inductor_conv
from qconvdiag.quantization.qparams import QParams, per_tensor
from tests.cases import CodesCase, random_codes_case

ENGINE = "x86_inductor"


def pt2e_case(rng: np.random.Generator, i: int) -> tuple[CodesCase, bool, bool]:
    """(case, relu, float_output): a random geometry with PT2E's qparams."""
    c = random_codes_case(rng, i)
    o = c.w.shape[0]
    per_channel = rng.random() < 0.8
    scales = rng.uniform(0.001, 0.05, o if per_channel else 1).astype(np.float32)
    w_qp = QParams(tuple(float(s) for s in scales), (0,) * scales.size, "qint8",
                   0 if per_channel else None, "t")
    x_qp = per_tensor(float(np.float32(c.x_qp.scale[0])), int(rng.integers(0, 256)), "quint8",
                      "t")
    out_qp = per_tensor(float(np.float32(c.out_qp.scale[0])), int(rng.integers(0, 256)),
                        "quint8", "t")
    relu = bool(rng.random() < 0.5) and c.w.ndim <= 4
    float_output = bool(rng.random() < 0.3)
    case = CodesCase(c.x, x_qp, c.w, w_qp, c.bias, out_qp, c.geometry,
                     c.label.replace(" pt ", " ").replace(" pc ", " ")
                     + f" {'pc' if per_channel else 'pt'}{' relu' if relu else ''}"
                     + f" {'fp32' if float_output else 'u8'}")
    return case, relu, float_output


def check(n: int, seed: int) -> dict[str, object]:
    rng = np.random.default_rng(seed)
    stats: dict[str, object] = {"ran": 0, "refused": 0, "mismatched_cases": 0,
                                "outputs": 0, "mismatched_outputs": 0, "float_cases": 0,
                                "relu_cases": 0, "failures": []}
    failures: list[str] = stats["failures"]  # type: ignore[assignment]
    for i in range(n):
        c, relu, float_output = pt2e_case(rng, i)
        g = c.geometry
        o, cin_g = c.w.shape[0], c.w.shape[1]
        attrs = LayerAttrs(c.x_qp.zero_point[0] != 0,
                           not float_output and c.out_qp.zero_point[0] != 0,
                           float_output, relu, c.w_qp.per_channel)
        kernel = select_kernel(ENGINE, c.w_qp, g.groups, cin_g, o // g.groups, g,
                               tuple(c.w.shape[2:]), c.x.shape, attrs)
        r = run_inductor_conv(c.x, c.x_qp, c.w, c.w_qp, c.bias, c.out_qp.scale[0],
                              c.out_qp.zero_point[0], g, relu, float_output)
        if not r.ran:
            stats["refused"] += 1  # type: ignore[operator]
            failures.append(f"{c.label}: refused: {r.error}")
            continue
        stats["ran"] += 1  # type: ignore[operator]
        stats["float_cases"] += int(float_output)  # type: ignore[operator]
        stats["relu_cases"] += int(relu)  # type: ignore[operator]
        em = emulate(kernel, c.x, c.x_qp, c.w, c.w_qp, c.bias, c.out_qp, g, relu, float_output)
        mine, theirs = ((em.output_float32, r.output_float) if float_output
                        else (em.output_codes, r.output_codes))
        assert mine is not None and theirs is not None
        bad = int(np.count_nonzero(mine != theirs))
        stats["outputs"] += int(theirs.size)  # type: ignore[operator]
        stats["mismatched_outputs"] += bad  # type: ignore[operator]
        if bad:
            stats["mismatched_cases"] += 1  # type: ignore[operator]
            failures.append(f"{c.label} [{kernel.accumulation} combined={kernel.combined_scales}"
                            f" divides={kernel.divides_dst_scale}]: {bad} of {theirs.size} "
                            "outputs differ")
    return {"profile": probe_pt2e()[ENGINE].to_dict(), "engine": stats}


if __name__ == "__main__":
    print(json.dumps(check(int(sys.argv[1]), int(sys.argv[2]))))
