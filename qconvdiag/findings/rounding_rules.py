"""QCD012 and QCD026 (added after the design table): rounding of the input or the weight
explains most of the error, typically because the values are far below one step (for example
when an observer's scale hits torch's floor, float32 eps = 1.19e-7, and tiny weights all round
to 0)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..report import Finding
from .base import Context, fmt, severity_for, share

EPS = float(np.finfo(np.float32).eps)


def _rounding_rule(ctx: Context, tensor: str, code: str) -> Iterator[Finding]:
    stage = f"{tensor}_rounding"
    for run in (ctx.as_given, ctx.production):
        if run is None or run.ladder is None:
            continue
        impact = share(run, stage)
        out_s = float(run.spec.output_qparams.scale[0])
        if impact < 0.5 or run.report.total.rmse <= 1.5 * out_s / np.sqrt(12):
            continue
        values = ctx.case.input if tensor == "input" else ctx.case.weight
        codes = run.spec.input_codes if tensor == "input" else run.spec.weight_codes
        qp = run.spec.input_qparams if tensor == "input" else run.spec.weight_qparams
        zps = np.asarray(qp.zero_point).reshape(
            (-1,) + (1,) * (codes.ndim - 1)) if qp.per_channel else qp.zero_point[0]
        vanished = int(np.count_nonzero((codes == zps) & (values != 0)))
        scales = qp.scales()
        at_floor = bool(np.any(np.isclose(scales, EPS, rtol=1e-6)))
        message = (
            f"Rounding the {tensor} explains {impact:.0%} of the {run.report.name} path's "
            f"error: {vanished} of {values.size} nonzero {tensor} values round to the zero "
            f"point (scale {fmt(float(scales.min()))}"
            + (f"..{fmt(float(scales.max()))}" if scales.size > 1 else "")
            + f", values up to {fmt(float(np.abs(values).max()))})."
        )
        if at_floor:
            message += (" The observer clamped the scale to its floor, float32 eps = 1.19e-7: "
                        "values this small cannot be represented in 8 bits at that scale.")
        yield Finding(
            code=code,
            severity=severity_for(impact),
            title=f"{tensor} rounding dominates: {tensor} values are below one quantization step",
            message=message,
            evidence={"share": impact, "vanished": vanished, "total": int(values.size),
                      "scale_min": float(scales.min()), "scale_at_eps_floor": at_floor,
                      "path": run.report.name},
            fix=("# rescale the layer so its values are not tiny: multiply the weight by k and\n"
                 "# divide the next layer's input (or this output) by k, or keep it in float:\n"
                 "m.qconfig = None  # skip quantizing this conv"),
            path=run.report.name, impact=impact,
        )


def qcd012(ctx: Context) -> Iterator[Finding]:
    yield from _rounding_rule(ctx, "input", "QCD012")


def qcd026(ctx: Context) -> Iterator[Finding]:
    yield from _rounding_rule(ctx, "weight", "QCD026")
