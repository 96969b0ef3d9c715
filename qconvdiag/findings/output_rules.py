"""QCD050-QCD053: output requantization."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..report import Finding
from .base import Context, fmt, severity_for, share
from .snippets import production_snippet, set_output_snippet


def _final_output_qparams(run):  # type: ignore[no-untyped-def]
    return run.spec.module.output_qparams if run.spec.module else run.spec.output_qparams


def qcd050(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None:
        return
    qp = _final_output_qparams(run)
    s = ctx.case.setup
    user_set = s is not None and s.output_qparams is not None
    if user_set or qp.scale[0] != 1.0 or qp.zero_point[0] != 0:
        return
    prod = ctx.production
    y0 = run.ladder.float_output if run.ladder is not None else None
    impact = share(run, "output_rounding", "output_clipping")
    if y0 is None:
        rng = ""
    else:
        lo, hi = float(y0.min()), float(y0.max())
        span = f"is {fmt(lo)}" if lo == hi else f"spans {fmt(lo)}..{fmt(hi)}"
        rng = (f" The float output {span}; with scale 1.0 and zero point 0 only 0..255 in "
               "steps of 1.0 can be represented.")
    yield Finding(
        code="QCD050",
        severity="error" if impact >= 0.05 else "warning",
        title="output scale/zero_point left at the module defaults (1.0, 0)",
        message=(
            "The quantized conv's output scale and zero point were never set, so they are the "
            "module's defaults 1.0 and 0." + rng +
            " An output observer (calibration) or from_float sets them."
        ),
        evidence={"scale": qp.scale[0], "zero_point": qp.zero_point[0], "share": impact,
                  "production_output_scale": None if prod is None else
                  prod.report.qparams["output"].scale[0]},
        fix=set_output_snippet(ctx.case, prod) + "\n\n# the production route:\n"
        + production_snippet(ctx.case, ctx.engines[0], prod),
        path="as_given", impact=max(impact, 0.05),
    )


def _saturated(unclamped: np.ndarray, lo: int, hi: int) -> int:
    """How many values lie outside [lo, hi] (two reductions when none do)."""
    if not unclamped.size or (int(unclamped.min()) >= lo and int(unclamped.max()) <= hi):
        return 0
    return int(np.count_nonzero(unclamped > hi) + np.count_nonzero(unclamped < lo))


def qcd051(ctx: Context) -> Iterator[Finding]:
    for run in (ctx.as_given, ctx.production):
        if run is None or run.emulation is None:
            continue
        em = run.module_emulation or run.emulation
        qp = _final_output_qparams(run)
        n = _saturated(em.unclamped, qp.dtype_min, qp.dtype_max)
        intended, out_qp = run.emulation, run.spec.output_qparams
        n_int = n if intended is em and out_qp.dtype == qp.dtype else _saturated(
            intended.unclamped, out_qp.dtype_min, out_qp.dtype_max)
        if n == 0 and n_int == 0:
            continue
        impact = share(run, "output_clipping")
        y0 = run.ladder.float_output if run.ladder is not None else None
        s, zp = float(run.spec.output_qparams.scale[0]), int(run.spec.output_qparams.zero_point[0])
        top = (run.spec.output_qparams.dtype_max - zp) * s
        bottom = (run.spec.output_qparams.dtype_min - zp) * s
        count = n_int if n_int else n
        msg = (f"{count} of {em.output_codes.size} outputs fall outside the representable range "
               f"[{fmt(bottom)}, {fmt(top)}] and saturate at the quint8 limits")
        if y0 is not None:
            msg += f" (the float output reaches {fmt(float(y0.max()))})"
        yield Finding(
            code="QCD051",
            severity=severity_for(impact) if impact > 0.001 else "info",
            title="outputs saturated at the output dtype's limits",
            message=msg + ".",
            evidence={"saturated": count, "total": int(em.output_codes.size), "low": bottom,
                      "high": top, "share": impact, "path": run.report.name},
            fix=set_output_snippet(ctx.case, ctx.production),
            path=run.report.name, impact=impact,
        )


def qcd052(ctx: Context) -> Iterator[Finding]:
    # Judged on the user's setup only: production's 7-bit (reduce_range) output scale is
    # coarser by design, and that trade-off is the engine default, not a mistake.
    for run in (ctx.as_given,):
        if run is None or run.ladder is None:
            continue
        impact = share(run, "output_rounding")
        y0 = run.ladder.float_output
        out_s = float(run.spec.output_qparams.scale[0])
        lo, hi = min(float(y0.min()), 0.0), max(float(y0.max()), 0.0)
        ideal = (hi - lo) / 255
        if impact < 0.5 or ideal <= 0 or out_s <= 2 * ideal or \
                run.report.total.max_abs < 0.25 * out_s:
            continue
        levels = (hi - lo) / out_s
        yield Finding(
            code="QCD052",
            severity="warning",
            title="output rounding dominates: the output scale is coarse",
            message=(
                f"Output rounding explains {impact:.0%} of the {run.report.name} path's error: "
                f"the output scale {fmt(out_s)} is {fmt(out_s / ideal)}x what the float "
                f"output's range [{fmt(lo)}, {fmt(hi)}] needs ({fmt(ideal)}), so it uses only "
                f"{fmt(levels)} of quint8's 255 steps."
            ),
            evidence={"share": impact, "levels": levels, "output_scale": out_s,
                      "needed_scale": ideal},
            fix=set_output_snippet(ctx.case, ctx.production),
            path=run.report.name, impact=impact,
        )


def qcd053(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None:
        return
    qp = _final_output_qparams(run)
    zp = qp.zero_point[0]
    if qp.dtype_min <= zp <= qp.dtype_max:
        return
    yield Finding(
        code="QCD053",
        severity="error",
        title="output zero point outside the output dtype's range",
        message=(
            f"The output zero point {zp} is outside quint8's 0..255. torch accepts it silently; "
            "the real value 0.0 has no code, and every output is shifted out of range."
        ),
        evidence={"zero_point": zp, "range": [qp.dtype_min, qp.dtype_max]},
        fix=set_output_snippet(ctx.case, ctx.production),
        path="as_given", impact=share(run, "output_clipping", "output_rounding"),
    )


__all__ = ["qcd050", "qcd051", "qcd052", "qcd053", "np"]
