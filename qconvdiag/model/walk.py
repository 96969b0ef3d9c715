"""The model walk: which conv of a model is to blame.

Every captured conv is *screened*: its own error (its quantized output, as the quantized model
computed it, against the float conv on the input it really received), its propagated error
(against the float model's output at that point) and its floor (budget.py). The screen costs
one float conv per layer and one pass over its output and its input: no stage ladder, no
emulation. The torch check (the emulation of the module on its captured input against the codes
the model computed) comes with a layer's diagnosis, or on every layer with ``--torch-check
all``.

A layer above its floor gets the judged path's diagnosis (as_given alone: the module as it is),
for its findings and its stage ladder. A layer at its floor gets none: findings fire only on
error above the floor, so it has none to give. The worst ``top`` layers by own error, and the
layers asked for by name, get the full single-conv diagnosis (the production path as well, as
``qconvdiag explain`` gives a case).

A conv whose kernel writes float32 (``LayerCapture.output_float32``: a PT2E conv before a
residual add) is screened on those float32 values: no output rounding or clipping, so its floor
is the weight's (and the bias's), its dominant stage a weight stage (or the accumulation, where
saturated int16 pairs cost most of it), and its torch check the
emulation's float32 output against the kernel's, bit for bit. The stage ladder and the findings
model a quantized output, so such a conv is screened only (never diagnosed nor explained); on a
kernel that sums int16 pairs its saturation is counted and named (``fp32_saturation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..arithmetic.emulate import Emulation, Kernel, emulate
from ..arithmetic.engines import PT2E_ENGINES
from ..case import ConvCase
from ..diagnosis import Diagnosis, Options, layer_kernel, run_diagnosis
from ..errors import UsageError
from ..gate import FAIL_ON, LEVELS
from ..measure.budget import AT_FLOOR, FAR, MOST, SLACK, floors
from ..measure.evidence import exec_weight_qparams
from ..measure.metrics import chunked_energy, fused_pass
from ..model_report import (
    ErrorSummary,
    LayerBreach,
    LayerDetail,
    LayerFinding,
    LayerRow,
    ModelGate,
    ModelReport,
    UpstreamLoss,
)
from ..parallel import two_at_a_time
from ..quantization.paths import (
    PathSpec,
    ProductionOptions,
    conv_output_qparams,
    holds_float_weight,
)
from ..quantization.qparams import QParams, dequantize, dequantize32, wide_codes
from ..report import Finding, Report
from .bundle import LayerCapture, ModelBundle
from .compiled import qcd063
from .lost import qcd065
from .reuse import CODE as REUSE_CODE
from .reuse import qcd064

Progress = Callable[[str], None]


@dataclass(frozen=True)
class WalkOptions:
    top: int = 3
    """Explain the worst ``top`` layers by own error in full (0: screen only)."""
    layers: tuple[str, ...] = ()
    """Explain these layers in full too (module paths)."""
    production: ProductionOptions = field(default_factory=ProductionOptions)
    """The production path's options, for the layers explained in full."""
    fail_under_sqnr: float | None = None
    max_abs_error: float | None = None
    fail_on: str = "never"
    ignore: tuple[str, ...] = ()
    torch_check: str = "diagnosed"
    """Which convs get the torch check (their emulation against the codes the model computed):
    ``diagnosed`` (those above their floor and those explained: their numbers rest on the
    emulation) or ``all`` (every conv: one integer emulation each, which costs more than the
    screen)."""


TORCH_CHECKS = ("diagnosed", "all")


@dataclass(frozen=True, eq=False)
class ModelDiagnosis:
    report: ModelReport
    diagnoses: dict[str, Diagnosis]
    """Every diagnosis that ran, by layer name (the explained layers' are full)."""


@dataclass(frozen=True)
class Screen:
    """A layer's screen: the numbers that need no stage ladder."""

    own: ErrorSummary
    propagated: ErrorSummary
    input: ErrorSummary
    input_floor_ratio: float
    """The input's RMSE over the 8-bit rounding floor of quantizing it (inf for a constant
    input that is not exact)."""
    input_defaults: bool
    """The input's qparams are an uncalibrated observer's (scale 1.0, zero point 0)."""
    floor_rmse: float
    verdict: str
    dominant_stage: str | None
    findings: tuple[LayerFinding, ...] = ()
    """A float32-output conv's findings (it gets no diagnosis): QCD040 where its kernel's
    int16 pair sums saturated (``fp32_saturation``)."""


def walk_model(bundle: ModelBundle, options: WalkOptions | None = None,
               progress: Progress | None = None) -> ModelDiagnosis:
    """Screen every conv of ``bundle``, diagnose those above their floor, and explain the
    worst ``options.top`` (and ``options.layers``) in full."""
    from ..runtime import single_threaded_blas

    options = options or WalkOptions()
    if options.fail_on not in FAIL_ON:
        raise UsageError(f"--fail-on must be one of {', '.join(FAIL_ON)}")
    if options.top < 0:
        raise UsageError(f"--top must be 0 or more, got {options.top}")
    if options.torch_check not in TORCH_CHECKS:
        raise UsageError(f"--torch-check must be one of {', '.join(TORCH_CHECKS)}")
    for name in options.layers:
        if bundle.layer(name).output_float32:  # an unknown name is refused before any work
            raise UsageError(f"--layer {name}: its output is float32 (a conv before a residual "
                             "add): it is screened only; the diagnosis models quantized outputs")
    with single_threaded_blas():
        return _walk(bundle, options, progress or (lambda _msg: None))


def _walk(bundle: ModelBundle, options: WalkOptions, say: Progress) -> ModelDiagnosis:
    import torch

    from .. import __version__
    from ..arithmetic.cpu import cpu_info
    from ..versions import unverified_torch_note

    engine = bundle.engine
    if engine in PT2E_ENGINES:
        from ..torchao_import import require_torchao

        require_torchao(f"the PT2E model bundle {bundle.source or ''}".rstrip())
    say(f"screening {len(bundle.layers)} convs")
    for lay in bundle.layers:  # the kernels chosen first, here: their probes run torch's convs
        _kernel(lay.case, module_spec(lay.case), engine, lay.output_float32)  # (cached)
    screens = dict(zip([lay.name for lay in bundle.layers],
                       two_at_a_time(lambda lay: screen_layer(lay, engine), list(bundle.layers))))
    ranking = rank(screens)
    floats = {lay.name for lay in bundle.layers if lay.output_float32}
    explainable = [name for name in ranking if name not in floats]
    explain = list(dict.fromkeys([*explainable[:options.top], *options.layers]))
    diagnoses: dict[str, Diagnosis] = {}
    for lay in bundle.layers:
        if lay.output_float32:
            continue
        full = lay.name in explain
        if full or screens[lay.name].verdict != "at_floor":
            say(f"diagnosing {lay.name}" + (" (in full)" if full else ""))
            diagnoses[lay.name] = run_diagnosis(lay.case, _options(options, engine, full))
    checks = {}
    for lay in bundle.layers:
        d = diagnoses.get(lay.name)
        if d is not None:
            checks[lay.name] = _diagnosis_check(lay, d)
        elif options.torch_check == "all" or (
                lay.output_float32 and screens[lay.name].verdict != "at_floor"):
            say(f"torch check of {lay.name}")
            checks[lay.name] = torch_check(lay, engine)
    rows = tuple(_row(lay, engine, screens[lay.name], diagnoses.get(lay.name),
                      checks.get(lay.name), options.ignore) for lay in bundle.layers)
    pt2e = engine in PT2E_ENGINES
    upstream = upstream_losses([lay.name for lay in bundle.layers], screens, pt2e,
                               {c: r.kind for r in bundle.reused for c in r.missing_after()})
    model_findings = tuple(f for f in [qcd063(bundle.compiled, pt2e),
                                       *qcd064(bundle.reused, pt2e), *qcd065(upstream, pt2e)]
                           if f is not None and f.code not in options.ignore)
    gate = _gate(rows, options, model_findings)
    notes = list(bundle.notes)
    version_note = unverified_torch_note(torch.__version__)
    if version_note is not None:
        notes.append(version_note)
    report = ModelReport(
        qconvdiag_version=__version__, torch_version=torch.__version__, cpu=cpu_info(),
        source=bundle.source, engine=engine, layers=rows, ranking=tuple(ranking),
        details=tuple(LayerDetail(name, diagnoses[name].report) for name in explain),
        status="fail" if gate.breaches else "ok", gate=gate, notes=tuple(notes),
        upstream=upstream,
        findings=model_findings)
    return ModelDiagnosis(report, diagnoses)


#: A conv's input is lost upstream when it is this many dB worse than the worst propagated
#: error of the convs before it (errors of several branches add: two equal ones cost 3 dB).
UPSTREAM_DB = 10.0


def upstream_losses(order: list[str], screens: dict[str, Screen], pt2e: bool = False,
                    missing: dict[str, str] | None = None) -> tuple[UpstreamLoss, ...]:
    """Convs whose input is far worse than the convs before them explain: for a conv no
    earlier conv feeds (the first), its input is at least budget.FAR times the 8-bit floor of
    quantizing it; after that, its input SQNR is UPSTREAM_DB below the worst propagated SQNR of
    the convs before it (in model order: a residual branch's worst included), and its error
    FAR times that floor too. ``pt2e``: the model is a convert_pt2e graph, whose input
    quantization is a quantize_per_tensor node, not a QuantStub. ``missing``: convs that run
    without the activation the float model applies after them (QCD064), and its kind: a loss
    after one of them is blamed on that."""
    stub = ("the quantize_per_tensor of the model's input" if pt2e else "its QuantStub")
    out = []
    worst: tuple[float, str] | None = None  # (propagated SQNR, conv) of the worst so far
    for name in order:
        s = screens[name]
        got = s.input.sqnr_db
        if worst is None:
            if s.input_floor_ratio >= FAR:
                why = ("was never calibrated (scale 1.0, zero point 0: run calibration "
                       "batches between prepare and convert)" if s.input_defaults else
                       "has a scale that does not fit the inputs (calibrate it on inputs "
                       "scaled as at inference)")
                out.append(UpstreamLoss(
                    name, s.input, s.input_floor_ratio, None, None,
                    f"{name}'s input is {_db_text(got)} from the float model's, "
                    f"{s.input_floor_ratio:.1f}x the rounding floor of quantizing it: the "
                    f"model's input quantization ({stub}) {why}, and loses it before "
                    "any conv."))
        elif got is not None and got < worst[0] - UPSTREAM_DB and s.input_floor_ratio >= FAR:
            since = order.index(out[-1].layer) if out else 0  # after the last loss named
            before = [c for c in order[since:order.index(name)] if c in (missing or {})]
            cause = ("an op between them (an add, a pool, a cat, a linear layer: its output "
                     "scale) loses it" if not before else
                     f"the {(missing or {})[before[0]]} the float model applies after "
                     f"{', '.join(before)} is gone in the quantized model ({REUSE_CODE}), "
                     "which lets negative values through")
            out.append(UpstreamLoss(
                name, s.input, None, worst[1], worst[0],
                f"{name}'s input is {_db_text(got)} from the float model's, {worst[0] - got:.1f}"
                f" dB worse than any conv before it delivers (worst: {worst[1]}, "
                f"{worst[0]:.1f} dB): {cause}."))
        p = s.propagated.sqnr_db
        if p is not None and (worst is None or p < worst[0]):
            worst = (p, name)
        elif worst is None:
            worst = (math.inf, name)
    return tuple(out)


def _db_text(sqnr: float | None) -> str:
    return "exactly" if sqnr is None else f"{sqnr:.1f} dB"


def _options(options: WalkOptions, engine: str, full: bool) -> Options:
    return Options(engine=engine, production=options.production,
                   fail_under_sqnr=options.fail_under_sqnr, max_abs_error=options.max_abs_error,
                   fail_on=options.fail_on, ignore=options.ignore, production_path=full)


def rank(screens: dict[str, Screen]) -> list[str]:
    """Layer names by own error, worst first: lowest own SQNR (an exact layer last), then
    largest RMSE."""
    def key(name: str) -> tuple[float, float]:
        own = screens[name].own
        return (math.inf if own.sqnr_db is None else own.sqnr_db, -own.rmse)

    return sorted(screens, key=key)


def module_spec(case: ConvCase) -> PathSpec:
    """The quantized module as it is, on the input codes it received (in the dtype the capture
    kept them in: what the screen reads of them needs no arithmetic)."""
    s = case.setup
    assert s is not None and s.module is not None and s.input_qparams is not None
    assert s.input_codes is not None
    m = s.module
    return PathSpec("as_given", s.input_qparams, m.weight_qparams,
                    conv_output_qparams(m.output_qparams), s.input_codes, m.weight_codes, m.bias,
                    m)


def _kernel(case: ConvCase, spec: PathSpec, engine: str, float_output: bool = False) -> Kernel:
    return layer_kernel(case, engine, spec.input_qparams,
                        exec_weight_qparams(spec.weight_qparams), spec.output_qparams,
                        float_output)


def float_conv(case: ConvCase) -> np.ndarray:
    """The float conv on the case's input (float32, as the float model runs it), after the
    fused activation."""
    import torch

    from ..torch_calls import conv_function

    g = case.geometry
    conv = conv_function(case.spatial_dims)
    with torch.no_grad():
        y = conv(torch.from_numpy(case.input), torch.from_numpy(case.weight),
                 None if case.bias is None else torch.from_numpy(case.bias), list(g.stride),
                 list(g.padding), list(g.dilation), g.groups)
        if case.activation == "relu":
            torch.relu_(y)
    return y.numpy()


def screen_layer(lay: LayerCapture, engine: str) -> Screen:
    """Own and propagated error, floor and verdict, and the dominant stage estimated from the
    output codes: one float32 conv, one pass over the output and one over the input
    (``metrics.fused_pass``)."""
    case = lay.case
    spec = module_spec(case)
    y = float_conv(case)
    fp32 = lay.output_float32
    (own_d, propagated_d), (y_span,) = fused_pass(_output_values(lay), (y, lay.float_output),
                                                  (y,))
    x = np.ascontiguousarray(case.input).reshape(-1)
    (received_d,), (x_span, float_x_span) = fused_pass(lambda sl: x[sl], (lay.float_input,),
                                                       (case.input, lay.float_input))
    own, propagated, received = (ErrorSummary(*d) for d in (own_d, propagated_d, received_d))
    f = floors(case, spec, _kernel(case, spec, engine, fp32), y, None,
               np.empty(0, dtype=np.int64) if fp32 else lay.quantized_output, input_floor=False,
               spans=(x_span, y_span))
    # a float32 output is not rounded to a step: its floor is the weight's and the bias's
    floor = math.sqrt(f.energy - f.stages["output_rounding"] if fp32 else f.energy)
    ratio = own.rmse / floor if floor > 0 else (0.0 if own.rmse == 0 else math.inf)
    at_floor = AT_FLOOR + SLACK / math.sqrt(max(y.size, 1)) / 2
    verdict = "at_floor" if ratio <= at_floor else "broken" if ratio >= FAR else "above_floor"
    findings: tuple[LayerFinding, ...] = ()
    if fp32:
        dominant = weight_dominant(case, spec, own.rmse)
        if verdict != "at_floor":
            dominant, findings = fp32_saturation(lay, engine, own.rmse ** 2 * y.size,
                                                 floor ** 2 * y.size, verdict, dominant)
    else:
        dominant = dominant_stage(case, spec, lay.quantized_output, y, own.rmse ** 2 * y.size,
                                  y_span.positive)
    input_floor = float_x_span.ideal_step() / math.sqrt(12)
    input_ratio = (received.rmse / input_floor if input_floor > 0
                   else 0.0 if received.rmse == 0 else math.inf)
    in_qp = spec.input_qparams
    defaults = (in_qp.scale[0], in_qp.zero_point[0]) == (1.0, 0)
    return Screen(own, propagated, received, input_ratio, defaults, floor, verdict, dominant,
                  findings)


def fp32_saturation(lay: LayerCapture, engine: str, own_energy: float, floor_energy: float,
                    verdict: str, dominant: str | None
                    ) -> tuple[str | None, tuple[LayerFinding, ...]]:
    """A float32-output conv above its floor whose kernel sums int16 pairs (no VNNI): the
    emulation on its captured input counts the saturated pair sums and what they cost (the
    squared difference of its output from the same kernel's with exact accumulation). When
    they cost most of the own error, the dominant stage is the accumulation's, not the
    weight's; QCD040 names them with the severity every cause gets (findings/base.py's
    severity_of: a warning from MATERIAL of the floor, an error on a broken conv when they
    explain most of its excess or alone are FAR from the floor).
    Returns the dominant stage and the findings."""
    import dataclasses

    from ..arithmetic.accumulate import EXACT
    from ..findings.base import severity_of

    kernel = _kernel(lay.case, module_spec(lay.case), engine, True)
    if kernel.accumulation == EXACT:
        return dominant, ()
    em = _module_emulation(lay, kernel)
    if not em.saturated_pairs:
        return dominant, ()
    exact = _module_emulation(lay, dataclasses.replace(kernel, accumulation=EXACT))
    assert em.output_float32 is not None and exact.output_float32 is not None
    # on the output (a fused ReLU zeroes some saturated sums anyway), in float64
    energy = float(np.sum(np.square(em.output_float32.astype(np.float64)
                                    - exact.output_float32)))
    level = severity_of(energy, floor_energy, max(own_energy - floor_energy, 0.0), verdict)
    if energy >= MOST * own_energy:
        dominant = "accumulation"
    return dominant, (LayerFinding("QCD040", level,
                                   f"int16 pair saturation in accumulation on {engine}"),)


def _output_values(lay: LayerCapture) -> Callable[[slice], np.ndarray]:
    """The layer's quantized output as float32 values, a flat chunk at a time (its codes
    dequantized as ``tensor.dequantize()`` does; a float32 output as it is)."""
    flat = np.ascontiguousarray(lay.quantized_output).reshape(-1)
    qp = lay.quantized_output_qparams
    if lay.output_float32:
        return lambda sl: flat[sl]
    if qp.per_channel:  # not a conv's output: dequantized whole, the channel axis known
        whole = dequantize32(lay.quantized_output, qp).reshape(-1)
        return lambda sl: whole[sl]
    return lambda sl: dequantize32(flat[sl], qp)


def _energy(v: np.ndarray) -> float:
    return chunked_energy(lambda sl: v[sl], v.size)


def dominant_stage(case: ConvCase, spec: PathSpec, codes: np.ndarray, y: np.ndarray,
                   own_energy: float, positive: int) -> str | None:
    """The stage that adds most of the own error, estimated from the output codes (a layer
    above its floor gets the stage ladder's answer instead). Outputs pinned at a limit of the
    output dtype while the float output lies beyond it are clipped: their error is the
    clipping's; elsewhere output rounding adds step^2 / 12 per output it lets through, and what
    the error has beyond that is the weight's (split between its clipping and its rounding, or
    the module's state when its weight is not the float weight quantized). The input stages
    add nothing: the input is the one received. ``own_energy``: sum((quantized - y)^2);
    ``positive``: how many of ``y`` are above 0."""
    qp = spec.output_qparams
    s, zp = float(qp.scale[0]), int(qp.zero_point[0])
    c, yf = codes.reshape(-1), y.reshape(-1)
    clipped = _beyond(c, yf, qp.dtype_max, (qp.dtype_max - zp + 0.5) * s, above=True)
    if case.activation != "relu":  # a ReLU's zeros are its own clamp
        clipped = np.concatenate(
            [clipped, _beyond(c, yf, qp.dtype_min, (qp.dtype_min - zp - 0.5) * s, above=False)])
    e_clipped = dequantize32(c[clipped], qp) - yf[clipped]
    at_limit = _energy(e_clipped)
    rest = max(own_energy - at_limit, 0.0)
    passed = (positive - int(np.count_nonzero(yf[clipped] > 0))
              if case.activation == "relu" else yf.size - clipped.size)
    rounding = min(rest, passed * s * s / 12)
    energy = {"output_clipping": at_limit, "output_rounding": rounding}
    if rest - rounding > max(energy.values()):
        for sid, part in _weight_split(case, spec).items():
            energy[sid] = (rest - rounding) * part
    best = max(energy, key=lambda sid: energy[sid])
    return best if energy[best] > 0 else None


def weight_dominant(case: ConvCase, spec: PathSpec, own_rmse: float) -> str | None:
    """The dominant stage of a conv with a float32 output: its input is the one received and
    its output is not rounded, so what error it has is the weight's (the float32 arithmetic
    adds ~1e-7 relative); None when it is exactly 0."""
    if own_rmse == 0:
        return None
    split = _weight_split(case, spec)
    return max(split, key=lambda sid: split[sid])


def _beyond(codes: np.ndarray, values: np.ndarray, limit: int, threshold: float, above: bool
            ) -> np.ndarray:
    """Positions whose code is ``limit`` and whose value lies beyond ``threshold`` (above or
    below it; only the few codes at the limit are compared)."""
    at = np.flatnonzero(codes == limit)
    v = values[at]
    return at[v > threshold] if above else at[v < threshold]


def _weight_split(case: ConvCase, spec: PathSpec) -> dict[str, float]:
    """The weight's error energy, as fractions: the module's state, or clipping and rounding."""
    assert spec.module is not None
    if not holds_float_weight(case, spec.module):
        return {"module_state": 1.0}
    qp: QParams = spec.weight_qparams
    w = case.weight.astype(np.float64)
    axis = None if qp.axis is None else qp.axis % w.ndim
    lo = dequantize(np.full((1,) * w.ndim, qp.dtype_min), qp) if axis is None else None
    if axis is None:
        hi = dequantize(np.full((1,) * w.ndim, qp.dtype_max), qp)
    else:
        n = w.shape[axis]
        shape = [1] * w.ndim
        shape[axis] = n
        lo = dequantize(np.full(shape, qp.dtype_min), qp)
        hi = dequantize(np.full(shape, qp.dtype_max), qp)
    clipped = np.clip(w, lo, hi)
    clip = float(np.sum((clipped - w) ** 2))
    rounding = float(np.sum((dequantize(spec.weight_codes, qp) - clipped) ** 2))
    total = clip + rounding
    if total == 0:
        return {"weight_rounding": 1.0}
    return {"weight_clipping": clip / total, "weight_rounding": rounding / total}


def torch_check(lay: LayerCapture, engine: str) -> int:
    """Output elements where the emulation of the module on its captured input differs from
    the codes the quantized model computed (a float32 output: from the float32 values its
    kernel wrote, bit for bit)."""
    fp32 = lay.output_float32
    em = _module_emulation(lay, _kernel(lay.case, module_spec(lay.case), engine, fp32))
    if fp32:
        assert em.output_float32 is not None
        mine, got = em.output_float32.view(np.int32), lay.quantized_output.view(np.int32)
        return int(np.count_nonzero(mine != got))
    return int(np.count_nonzero(em.output_codes != lay.quantized_output))


def _module_emulation(lay: LayerCapture, kernel: Kernel) -> Emulation:
    """The emulation of the quantized module on its captured input by ``kernel`` (a float32
    output where its kernel writes one)."""
    case = lay.case
    spec = module_spec(case)
    fp32 = lay.output_float32
    return emulate(kernel,
                   wide_codes(spec.input_codes, spec.input_qparams), spec.input_qparams,
                   spec.weight_codes, exec_weight_qparams(spec.weight_qparams), spec.bias,
                   spec.output_qparams, case.geometry, case.activation == "relu", fp32)


def _diagnosis_check(lay: LayerCapture, d: Diagnosis) -> int | None:
    """The torch check from a diagnosis's as_given run (its emulation of the module)."""
    run = next((r for r in d.runs if r.report.name == "as_given"), None)
    em = None if run is None else (run.module_emulation or run.emulation)
    if em is None:
        return None
    return int(np.count_nonzero(em.output_codes != lay.quantized_output))


def _row(lay: LayerCapture, engine: str, screen: Screen, diagnosis: Diagnosis | None,
         mismatches: int | None, ignore: tuple[str, ...] = ()) -> LayerRow:
    case = lay.case
    op = f"conv{case.spatial_dims}d" + ("+relu" if case.activation == "relu" else "")
    findings: tuple[LayerFinding, ...] = ()
    dominant = screen.dominant_stage
    if diagnosis is not None:
        findings = judged_findings(diagnosis.report)
        dominant = ladder_dominant(diagnosis.report) or dominant
    else:
        findings = tuple(f for f in screen.findings if f.code not in ignore)
    return LayerRow(
        name=lay.name, op=op, input_shape=tuple(case.input.shape),
        weight_shape=tuple(case.weight.shape), engine=engine, own=screen.own,
        propagated=screen.propagated, input=screen.input, floor_rmse=screen.floor_rmse,
        verdict=screen.verdict,
        dominant_stage=dominant, findings=findings, torch_mismatches=mismatches,
        torch_total=int(lay.quantized_output.size), diagnosed=diagnosis is not None,
        bn_folded=lay.bn_folded, notes=lay.notes,
        output_dtype="float32" if lay.output_float32 else "quint8")


def judged_findings(report: Report) -> tuple[LayerFinding, ...]:
    """The as_given path's findings (the module as it is), most severe first."""
    return tuple(LayerFinding(f.code, f.severity, f.title) for f in report.findings
                 if f.path in (None, "as_given"))


def ladder_dominant(report: Report) -> str | None:
    p = report.path("as_given")
    if p is None:
        return None
    shares = [(s.share, s.id) for s in p.stages if s.applies and s.share]
    return max(shares)[1] if shares else None


#: The gate's name for a breach by a finding about the whole model.
MODEL = "(model)"


def _gate(rows: tuple[LayerRow, ...], options: WalkOptions,
          model_findings: tuple[Finding, ...] = ()) -> ModelGate:
    breaches = [LayerBreach(MODEL, f"{f.code} ({f.severity}): {f.title}")
                for f in model_findings if f.severity in LEVELS[options.fail_on]]
    for row in rows:
        sqnr = row.own.sqnr_db
        if options.fail_under_sqnr is not None and sqnr is not None \
                and sqnr < options.fail_under_sqnr:
            breaches.append(LayerBreach(row.name, f"own SQNR {sqnr:.2f} dB < "
                                                  f"{options.fail_under_sqnr} dB"))
        if options.max_abs_error is not None and row.own.max_abs > options.max_abs_error:
            breaches.append(LayerBreach(row.name, f"own max abs error {row.own.max_abs:.6g} > "
                                                  f"{options.max_abs_error}"))
        for f in row.findings:
            if f.severity in LEVELS[options.fail_on]:
                breaches.append(LayerBreach(row.name, f"{f.code} ({f.severity}): {f.title}"))
    return ModelGate(options.fail_under_sqnr, options.max_abs_error, options.fail_on,
                     tuple(breaches))


def diagnose_model(float_model: object, quantized_model: object, inputs: object, top: int = 3,
                   options: WalkOptions | None = None, max_elements: int | None = None,
                   progress: Progress | None = None, calibration: object = None
                   ) -> ModelReport:
    """Capture (``capture_model``, no file) and walk a model in-process::

        report = qconvdiag.diagnose_model(model.eval(), quantized, [x1, x2], top=3)
        print(report.ranking[0], report.layer(report.ranking[0]).own.sqnr_db)
    """
    import dataclasses

    from .capture import capture_model

    bundle = capture_model(float_model, quantized_model, inputs, None, calibration=calibration,
                           max_elements=max_elements, progress=progress)
    options = dataclasses.replace(options or WalkOptions(), top=top)
    return walk_model(bundle, options, progress).report
