"""QCD010-QCD012: the input."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..measure.budget import CALIBRATION_LIKE, calibration_times, ideal_step
from ..quantization.qparams import clip_bounds
from ..report import Finding
from .base import Context, excess, finding, fmt, material, severity
from .fixes import input_fix
from .output_rules import said_as_trim, trimmed_outliers

CLIPPING, ROUNDING = ("input_clipping",), ("input_rounding",)


def qcd010(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        energy = excess(run, *CLIPPING)
        if not material(run, energy):
            continue  # nothing clips beyond rounding, or the clipping pays for finer rounding
        qp = run.spec.input_qparams
        lo, hi = (float(v.reshape(-1)[0]) for v in clip_bounds(qp))
        # within half a step of a bound is rounding, not clipping
        half = float(qp.scale[0]) / 2 * (1 + 1e-3)
        x = ctx.case.input
        low = int(np.count_nonzero(x < lo - half))
        high = int(np.count_nonzero(x > hi + half))
        if low + high == 0:
            continue
        sides = []
        if high:
            sides.append(f"{high} above {fmt(hi)} (largest {fmt(float(x.max()))})")
        if low:
            sides.append(f"{low} below {fmt(lo)} (smallest {fmt(float(x.min()))})")
        production = run.report.name == "production"
        level = severity(run, energy)
        # a few outliers beyond a range that keeps most of the input's reach: what a histogram
        # observer's trim gives (QCD051's rule), said, not warned about; an error stays one
        # unless one or two values (TRIMMED_FEW) are all that reach past it
        trimmed = said_as_trim(level, low + high, int(x.size)) and trimmed_outliers(
            low + high, int(x.size), (lo, hi), (float(x.min()), float(x.max())), low > 0,
            high > 0)
        yield finding(
            "QCD010", "info" if trimmed else level,
            "input values clipped by the input qparams",
            f"{low + high} of {x.size} input values lie outside the representable range "
            f"[{fmt(lo)}, {fmt(hi)}] and are clipped: {' and '.join(sides)}."
            + (" The observer clips outliers on purpose to get a finer step; here that costs "
               "more than it saves." if production and not trimmed else "")
            + (f" That is {fmt(100 * (low + high) / x.size)}% of the inputs, beyond a range that "
               "keeps most of their reach: what a histogram observer (the default) gives when "
               "it trims outliers for a finer step, or data beyond what calibration saw; a "
               "MinMax observer keeps them, at a coarser step." if trimmed else ""),
            {"clipped": low + high, "below": low, "above": high, "total": int(x.size),
             "low": lo, "high": hi, "input_min": float(x.min()), "input_max": float(x.max()),
             "excess": energy},
            input_fix(ctx.case, run)[0], run, energy, CLIPPING)


def qcd011(ctx: Context) -> Iterator[Finding]:
    for engine in ctx.engines:
        run = ctx.run("as_given", engine)
        if run is None:
            continue
        qp = run.spec.input_qparams
        if qp.dtype == "quint8" and not qp.per_channel:
            continue
        what = "per-channel" if qp.per_channel else qp.dtype
        yield finding(
            "QCD011", "error", f"input {what} is not accepted by {engine}",
            f"The {engine} quantized conv takes per-tensor quint8 activations; this input is "
            f"{what}" + (f". torch says: {run.report.refused}" if run.report.refused
                         else ": torch refuses it"),
            {"dtype": qp.dtype, "scheme": qp.scheme, "engine": engine,
             "torch_error": run.report.refused},
            input_fix(ctx.case, run)[0], run,
            run.report.budget.excess if run.report.budget else 0.0)


def qcd012(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        b = run.report.budget
        energy = excess(run, *ROUNDING)
        if b is None or not material(run, energy):
            continue
        allowed = 2.0 if b.input_bits == 7 else 1.0
        ratio = b.input_step_ratio / allowed
        if ratio < 1.5:
            continue  # the step is fine: the excess is sampling noise of a small input
        x = ctx.case.input
        qp = run.spec.input_qparams
        step = float(qp.scale[0])
        below = int(np.count_nonzero((np.abs(x) < step / 2) & (x != 0)))
        times = calibration_times(ctx.case)  # the calibration batches' range, if given
        unlike = times is not None and times > CALIBRATION_LIKE
        ideal = step / b.input_step_ratio if b.input_step_ratio > 0 else ideal_step(x)
        whose = ("the input's and its calibration batches' range"
                 if times is not None and not unlike else "the input's range")
        yield finding(
            "QCD012", severity(run, energy),
            "input step too coarse for the input's range",
            f"The input scale {fmt(step)} is {fmt(b.input_step_ratio)}x the step {whose} "
            f"needs ({fmt(ideal)} = range / 255), so input rounding adds "
            f"{fmt(b.stage('input_rounding').measured)} RMSE where "
            f"{fmt(b.stage('input_rounding').floor)} would do"
            + (f"; {below} of {x.size} nonzero inputs are below half a step and round to 0"
               if below else "") + "."
            + (f" The calibration batches given with it span {fmt(times or 0.0)}x its range: "
               "calibrate on data like what the conv receives." if unlike else
               " Without calibration batches (--calib), the input is all it is judged "
               "against: an observer calibrated on a wider range gives a coarser step."
               if times is None and run.report.name == "as_given" else ""),
            {"scale": step, "ideal_step": ideal, "step_ratio": b.input_step_ratio,
             "below_half_step": below, "excess": energy},
            input_fix(ctx.case, run)[0], run, energy, ROUNDING)
