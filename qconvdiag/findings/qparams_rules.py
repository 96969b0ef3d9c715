"""QCD001-QCD003: the qparams themselves."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..qparams import QParams, clip_bounds
from ..report import Finding
from .base import Context, fmt, minmax_qparams, share


def _user_qparams(ctx: Context) -> list[tuple[str, QParams, np.ndarray | None]]:
    s = ctx.case.setup
    if s is None:
        return []
    out = []
    for name, qp, tensor in (
        ("input", s.input_qparams, ctx.case.input),
        ("weight", s.weight_qparams, ctx.case.weight),
        ("output", s.output_qparams, None),
    ):
        if qp is not None:
            out.append((name, qp, tensor))
    if s.module is not None and s.module.output_qparams.zero_point_given is not None:
        out.append(("module output", s.module.output_qparams, None))
    return out


def qcd001(ctx: Context) -> Iterator[Finding]:
    for name, qp, _ in _user_qparams(ctx):
        if qp.zero_point_given is None:
            continue
        given = qp.zero_point_given
        used = qp.zero_point
        rounded = tuple(int(np.rint(z)) for z in given)
        changed = rounded != used
        stage = "input_rounding" if name == "input" else "weight_rounding"
        impact = share(ctx.as_given, stage) * (0.5 if changed else 0.1)
        yield Finding(
            code="QCD001",
            severity="warning" if changed else "info",
            title=f"{name} zero point is not an integer",
            message=(
                f"The {name} zero point {fmt(given[0])} is a float; torch truncates it toward 0 "
                f"to {used[0]}"
                + (f" (rounding would give {rounded[0]})" if changed else "")
                + ". Zero points are integers: the real value 0.0 must map to an exact code."
            ),
            evidence={"tensor": name, "zero_point_given": list(given)[:8],
                      "zero_point_used": list(used)[:8], "rounded": list(rounded)[:8]},
            fix=f"{name}_zero_point = int(round({fmt(given[0])}))  # = {rounded[0]}",
            path="as_given", impact=impact,
        )


def qcd002(ctx: Context) -> Iterator[Finding]:
    for name, qp, _ in _user_qparams(ctx):
        if name not in ("input", "weight"):
            continue
        bad = [z for z in qp.zero_point if not qp.dtype_min <= z <= qp.dtype_max]
        if not bad:
            continue
        yield Finding(
            code="QCD002",
            severity="error",
            title=f"{name} zero point outside the {qp.dtype} range",
            message=(
                f"The {name} zero point {bad[0]} lies outside {qp.dtype}'s "
                f"[{qp.dtype_min}, {qp.dtype_max}]: torch.quantize_per_tensor refuses it "
                "('zero_point is above upper bound'), and no code could represent 0.0."
            ),
            evidence={"tensor": name, "zero_point": bad[0],
                      "range": [qp.dtype_min, qp.dtype_max]},
            fix=f"zero_point = min(max(zero_point, {qp.dtype_min}), {qp.dtype_max})  "
                "# better: let an observer compute it",
            path="as_given", impact=1.0,
        )


def qcd003(ctx: Context) -> Iterator[Finding]:
    for name, qp, tensor in _user_qparams(ctx):
        if tensor is None or qp.per_channel:
            continue
        t_max, t_min = tensor.max(), tensor.min()
        rng = float(t_max - t_min)
        if rng <= 0:
            continue
        steps_used = rng / qp.scale[0]
        full = qp.dtype_max - qp.dtype_min
        lo, hi = clip_bounds(qp)
        tol = qp.scale[0] / 2
        # any value beyond a bound <=> the extreme is (compared in float64, as elementwise)
        clipped = float(t_max) > hi[0] + tol or float(t_min) < lo[0] - tol
        # The thread's formula divides the range by 2^8 - 2 = 254: one level short.
        if clipped or abs(steps_used - (full - 1)) > 0.5:
            continue
        good_scale, good_zp = minmax_qparams(tensor, qp.dtype)
        yield Finding(
            code="QCD003",
            severity="info",
            title=f"{name} scale formula wastes levels",
            message=(
                f"The {name} range {fmt(rng)} spans {fmt(steps_used)} steps of scale "
                f"{fmt(qp.scale[0])}, but {qp.dtype} has {full}: the formula divides by "
                f"{round(steps_used)} instead of {full} (2^8 - 1), so every step is "
                f"{fmt(full / steps_used)}x coarser than it needs to be."
            ),
            evidence={"tensor": name, "range": rng, "scale": qp.scale[0],
                      "steps_used": steps_used, "steps_available": full},
            fix=(f"scale = (max - min) / {full}  # = {good_scale:.6g} for this {name}\n"
                 f"zero_point = {qp.dtype_min} - round(min / scale)  # = {good_zp}"),
            path="as_given", impact=0.01,
        )
