"""QCD050-QCD053: output requantization."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..arithmetic.engines import PT2E_ENGINES
from ..case import ConvCase, trained_with_qat
from ..measure.budget import output_span
from ..measure.evidence import PathRun
from ..quantization.qparams import DTYPE_RANGES
from ..report import Finding
from .base import Context, excess, finding, fmt, material, severity
from .fixes import eager_flow, output_fix
from .qparams_rules import observer_default

OUTPUT = ("output_rounding", "output_clipping")
#: Output-scale verdicts rest on the float output's range: fewer values do not show one.
MIN_OUTPUTS_FOR_SCALE = 16
#: Saturation a histogram observer's trim gives (the default activation observer of both of
#: torch's flows): at most this fraction of the outputs (the 0.5% ``budget.uses_seven_bits``
#: allows for trimmed outliers too), beyond a range that keeps at least TRIM_KEEPS of the float
#: output's reach on that side. Where it would be a warning, it is said (info) instead: the
#: observer trades those outliers for a finer step by design. It stays an error where it breaks
#: the path, and keeps its severity on output qparams the user wrote.
TRIMMED_OUTLIERS = 0.005
#: ...or at most this many outputs, where there are too few for a fraction (a squeeze-excite
#: conv's 96 outputs): a sample other than the calibration data reaches past the trim by chance.
#: So many or fewer, where they are TRIMMED_OUTLIERS of the values too, are said (info) even
#: where they break the path: one or two values past a trim are no evidence that the range is
#: wrong (helper-64's SE squeeze conv, 1 of 800 outputs 18% past its histogram observer's
#: range, 7x its floor: the fix left accuracy where it was).
TRIMMED_FEW = 2
TRIM_KEEPS = 0.5


def _y0(run: PathRun) -> np.ndarray:
    y = run.output_reference
    assert y is not None
    return y


def _covered(ctx: Context, run: PathRun) -> np.ndarray:
    """The values good output qparams cover (for their fix): the float output, or in a model
    walk its range widened to the float model's (``budget.output_span``)."""
    y0 = _y0(run)
    if ctx.case.output_range is None:
        return y0
    return np.asarray(output_span(ctx.case, y0), dtype=np.float64)


def _output_fix(ctx: Context, run: PathRun) -> str:
    """``output_fix`` over ``_covered``, its comment naming the calibration batches when their
    range widened it (a model walk's: the message's numbers are the captured samples')."""
    calibrated = ctx.case.output_range is not None and not ctx.case.output_range_sampled
    what = ("the float output on calibration and captured inputs" if calibrated
            else "the float output")
    case = ctx.case
    graph_conv = case.layer if case.pt2e and case.in_model else None
    return output_fix(_covered(ctx, run), what, run.report.engine, graph_conv)[0]


#: Output qparams at the defaults are named in a model walk, whatever the error on the input
#: the conv received, where scale 1.0 is this many times the step the float model's range at
#: the conv needs (QCD052's bound).
COARSE_DEFAULTS = 1.5


def qcd050(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    s = ctx.case.setup
    if run is None or s is None or run.float_output is None:
        return
    qp = run.spec.final_output_qparams
    if not observer_default(qp) or (s.output_qparams is not None and s.module is None):
        return  # not defaults, or the user wrote scale 1.0 / zero point 0 themselves
    # the intended output qparams are the defaults too (none given), or only the module
    # holds them: then the module_state rung carries their cost
    stages = OUTPUT if observer_default(run.spec.output_qparams) else ("module_state",)
    energy = excess(run, *stages)
    # a model walk's conv whose received input was lost before it leaves it little to round:
    # its output qparams are judged on the float model's range there too (helper-52: at its
    # floor on that input, the conv got the all-clear while scale 1.0 put its real outputs
    # on a few codes)
    model = ctx.case.output_range
    too_coarse = model is not None and model[1] - model[0] > 0 and float(qp.scale[0]) >= (
        COARSE_DEFAULTS * (model[1] - model[0]) / 255)
    if energy <= 0 and not too_coarse:
        return  # 1.0 / 0 happen to suit this output (e.g. pixel values 0..255)
    uncalibrated = observer_default(s.input_qparams)
    y0 = _y0(run)
    lo, hi = float(y0.min()), float(y0.max())
    whose = "The float output"
    if energy <= 0 and model is not None:  # the float model's range, not the received one
        lo, hi = model
        whose = ("On the input it received it has little to round, but the float model's "
                 "output at this conv")
    span = f"is {fmt(lo)}" if lo == hi else f"spans {fmt(lo)}..{fmt(hi)}"
    fix = _output_fix(ctx, run)
    yield finding(
        "QCD050", severity(run, energy, "warning") if energy > 0 else "warning",
        "output qparams left at the defaults 1.0 / 0",
        ("The quantized conv's output scale and zero point are 1.0 and 0: "
         + ("what its observer returns when the model was converted without calibration "
            "batches." if uncalibrated else
            "a freshly built module's defaults (never set, or set to them by hand).")
         + f" {whose} {span}; with scale 1.0 and zero point 0 only 0..255 in steps of "
         "1.0 can be represented. An output observer (calibration) or from_float sets them."),
        {"scale": qp.scale[0], "zero_point": qp.zero_point[0], "uncalibrated": uncalibrated,
         "excess": energy},
        # converted without calibration: calibrating sets these and the input's at once
        (eager_flow(ctx.case, run.report.engine) + "\n# or this conv's output qparams alone:\n"
         + fix if uncalibrated else
         fix + ("\n# or the quantizer's flow, which sets them from observers:\n"
                if run.report.engine in PT2E_ENGINES else
                "\n# or the eager flow, which sets them from observers:\n")
         + eager_flow(ctx.case, run.report.engine)),
        run, energy, stages)


def _saturation(run: PathRun) -> tuple[int, int, bool]:
    """Outputs below and above the dtype's range before clamping (the intended setup's), and
    whether they are counted on the float output: where no integer output is beyond it, the
    float outputs beyond it are (the view the stage's excess is measured on: a saturated int16
    accumulation, or an input clipped before the conv, can move an output the range leaves
    out back inside it)."""
    em = run.emulation
    if em is None or not em.unclamped.size:
        return 0, 0, False
    qp = run.spec.output_qparams
    lo, hi = int(em.unclamped.min()), int(em.unclamped.max())
    below = 0 if lo >= qp.dtype_min else int(np.count_nonzero(em.unclamped < qp.dtype_min))
    above = 0 if hi <= qp.dtype_max else int(np.count_nonzero(em.unclamped > qp.dtype_max))
    floats = below + above == 0
    if floats and run.output_reference is not None:
        y0 = run.output_reference
        s, zp = float(qp.scale[0]), int(qp.zero_point[0])
        below = int(np.count_nonzero(y0 < (qp.dtype_min - zp - 0.5) * s))
        above = int(np.count_nonzero(y0 > (qp.dtype_max - zp + 0.5) * s))
    if run.activation == "relu":
        below = 0  # a fused ReLU zeroes them anyway: its clamp, not a saturation
    return below, above, floats and below + above > 0


def qcd051(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        energy = excess(run, "output_clipping")
        if not material(run, energy) or run.float_output is None:
            continue
        below, above, float_view = _saturation(run)
        if below + above == 0:
            continue
        qp = run.spec.output_qparams
        s, zp = float(qp.scale[0]), int(qp.zero_point[0])
        top, bottom = (qp.dtype_max - zp) * s, (qp.dtype_min - zp) * s
        y0 = _y0(run)
        sides = []
        here = " on the captured inputs" if ctx.case.output_range is not None else ""
        if above:
            sides.append(f"{above} above {fmt(top)} (the float output reaches "
                         f"{fmt(float(y0.max()))}{here})")
        if below:
            sides.append(f"{below} below {fmt(bottom)} (the float output reaches "
                         f"{fmt(float(y0.min()))}{here})")
        # most saturate only because the input strays (an earlier loss): not this conv's fault
        astray = _beyond_float_model(ctx, y0, s, (bottom, top), below > 0, above > 0)
        if 2 * astray >= below + above:
            yield _fed_astray(run, energy, (astray, below + above, int(y0.size)),
                              (bottom, top), ctx.case)
            continue
        fix = _output_fix(ctx, run)
        unlike = _unlike_calibration(ctx.case, below > 0, above > 0)
        if unlike:
            fix = ("# calibrate on inputs like these, prepared as at inference: every observer\n"
                   + eager_flow(ctx.case, run.report.engine)
                   + "\n# or this conv's output qparams alone:\n" + fix)
        production = run.report.name == "production"
        level = severity(run, energy)
        # a trim's cost is said, not warned about; a saturation that breaks the path (past
        # TRIMMED_FEW outputs), or qparams the user wrote (no observer trimmed them), keep
        # their severity
        trim = qp.source != "user" and trimmed_outliers(
            below + above, int(y0.size), (bottom, top), (float(y0.min()), float(y0.max())),
            below > 0, above > 0)
        # a QAT model trained through this trim (its fake quantization's moving average of
        # each batch's range leaves a batch's largest values out): the layers after the conv
        # learned on outputs clipped there, so even a trim that breaks the path is said (a
        # PT2E QAT model of a helper's digits CNN: 97 of 65536 outputs, 8.7x the floor, the
        # model's accuracy the float model's)
        qat = trim and run.report.name == "as_given" and trained_with_qat(ctx.case.notes)
        trimmed = trim and (said_as_trim(level, below + above, int(y0.size)) or qat)
        yield finding(
            "QCD051", "info" if trimmed else level,
            "outputs saturated at the output dtype's limits",
            f"{below + above} of {y0.size} outputs fall outside the representable range "
            f"[{fmt(bottom)}, {fmt(top)}] of output scale {fmt(s)}, zero point {zp} and "
            f"saturate: {' and '.join(sides)}."
            + (" Here an earlier stage moved the integer outputs back inside it (a saturated "
               "accumulation, or an input clipped before the conv): the range leaves them "
               "out all the same." if float_view else "")
            + (" The output observer trims outliers on purpose; here that costs more than it "
               "saves." if production and not trimmed else "")
            + (f" That is {fmt(100 * (below + above) / y0.size)}% of the outputs, as QAT's "
               "observer trims them (a moving average of each training batch's range): the "
               "model trained with this clip, and the layers after this conv learned on "
               "outputs clipped there. Widening the range brings this conv closer to its "
               "float twin, whose outputs those layers never trained on." if qat else
               f" That is {fmt(100 * (below + above) / y0.size)}% of the outputs, as a histogram"
               " observer (the default) trims outliers for a finer step: a MinMax observer "
               "keeps them, at a coarser step." if trimmed else "")
            + unlike,
            {"saturated": below + above, "below": below, "above": above,
             "total": int(y0.size), "low": bottom, "high": top, "excess": energy},
            QAT_TRIM_FIX if qat else fix, run, energy, ("output_clipping",))


#: QCD051's fix on a QAT model's trim: the layers after the conv trained on it.
QAT_TRIM_FIX = ("# nothing to change: the layers after this conv trained on outputs clipped\n"
                "# at this range; widening it moves the conv toward its float twin, not\n"
                "# toward what training fitted")


#: A model walk's float output at a conv reaching this many times beyond what it reached on
#: the calibration batches (on a saturated side) says those batches are not like the inputs
#: diagnosed: another scale or preprocessing, which every observer calibrated on them shares.
UNLIKE_CALIBRATION = 2.0


def _unlike_calibration(case: ConvCase, low_side: bool, high_side: bool) -> str:
    """The sentence for a model walk's conv whose float output on the captured samples reaches
    UNLIKE_CALIBRATION times beyond its range on the calibration batches, on a saturated side
    ('' where it does not, or without calibration batches)."""
    cal, own = case.calibration_range, case.model_output
    if cal is None or own is None or own.size == 0:
        return ""
    lo, hi = float(own.min()), float(own.max())
    if high_side and hi > 0 and hi > UNLIKE_CALIBRATION * max(cal[1], 0.0):
        times, reach, there = hi / max(cal[1], 1e-30), hi, cal[1]
    elif low_side and lo < 0 and lo < UNLIKE_CALIBRATION * min(cal[0], 0.0):
        times, reach, there = lo / min(cal[0], -1e-30), lo, cal[0]
    else:
        return ""
    over = f"{fmt(times)}x" if there != 0 else "far"
    return (f" The float model's own output here reaches {fmt(reach)} on the captured inputs, "
            f"{over} beyond what it reached on the calibration batches ({fmt(there)}): those "
            "batches are not like these inputs (another scale or preprocessing?), and every "
            "observer calibrated on them shares that.")


def _wider_calibration(case: ConvCase) -> str:
    """The sentence for a model walk's conv judged on the captured inputs' range because the
    calibration batches reach far wider at every conv (``bundle.calibration_unlike``); ''
    otherwise."""
    from ..model.bundle import sample_range, span_ratio

    cal, own = case.calibration_range, case.model_output
    if cal is None or own is None or not case.output_range_sampled:
        return ""
    times = span_ratio(cal, sample_range(case, own))
    wider = (f"{fmt(times)}x its range on the captured inputs" if math.isfinite(times)
             else "where the captured inputs give 0")
    return (f" The float model's output here spans [{fmt(cal[0])}, {fmt(cal[1])}] on the "
            f"calibration batches, {wider}, as at every conv (8x or more): those batches are "
            "not like these inputs (another scale or preprocessing?), and every observer "
            "calibrated on them shares that.")


def _beyond_float_model(ctx: Context, y0: np.ndarray, step: float,
                        representable: tuple[float, float], low_side: bool,
                        high_side: bool) -> int:
    """In a model walk: how many outputs saturate beyond the float model's own reach at this
    conv too (``ConvCase.output_range``: over the calibration batches and the captured
    samples; half a step of slack), on the saturated sides, or, where more, how many more
    saturate than the float model's own output there (``ConvCase.model_output``) does. The
    float model never gives those: only the input this conv received, strayed from the float
    model's, does. 0 outside a model walk."""
    reach = ctx.case.output_range
    if reach is None:
        return 0
    n = 0
    if high_side:
        n += int(np.count_nonzero(y0 > max(reach[1], representable[1]) + step / 2))
    if low_side:
        n += int(np.count_nonzero(y0 < min(reach[0], representable[0]) - step / 2))
    own = ctx.case.model_output
    if own is not None and own.shape == y0.shape:
        # or by count: the saturations the float model's own output gives at this conv are
        # the only ones good qparams answer for; the rest come from the received input
        # (measured: 3 of 131072 against 2688 after a conv qnnpack kept stale, QCD068)
        given = 0
        if high_side:
            given += int(np.count_nonzero(own > representable[1] + step / 2))
        if low_side:
            given += int(np.count_nonzero(own < representable[0] - step / 2))
        saturated = int(np.count_nonzero(y0 > representable[1] + step / 2) if high_side
                        else 0) + int(np.count_nonzero(y0 < representable[0] - step / 2)
                                      if low_side else 0)
        n = max(n, saturated - given)
    return n


def _fed_astray(run: PathRun, energy: float, counts: tuple[int, int, int],
                representable: tuple[float, float], case: ConvCase) -> Finding:
    """QCD051 where most saturated outputs lie beyond the float model's own reach
    (``_beyond_float_model``; ``counts``: those, all saturated, all outputs): said, not warned
    about, and no fix to the output qparams, which fit the float model."""
    assert case.output_range is not None
    astray, saturated, total = counts
    lo, hi = case.output_range
    where = ("the captured samples" if case.output_range_sampled
             else "the calibration batches and the captured samples")
    return finding(
        "QCD051", "info", "outputs saturated at the output dtype's limits",
        f"{saturated} of {total} outputs fall outside the representable range "
        f"[{fmt(representable[0])}, {fmt(representable[1])}] and saturate, {astray} of them "
        f"beyond what the float model itself gives at this conv ({fmt(lo)} to {fmt(hi)} over "
        f"{where}): they saturate because the input this conv received strays from the float "
        "model's input here, lost before this conv. Its output qparams fit the float model; "
        "the loss is upstream (the first conv above its floor, or the model's finding on a "
        "lost input).",
        {"saturated": saturated, "beyond_float_model": astray, "total": total,
         "low": representable[0], "high": representable[1], "float_model_low": lo,
         "float_model_high": hi, "excess": energy},
        "# nothing to change in this conv's output qparams: they fit the float model here;\n"
        "# fix the layer or op before it that loses the signal",
        run, energy, ("output_clipping",))


def said_as_trim(level: str, saturated: int, total: int) -> bool:
    """Whether a trim (``trimmed_outliers``) of ``saturated`` of ``total`` values, which would
    be a finding at ``level``, is said (info) instead: where it is a warning, or where
    TRIMMED_FEW values or fewer reach past it that are also TRIMMED_OUTLIERS of the values or
    fewer (chance, at any level: 2 of 400 or more); more that break the path keep their error
    (2 of a conv's 10 outputs are a fifth of them, not chance)."""
    return level == "warning" or saturated <= min(TRIMMED_FEW, TRIMMED_OUTLIERS * total)


def trimmed_outliers(saturated: int, total: int, representable: tuple[float, float],
             reach: tuple[float, float], low_side: bool, high_side: bool) -> bool:
    """A saturation a histogram observer's trim gives: few outputs (TRIMMED_OUTLIERS, or
    TRIMMED_FEW) beyond a range that keeps most of the float output's reach (TRIM_KEEPS) on each
    saturated side."""
    if saturated > max(TRIMMED_OUTLIERS * total, TRIMMED_FEW):
        return False
    keeps_high = not high_side or representable[1] >= TRIM_KEEPS * reach[1]
    keeps_low = not low_side or representable[0] <= TRIM_KEEPS * reach[0]
    return keeps_high and keeps_low


def qcd052(ctx: Context) -> Iterator[Finding]:
    for run in ctx.paths():
        b = run.report.budget
        energy = excess(run, "output_rounding")
        if b is None or run.float_output is None or not material(run, energy) \
                or b.outputs < MIN_OUTPUTS_FOR_SCALE:
            continue
        allowed = 2.0 if b.output_bits == 7 else 1.0
        if b.output_step_ratio / allowed < 1.5:
            continue
        out_s = float(run.spec.output_qparams.scale[0])
        lo, hi = output_span(ctx.case, _y0(run))
        ideal = (hi - lo) / 255
        fix = _output_fix(ctx, run)
        wider = _wider_calibration(ctx.case)
        reduced = "" if wider else _reduced_needlessly(ctx, run)
        if wider:  # not this conv's qparams fitted to a few samples: the batches are at fault
            fix = ("# calibrate on inputs like these, prepared as at inference: every observer\n"
                   + eager_flow(ctx.case, run.report.engine))
        elif reduced:  # the qconfig is the engine's default: what the kernel needs
            engine = run.report.engine
            fix = eager_flow(ctx.case, engine, PER_CHANNEL_8BIT.format(engine=engine)
                             if run.spec.weight_qparams.per_channel else
                             f'model.qconfig = get_default_qconfig("{engine}")')
        yield finding(
            "QCD052", severity(run, energy), REDUCED_TITLE if reduced else
            "output step too coarse for the output's range",
            f"The output scale {fmt(out_s)} is {fmt(b.output_step_ratio)}x what the float "
            f"output's range [{fmt(lo)}, {fmt(hi)}] needs ({fmt(ideal)} = range / 255), so it "
            f"uses only {_about((hi - lo) / out_s)} of quint8's 255 steps and output "
            f"rounding adds {fmt(b.stage('output_rounding').measured)} RMSE where "
            f"{fmt(b.stage('output_rounding').floor)} would do." + wider + reduced,
            {"output_scale": out_s, "needed_scale": ideal, "step_ratio": b.output_step_ratio,
             "levels": (hi - lo) / out_s, "excess": energy,
             **({"reduce_range": True} if reduced else {})},
            fix, run, energy, ("output_rounding",))


#: QCD052's title where the output is on 128 levels on qnnpack (``_reduced_needlessly``).
REDUCED_TITLE = "output on 128 levels (reduce_range) where qnnpack takes 256"
#: Its fix where the weights are per channel (x86's and fbgemm's default): the engine's 8-bit
#: activations, the per-channel weights kept (qnnpack's default qconfig would make them per
#: tensor: helper-49 measured 31.3 dB to 28.8 with it, 35.6 with this).
PER_CHANNEL_8BIT = (
    "from torch.ao.quantization import QConfig, default_per_channel_weight_observer\n"
    "# the engine's 8-bit activations; the per-channel weights kept\n"
    'model.qconfig = QConfig(activation=get_default_qconfig("{engine}").activation,\n'
    "                        weight=default_per_channel_weight_observer)")


def _reduced_needlessly(ctx: Context, run: PathRun) -> str:
    """A sentence when the output is on 128 levels (reduce_range=True: x86's and fbgemm's
    default qconfig, which keeps their int16 pair sums from saturating on CPUs without VNNI)
    on qnnpack, whose kernels sum exactly and whose default qconfig keeps 8 bits; else ""."""
    from ..measure.budget import uses_seven_bits

    b, em = run.report.budget, run.emulation
    if b is None or em is None or run.kernel is None or run.kernel.kernel != "qnnpack":
        return ""
    codes = em.output_codes if run.activation == "relu" else em.unclamped
    # as the floors read 7-bit activations (budget.floors): a calibration range is exact
    if not uses_seven_bits(codes, b.output_step_ratio,
                           1.0 if ctx.case.output_range is not None else 1.3):
        return ""
    return (" Its codes span 128 levels, as reduce_range=True gives (x86's and fbgemm's "
            "default qconfig, for their kernels' int16 pair sums on CPUs without VNNI): "
            "qnnpack's kernels sum exactly, and its own default qconfig keeps 8 bits.")


def qcd054(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None or run.output_reference is None:
        return
    qp = run.spec.output_qparams
    if qp.dtype_given is None or qp.dtype_given == "quint8":
        return
    energy = excess(run, *OUTPUT)
    zp, s = qp.zero_point[0], qp.scale[0]
    lo, hi = DTYPE_RANGES[qp.dtype_given]
    fix = _output_fix(ctx, run)
    yield finding(
        "QCD054", severity(run, energy, "warning"),
        f"output qparams say {qp.dtype_given}; torch's quantized conv writes quint8",
        f"The output qparams say {qp.dtype_given}, but torch's quantized conv takes only a "
        f"scale and a zero point and always writes quint8: with zero point {zp} the outputs "
        f"run from {fmt(-zp * s)} to {fmt((255 - zp) * s)}, not {qp.dtype_given}'s "
        f"{fmt((lo - zp) * s)} to {fmt((hi - zp) * s)}.",
        {"dtype_given": qp.dtype_given, "zero_point": zp, "excess": energy},
        "# quint8 output qparams over the float output's range:\n" + fix, run, energy, OUTPUT)


def qcd053(ctx: Context) -> Iterator[Finding]:
    run = ctx.as_given
    if run is None or run.float_output is None:
        return
    qp = run.spec.final_output_qparams
    zp = qp.zero_point[0]
    if qp.dtype_min <= zp <= qp.dtype_max:
        return
    energy = excess(run, *OUTPUT, "module_state")
    fix = _output_fix(ctx, run)
    yield finding(
        "QCD053", severity(run, energy, "warning"),
        "output zero point outside the output dtype's range",
        f"The output zero point {zp} is outside {qp.dtype}'s {qp.dtype_min}..{qp.dtype_max}. "
        "torch accepts it silently; the real value 0.0 has no code, and outputs are shifted "
        "out of range.",
        {"zero_point": zp, "range": [qp.dtype_min, qp.dtype_max], "excess": energy},
        fix, run, energy, OUTPUT)


def _about(steps: float) -> str:
    """A count of steps in words: whole steps, or less than one."""
    return f"about {steps:.0f}" if steps >= 0.5 else "less than one"
