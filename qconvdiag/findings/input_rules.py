"""QCD010-QCD011: the input."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..qparams import clip_bounds
from ..report import Finding
from .base import Context, fmt, minmax_qparams, severity_for, share


def qcd010(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None:
        return
    qp = run.spec.input_qparams
    lo, hi = clip_bounds(qp)
    x = ctx.case.input
    if not x.size or (float(x.min()) >= lo[0] and float(x.max()) <= hi[0]):
        return  # the extremes settle it: nothing clips
    n = int(np.count_nonzero(x > hi[0]) + np.count_nonzero(x < lo[0]))
    if n == 0:
        return
    impact = share(run, "input_clipping")
    scale, zp = minmax_qparams(x, "quint8")
    yield Finding(
        code="QCD010",
        severity=severity_for(impact) if impact > 0.001 else "info",
        title="input values clipped by the input qparams",
        message=(
            f"{n} of {x.size} input values lie outside the representable range "
            f"[{fmt(lo[0])}, {fmt(hi[0])}] and were clipped"
            f" (largest {fmt(float(x.max()))}, smallest {fmt(float(x.min()))})."
        ),
        evidence={"clipped": n, "total": int(x.size), "low": float(lo[0]),
                  "high": float(hi[0]), "input_min": float(x.min()),
                  "input_max": float(x.max()), "share": impact},
        fix=(f"input_scale = {scale:.6g}  # (max - min) / 255 over this input\n"
             f"input_zero_point = {zp}"),
        path="as_given", impact=impact,
    )


def qcd011(ctx: Context) -> Iterator[Finding]:
    for engine in ctx.engines:
        run = ctx.run("as_given", engine)
        if run is None:
            continue
        qp = run.spec.input_qparams
        if qp.dtype == "quint8" and not qp.per_channel:
            continue
        what = "per-channel" if qp.per_channel else qp.dtype
        yield Finding(
            code="QCD011",
            severity="error",
            title=f"input {what} is not accepted by {engine}",
            message=(
                f"The {engine} quantized conv takes per-tensor quint8 activations; this input is "
                f"{what}. torch says: {run.report.refused or 'refused'}"
            ),
            evidence={"dtype": qp.dtype, "scheme": qp.scheme, "engine": engine,
                      "torch_error": run.report.refused},
            fix=("qx = torch.quantize_per_tensor(x, scale, zero_point, torch.quint8)"
                 "  # zero_point in 0..255"),
            path="as_given", engine=engine, impact=1.0,
        )


__all__ = ["qcd010", "qcd011", "np"]
