"""QCD001-QCD003 and QCD013: the qparams themselves."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..measure.budget import ideal_step
from ..quantization.qparams import QParams, clip_bounds
from ..report import Finding
from .base import Context, excess, finding, fmt, minmax_qparams, severity
from .fixes import eager_flow, given_weight_fix, input_fix, output_fix, repacked, weight_fix

STAGES = {"input": ("input_clipping", "input_rounding"),
          "weight": ("weight_clipping", "weight_rounding"),
          "output": ("output_rounding", "output_clipping")}


def _user_qparams(ctx: Context) -> list[tuple[str, QParams, np.ndarray | None]]:
    """The qparams the user's setup wrote (the quantized module's own when it holds them)."""
    s = ctx.case.setup
    if s is None:
        return []
    module = s.module
    out = []
    for name, qp, tensor in (
        ("input", s.input_qparams, ctx.case.input),
        ("weight", s.weight_qparams or (module.weight_qparams if module else None),
         ctx.case.weight),
        ("output", s.output_qparams or (module.output_qparams if module else None), None),
    ):
        if qp is not None:
            out.append((name, qp, tensor))
    return out


def qcd001(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None:
        return
    for name, qp, _ in _user_qparams(ctx):
        if qp.zero_point_given is None:
            continue
        given, used = qp.zero_point_given[0], qp.zero_point[0]
        rounded = int(np.rint(given))
        in_range = qp.dtype_min <= rounded <= qp.dtype_max
        if name == "input":
            fix = (input_fix(ctx.case, run)[0] if not in_range or qp.per_channel else
                   f"qx = torch.quantize_per_tensor(x, {qp.scale[0]!r}, {rounded}, "
                   f"torch.{qp.dtype})  # an integer zero point")
        elif name == "weight":
            integer = QParams(qp.scale, (rounded,) * len(qp.scale), qp.dtype, qp.axis, "fix")
            fix = (given_weight_fix(ctx.case, run.kernel.kernel, integer, run.spec.input_qparams,
                                    "an integer zero point")
                   if in_range else None) or weight_fix(
                ctx.case, run.kernel.kernel, qp.per_channel, run.spec.input_qparams)
        else:
            fix = (repacked(f"qm.zero_point = {rounded}  # an integer zero point",
                            run.report.engine) if in_range
                   else output_fix(run.output_reference if run.output_reference is not None
                                   else np.zeros(1), engine=run.report.engine)[0])
        yield finding(
            "QCD001", "info", f"{name} zero point is not an integer",
            f"The {name} zero point {fmt(given)} is a float; torch truncates it toward 0 to "
            f"{used}" + (f" (rounding would give {rounded})" if rounded != used else "")
            + (f", outside {qp.dtype}'s {qp.dtype_min}..{qp.dtype_max} (QCD002)"
               if not in_range else "")
            + ". Zero points are integers: the real value 0.0 must map to an exact code.",
            {"tensor": name, "zero_point_given": list(qp.zero_point_given)[:8],
             "zero_point_used": list(qp.zero_point)[:8], "rounded": rounded},
            fix, run)


def qcd002(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    for name, qp, _ in _user_qparams(ctx):
        if name not in ("input", "weight"):
            continue
        bad = [z for z in qp.zero_point if not qp.dtype_min <= z <= qp.dtype_max]
        if not bad or run is None:
            continue
        fix = (input_fix(ctx.case, run)[0] if name == "input" else
               weight_fix(ctx.case, run.kernel.kernel, qp.per_channel, run.spec.input_qparams))
        yield finding(
            "QCD002", severity(run, excess(run, *STAGES[name]), "warning"),
            f"{name} zero point outside the {qp.dtype} range",
            f"The {name} zero point {bad[0]} lies outside {qp.dtype}'s "
            f"[{qp.dtype_min}, {qp.dtype_max}]: torch.quantize_per_tensor refuses it "
            "('zero_point is above upper bound'), and no code could represent 0.0.",
            {"tensor": name, "zero_point": bad[0], "range": [qp.dtype_min, qp.dtype_max]},
            fix, run, excess(run, *STAGES[name]), STAGES[name])


def qcd003(ctx: Context) -> Iterator[Finding]:
    for name, qp, tensor in _user_qparams(ctx):
        if tensor is None or qp.per_channel:
            continue
        if qp.dtype == "qint8" and qp.zero_point[0] == 0:
            continue  # symmetric: max|t| / 127 (254 steps) keeps the largest value unclipped,
            # as QCD020's fix does, and torch's observers' / 127.5 spans 254.x on a range a
            # little short of symmetric: neither is the thread's (max - min) / 254
        t_max, t_min = tensor.max(), tensor.min()
        rng = float(t_max - t_min)
        if rng <= 0:
            continue
        steps_used = rng / qp.scale[0]
        full = qp.dtype_max - qp.dtype_min
        lo, hi = clip_bounds(qp)
        tol = qp.scale[0] / 2
        clipped = float(t_max) > hi[0] + tol or float(t_min) < lo[0] - tol
        # The thread's formula divides the range by 2^8 - 2 = 254: one level short.
        if clipped or abs(steps_used - (full - 1)) > 0.5:
            continue
        run = ctx.as_given
        assert run is not None
        good_scale, good_zp = minmax_qparams(tensor, qp.dtype)
        if name == "input":
            fix = (f"qx = torch.quantize_per_tensor(x, {good_scale!r}, {good_zp}, "
                   f"torch.{qp.dtype})  # (max - min) / {full}")
        else:
            fixed = QParams((good_scale,), (good_zp,), qp.dtype, None, "fix")
            fix = given_weight_fix(ctx.case, run.kernel.kernel, fixed, run.spec.input_qparams,
                                   f"(max - min) / {full}") \
                or weight_fix(ctx.case, run.kernel.kernel, False, run.spec.input_qparams)
        yield finding(
            "QCD003", "info", f"{name} scale formula wastes levels",
            f"The {name} range {fmt(rng)} spans {fmt(steps_used)} steps of scale "
            f"{fmt(qp.scale[0])}, but {qp.dtype} has {full}: the formula divides by "
            f"{round(steps_used)} instead of {full} (2^8 - 1), so every step is "
            f"{fmt(full / steps_used)}x coarser than it needs to be.",
            {"tensor": name, "range": rng, "scale": qp.scale[0], "steps_used": steps_used,
             "steps_available": full},
            fix,
            ctx.as_given)


def observer_default(qp: QParams | None) -> bool:
    """Scale 1.0 and zero point 0: what torch's observers return before they see data (and
    a fresh quantized module's output qparams)."""
    return qp is not None and not qp.per_channel and qp.scale[0] == 1.0 and qp.zero_point[0] == 0


def qcd013(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    s = ctx.case.setup
    if run is None or s is None or not observer_default(s.input_qparams):
        return
    step = ideal_step(ctx.case.input)
    energy = excess(run, *STAGES["input"])
    b = run.report.budget
    if b is None or energy <= 0:
        return  # scale 1.0 suits this input (e.g. pixel values 0..255)
    measured = float(np.hypot(b.stage("input_rounding").measured,
                              b.stage("input_clipping").measured))
    module_default = s.module is not None and observer_default(s.module.output_qparams)
    yield finding(
        "QCD013", severity(run, energy, "warning"),
        "input qparams are uncalibrated defaults 1.0 / 0",
        "The input's scale 1.0 and zero point 0 are what an observer returns when it has seen "
        "no data: the model was converted without calibration batches between prepare() and "
        "convert() (torch warns 'must run observer before calling calculate_qparams')"
        + (", and the conv's output qparams are the same defaults" if module_default else "")
        + f". For this input, range [{fmt(float(ctx.case.input.min()))}, "
        f"{fmt(float(ctx.case.input.max()))}], the step should be about {fmt(step)}: the input "
        f"error is {fmt(measured)} "
        f"RMSE where its floor is {fmt(b.stage('input_rounding').floor)}.",
        {"scale": 1.0, "zero_point": 0, "ideal_step": step, "excess": energy},
        eager_flow(ctx.case, run.report.engine), run, energy, STAGES["input"])
