"""QCD060, QCD061, QCD070: the API, the backend, and the rounding floor."""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..report import Finding
from .base import Context, fmt

ALTERNATIVE = (
    "torch 2.13 deprecates the quantized dtypes (quint8, qint8, qint32) and the eager "
    "torch.ao.nn.quantized modules built on them. Today's route is torchao's PT2E flow:\n"
    "from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, convert_pt2e\n"
    "# export, prepare_pt2e(model, quantizer), calibrate, convert_pt2e: int8 tensors with\n"
    "# explicit scale/zero_point instead of quantized dtypes"
)


def qcd060(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    if s is None or not (s.used_quantized_dtypes or s.apis):
        return
    apis = ", ".join(s.apis) if s.apis else "quantized tensors (quint8/qint8)"
    deprecations = [w for w in ctx.torch_warnings if "deprecated" in w.lower()]
    yield Finding(
        code="QCD060",
        severity="info",
        title="deprecated quantization API in use",
        message=(
            f"This case was built with {apis}, deprecated since torch 2.13 (torch warns on "
            "every quantized tensor it creates). The eager kernels still run and are what this "
            "report explains; new code should use the current alternative."
        ),
        evidence={"apis": list(s.apis), "torch_warnings": deprecations[:3]},
        fix=ALTERNATIVE, path="as_given", impact=0.0,
    )


def qcd061(ctx: Context) -> Iterator[Finding]:
    for run in ctx.runs:
        check = run.report.torch_check
        if not check.ran or not check.mismatched_elements:
            continue
        depthwise = ctx.case.weight.shape[1] == 1 and ctx.case.geometry.groups > 1
        known = run.report.kernel == "onednn" and depthwise
        yield Finding(
            code="QCD061",
            severity="error",
            title=f"torch's output differs from the emulation on {run.report.engine}",
            message=(
                f"{check.mismatched_elements} output elements of the {run.report.name} path differ "
                f"from the integer-exact emulation by up to {fmt(check.max_abs_lsb or 0)} steps; "
                "the stage table attributes that difference to backend_residual."
                + (" This is the known unmatched class (oneDNN depthwise convs on AVX512 CPUs "
                   "without VNNI; README 'Limits')." if known else
                   " Please report this case: qconvdiag.capture(...) writes it.")
            ),
            evidence={"mismatched_elements": check.mismatched_elements,
                      "max_abs_lsb": check.max_abs_lsb, "kernel": run.report.kernel,
                      "accumulation": run.report.accumulation, "known_limit": known},
            fix="qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path='report_me.pt')",
            path=run.report.name, engine=run.report.engine, impact=0.0,
        )


def qcd070(ctx: Context, others: list[Finding]) -> Iterator[Finding]:
    run = ctx.as_given or ctx.production
    if run is None or run.ladder is None or run.report.refused:
        return
    if any(f.severity in ("error", "warning") for f in others):
        return
    s = float((run.spec.module.output_qparams if run.spec.module
               else run.spec.output_qparams).scale[0])
    floor = s / math.sqrt(12)
    rmse = run.report.total.rmse
    if rmse > 1.5 * floor:
        return
    sqnr = run.report.total.sqnr_db
    yield Finding(
        code="QCD070",
        severity="info",
        title="the error is at the rounding floor: nothing is misconfigured",
        message=(
            f"RMSE {fmt(rmse)} is {fmt(rmse / floor)}x the floor of uniform rounding at this "
            f"output scale ({fmt(s)} / sqrt(12) = {fmt(floor)})"
            + (f"; SQNR {sqnr:.1f} dB" if sqnr is not None else "")
            + ". 8-bit quantization of this layer cannot do much better."
        ),
        evidence={"rmse": rmse, "floor": floor, "ratio": rmse / floor, "sqnr_db": sqnr},
        fix="# nothing to fix; for more precision use per-channel weights or a finer output "
            "scale from better calibration data",
        path=run.report.name, impact=0.0,
    )
