"""QCD040-QCD041: integer accumulation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..emulate import EXACT, PAIRS_K, pair_saturation
from ..report import Finding
from .base import Context, fmt, severity_for, share

REDUCE_RANGE_FIX = (
    "from torch.ao.quantization.observer import HistogramObserver\n"
    "act = HistogramObserver.with_args(reduce_range=True)  # 7-bit activations: pairs fit int16\n"
    "# get_default_qconfig('x86') and ('fbgemm') already use reduce_range=True"
)


def qcd040(ctx: Context) -> Iterator[Finding]:
    hypothetical_done = False
    for engine in ctx.engines:
        for name in ("as_given", "production"):
            run = ctx.run(name, engine)
            if run is None or run.emulation is None:
                continue
            # The ladder's accumulation stage is the intended setup's; the module's run (what
            # really ran) is reported next to it.
            em = run.emulation
            ran = run.module_emulation
            if em.saturated_pairs > 0 or (ran is not None and ran.saturated_pairs > 0):
                impact = share(run, "accumulation")
                module_note = ""
                if ran is not None:
                    module_note = (f" (the module's own weight: {ran.saturated_pairs} "
                                   "saturated pairs)")
                st = run.report.stage("accumulation")
                lsb = st.delta.max_abs_lsb if st.delta is not None else None
                severity = severity_for(impact)
                if severity == "info" and (lsb is None or lsb >= 1):
                    severity = "warning"  # whole output steps lost, even if others dominate
                yield Finding(
                    code="QCD040",
                    severity=severity,
                    title=f"int16 pair saturation in accumulation on {engine}",
                    message=(
                        f"On this CPU {engine} sums products of raw codes in pairs in saturating "
                        f"int16 ({run.kernel.accumulation}); {em.saturated_pairs} pair "
                        f"sum{'s' if em.saturated_pairs != 1 else ''} saturated on the {name} "
                        f"path{module_note}, moving outputs by up to "
                        f"{fmt(st.delta.max_abs if st.delta else 0)} "
                        f"({fmt(lsb or 0)} output steps)."
                    ),
                    evidence={"saturated_pairs": em.saturated_pairs,
                              "accumulation": run.kernel.accumulation, "share": impact,
                              "path": name},
                    fix=REDUCE_RANGE_FIX, path=name, engine=engine, impact=impact,
                )
            elif name == "as_given" and run.kernel.kernel != "qnnpack" and \
                    run.kernel.accumulation == EXACT and not hypothetical_done:
                hypothetical_done = True
                # Exact here, but would a CPU without AVX512-VNNI saturate this setup?
                spec = run.spec
                codes, qp = spec.weight_codes, spec.weight_qparams
                if qp.dtype != "qint8" or spec.input_qparams.dtype != "quint8":
                    continue
                _, n = pair_saturation(spec.input_codes, spec.input_qparams.zero_point[0], codes,
                                       ctx.case.geometry, PAIRS_K,
                                       spec.input_qparams.zero_point[0], count_only=True)
                if n == 0:
                    continue
                yield Finding(
                    code="QCD040",
                    severity="info",
                    title="int16 pair saturation on CPUs without AVX512-VNNI",
                    message=(
                        f"This CPU accumulates exactly, but on CPUs without AVX512-VNNI the "
                        f"fbgemm/x86 kernels sum raw u8*s8 products in saturating int16 pairs: "
                        f"this input (codes up to {int(spec.input_codes.max())}) would saturate "
                        f"{n} pair sum{'s' if n != 1 else ''} there and change the result."
                    ),
                    evidence={"saturated_pairs_without_vnni": n,
                              "max_input_code": int(spec.input_codes.max())},
                    fix=REDUCE_RANGE_FIX, path=name, engine=None, impact=0.0,
                )


def qcd041(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given or ctx.production
    if run is None:
        return
    spec = run.spec
    k = int(np.prod(ctx.case.weight.shape[1:]))
    zx = spec.input_qparams.zero_point[0]
    max_x = int(max(abs(spec.input_codes.max() - zx), abs(spec.input_codes.min() - zx)))
    zw = np.asarray(spec.weight_qparams.zero_point).reshape((-1,) + (1,) * (
        spec.weight_codes.ndim - 1)) if spec.weight_qparams.per_channel else \
        spec.weight_qparams.zero_point[0]
    max_w = int(np.abs(spec.weight_codes - zw).max())
    bound = k * max_x * max_w
    if bound <= 2**31 - 1:
        return
    exact = run.emulation.acc_exact if run.emulation is not None else np.zeros(1, np.int64)
    overflowed = int(np.count_nonzero((exact > 2**31 - 1) | (exact < -(2**31))))
    yield Finding(
        code="QCD041",
        severity="error" if overflowed else "warning",
        title="int32 accumulator overflow possible",
        message=(
            f"K = {k} products of up to {max_x} x {max_w} can reach {bound:,}, beyond int32 "
            f"(2,147,483,647); {overflowed} outputs of this input actually overflow and wrap."
        ),
        evidence={"k": k, "bound": bound, "overflowed": overflowed},
        fix="# split the conv along input channels (groups) or lower the activation range",
        path=run.report.name, impact=1.0 if overflowed else 0.0,
    )
