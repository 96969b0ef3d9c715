"""QCD030-QCD031: the bias."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..report import Finding
from .base import Context, fmt, severity_for, share


def qcd030(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    run = ctx.as_given
    if s is None or s.module is None or run is None:
        return
    b = ctx.case.bias
    mb = s.module.bias
    if b is None and mb is None:
        return
    if b is not None and mb is not None and np.allclose(b, mb, rtol=1e-6, atol=0):
        return
    if b is None:
        assert mb is not None
        what = f"a bias (max |b| {fmt(float(np.abs(mb).max()))}) the float layer does not have"
    elif mb is None:
        what = "no bias, while the float layer has one"
    else:
        d = float(np.abs(mb - b).max())
        what = f"a bias that differs from the float bias by up to {fmt(d)}"
        if not np.any(mb):
            what = f"a zero bias, while the float bias is {fmt(float(b.reshape(-1)[0]))}" + (
                "" if b.size == 1 else " ...")
    impact = share(run, "module_state") * 0.1
    yield Finding(
        code="QCD030",
        severity="warning" if b is not None and float(np.abs(b).max()) > 0 else "info",
        title="the quantized module's bias is missing or differs from the float bias",
        message=f"The quantized module holds {what}.",
        evidence={"float_bias": None if b is None else b[:8].tolist(),
                  "module_bias": None if mb is None else mb[:8].tolist()},
        fix="qm.set_weight_bias(quantized_weight, float_conv.bias)",
        path="as_given", impact=impact,
    )


def qcd031(ctx: Context) -> Iterator[Finding]:
    for run in (ctx.as_given, ctx.production):
        if run is None:
            continue
        st = run.report.stage("bias_quantization")
        if not st.applies or st.delta is None or st.delta.max_abs_lsb is None:
            continue
        impact = share(run, "bias_quantization")
        if st.delta.max_abs_lsb < 0.5 and impact < 0.05:
            continue
        yield Finding(
            code="QCD031",
            severity=severity_for(impact),
            title="bias quantization error is notable",
            message=(
                f"Quantizing the bias (step input_scale * weight_scale) moves outputs by up to "
                f"{fmt(st.delta.max_abs)} ({fmt(st.delta.max_abs_lsb)} output steps) on the "
                f"{run.report.name} path ({run.report.kernel})."
            ),
            evidence={"max_abs": st.delta.max_abs, "max_abs_lsb": st.delta.max_abs_lsb,
                      "share": impact},
            fix="# larger input/weight scales coarsen the bias grid; calibrate input and weight "
                "qparams with observers instead of hand-made ones",
            path=run.report.name, engine=run.report.engine, impact=impact,
        )
