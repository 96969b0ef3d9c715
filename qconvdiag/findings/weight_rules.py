"""QCD020-QCD027: the weight, and the module that should hold it.

The weight's floor is per-channel symmetric qint8 (the finest grid torch offers). For a
per-tensor weight with excess, the measurement layer measured two candidates: a good per-tensor
scale and per-channel weights. The scale's choice is credited with what the good per-tensor
scale saves (QCD020/QCD021/QCD026), per-channel granularity with what it saves beyond that
(QCD023): each cause with its own gain.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from ..case import FoldedBatchNorm, trained_with_qat
from ..measure.budget import FAR
from ..measure.evidence import PathRun
from ..quantization.paths import FOREIGN_CODES
from ..quantization.qparams import QParams, clip_bounds, dequantize, narrowed
from ..report import Finding
from .base import Context, conv_name, excess, finding, fmt, material, severity
from .fixes import given_weight_fix, model_calibration, per_channel_qconfig, weight_fix

CLIPPING, ROUNDING = ("weight_clipping",), ("weight_rounding",)
#: Engines whose default qconfig quantizes weights per tensor (get_default_qconfig).
DEFAULT_PER_TENSOR = ("qnnpack",)
WEIGHT = CLIPPING + ROUNDING


def granularity_energy(run: PathRun) -> float:
    """Excess energy per-channel weights would remove beyond a good per-tensor scale."""
    b = run.report.budget
    if b is None or not b.weight_candidates:
        return 0.0
    now = b.stage("weight_clipping").measured ** 2 + b.stage("weight_rounding").measured ** 2
    good = b.weight_candidates["per_tensor_symmetric"] ** 2
    per_channel = b.weight_candidates["per_channel_symmetric"] ** 2
    return max(0.0, min(good, now) - per_channel)


#: Per-tensor weights cost beyond what a path's verdict shows when even a good per-tensor
#: scale leaves FAR times the weight error (RMSE) per-channel weights give, and that error is
#: at least this share of the path's error energy: the path is at its floor only because its
#: other stages' floor (the activations' rounding) is as large (a helper's conv whose BatchNorm
#: made one channel 40x the others: at its floor 1.21x, "nothing is misconfigured", while
#: per-channel weights took the model from 59% to 89% accuracy).
PER_TENSOR_SHARE = 1 / 3


def per_tensor_cost(run: PathRun) -> tuple[float, float] | None:
    """How many times the weight error per-channel weights give a per-tensor path's is (RMSE,
    a good per-tensor scale's at most), and its share of the path's error energy, where they
    are FAR and PER_TENSOR_SHARE or more, else None."""
    b = run.report.budget
    if b is None or run.spec.weight_qparams.per_channel or not b.weight_candidates:
        return None
    now = b.stage("weight_clipping").measured ** 2 + b.stage("weight_rounding").measured ** 2
    weight = min(now, b.weight_candidates["per_tensor_symmetric"] ** 2)
    per_channel = b.weight_candidates["per_channel_symmetric"] ** 2
    if per_channel <= 0 or b.rmse <= 0 or weight < FAR ** 2 * per_channel \
            or weight < PER_TENSOR_SHARE * b.rmse ** 2:
        return None
    return math.sqrt(weight / per_channel), min(weight / b.rmse ** 2, 1.0)


def scale_energy(run: PathRun, *stage_ids: str) -> float:
    """The weight stages' excess minus what per-channel granularity explains (split over the
    stages in proportion to their excess)."""
    total = excess(run, *WEIGHT)
    if total <= 0:
        return 0.0
    own = max(0.0, total - granularity_energy(run))
    return own * excess(run, *stage_ids) / total


def _axis_bounds(qp: QParams, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = clip_bounds(qp)
    if qp.per_channel and lo.size > 1:
        shape = [1] * w.ndim
        shape[(qp.axis or 0) % w.ndim] = -1
        return lo.reshape(shape), hi.reshape(shape)
    return lo.reshape(()), hi.reshape(())


def _symmetric_fix(ctx: Context, run: PathRun) -> str:
    return weight_fix(ctx.case, run.kernel.kernel, run.spec.weight_qparams.per_channel,
                      run.spec.input_qparams)


def qcd020(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        energy = scale_energy(run, *CLIPPING)
        if not material(run, energy):
            continue
        qp = run.spec.weight_qparams
        w = ctx.case.weight
        try:
            lo, hi = _axis_bounds(qp, w)
        except ValueError:
            continue
        # within half a step of a bound is rounding (torch's symmetric observers put the
        # largest weight exactly there: max|w| / 127.5 leaves it half a step above 127)
        half = np.asarray(qp.scales()).max() / 2 * (1 + 1e-3)  # float32 observers: 1e-5 off
        over, under = w > hi + half, w < lo - half
        n = int(over.sum() + under.sum())
        if n == 0:
            if not narrowed(qp):  # the half step of torch's 8-bit observers (127.5)
                yield from _half_step(ctx, run, energy, w, hi)
            continue
        where = []
        if over.any():
            where.append(f"{int(over.sum())} exceed the largest representable value "
                         f"{fmt(float(np.min(np.broadcast_to(hi, w.shape)[over])))}")
        if under.any():
            where.append(f"{int(under.sum())} fall below the smallest "
                         f"{fmt(float(np.max(np.broadcast_to(lo, w.shape)[under])))}")
        # QAT trained the weight with this clip where it keeps most of the weight's reach
        # (_qat_trim), even where it breaks the conv against its float twin: training adapted
        # the rest of the model to it, so it is info (a helper's QAT model, the clip of its
        # stem undone: that conv 3.5 dB closer to its float twin, the model 0.5 accuracy
        # points worse)
        trained = (trained_with_qat(ctx.case.notes) and run.report.name == "as_given"
                   and _qat_trim(w, lo, hi))
        yield finding(
            "QCD020", "info" if trained else severity(run, energy),
            "weight values clipped by the weight qparams",
            f"{n} of {w.size} weights are outside the representable range: "
            f"{' and '.join(where)}, and were clipped to it."
            + (" QAT trained this weight through its fake quantization, this clip included: "
               "the model learned with it, and undoing it on this conv alone can cost "
               "accuracy." if trained else ""),
            {"clipped": n, "total": int(w.size), "weight_min": float(w.min()),
             "weight_max": float(w.max()), "excess": energy},
            QAT_CLIP_FIX if trained else _symmetric_fix(ctx, run), run, energy, CLIPPING)


#: A QAT-trained weight's clip is one its fake quantization trained with (its moving average
#: of the weight's range lags a weight that grows in training, or a BatchNorm's statistics
#: that move) when every channel it clips keeps at least TRIM_KEEPS of its reach on each side:
#: helper-60's eager and PT2E QAT models clipped 2 and 4 of 144 stem weights, 9.5x and 25x the
#: floor against their float twins, and a scale that keeps them cost those models 12 and 34
#: accuracy points; a QAT model of a few steps with moving BatchNorm statistics clipped 19% and
#: 23% of two convs' weights, each keeping over 0.7 of its reach. A range cut by hand to a
#: third keeps a third.
QAT_CLIP_FIX = ("# nothing to change: QAT trained this weight with this clip and the model\n"
                "# learned with it (a scale that keeps these weights cost a helper's QAT\n"
                "# models 12 and 34 accuracy points)")


def _qat_trim(w: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> bool:
    """The clip of ``w`` by ``lo``/``hi`` (broadcast: per tensor, or per channel on any axis)
    keeps TRIM_KEEPS of each side's reach in every channel it clips: every weight beyond a
    bound lies within 1 / TRIM_KEEPS of it."""
    from .output_rules import TRIM_KEEPS

    top, bottom = np.broadcast_to(hi, w.shape), np.broadcast_to(lo, w.shape)
    over, under = w > top, w < bottom
    return bool(np.all(top[over] >= TRIM_KEEPS * w[over])
                and np.all(bottom[under] <= TRIM_KEEPS * w[under]))


#: The share of a path's excess the half-step clip of the largest weights must carry for
#: QCD020 to name it (pytorch#95785's identity conv: 25%; a sweep's 1x1 conv with 4 weights
#: per channel beside an input clipped away: 0.5%).
HALF_STEP_SHARE = 0.1


def _half_step(ctx: Context, run: PathRun, energy: float, w: np.ndarray, hi: np.ndarray
               ) -> Iterator[Finding]:
    """QCD020 for weights clipped by half a step at most, on the as_given path above its
    floor: torch's symmetric observers' scale max|w| / 127.5 puts each channel's largest
    weight on code 127.5, rounded to 128 and clipped to 127. One weight per channel there
    costs nothing; many of one magnitude (an identity or constant kernel, pytorch#95785: half
    the outputs one step low) cost a material share of the floor, which scale max|w| / 127
    avoids."""
    b = run.report.budget
    # above its floor by this clip: HALF_STEP_SHARE of the excess or more (an input clipped
    # away, with a few-weight conv's half steps beside it, is the input's)
    if run.report.name != "as_given" or b is None or b.verdict == "at_floor" \
            or energy < HALF_STEP_SHARE * b.excess:
        return
    qp = run.spec.weight_qparams
    top = w > hi + np.asarray(qp.scales()).max() * 1e-3
    n = int(top.sum())
    # many of one magnitude: two or more in one channel (one scale per channel) or in the
    # tensor (one scale): a lone largest weight is what the observer's scale means to clip
    # (helper-49: a healthy 16-weight qnnpack conv warned for its one largest weight)
    per_group = (top.reshape(top.shape[(qp.axis or 0) % w.ndim], -1).sum(axis=1)
                 if qp.per_channel and qp.axis is not None and (qp.axis or 0) % w.ndim == 0
                 else np.array([n]))
    if n == 0 or int(per_group.max()) < 2:
        return
    yield finding(
        "QCD020", severity(run, energy), "the largest weights clipped by half a step",
        f"{n} of {w.size} weights lie half a step above the largest code (at "
        f"{fmt(float(np.min(np.broadcast_to(hi, w.shape)[top])))} and were clipped there): "
        "torch's symmetric weight observers take scale max|w| / 127.5, which puts each "
        "channel's largest weight on code 127.5, rounded to 128 and clipped to 127. Where many "
        "weights share that magnitude the clip is systematic; scale max|w| / 127 keeps them "
        "(an observer with quant_min=-127, quant_max=127 gives it).",
        {"clipped": n, "total": int(w.size), "weight_min": float(w.min()),
         "weight_max": float(w.max()), "excess": energy},
        "# scale max|w| / 127: the largest weights on code 127, not clipped\n"
        + weight_fix(ctx.case, run.kernel.kernel, run.spec.weight_qparams.per_channel,
                     run.spec.input_qparams, levels=127),
        run, energy, CLIPPING)


def qcd021(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    run = ctx.as_given
    if s is None or run is None:
        return
    qp = s.weight_qparams or (s.module.weight_qparams if s.module else None)
    if qp is None or qp.dtype != "qint8" or qp.per_channel:
        return
    w = ctx.case.weight
    given = (qp.zero_point_given or qp.zero_point)[0]
    unsigned_formula = -float(w.min()) / qp.scale[0]
    top = (127 - qp.zero_point[0]) * qp.scale[0]
    # quint8's formula: -min/scale; it matters where it leaves the top of the weights out by
    # more than half a step (torch's symmetric observers leave the largest weight half a step
    # above 127, whose zero point 0 is -min/scale too where no weight is negative; float32
    # observers: 1e-5 off)
    half = qp.scale[0] / 2 * (1 + 1e-3)
    if abs(given - unsigned_formula) > 1.0 or top >= float(w.max()) - half:
        return
    signed = -128 - float(w.min()) / qp.scale[0]
    energy = scale_energy(run, *WEIGHT)
    yield finding(
        "QCD021", severity(run, energy, "warning"),
        "quint8's zero point formula used for qint8 weights",
        f"The weight zero point {fmt(given)} is -min/scale, the formula for quint8's range "
        f"0..255. qint8 spans -128..127, so its formula is -128 - min/scale = {fmt(signed)}: "
        f"with {qp.zero_point[0]} (torch truncates {fmt(given)}) the codes run up to 127 at "
        f"{fmt(top)}, below the weight's max {fmt(float(w.max()))}.",
        {"zero_point_given": given, "zero_point_used": qp.zero_point[0],
         "unsigned_formula": unsigned_formula, "signed_formula": signed,
         "scale": qp.scale[0], "excess": energy},
        "# symmetric qint8 weights, which every engine accepts:\n" + _symmetric_fix(ctx, run),
        run, energy, WEIGHT)


def qcd022(ctx: Context) -> Iterator[Finding]:
    for engine in ctx.engines:
        run = ctx.run("as_given", engine)
        if run is None or run.kernel.kernel != "onednn":
            continue
        held = run.spec.module.weight_qparams if run.spec.module else None
        for label, qp in (("weight", run.spec.weight_qparams), ("module's weight", held)):
            if qp is None or all(z == 0 for z in qp.zero_point):
                continue
            yield finding(
                "QCD022", "error", f"{engine} requires symmetric weights (zero point 0)",
                f"The {label} zero point is {qp.zero_point[0]}; {engine} refuses any weight "
                f"zero point other than 0" + (f". torch says: {run.report.refused}"
                                              if run.report.refused else
                                              ": torch refuses it when it packs the weight"),
                {"engine": engine, "tensor": label, "zero_point": list(qp.zero_point)[:8],
                 "torch_error": run.report.refused},
                weight_fix(ctx.case, "onednn", qp.per_channel, run.spec.input_qparams), run)
            break


def qcd023(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        b = run.report.budget
        if b is None or run.spec.weight_qparams.per_channel or not b.weight_candidates:
            continue
        w = ctx.case.weight
        if w.shape[0] < 2:
            continue
        energy = granularity_energy(run)
        if not material(run, energy):
            continue
        per_ch = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        spread = float(per_ch.max() / max(per_ch[per_ch > 0].min(), 1e-300)) if per_ch.any() \
            else 1.0
        good = b.weight_candidates["per_tensor_symmetric"]
        then = b.weight_candidates["per_channel_symmetric"]
        # granularity is a design choice: a warning only when per-channel weights would halve
        # the path's error energy (3 dB), and never where per-tensor is the engine's default
        # (qnnpack): there it is the default's trade-off, named as advice
        level = severity(run, energy)
        if level == "warning" and (energy < 0.5 * b.rmse ** 2
                                   or run.report.engine in DEFAULT_PER_TENSOR):
            level = "info"
        cost = per_tensor_cost(run)
        beyond = ""
        if cost is not None and b.verdict == "at_floor":
            # at its floor by its whole error, with a weight error the floor does not show
            beyond = (f" That is {cost[0]:.1f}x what per-channel weights give, and "
                      f"{cost[1]:.0%} of this layer's error: it is at its floor overall only "
                      "because the floor of its other stages is as large.")
            if run.report.engine not in DEFAULT_PER_TENSOR:
                level = "warning"
        yield finding(
            "QCD023", level, "per-channel weights would cut the weight error",
            f"The {run.report.name} path quantizes the weight per tensor; its output channels' "
            f"ranges differ up to {fmt(spread)}x. With a good per-tensor scale the weight error "
            f"would be {fmt(good)} RMSE; per-channel symmetric weights make it {fmt(then)}."
            + beyond,
            {"rmse_per_tensor_symmetric": good, "rmse_per_channel": then,
             "channel_range_ratio": spread, "excess": energy},
            weight_fix(ctx.case, run.kernel.kernel, True, run.spec.input_qparams)
            + ("\n# in the FX flow: qconfig_mapping.set_global(qconfig), with\n"
               if ctx.case.model_flow == "fx" else
               "\n# in the eager flow: model.qconfig = qconfig, with\n")
            + per_channel_qconfig(run.report.engine),
            run, energy, WEIGHT)


def module_weight_problem(ctx: Context, run: PathRun) -> str | None:
    """Why the module's weight is not the weight that was meant (None when it is)."""
    m = run.spec.module
    if m is None:
        return None
    intended = dequantize(run.spec.weight_codes, run.spec.weight_qparams)
    held = dequantize(m.weight_codes, m.weight_qparams)
    if np.array_equal(intended, held):
        return None
    moved = moved_weight(run)
    if moved is not None:  # one step off in some codes (of any channel's step): named as such
        off, far, total = moved
        return (f"the float weight quantized with the module's own qparams, but with "
                f"{off} of its {total} codes ({off / total:.0%}) off, "
                + (f"{far} of them by more than one step" if far else "each by one step"))
    diff = float(np.abs(held - intended).max())
    if diff <= 0.5 * float(np.max(run.spec.weight_qparams.scales())):
        return None
    fresh = not m.weight_qparams.per_channel and m.weight_qparams.scale[0] == 1.0 \
        and m.weight_qparams.zero_point[0] == 0
    zeros = not np.any(m.weight_codes - np.asarray(m.weight_qparams.zero_point).reshape(
        (-1,) + (1,) * (m.weight_codes.ndim - 1)))
    if fresh:
        return ("all zeros at scale 1.0, a freshly built module's weight: never set"
                if zeros else "uninitialised codes at scale 1.0, a freshly built module's "
                "weight: never set")
    if zeros:
        return "all zeros"
    rescaled = _rescaled_codes(run.spec.weight_codes, run.spec.weight_qparams, m.weight_codes,
                               m.weight_qparams)
    if rescaled is not None:
        return rescaled
    return (f"{ANOTHER_WEIGHT} {fmt(float(np.abs(held).max()))}, {fmt(diff)} away from the "
            "meant weight")


#: How ``module_weight_problem`` begins its text for another weight altogether (not a fresh
#: module's, not the meant codes at another scale, not the meant weight moved by a step).
ANOTHER_WEIGHT = "values up to"


def moved_weight(run: PathRun) -> tuple[int, int, int] | None:
    """(codes off, codes more than one step off, codes) when the module holds the weight
    meant at the same qparams but for codes off it, nearly all by one step
    (paths.moved_codes: the float weight moved after convert), else None."""
    m = run.spec.module
    qp = run.spec.weight_qparams
    if m is None or m.weight_codes.shape != run.spec.weight_codes.shape \
            or (qp.scale, qp.zero_point, qp.axis) != (m.weight_qparams.scale,
                                                      m.weight_qparams.zero_point,
                                                      m.weight_qparams.axis):
        return None
    step = np.abs(run.spec.weight_codes.astype(np.int64) - m.weight_codes.astype(np.int64))
    off, far = int(np.count_nonzero(step)), int(np.count_nonzero(step > 1))
    if off == 0 or far > FOREIGN_CODES * step.size:  # far off: another weight altogether
        return None
    return off, far, int(step.size)


def pt2e_requantize(ctx: Context) -> str | None:
    """A PT2E model's conv has no module to repack (its weight and bias are constants of the
    converted graph): the fix of a module's state quantizes the model again from this float
    model; None for another conv."""
    from ..arithmetic.engines import PT2E_ENGINES

    if ctx.case.in_model and (ctx.case.flow == "pt2e" or ctx.case.engine in PT2E_ENGINES):
        return ("# quantize the model again from this float model (its weights are\n"
                "# constants of the converted graph: no module to repack)\n"
                + model_calibration("pt2e"))
    return None


def other_weights_requantize(ctx: Context, run: PathRun) -> str | None:
    """A model walk's conv whose module holds another float weight altogether: the quantized
    model was made from other float weights (another checkpoint loaded, or training on, after
    convert), and its output scales, this conv's and those after it, were calibrated on what
    those weights computed. Repacking this conv's weight alone keeps them (helper-65: every
    conv's repack took a digits CNN from another seed's checkpoint to 7.6% accuracy, quantizing
    again to the float model's 99.0%): its fix quantizes the model again; None for another
    conv."""
    from ..case import trained_with_qat

    # a QAT model's weights are what training made: quantizing its float twin again would
    # throw them away
    if not ctx.case.in_model or trained_with_qat(ctx.case.notes):
        return None
    problem = module_weight_problem(ctx, run)
    if problem is None or not problem.startswith(ANOTHER_WEIGHT):
        return None
    return ("# quantize the model again from this float model: the quantized one was made\n"
            "# from other float weights, and its output scales were calibrated on what\n"
            "# they computed (repacking this conv's weight alone keeps those scales)\n"
            + model_calibration(_model_flow(ctx)))


def _model_flow(ctx: Context) -> str:
    """The flow a model walk's conv was quantized with (eager, fx or pt2e)."""
    from ..arithmetic.engines import PT2E_ENGINES

    return ctx.case.model_flow or ("pt2e" if ctx.case.pt2e or ctx.case.engine in PT2E_ENGINES
                                   else "eager")


def _moved_fix(ctx: Context) -> str:
    """Repack the float weight at the module's own qparams (torch's readback of them)."""
    again = pt2e_requantize(ctx)
    if again is not None:
        return again
    name = conv_name(ctx.case)
    per_channel = ("qw = torch.quantize_per_channel(\n"
                   "    conv.weight.detach(), old.q_per_channel_scales(),\n"
                   "    old.q_per_channel_zero_points(), old.q_per_channel_axis(), old.dtype)")
    per_tensor = ("qw = torch.quantize_per_tensor(\n"
                  "    conv.weight.detach(), old.q_scale(), old.q_zero_point(), old.dtype)")
    qp = ctx.case.setup.module.weight_qparams if ctx.case.setup and ctx.case.setup.module \
        else None
    return ("# quantize this float weight at the module's own qparams (conv: the float\n"
            f"# {name}, its BatchNorm folded in where the quantized one has it), or\n"
            "# convert again from this float model: prepare, calibrate, convert\n"
            "old = qm.weight()\n"
            f"{per_channel if qp is not None and qp.per_channel else per_tensor}\n"
            "qm.set_weight_bias(qw, conv.bias)  # repacks weight and bias")


def _rescaled_codes(codes: np.ndarray, qp: QParams, held_codes: np.ndarray,
                    held_qp: QParams) -> str | None:
    """How the module's weight differs when it holds the meant weight's codes and zero
    points at other scales (a scale written by hand after convert), else None."""
    if codes.shape != held_codes.shape or not np.array_equal(codes, held_codes) \
            or tuple(qp.zero_point) != tuple(held_qp.zero_point):
        return None
    ratio = (np.asarray(held_qp.scales(), np.float64).reshape(-1)
             / np.asarray(qp.scales(), np.float64).reshape(-1))
    low, high = float(ratio.min()), float(ratio.max())
    times = f"{fmt(low)}x" if high <= low * 1.001 else f"{fmt(low)}x to {fmt(high)}x"
    return (f"the meant weight's codes at {times} their scale ({fmt(float(held_qp.scale[0]))} "
            f"for {fmt(float(qp.scale[0]))}): a weight scale written after convert")


#: QCD027's evidence. A channel of fewer weights fits any factor, so it proves nothing.
FOLD_MIN_WEIGHTS = 4
#: The module's weight is the float weight times one factor per output channel when what is
#: left after the fit is within this many of the channel's weight steps (RMS; rounding alone
#: leaves 0.29, 1/sqrt(12))...
FOLD_FIT_STEPS = 0.5
#: ...and the factors explain at least this share of the difference's energy...
FOLD_EXPLAINED = 0.75
#: ...and none is near 0 (an all-zero module weight fits a factor 0: never set, QCD024)...
FOLD_SMALLEST = 0.01
#: ...and they differ: the largest |factor| at least this many times the smallest. A
#: BatchNorm's gamma / sqrt(var + eps) differs per channel in any trained model; one factor
#: for every channel is a weight scale written by hand (QCD024 says so), not a fold.
FOLD_SPREAD = 1.1


class Fold(NamedTuple):
    """``batchnorm_fold``'s evidence."""

    low: float
    high: float
    """The smallest and the largest factor."""
    fit: float
    """The worst channel's RMS left after the fit, in its weight steps."""
    explained: float
    """The share of the difference's energy the factors explain."""
    factors: np.ndarray
    """Per output channel (NaN for an all-zero float channel: none to fit)."""


def batchnorm_fold(ctx: Context, run: PathRun) -> Fold | None:
    """The factors when the module's weight is the float weight scaled per output channel, up
    to rounding: what folding a BatchNorm into the conv gives (w * gamma / sqrt(var + eps)),
    while the float weight is the conv's before BatchNorm. All-zero float channels (pruned)
    must be zero in the module too, at least half the channels (two or more) carry a factor,
    and the factors differ (FOLD_SPREAD). None when it is not, or not shown.

    E.g. float weights (0.1, -0.2, 0.3, 0.05) in channel 0, module weight codes (12, -24, 36, 6)
    at step 0.0125: the factor is 1.5 and nothing is left but rounding."""
    m = run.spec.module
    if m is None or module_weight_problem(ctx, run) is None:
        return None
    w = ctx.case.weight.astype(np.float64)
    out = w.shape[0]
    if w[0].size < FOLD_MIN_WEIGHTS:
        return None
    held = dequantize(m.weight_codes, m.weight_qparams).reshape(out, -1)
    w = w.reshape(out, -1)
    steps = np.broadcast_to(np.asarray(m.weight_qparams.scales(), np.float64).reshape(-1),
                            (out,))
    norms = (w * w).sum(axis=1)
    live = norms > 0  # a pruned (all-zero) channel stays zero when folded: no factor to fit
    if np.count_nonzero(live) < max(2, out // 2) \
            or np.any(np.abs(held[~live]) > 0.5 * steps[~live, None]):
        return None
    factors = np.where(live, (held * w).sum(axis=1) / np.where(live, norms, 1.0), 1.0)
    left = held - factors[:, None] * w
    fit = float(np.max(np.sqrt((left * left).mean(axis=1)) / steps))
    difference = float(((held - w) ** 2).sum())
    explained = 1.0 - float((left * left).sum()) / difference if difference > 0 else 0.0
    smallest = float(np.abs(factors[live]).min())
    if fit > FOLD_FIT_STEPS or explained < FOLD_EXPLAINED or smallest < FOLD_SMALLEST \
            or float(np.abs(factors[live]).max()) < FOLD_SPREAD * smallest:
        return None
    return Fold(float(factors[live].min()), float(factors[live].max()), fit, explained,
                np.where(live, factors, np.nan))


#: A fold with another eps: the factors are sqrt((var + eps) / (var + eps')) for one eps' on
#: every channel to within this (relative; a fitted factor's own error is ~0.7% / sqrt(its
#: weights), so 2% tells one eps from moved statistics)...
EPS_FIT = 0.02
#: ...fitted on the channels whose factor differs from 1 by at least this much (the others
#: tell nothing of eps': their variance is far above it).
EPS_INFORMATIVE = 0.01
#: The eps torchao's prepare_qat_pt2e writes on every batch_norm it rewrites, whatever the
#: model's (pytorch/ao#4107, #2980: ``export_utils._replace_batchnorm``, ``qat_utils``).
TORCHAO_QAT_EPS = 1e-5


def refolded_eps(factors: np.ndarray, bn: FoldedBatchNorm) -> float | None:
    """The eps' with which the quantized model folded ``bn`` when that explains the factors
    (``Fold.factors``) on every channel: w * gamma / sqrt(var + eps') against the float model's
    w * gamma / sqrt(var + eps); None when no eps' does (its statistics moved, or gamma)."""
    var = np.asarray(bn.running_var, dtype=np.float64)
    live = np.isfinite(factors) & (factors > 0)
    if var.shape != factors.shape or not np.any(live):
        return None
    f, v = factors[live], var[live]
    informative = np.abs(f - 1.0) >= EPS_INFORMATIVE
    if not np.any(informative):
        return None
    eps = float(np.median((v[informative] + bn.eps) / f[informative] ** 2 - v[informative]))
    if not eps > 0 or math.isclose(eps, bn.eps, rel_tol=0.1):
        return None
    predicted = np.sqrt((v + bn.eps) / (v + eps))
    if float(np.max(np.abs(f / predicted - 1.0))) > EPS_FIT:
        return None
    return eps


def qcd027(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None:
        return
    fold = batchnorm_fold(ctx, run)
    if fold is None:
        return
    energy = excess(run, "module_state")
    bn = ctx.case.folded_bn
    if bn is not None:  # a model walk's conv: the float weight has the BatchNorm folded in
        yield _refolded(ctx, run, fold, bn, energy)
        return
    low, high, fit, explained = fold.low, fold.high, fold.fit, fold.explained
    yield finding(
        "QCD027", severity(run, energy, "warning"),
        "the float reference is the conv before BatchNorm; the quantized conv has it folded in",
        f"The quantized {conv_name(ctx.case)}'s weight is the float weight times one factor per "
        f"output channel ({fmt(low)} to {fmt(high)}), up to rounding ({fmt(fit)} steps RMS "
        f"left at most, {explained:.0%} of the difference explained): a BatchNorm folded into "
        "the conv (prepare_pt2e, fuse_modules and QAT's ConvBn do), compared with the conv "
        "before it. The quantized conv is not at fault; its float reference is (torchao's "
        "numeric debugger compares this way and gives ~0 dB on every BN-folded conv). Its "
        "bias differs for the same reason.",
        {"factor_min": low, "factor_max": high, "fit_steps": fit, "explained": explained,
         "excess": energy},
        "# compare with the float conv with the same BatchNorm folded in (bn: the\n"
        "# BatchNorm that follows conv in the float model, in eval mode)\n"
        "conv = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())\n"
        "# a whole model: qconvdiag.capture_model(model, quantized, ...) folds it",
        run, energy, ("module_state",))


def _refolded(ctx: Context, run: PathRun, fold: Fold, bn: FoldedBatchNorm, energy: float
              ) -> Finding:
    """QCD027 for a model walk's conv, whose float weight has the float model's BatchNorm
    folded in already: the quantized model folded that BatchNorm with another eps (torchao's
    QAT writes 1e-05), or with other statistics than the float model's now."""
    flow = _model_flow(ctx)
    eps = refolded_eps(fold.factors, bn)
    shown = (f"one factor per output channel ({fmt(fold.low)} to {fmt(fold.high)}, "
             f"{fmt(fold.fit)} weight steps RMS left at most)")
    evidence = {"factor_min": fold.low, "factor_max": fold.high, "fit_steps": fold.fit,
                "explained": fold.explained, "batchnorm": bn.name, "batchnorm_eps": bn.eps,
                "excess": energy}
    if eps is not None:
        torchao = flow == "pt2e" and math.isclose(eps, TORCHAO_QAT_EPS, rel_tol=0.1)
        eps = TORCHAO_QAT_EPS if torchao else float(f"{eps:.2g}")  # as it was written
        fix = (_QAT_EPS_FIX.format(eps=bn.eps) if torchao else
               f"# quantize the model again from this float model (its BatchNorm's eps is\n"
               f"# {fmt(bn.eps)}; the quantized model was converted with eps {fmt(eps)})\n"
               + model_calibration(flow))
        return finding(
            "QCD027", severity(run, energy, "warning"),
            f"BatchNorm {bn.name} folded with eps {fmt(eps)}, not its {fmt(bn.eps)}",
            f"The quantized {conv_name(ctx.case)}'s weight is the float model's, with its "
            f"BatchNorm {bn.name} folded in, times {shown}: sqrt((running_var + {fmt(bn.eps)}) "
            f"/ (running_var + {fmt(eps)})) gives each within {EPS_FIT:.0%}. The quantized model "
            f"folded the BatchNorm with eps {fmt(eps)}, not {fmt(bn.eps)}: a channel whose "
            "running variance is near eps or below is scaled up, its outputs with it. "
            + ("torchao's prepare_qat_pt2e writes eps 1e-05 (and momentum 0.1) on every "
               "batch_norm it rewrites, whatever the model's (pytorch/ao#4107, #2980)."
               if torchao else ""),
            {**evidence, "folded_eps": eps}, fix, run, energy, ("module_state",))
    return finding(
        "QCD027", severity(run, energy, "warning"),
        f"BatchNorm {bn.name} folded with other statistics than the float model's",
        f"The quantized {conv_name(ctx.case)}'s weight is the float model's, with its "
        f"BatchNorm {bn.name} folded in, times {shown}, which no single eps explains: the "
        "quantized model folded the BatchNorm's running statistics (or gamma) as they were "
        "at convert, and the float model's moved since (QAT trained them in the prepared "
        "model, or the float model ran in training mode).",
        evidence,
        "# capture with the float model the quantized one was converted from (QAT: its\n"
        "# trained BatchNorm buffers and weights), or quantize again from this one\n"
        + model_calibration(flow), run, energy, ("module_state",))


_QAT_EPS_FIX = (
    "# torchao's prepare_qat_pt2e folds every BatchNorm with eps 1e-05: before\n"
    "# torch.export, give each that eps and running_var + (eps - 1e-05), so that\n"
    "# running_var + eps, the eval output and the fold stay as they are\n"
    "for m in model.modules():\n"
    "    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.eps != 1e-05:\n"
    "        with torch.no_grad():\n"
    "            m.running_var += m.eps - 1e-05\n"
    "        m.eps = 1e-05\n"
    "# then export, prepare_qat_pt2e, train or calibrate, convert_pt2e as before\n"
    "# (your BatchNorms had eps {eps:g})")


def qcd024(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None or run.spec.module is None:
        return
    problem = module_weight_problem(ctx, run)
    if problem is None or batchnorm_fold(ctx, run) is not None:  # QCD027 explains it
        return
    from .bias_rules import bias_energy

    energy = max(0.0, excess(run, "module_state") - bias_energy(ctx, run))
    if moved_weight(run) is not None:
        yield _qcd024_moved(ctx, run, problem, energy)
        return
    fix = _qcd024_fix(ctx, run)
    yield finding(
        "QCD024", severity(run, energy, "warning"),
        "the module's weight is not the float weight",
        f"The quantized {conv_name(ctx.case)} runs a weight of {problem}, not the quantized "
        "float weight "
        f"(max {fmt(float(np.abs(ctx.case.weight).max()))}){_how(problem)}"
        "`qm.weight().data = w` changes nothing: qm.weight() unpacks a fresh copy of the packed "
        "params, and the module keeps running its original weight; qm.set_weight_bias(w, b) "
        "repacks.",
        {"module_weight": problem, "module_weight_scale": run.spec.module.weight_qparams.scale[0],
         "excess": energy},
        fix + ("" if pt2e_requantize(ctx) or other_weights_requantize(ctx, run) else
               f"\n# or build qm with {conv_name(ctx.case)}.from_float after calibration "
               "(QCD050)"),
        run, energy, ("module_state",))


def _qcd024_fix(ctx: Context, run: PathRun) -> str:
    """QCD024's fix for a module that holds another weight: the meant weight (or a symmetric
    one) and the float bias, packed again."""
    again = pt2e_requantize(ctx) or other_weights_requantize(ctx, run)
    if again is not None:
        return again
    if moved_weight(run) is not None:
        return _moved_fix(ctx)
    intended_qp = run.spec.weight_qparams
    fix = given_weight_fix(ctx.case, run.kernel.kernel, intended_qp, run.spec.input_qparams) \
        if not intended_qp.source.startswith("observer") else None
    return fix if fix is not None else _symmetric_fix(ctx, run)


def module_weight_fix(ctx: Context, run: PathRun) -> str | None:
    """QCD024's fix where the module holds another weight than the meant one (it packs the
    float bias with it), else None."""
    if module_weight_problem(ctx, run) is None or batchnorm_fold(ctx, run) is not None:
        return None
    return _qcd024_fix(ctx, run)


def _how(problem: str) -> str:
    """How a module comes to hold ``problem`` (module_weight_problem), where that is not
    plain: another float weight, or a new weight that never reached it."""
    if "never set" in problem or problem == "all zeros" or "written after convert" in problem:
        return ". "
    return (": it was made from other float weights (training continued, or another "
            "checkpoint loaded, after convert; after QAT, pass the QAT model convert was called "
            "on), or a new weight never reached it. ")


def _qcd024_moved(ctx: Context, run: PathRun, problem: str, energy: float) -> Finding:
    """QCD024 for a weight that moved after convert: graded by what it costs (a warning
    only where it costs MATERIAL of the floor), unlike another weight altogether."""
    return finding(
        "QCD024", severity(run, energy),
        "the module's weight is not this float weight quantized: it moved after convert",
        f"The quantized {conv_name(ctx.case)} runs {problem}: the quantized model was "
        "converted from other float weights than these (the float model trained on after "
        "convert, or another checkpoint loaded; after QAT, pass the QAT model convert was "
        "called on, whose float twin is captured), so part of the error measured here is the "
        "move, not quantization.",
        {"module_weight": problem,
         "module_weight_scale": run.spec.module.weight_qparams.scale[0]
         if run.spec.module is not None else None,
         "excess": energy},
        _moved_fix(ctx), run, energy, ("module_state",))


def qcd025(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    run = ctx.as_given
    if s is None or run is None:
        return
    w = ctx.case.weight
    for label, qp in (("weight", s.weight_qparams),
                      ("qconv weight", s.module.weight_qparams if s.module else None)):
        if qp is None or not qp.per_channel or (qp.axis or 0) % w.ndim == 0:
            continue
        refused = run.report.refused
        b = run.report.budget
        # every output channel scaled by another channel's scale: it shows in the chain, not
        # in the weight's effect alone, so it is credited with the path's whole excess
        energy = max(excess(run, *WEIGHT, "module_state"), 0.0 if b is None else b.excess)
        yield finding(
            "QCD025", "error" if refused else severity(run, energy, "warning"),
            f"per-channel {label} scales along axis {qp.axis}, not 0",
            f"The {label} has {len(qp.scale)} per-channel scales along axis {qp.axis}; "
            "torch's quantized conv applies per-channel scales to output channels (axis 0). "
            + (f"torch refused it: {refused}" if refused else
               "torch accepts it and computes a wrong result (scale i applied to output "
               "channel i)."),
            {"axis": qp.axis, "scales": len(qp.scale), "out_channels": int(w.shape[0]),
             "torch_error": refused, "excess": energy},
            weight_fix(ctx.case, run.kernel.kernel, True, run.spec.input_qparams),
            run, energy, WEIGHT)


def qcd026(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        b = run.report.budget
        energy = scale_energy(run, *ROUNDING)
        if b is None or not material(run, energy):
            continue
        qp = run.spec.weight_qparams
        w = ctx.case.weight
        top = float(np.abs(w).max())
        if qp.per_channel:
            ratio = b.weight_step_ratio
        else:
            ratio = float(qp.scale[0]) / (top / 127.5) if top > 0 else 1.0
        if ratio < 1.5:
            continue
        steps = qp.scales()
        zps = np.asarray(qp.zero_point).reshape((-1,) + (1,) * (w.ndim - 1)) \
            if qp.per_channel else qp.zero_point[0]
        vanished = int(np.count_nonzero((run.spec.weight_codes == zps) & (w != 0)))
        if narrowed(qp) and ratio * (qp.qmax - qp.qmin) / 2 / 127.5 < 1.5:
            yield _few_levels(ctx, run, energy, ratio, vanished)
            continue
        yield finding(
            "QCD026", severity(run, energy),
            "weight step too coarse for the weight's range",
            f"The weight scale {fmt(float(steps.max()))} is {fmt(ratio)}x what the weight's "
            f"range needs ({fmt(top / 127.5)} = max|w| / 127.5); {vanished} of {w.size} nonzero "
            f"weights round to the zero point, and weight rounding adds "
            f"{fmt(b.stage('weight_rounding').measured)} RMSE where "
            f"{fmt(b.stage('weight_rounding').floor)} would do.",
            {"scale": float(steps.max()), "step_ratio": ratio, "vanished": vanished,
             "total": int(w.size), "excess": energy},
            _symmetric_fix(ctx, run), run, energy, ROUNDING)


def _few_levels(ctx: Context, run: PathRun, energy: float, ratio: float, vanished: int
                ) -> Finding:
    """QCD026 for weights on fewer levels than qint8 has, on purpose: a weight observer's
    quant_min/quant_max (4 bits: -8..7, as in pytorch/ao#2138), its step what that range needs
    for the weight. What they cost is measured against 8-bit weights; a choice, not a slip,
    so a warning at most."""
    b = run.report.budget
    assert b is not None
    qp = run.spec.weight_qparams
    levels = qp.qmax - qp.qmin + 1
    bits = math.log2(levels)
    name = f"{int(bits)}-bit weights" if bits.is_integer() else f"weights on {levels} levels"
    level = severity(run, energy)
    return finding(
        "QCD026", "warning" if level == "error" else level,
        f"{name}: codes {qp.qmin}..{qp.qmax} (quant_min/quant_max)",
        f"The module's weight codes lie within {qp.qmin}..{qp.qmax}, as a weight observer with "
        f"quant_min={qp.qmin}, quant_max={qp.qmax} gives: {levels} levels, a step "
        f"{fmt(ratio)}x what 8-bit weights need for this weight's range; {vanished} of "
        f"{ctx.case.weight.size} nonzero weights round to the zero point, and weight rounding "
        f"adds {fmt(b.stage('weight_rounding').measured)} RMSE where 8-bit weights add "
        f"{fmt(b.stage('weight_rounding').floor)}. What the accuracy of {name} needs is "
        "training with them (QAT, its fake quantization on until convert, so the scales it "
        "trained with are the ones converted).",
        {"scale": float(qp.scales().max()), "step_ratio": ratio, "vanished": vanished,
         "total": int(ctx.case.weight.size), "excess": energy, "quant_min": qp.qmin,
         "quant_max": qp.qmax},
        "# 8-bit weights: the default weight observer's range\n"
        + _symmetric_fix(ctx, run), run, energy, ROUNDING)


def qcd028(ctx: Context) -> Iterator[Finding]:
    """Weights that are not qint8 (quint8, as the activations are): fbgemm and qnnpack (and
    x86, whichever it hands the conv to) refuse them when they pack the weight; onednn takes
    quint8 codes with zero point 0 and reads their bytes as int8, so codes above 127 turn
    negative (with another zero point it refuses them: QCD022)."""
    for engine in ctx.engines:
        run = ctx.run("as_given", engine)
        if run is None:
            continue
        held = run.spec.module.weight_qparams if run.spec.module else None
        held_codes = run.spec.module.weight_codes if run.spec.module else None
        for label, qp, codes in (("weight", run.spec.weight_qparams, run.spec.weight_codes),
                                 ("module's weight", held, held_codes)):
            if qp is None or codes is None or qp.dtype == "qint8":
                continue
            if run.kernel.kernel == "onednn":
                flipped = int(np.count_nonzero(codes > 127))
                if any(z != 0 for z in qp.zero_point):
                    continue  # QCD022 names the zero point
                if not flipped:  # read the same: worth knowing, as the other engines refuse
                    yield finding(
                        "QCD028", "info", f"{label} is {qp.dtype}: it runs on onednn only",
                        f"The {label} is quantized to {qp.dtype}. onednn reads its bytes as "
                        f"int8, and every code here is below 128, so they read the same; "
                        "fbgemm, qnnpack and x86 refuse quint8 weights, and a weight whose "
                        "codes reach 128 would turn negative here.",
                        {"engine": engine, "tensor": label, "dtype": qp.dtype},
                        weight_fix(ctx.case, run.kernel.kernel, qp.per_channel,
                                   run.spec.input_qparams), run)
                    break
                what = (f"onednn reads {qp.dtype} weight bytes as int8: {flipped} of "
                        f"{codes.size} codes are above 127 and turn negative (code c reads as "
                        "c - 256)")
            else:
                what = (f"{engine} refuses {qp.dtype} weights when it packs them"
                        + (f". torch says: {run.report.refused}" if run.report.refused
                           else ""))
            yield finding(
                "QCD028", "error", f"{label} is {qp.dtype}: quantized convs take qint8 weights",
                f"The {label} is quantized to {qp.dtype}; every engine's conv takes qint8 "
                f"weights (onednn only with zero point 0). {what}.",
                {"engine": engine, "tensor": label, "dtype": qp.dtype,
                 "torch_error": run.report.refused},
                weight_fix(ctx.case, run.kernel.kernel, qp.per_channel, run.spec.input_qparams),
                run, excess(run, *WEIGHT), WEIGHT)
            break
