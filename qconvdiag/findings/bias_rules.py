"""QCD030-QCD031: the bias."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..measure.evidence import PathRun
from ..report import Finding
from .base import Context, excess, finding, fmt, material, severity
from .fixes import eager_flow


def bias_energy(ctx: Context, run: PathRun) -> float:
    """Mean square output shift of the module's bias against the float bias: a constant per
    output channel (float units^2), at most the module_state stage's excess."""
    m = run.spec.module
    if m is None:
        return 0.0
    o = ctx.case.weight.shape[0]
    b = np.zeros(o) if ctx.case.bias is None else ctx.case.bias.astype(np.float64)
    mb = np.zeros(o) if m.bias is None else m.bias.astype(np.float64)
    return min(float(np.mean((mb - b) ** 2)), excess(run, "module_state"))


def qcd030(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None or run.spec.module is None:
        return
    b = ctx.case.bias
    mb = run.spec.module.bias
    o = ctx.case.weight.shape[0]
    # no bias and a zero bias add the same (qnnpack's readback of a bias-less conv is zeros)
    if np.allclose(np.zeros(o) if b is None else b, np.zeros(o) if mb is None else mb,
                   rtol=1e-6, atol=0):
        return
    from .weight_rules import batchnorm_fold

    if batchnorm_fold(ctx, run) is not None:  # a folded BatchNorm's bias: QCD027 says so
        return
    if b is None:
        assert mb is not None
        what = f"a bias (max |b| {fmt(float(np.abs(mb).max()))}) the float layer does not have"
    elif mb is None:
        what = "no bias, while the float layer has one"
    elif not np.any(mb):
        what = f"a zero bias, while the float bias is {fmt(float(b.reshape(-1)[0]))}" + (
            "" if b.size == 1 else " ...")
    else:
        d = float(np.abs(mb - b).max())
        what = f"a bias that differs from the float bias by up to {fmt(d)}"
    energy = bias_energy(ctx, run)
    from .weight_rules import module_weight_fix, other_weights_requantize, pt2e_requantize

    # the module holds another weight too (QCD024): the bias alone packed with it can cost
    # more (a sweep's depthwise conv from another checkpoint: 42.8% -> 32.0% accuracy)
    both = module_weight_fix(ctx, run)
    fix = ("qm.set_weight_bias(qm.weight(), conv.bias)  # the module's weight, the float bias"
           if both is None else "# the module's weight is not the float weight either (QCD024):"
           "\n# pack both again, the float bias with the meant weight\n" + both)
    fix = pt2e_requantize(ctx) or other_weights_requantize(ctx, run) or fix
    yield finding(
        "QCD030", severity(run, energy),
        "the module's bias is missing or not the float bias",
        f"The quantized module holds {what}: outputs shift by "
        f"{fmt(float(np.sqrt(energy)))} RMSE.",
        {"float_bias": None if b is None else b[:8].tolist(),
         "module_bias": None if mb is None else mb[:8].tolist(), "excess": energy},
        fix, run, energy, ("module_state",))


def qcd031(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        energy = excess(run, "bias_quantization")
        if not material(run, energy):
            continue
        st = run.report.stage("bias_quantization")
        assert st.delta is not None
        em = run.emulation
        clamped = 0 if em is None or em.bias_int32 is None else int(
            np.count_nonzero(np.abs(em.bias_int32) >= 2 ** 31 - 1))
        how = (f"{run.report.kernel} rounds the bias to int32" if not clamped else
               f"{run.report.kernel} quantizes the bias to int32 at that step, and "
               f"{clamped} bias value(s) lie beyond int32's range there and are clamped to "
               "it: a weight scale that fine (torch's observers clamp a tiny weight's to "
               "float32's eps) leaves the bias no room")
        yield finding(
            "QCD031", severity(run, energy), "bias quantization error is notable",
            f"Quantizing the bias (step input_scale * weight_scale) moves outputs by up to "
            f"{fmt(st.delta.max_abs)} ({fmt(st.delta.max_abs_lsb or 0)} output steps) on the "
            f"{run.report.name} path ({how}).",
            {"max_abs": st.delta.max_abs, "max_abs_lsb": st.delta.max_abs_lsb,
             "excess": energy, "clamped": clamped},
            _BIAS_ROOM if clamped else
            "# the bias grid is input_scale * weight_scale; qparams from observers keep it fine\n"
            "# against the output step:\n" + eager_flow(ctx.case, run.report.engine),
            run, energy, ("bias_quantization",))


#: QCD031's fix where the bias is clamped at int32: a weight scale no finer than the bias
#: needs (its int32 codes within 2^30, room for the products' sum), the weight packed again.
_BIAS_ROOM = (
    "# a weight scale at which the bias fits int32 (max|bias| / input_scale /\n"
    "# 2**30; the observer clamped a tiny weight's to float32's eps), the weight\n"
    "# packed again\n"
    "old = qm.weight()\n"
    "room = float(conv.bias.abs().max()) / qx.q_scale() / 2**30\n"
    "if old.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):\n"
    "    qw = torch.quantize_per_tensor(\n"
    "        conv.weight.detach(), max(old.q_scale(), room), 0, torch.qint8)\n"
    "else:\n"
    "    qw = torch.quantize_per_channel(\n"
    "        conv.weight.detach(), old.q_per_channel_scales().clamp(min=room),\n"
    "        old.q_per_channel_zero_points(), old.q_per_channel_axis(), torch.qint8)\n"
    "qm.set_weight_bias(qw, conv.bias)")
