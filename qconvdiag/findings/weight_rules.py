"""QCD020-QCD025: the weight, and the module that should hold it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..evidence import PathRun
from ..metrics import dot
from ..qparams import QParams, clip_bounds, dequantize, quantize
from ..report import Finding
from ..stages import conv_diff
from .base import Context, conv_name, fmt, severity_for, share, symmetric_scale


def _axis_bounds(qp: QParams, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = clip_bounds(qp)
    if qp.per_channel and lo.size > 1:
        shape = [1] * w.ndim
        shape[(qp.axis or 0) % w.ndim] = -1
        return lo.reshape(shape), hi.reshape(shape)
    return lo.reshape(()), hi.reshape(())


def qcd020(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None:
        return
    qp = run.spec.weight_qparams
    w = ctx.case.weight
    try:
        lo, hi = _axis_bounds(qp, w)
    except ValueError:
        return
    tol = np.asarray(qp.scales()).max() / 2
    over = w > hi + tol
    under = w < lo - tol
    n = int(over.sum() + under.sum())
    if n == 0:
        return
    impact = share(run, "weight_clipping")
    where = []
    if over.any():
        where.append(f"{int(over.sum())} exceed the largest representable value "
                     f"{fmt(float(np.min(np.broadcast_to(hi, w.shape)[over])))}")
    if under.any():
        where.append(f"{int(under.sum())} fall below the smallest "
                     f"{fmt(float(np.max(np.broadcast_to(lo, w.shape)[under])))}")
    yield Finding(
        code="QCD020",
        severity=severity_for(impact) if impact > 0.001 else "info",
        title="weight values clipped by the weight qparams",
        message=(f"{n} of {w.size} weights are outside the representable range: "
                 f"{' and '.join(where)}, and were clipped to it."),
        evidence={"clipped": n, "total": int(w.size), "share": impact,
                  "weight_min": float(w.min()), "weight_max": float(w.max())},
        fix=(f"scale = max(abs(w)) / 127.5  # = {symmetric_scale(w):.6g}, symmetric\n"
             f"qw = torch.quantize_per_tensor(w, scale, 0, torch.qint8)"),
        path="as_given", impact=impact,
    )


def qcd021(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    run = ctx.as_given
    if s is None or run is None or s.weight_qparams is None:
        return
    qp = s.weight_qparams
    if qp.dtype != "qint8" or qp.per_channel:
        return
    w = ctx.case.weight
    given = (qp.zero_point_given or qp.zero_point)[0]
    unsigned_formula = -float(w.min()) / qp.scale[0]
    if abs(given - unsigned_formula) > 1.0 or abs(given) < 1:
        return
    signed = -128 - float(w.min()) / qp.scale[0]
    impact = share(run, "weight_clipping")
    sym = symmetric_scale(w)
    yield Finding(
        code="QCD021",
        severity=severity_for(impact) if impact > 0.001 else "warning",
        title="unsigned-range zero point formula used for qint8 weights",
        message=(
            f"The weight zero point {fmt(given)} is -min/scale, the formula for quint8's range "
            f"0..255. qint8 spans -128..127, so its formula is -128 - min/scale = {fmt(signed)}: "
            f"with {int(round(given))} the codes run up to 127 at "
            f"{fmt((127 - qp.zero_point[0]) * qp.scale[0])}, far below the weight's max "
            f"{fmt(float(w.max()))}."
        ),
        evidence={"zero_point_given": given, "unsigned_formula": unsigned_formula,
                  "signed_formula": signed, "scale": qp.scale[0]},
        fix=(f"# symmetric qint8 weights, which every engine accepts:\n"
             f"weight_scale = w.abs().max() / 127.5  # = {sym:.6g}\n"
             f"qw = torch.quantize_per_tensor(w, weight_scale, 0, torch.qint8)"),
        path="as_given", impact=impact,
    )


def qcd022(ctx: Context) -> Iterator[Finding]:
    for engine in ctx.engines:
        run = ctx.run("as_given", engine)
        if run is None or run.report.kernel != "onednn":
            continue
        qp = run.spec.module.weight_qparams if run.spec.module else run.spec.weight_qparams
        if all(z == 0 for z in qp.zero_point):
            continue
        yield Finding(
            code="QCD022",
            severity="error",
            title=f"{engine} requires symmetric weights (zero point 0)",
            message=(
                f"The weight zero point is {qp.zero_point[0]}; {engine} refuses any weight zero "
                f"point other than 0. torch says: {run.report.refused}"
            ),
            evidence={"engine": engine, "zero_point": list(qp.zero_point)[:8],
                      "torch_error": run.report.refused},
            fix=("weight_scale = w.abs().max() / 127.5\n"
                 "qw = torch.quantize_per_tensor(w, weight_scale, 0, torch.qint8)\n"
                 "# or torch.backends.quantized.engine = 'x86'  (accepts zero points)"),
            path="as_given", engine=engine, impact=1.0,
        )


def _weight_error_rmse(ctx: Context, w_deq: np.ndarray) -> float:
    """RMSE of the output change that replacing the weight by ``w_deq`` alone causes."""
    case = ctx.case
    diff = conv_diff(case.input, w_deq - case.weight.astype(np.float64), case.geometry)
    flat = diff.reshape(-1)
    return float(np.sqrt(dot(flat, flat) / max(flat.size, 1)))


def _production_per_channel_rmse(ctx: Context, run: PathRun, scales: np.ndarray
                                 ) -> float | None:
    """The weight error RMSE the production path measured, when it quantized the weight per
    output channel, symmetric qint8, at the candidate's scales (up to float32 rounding: the
    observer computes them in float32), else None."""
    prod = ctx.run("production", run.report.engine)
    if prod is None or prod.ladder is None or prod.ladder.weight_error_rmse is None:
        return None
    qp = prod.spec.weight_qparams
    w = ctx.case.weight
    if (not qp.per_channel or (qp.axis or 0) % w.ndim != 0 or qp.dtype != "qint8"
            or any(qp.zero_point) or len(qp.scale) != len(scales)
            or not np.allclose(qp.scales(), scales, rtol=1e-6, atol=0)):
        return None
    return prod.ladder.weight_error_rmse


def qcd023(ctx: Context) -> Iterator[Finding]:
    for run in (ctx.as_given, ctx.production):
        if run is None or run.spec.weight_qparams.per_channel:
            continue
        w = ctx.case.weight
        if w.shape[0] < 2:
            continue
        qp = run.spec.weight_qparams
        per_ch_scale = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127.5
        per_ch_scale = np.where(per_ch_scale > 0, per_ch_scale, 1.0)
        pc = QParams(tuple(float(s) for s in per_ch_scale), (0,) * w.shape[0], "qint8", 0, "x")
        measured = run.ladder.weight_error_rmse if run.ladder is not None else None
        now = measured if measured is not None else _weight_error_rmse(
            ctx, dequantize(run.spec.weight_codes, qp))
        # the production path quantized this weight per channel with the same recipe: its
        # ladder measured the candidate's error already (one conv of the layer saved)
        then = _production_per_channel_rmse(ctx, run, per_ch_scale)
        if then is None:
            then = _weight_error_rmse(ctx, dequantize(quantize(w, pc), pc))
        if now <= 0 or then >= now / 2:
            continue
        impact = share(run, "weight_clipping", "weight_rounding") * (1 - then / now)
        yield Finding(
            code="QCD023",
            severity="warning" if impact >= 0.05 else "info",
            title="per-channel weights would cut the weight error notably",
            message=(
                f"The {run.report.name} path quantizes the weight per tensor; the output channels' "
                f"ranges differ up to {fmt(float(per_ch_scale.max() / per_ch_scale.min()))}x. "
                f"Per-channel symmetric weights would cut the weight-induced output RMSE from "
                f"{fmt(now)} to {fmt(then)}."
            ),
            evidence={"rmse_per_tensor": now, "rmse_per_channel": then,
                      "channel_range_ratio": float(per_ch_scale.max() / per_ch_scale.min())},
            fix=("from torch.ao.quantization.observer import PerChannelMinMaxObserver\n"
                 "qconfig = torch.ao.quantization.QConfig(activation=qconfig.activation,\n"
                 "    weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,\n"
                 "    qscheme=torch.per_channel_symmetric))  # or: qconvdiag ... --per-channel"),
            path=run.report.name, impact=impact,
        )


def qcd024(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    run = ctx.as_given
    if s is None or s.module is None or run is None:
        return
    m = s.module
    intended = dequantize(run.spec.weight_codes, run.spec.weight_qparams)
    held = dequantize(m.weight_codes, m.weight_qparams)
    if np.array_equal(intended, held):
        return
    diff = float(np.abs(held - intended).max())
    ref = float(np.abs(intended).max()) or 1.0
    if diff <= 0.5 * float(np.max(run.spec.weight_qparams.scales())):
        return
    unrelated = diff > 0.5 * ref
    impact = 1.0 if unrelated else share(run, "module_state")
    all_zero = not np.any(m.weight_codes - np.asarray(m.weight_qparams.zero_point).reshape(
        (-1,) + (1,) * (m.weight_codes.ndim - 1)))
    bias_arg = "float_conv.bias" if ctx.case.bias is not None else "None"
    held_desc = "all zeros" if all_zero else f"values up to {fmt(float(np.abs(held).max()))}"
    yield Finding(
        code="QCD024",
        severity="error" if unrelated else severity_for(impact),
        title="the quantized module's weight is not the weight that was quantized",
        message=(
            f"The quantized {conv_name(ctx.case)} holds a weight of {held_desc} (scale "
            f"{fmt(m.weight_qparams.scale[0])}), not the quantized weight (max "
            f"{fmt(float(np.abs(intended).max()))}): it differs by up to {fmt(diff)}. "
            "`qm.weight().data = w` changes nothing: qm.weight() unpacks a fresh copy of the "
            "packed params, and the module keeps running its original weight."
        ),
        evidence={"max_difference": diff, "module_weight_all_zero": all_zero,
                  "module_weight_scale": m.weight_qparams.scale[0],
                  "module_state_share": share(run, "module_state")},
        fix=(f"qm.set_weight_bias(quantized_weight, {bias_arg})"
             "  # repacks weight and bias\n"
             "# or build qm with torch.ao.nn.quantized."
             f"{conv_name(ctx.case)}.from_float(float_conv) after calibration"),
        path="as_given", impact=impact,
    )


def qcd025(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    if s is None:
        return
    w = ctx.case.weight
    for label, qp in (("weight", s.weight_qparams),
                      ("qconv weight", s.module.weight_qparams if s.module else None)):
        if qp is None or not qp.per_channel or (qp.axis or 0) % w.ndim == 0:
            continue
        run = ctx.as_given
        refused = run.report.refused if run is not None else None
        yield Finding(
            code="QCD025",
            severity="error",
            title=f"per-channel {label} quantized along axis {qp.axis}, not the output channels",
            message=(
                f"The {label} has {len(qp.scale)} per-channel scales along axis {qp.axis}; "
                f"torch's quantized conv applies per-channel scales to output channels (axis 0). "
                + (f"torch refused it: {refused}" if refused else
                   "torch accepts it and computes a wrong result (scale i applied to output "
                   "channel i).")
            ),
            evidence={"axis": qp.axis, "scales": len(qp.scale), "out_channels": int(w.shape[0]),
                      "torch_error": refused},
            fix="qw = torch.quantize_per_channel(w, scales, zero_points, 0, torch.qint8)  # axis 0",
            path="as_given", impact=1.0,
        )
