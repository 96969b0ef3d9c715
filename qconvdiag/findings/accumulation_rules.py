"""QCD040-QCD042: integer accumulation, and the 7-bit activations that protect it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from ..measure.budget import FAR
from ..measure.evidence import PathRun
from ..report import Finding
from .base import Context, excess, finding, fmt, severity
from .fixes import eager_flow, reduce_range_flow

#: The fixed output qparams of torch's quantized sigmoid, hardsigmoid and softmax (1/256, 0)
#: and tanh (2/256, 128): 8-bit codes whatever reduce_range says.
FIXED_QPARAMS = ((1.0 / 256.0, 0), (2.0 / 256.0, 128))


def _eight_bit_input(run: PathRun, engine: str) -> str:
    """Where the input's codes use 8 bits on an engine whose default qconfig keeps 7
    (reduce_range) so that its pairs cannot saturate: the input's qparams are not that
    observer's (a helper's model: the output scale of the conv before, written by hand, made
    the depthwise conv after it saturate, and the fix read as the qconfig already in use)."""
    from ..quantization.paths import default_reduces_range

    qp, codes = run.spec.input_qparams, run.spec.input_codes
    if codes is None or codes.size == 0 or qp.dtype != "quint8" or qp.per_channel \
            or int(codes.max()) <= 127 or not default_reduces_range(engine):
        return ""  # 7-bit qparams (reduce_range) keep every code in 0..127
    if (qp.scale[0], qp.zero_point[0]) in FIXED_QPARAMS:
        return ""  # a sigmoid's, tanh's or hardsigmoid's output: 8 bits whatever the qconfig

    return (f" Its input codes reach {int(codes.max())}: 8 bits, where "
            f"{engine}'s default qconfig keeps activations to 128 levels (reduce_range) so "
            "that pairs cannot saturate: the input's scale and zero point are not that "
            "observer's (written by hand, as the output qparams of the op before it, or "
            "another qconfig's); the fix quantizes with it again, none written after convert.")


def qcd040(ctx: Context) -> Iterator[Finding]:
    for engine in ctx.engines:
        for run in ctx.paths(engine):
            if run.emulation is None:
                continue
            em, ran = run.emulation, run.module_emulation
            saturated = [e for e in (em, ran) if e is not None
                         and (e.saturated_pairs > 0 or e.saturated_row_sums > 0)]
            if saturated:
                # on a PT2E engine the ladder's accumulation is the eager graph's (float32):
                # the kernel's int16 pairs show in integer_kernel
                sid = ("integer_kernel" if any(s.id == "integer_kernel" and s.applies
                                               for s in run.report.stages) else "accumulation")
                energy = excess(run, sid)
                st = run.report.stage(sid)
                module_note = ("" if ran is None else
                               f" (the module's own weight: {ran.saturated_pairs} saturated pair"
                               f"{'s' if ran.saturated_pairs != 1 else ''})")
                rows = max(e.saturated_row_sums for e in saturated)
                if rows:
                    module_note += (f"; {rows} window sums of input codes (the depthwise "
                                    "kernel's weight zero point correction) saturated in int16")
                yield finding(
                    # a warning only when it costs measurably (MATERIAL of the floor), as
                    # every cause: a few saturated pairs at the floor are worth knowing only
                    "QCD040", severity(run, energy),
                    f"int16 pair saturation in accumulation on {engine}",
                    f"On this CPU {engine} sums products of raw codes in pairs in saturating "
                    f"int16 ({run.kernel.accumulation}); {em.saturated_pairs} pair "
                    f"sum{'s' if em.saturated_pairs != 1 else ''} saturated on the "
                    f"{run.report.name} path{module_note}, moving outputs by up to "
                    f"{fmt(st.delta.max_abs if st.delta else 0)} "
                    f"({fmt((st.delta.max_abs_lsb or 0) if st.delta else 0)} output steps) "
                    "before the output's rounding and clamping." + _eight_bit_input(run, engine),
                    {"saturated_pairs": em.saturated_pairs, "saturated_row_sums": rows,
                     "accumulation": run.kernel.accumulation, "excess": energy},
                    reduce_range_flow(ctx.case, engine, True), run, energy, (sid,))
            elif run.saturation_without_vnni:
                n = run.saturation_without_vnni
                cost = _without_vnni(run)
                ratio = cost[2] if cost is not None else 0.0
                yield finding(
                    # this CPU computes it exactly: worth knowing, with what it would cost
                    # there (the engines' default qconfigs keep 8-bit activations on onednn,
                    # so a warning would fault healthy layers: 26 of the corpus's)
                    "QCD040", "info",
                    # the title is what a terminal report shows of an info finding: it says
                    # what that CPU would do with these codes
                    "int16 pair saturation on CPUs without AVX512-VNNI"
                    + (": broken there" if ratio >= FAR else
                       f": {cost[0]} output{'s move' if cost[0] != 1 else ' moves'} there"
                       if cost is not None and cost[0] else ""),
                    "This CPU accumulates exactly, but on CPUs without AVX512-VNNI "
                    + _pairs_there(engine) + ": "
                    f"this input (codes up to {int(run.spec.input_codes.max())}) would "
                    f"saturate {n} pair sum{'s' if n != 1 else ''} there"
                    + (f", moving {cost[0]} output{'s' if cost[0] != 1 else ''} by up to "
                       f"{cost[1]} step{'s' if cost[1] != 1 else ''}: RMSE {fmt(cost[3])}, "
                       f"{fmt(ratio)}x its floor" + (" (broken there)" if ratio >= FAR else "")
                       if cost is not None else " and change the result")
                    + ". 7-bit activations (reduce_range, the x86/fbgemm default) cannot.",
                    {"saturated_pairs_without_vnni": n,
                     "max_input_code": int(run.spec.input_codes.max()),
                     **({"outputs_moved_without_vnni": cost[0], "max_steps_without_vnni":
                         cost[1], "floor_ratio_without_vnni": ratio} if cost else {})},
                    reduce_range_flow(ctx.case, engine, True), run)


def _pairs_there(engine: str) -> str:
    """Who sums int16 pairs on a CPU without AVX512-VNNI, and how the count was made: as
    fbgemm pairs them (along K), which is what x86 and fbgemm run there; oneDNN pairs input
    channels instead, and on AVX2 not in its grouped and depthwise kernels (measured with
    the ISA forced down), so for its engines the count is fbgemm's pairing, said as such."""
    if engine in ("x86", "fbgemm"):
        return "the fbgemm/x86 kernels sum raw u8*s8 products in saturating int16 pairs"
    return ("int8 kernels sum raw u8*s8 products in saturating int16 pairs (counted here as "
            "fbgemm pairs them, along K; oneDNN's pair input channels, and on AVX2 CPUs not in "
            "its grouped and depthwise convs)")


def _without_vnni(run: PathRun) -> tuple[int, int, float, float] | None:
    """What the path's codes give on a CPU without AVX512-VNNI (its kernel pairing along K, as
    fbgemm's GEMMs do there): (outputs that differ from this CPU's, the largest difference in
    output steps, the RMSE's ratio to the path's floor, the RMSE against the float output)."""
    import dataclasses

    from ..arithmetic.accumulate import PAIRS_K
    from ..arithmetic.emulate import emulate
    from ..measure.evidence import exec_weight_qparams
    from ..measure.metrics import error_metrics
    from ..quantization.qparams import dequantize

    b, em, y = run.report.budget, run.emulation, run.output_reference
    if b is None or em is None or y is None or run.geometry is None or b.floor_rmse <= 0:
        return None
    spec = run.spec
    paired = emulate(dataclasses.replace(run.kernel, accumulation=PAIRS_K), spec.input_codes,
                     spec.input_qparams, spec.weight_codes,
                     exec_weight_qparams(spec.weight_qparams), spec.bias, spec.output_qparams,
                     run.geometry, run.activation == "relu")
    diff = np.abs(paired.output_codes.astype(np.int64) - em.output_codes)
    rmse = error_metrics(dequantize(paired.output_codes, spec.output_qparams) - y, y,
                         None).rmse
    return int(np.count_nonzero(diff)), int(diff.max()), rmse / b.floor_rmse, rmse


def qcd041(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given or ctx.production
    if run is None:
        return
    spec = run.spec
    k = int(np.prod(ctx.case.weight.shape[1:]))
    zx = spec.input_qparams.zero_point[0]
    max_x = int(max(abs(spec.input_codes.max() - zx), abs(spec.input_codes.min() - zx)))
    w_qp, ndim = spec.weight_qparams, spec.weight_codes.ndim
    zw: Any = w_qp.zero_point[0]
    if w_qp.per_channel:  # along the qparams' own axis (QCD025: not always the output channels)
        shape = [1] * ndim
        shape[(w_qp.axis or 0) % ndim] = -1
        zw = np.asarray(w_qp.zero_point).reshape(shape)
    max_w = int(np.abs(spec.weight_codes - zw).max())
    bound = k * max_x * max_w
    if bound <= 2**31 - 1:
        return
    exact = run.emulation.acc_exact if run.emulation is not None else np.zeros(1, np.int64)
    overflowed = int(np.count_nonzero((exact > 2**31 - 1) | (exact < -(2**31))))
    energy = excess(run, "accumulation") if overflowed else 0.0
    yield finding(
        "QCD041", severity(run, energy, "warning" if overflowed else "info"),
        "int32 accumulator overflow possible",
        f"K = {k} products of up to {max_x} x {max_w} can reach {bound:,}, beyond int32 "
        f"(2,147,483,647); {overflowed} outputs of this input actually overflow and wrap.",
        {"k": k, "bound": bound, "overflowed": overflowed, "excess": energy},
        "# quantize the weight symmetric (zero point 0) so |w - zp| <= 128, and calibrate the\n"
        "# input so its codes stay near their zero point:\n"
        + eager_flow(ctx.case, run.report.engine), run, energy, ("accumulation",))


def _whose(run: Any) -> str:
    """Where a path's 7-bit activations come from: the production path takes torch's advice
    for this CPU where the default keeps 8 bits."""
    from ..quantization.paths import default_reduces_range, reduces_beyond_default

    engine = run.report.engine
    if run.report.name == "production" and reduces_beyond_default(engine):
        return "torch's advice for this CPU, whose int16 pair sums 8 bits saturate"
    if default_reduces_range(engine):
        return f"the {engine} default qconfig"
    # the engine's default keeps 8 bits: these qparams chose 7 (or a step twice too coarse)
    return f"reduce_range=True, which the {engine} default qconfig does not set"


def qcd042(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        b = run.report.budget
        if b is None or (b.input_bits == 8 and b.output_bits == 8) \
                or not b.floor_rmse > b.floor_rmse_8bit > 0:
            continue
        which = " and ".join(t for t, bits in (("input", b.input_bits),
                                              ("output", b.output_bits)) if bits == 7)
        cost_db = 20 * float(np.log10(b.floor_rmse / b.floor_rmse_8bit))
        exact_here = run.kernel.accumulation == "exact"
        yield finding(
            "QCD042", "info", "7-bit activations: reduce_range's trade-off",
            f"The {which} use{'s' if ' and ' not in which else ''} 128 of 256 codes, as "
            f"reduce_range gives ({_whose(run)}): that costs "
            f"{cost_db:.1f} dB at the floor (RMSE floor {fmt(b.floor_rmse)} vs "
            f"{fmt(b.floor_rmse_8bit)} with 8 bits). On CPUs without AVX512-VNNI the x86, "
            "fbgemm and onednn kernels sum u8*s8 products in int16 pairs that 8-bit "
            "activations can saturate; 7 bits cannot. "
            + ("This CPU accumulates this layer exactly: 8-bit activations would be safe "
               "here, only here." if exact_here else
               f"This layer's kernel pairs them on this CPU too ({run.kernel.accumulation}): "
               "keep 7 bits."),
            {"input_bits": b.input_bits, "output_bits": b.output_bits, "cost_db": cost_db,
             "floor_rmse": b.floor_rmse, "floor_rmse_8bit": b.floor_rmse_8bit,
             "exact_here": exact_here},
            ("# only if the model never runs on a CPU without AVX512-VNNI:\n"
             + reduce_range_flow(ctx.case, run.report.engine, False)) if exact_here else
            "# nothing to fix: keep reduce_range, this layer's kernel needs it here", run)
