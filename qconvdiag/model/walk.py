"""The model walk: which conv of a model is to blame.

Every captured conv is *screened* (screen.py: its own, propagated and received-input errors and
its floor, for one float conv per layer; no stage ladder, no emulation). The torch check (the
emulation of the module on its captured input against the codes the model computed) comes with
a layer's diagnosis, or on every layer with ``--torch-check all``.

A layer above its floor gets the judged path's diagnosis (as_given alone: the module as it is),
for its findings and its stage ladder. A layer at its floor gets none: findings fire only on
error above the floor, so it has none to give. The worst ``top`` layers by own error, and the
layers asked for by name, get the full single-conv diagnosis (the production path as well, as
``qconvdiag explain`` gives a case).

The stage ladder and the findings model a quantized output, so a conv whose kernel writes
float32 (a PT2E conv before a residual add) is screened only, never diagnosed nor explained.
Findings about the whole model come last: QCD063 (compiled.py), QCD064 (reuse.py), QCD065
(lost.py, from ``upstream_losses``; the op it names: ops.py), QCD066 (channels.py), QCD067
(engine.py: where the torch check finds another engine's kernels ran, the walk runs again on
that engine) and QCD068 (stale.py).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..arithmetic.engines import PT2E_ENGINES
from ..case import trained_with_qat
from ..diagnosis import Diagnosis, Options, run_diagnosis
from ..errors import UsageError
from ..gate import FAIL_ON, LEVELS
from ..measure.budget import FAR
from ..model_report import (
    LayerBreach,
    LayerDetail,
    LayerFinding,
    LayerRow,
    ModelGate,
    ModelReport,
    UpstreamLoss,
)
from ..parallel import two_at_a_time
from ..quantization.paths import ProductionOptions
from ..report import Finding, Report
from .after import qcd071
from .batchnorm import CODE as BN_CODE
from .batchnorm import COST_DB as BN_COST_DB
from .batchnorm import qcd072
from .bundle import LayerCapture, ModelBundle
from .calibration import qcd076
from .channels import qcd066
from .compiled import qcd063
from .constant import qcd074
from .engine import CODE as QCD067
from .engine import EngineThatRan, engine_that_ran, qcd067
from .lost import inputs_unlike, qcd065, qcd069, qcd069_training, unlike_inputs_sentence
from .ops import EXPLAINS_DB, OpRange, between, for_loss
from .refold import CODE as FOLD_CODE
from .refold import qcd073
from .relu import qcd075
from .reuse import CODE as REUSE_CODE
from .reuse import qcd064
from .screen import Screen, module_spec, screen_layer, spec_kernel, torch_check
from .stale import qcd068

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
            raise UsageError(f"--layer {name}: its output is float32 (its consumer takes "
                             "float: a residual add or an activation inductor fuses into the "
                             "conv): it is screened only; the diagnosis models quantized "
                             "outputs")
    with single_threaded_blas():
        return _walk(bundle, options, progress or (lambda _msg: None))


def _walk(bundle: ModelBundle, options: WalkOptions, say: Progress,
          ran: EngineThatRan | None = None) -> ModelDiagnosis:
    """The walk of ``bundle`` on its engine (``ran``: the engine that ran its convs, found by a
    first walk on the recorded one: QCD067)."""
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
        spec_kernel(lay.case, module_spec(lay.case), engine, lay.output_float32)  # (cached)
    screens = dict(zip([lay.name for lay in bundle.layers],
                       two_at_a_time(lambda lay: screen_layer(lay, engine), list(bundle.layers))))
    ranking = rank(screens)
    # convs whose kept BatchNorm costs its output what fusing it would not (QCD072)
    kept_bn = [(lay.name, lay.bn_kept, cost) for lay in bundle.layers
               if lay.bn_kept is not None and (cost := screens[lay.name].bn_kept) is not None]
    unfused = [(name, kept, cost) for name, kept, cost in kept_bn if cost.cost_db >= BN_COST_DB]
    # convs whose unfused ReLU costs its output what fusing it would not (QCD075)
    unfused_relus = [(lay.name, relu) for lay in bundle.layers
                     if (relu := screens[lay.name].relu) is not None]
    floats = {lay.name for lay in bundle.layers if lay.output_float32}
    explainable = [name for name in ranking if name not in floats]
    explain = list(dict.fromkeys([*explainable[:options.top], *options.layers]))
    diagnoses: dict[str, Diagnosis] = {}
    for lay in bundle.layers:
        if lay.output_float32:
            continue
        full = lay.name in explain
        if full or screens[lay.name].verdict != "at_floor" or _output_defaults(lay):
            say(f"diagnosing {lay.name}" + (" (in full)" if full else ""))
            # its fixes in the model's own flow (an FX model's prepare_fx)
            case = dataclasses.replace(lay.case, model_flow=bundle.flow)
            diagnoses[lay.name] = run_diagnosis(case, _options(options, engine, full))
    checks = {}
    for lay in bundle.layers:
        d = diagnoses.get(lay.name)
        if d is not None:
            checks[lay.name] = _diagnosis_check(lay, d)
        elif options.torch_check == "all" or (
                lay.output_float32 and screens[lay.name].verdict != "at_floor"):
            say(f"torch check of {lay.name}")
            checks[lay.name] = torch_check(lay, engine)
    if ran is None and engine not in PT2E_ENGINES:
        other = engine_that_ran(bundle, checks)
        if other is not None:
            say(f"the convs ran {other.engine}'s kernels, not {engine}'s: walking again on "
                f"{other.engine}")
            return _walk(dataclasses.replace(bundle, engine=other.engine), options, say, other)
    rows = tuple(_row(lay, engine, screens[lay.name], diagnoses.get(lay.name),
                      checks.get(lay.name), options.ignore) for lay in bundle.layers)
    pt2e = engine in PT2E_ENGINES
    # the captured samples against the calibration batches, at the first conv (a stub never
    # calibrated is said as such)
    first = bundle.layers[0]
    unlike = None if screens[first.name].input_defaults else inputs_unlike(first)
    upstream = upstream_losses([lay.name for lay in bundle.layers], screens,
                               pt2e or bundle.flow == "fx",
                               {c: r.kind for r in bundle.reused for c in r.missing_after()},
                               bundle.ops,
                               {c: bn for r in bundle.reused for c, bn in zip(r.misfused,
                                                                              r.across)
                                if REUSE_CODE not in options.ignore},
                               {name: kept.name for name, kept, _c in unfused
                                if BN_CODE not in options.ignore}, unlike,
                               {f.conv: (f.bn, f.readers_sqnr_db) for f in bundle.shared_folds
                                if FOLD_CODE not in options.ignore})
    lost = qcd065(upstream, pt2e, bundle.ops, engine, bundle.flow,
                  carried_to_end([lay.name for lay in bundle.layers], screens), unlike)
    # a BatchNorm whose statistics moved, named by QCD065 with the loss it causes already
    drift_named = "QCD065" not in options.ignore and any(
        for_loss(op, u.input.sqnr_db).drifted() for u in upstream if u.blamed_on is None
        for op in bundle.ops if op.name == u.op)
    # a conv packed on another engine differs from qnnpack's packing for that reason (QCD067)
    model_findings = tuple(f for f in [qcd068(() if ran is not None else bundle.stale),
                                       qcd067(ran, {n: s.floor_rmse
                                                    for n, s in screens.items()}),
                                       qcd063(bundle.compiled, pt2e),
                                       *qcd064(bundle.reused, pt2e, upstream),
                                       *lost,
                                       *qcd066(bundle.layers, screens,
                                               {u.layer for u in upstream}, pt2e),
                                       qcd069(bundle.ops, drift_named, bundle.flow),
                                       qcd069_training(bundle.bn_training),
                                       qcd072(kept_bn, upstream),
                                       qcd073(bundle.shared_folds),
                                       qcd074(bundle.layers, screens, bundle.flow),
                                       qcd075(unfused_relus, any(
                                           trained_with_qat(lay.notes)
                                           for lay in bundle.layers)),
                                       qcd076(bundle.layers, screens, bundle.flow),
                                       qcd071(bundle.lost_after)]
                           if f is not None and f.code not in options.ignore)
    gate = _gate(rows, options, model_findings)
    notes = list(bundle.notes)
    if ran is not None:
        notes.append(f"emulated on engine {ran.engine}, whose kernels ran the convs; "
                     f"torch.backends.quantized.engine was {ran.recorded} at capture ({QCD067})")
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


def carried_to_end(order: list[str], screens: dict[str, Screen]) -> tuple[str, float] | None:
    """The last conv (``order``: model order) and its propagated SQNR, where no conv is broken
    by its own error: what the model carries to its end is then the losses before the convs
    (QCD065's grade, lost.py); None where a conv is, or the last is exact."""
    end = screens[order[-1]].propagated.sqnr_db
    if end is None or any(s.verdict == "broken" for s in screens.values()):
        return None
    return order[-1], end


#: A conv's input is lost upstream when it is this many dB worse than the worst propagated
#: error of the convs before it (errors of several branches add: two equal ones cost 3 dB).
UPSTREAM_DB = 10.0


def upstream_losses(order: list[str], screens: dict[str, Screen], graph_input: bool = False,
                    missing: dict[str, str] | None = None, ops: tuple[OpRange, ...] = (),
                    across: dict[str, str] | None = None, unfused: dict[str, str] | None = None,
                    unlike: float | None = None,
                    refolded: dict[str, tuple[str, float]] | None = None
                    ) -> tuple[UpstreamLoss, ...]:
    """Convs whose input is far worse than the convs before them explain: for a conv no
    earlier conv feeds (the first), its input is at least budget.FAR times the 8-bit floor of
    quantizing it; after that, its input SQNR is UPSTREAM_DB below the worst propagated SQNR of
    the convs before it (in model order: a residual branch's worst included), and its error
    FAR times that floor too. ``graph_input``: the model is a convert_pt2e or convert_fx
    graph, whose input quantization is a quantize_per_tensor node, not a QuantStub.
    ``missing``: convs that run without the activation the float model applies after them
    (QCD064), and its kind: a loss after one of them is blamed on that. ``ops``: the quantized
    ops with their own output qparams (an eager model's, ops.py): one that ran just before the
    conv with qparams that do not fit the float model's range there is named. ``across``:
    convs that fused an activation the float model applies after their BatchNorm, which the
    quantized model kept after them (QCD064), and that BatchNorm: their propagated error is
    measured before it (against the float conv's output, not what follows receives), so its
    input's error stands for what it delivers, and a loss after one is blamed on the fusion,
    not on the BatchNorm's qparams (fitted to the clipped values it receives). ``unfused``:
    convs whose BatchNorm the quantized model kept (not fused) at a cost (QCD072), and that
    BatchNorm: a loss after one is blamed on it, before the BatchNorm's qparams. ``unlike``:
    the captured samples' range at the first conv over the calibration batches' (where they
    differ: ``lost.inputs_unlike``), said of a stub that loses them. ``refolded``: a PT2E
    graph's convs whose BatchNorm prepare_pt2e folded while the float model reads their
    output elsewhere too (QCD073), that BatchNorm and what its other readers get (their SQNR):
    a loss after one is blamed on it where that explains it (ops.EXPLAINS_DB)."""
    across, unfused, refolded = across or {}, unfused or {}, refolded or {}
    stub = ("the quantize_per_tensor of the model's input" if graph_input else "its QuantStub")
    out = []
    worst: tuple[float, str] | None = None  # (propagated SQNR, conv) of the worst so far
    for name in order:
        s = screens[name]
        got = s.input.sqnr_db
        if worst is None:
            if s.input_floor_ratio >= FAR:
                named = between(ops, order, name, got)[:1]
                head = (f"{name}'s input is {_db_text(got)} from the float model's, "
                        f"{s.input_floor_ratio:.1f}x the rounding floor of quantizing it: ")
                if named and named[0].kind != "Quantize" and not s.input_defaults:
                    # an op between the model's input and the first conv that does not
                    # compute what the float model's does (measured), not the stub (a guess)
                    op = named[0]
                    out.append(UpstreamLoss(
                        name, s.input, s.input_floor_ratio, None, None,
                        f"{head}{op.label()}, between the model's input and {name}, "
                        f"loses it: {op.misfit()}.", op.name))
                else:
                    why = ("was never calibrated (scale 1.0, zero point 0: run calibration "
                           "batches between prepare and convert)" if s.input_defaults else
                           "has qparams fitted to the calibration batches"
                           if unlike is not None else
                           "has qparams that do not fit the inputs (calibrate it on inputs "
                           "scaled as at inference)")
                    numbers = "".join(f" {op.name}: {op.misfit()}." for op in named)
                    if unlike is not None and not s.input_defaults:
                        numbers += " " + unlike_inputs_sentence(unlike, name)
                    out.append(UpstreamLoss(
                        name, s.input, s.input_floor_ratio, None, None,
                        f"{head}the model's input quantization ({stub}) {why}, and loses it "
                        f"before any conv.{numbers}",
                        named[0].name if named and named[0].kind == "Quantize" else None))
        elif got is not None and got < worst[0] - UPSTREAM_DB and s.input_floor_ratio >= FAR:
            since = order.index(out[-1].layer) if out else 0  # after the last loss named
            clipped = [c for c in order[since:order.index(name)] if c in across]
            kept = [c for c in order[since:order.index(name)] if c in unfused]
            folds = [c for c in order[since:order.index(name)] if c in refolded
                     and refolded[c][1] <= got + EXPLAINS_DB]
            before = [c for c in order[since:order.index(name)] if c in (missing or {})]
            # an op whose qparams do not fit is measured evidence; a lost activation may
            # cost nothing (where what it clips is rare), so it is blamed only without one
            named = [] if clipped else between(ops, order, name, got)[:1]
            kept = [] if named else kept  # an op that misfits is measured: it is blamed
            folds = [] if named or kept else folds
            if named or folds:
                before = []
            cause = (f"{named[0].label()} loses it: {named[0].misfit()}"
                     if named else
                     f"the activation fused into {', '.join(clipped)} clips before its "
                     f"BatchNorm {across[clipped[0]]}, where the float model clips after it "
                     f"({REUSE_CODE})" if clipped else
                     f"the BatchNorm {unfused[kept[-1]]} kept after {kept[-1]} (not fused into "
                     "it) multiplies its output's per-tensor rounding error by per-channel "
                     f"gains ({BN_CODE})" if kept else
                     f"prepare_pt2e folded BatchNorm {refolded[folds[0]][0]} into {folds[0]}, "
                     "whose output other ops read too: they get it after the BatchNorm "
                     f"({FOLD_CODE})" if folds else
                     f"the {(missing or {})[before[0]]} the float model applies after "
                     f"{', '.join(before)} is gone in the quantized model ({REUSE_CODE}), "
                     "which lets negative values through" if before else
                     "an op between them (an add, a pool, a cat, a linear layer: its output "
                     "scale) loses it")
            before = clipped or ([] if kept else before)
            out.append(UpstreamLoss(
                name, s.input, None, worst[1], worst[0],
                f"{name}'s input is {_db_text(got)} from the float model's, {worst[0] - got:.1f}"
                f" dB worse than any conv before it delivers (worst: {worst[1]}"
                f"{' (its input)' if worst[1] in across else ''}, "
                f"{worst[0]:.1f} dB): {cause}.", named[0].name if named else None,
                REUSE_CODE if before else BN_CODE if kept else FOLD_CODE if folds else None,
                tuple(before) or tuple(kept[-1:]) or tuple(folds[:1])))
        # an across conv's propagated error is measured before its BatchNorm: what reaches
        # it stands for what it delivers
        p = s.input.sqnr_db if name in across else s.propagated.sqnr_db
        if p is not None and (worst is None or p < worst[0]):
            worst = (p, name)
        elif worst is None:
            worst = (math.inf, name)
    return tuple(out)


def _output_defaults(lay: LayerCapture) -> bool:
    """The conv writes its output at an uncalibrated observer's qparams (scale 1.0, zero point
    0: QCD050), evidence of its own whatever its error on the input it received (an input
    lost before it leaves it little to round: cxzhou95/XLSR#5's last conv, at 0.9x its floor,
    put every pixel at 0 or 1). Such a conv is diagnosed, so its finding shows."""
    from ..findings.qparams_rules import observer_default

    return not lay.output_float32 and observer_default(lay.quantized_output_qparams)


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
    """The as_given path's findings (the module as it is): the causes its verdict names, in
    its order (the table's first finding is the verdict's first cause), then the others, most
    severe first."""
    v = report.verdict
    causes = [c.code for c in v.causes] if v is not None and v.path == "as_given" else []
    mine = [f for f in report.findings if f.path in (None, "as_given")]
    mine.sort(key=lambda f: causes.index(f.code) if f.code in causes else len(causes))
    return tuple(LayerFinding(f.code, f.severity, f.title) for f in mine)


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


#: How capture_model's refusals begin.
CAPTURE_PREFIX = "capture_model:"


def diagnose_model(float_model: object, quantized_model: object, inputs: object, top: int = 3,
                   options: WalkOptions | None = None, max_elements: int | None = None,
                   progress: Progress | None = None, calibration: object = None
                   ) -> ModelReport:
    """Capture (``capture_model``, no file) and walk a model in-process::

        report = qconvdiag.diagnose_model(model.eval(), quantized, [x1, x2], top=3)
        print(report.ranking[0], report.layer(report.ranking[0]).own.sqnr_db)
    """
    import dataclasses

    from ..errors import CaseError
    from .capture import capture_model

    try:
        bundle = capture_model(float_model, quantized_model, inputs, None,
                               calibration=calibration, max_elements=max_elements,
                               progress=progress)
    except CaseError as exc:  # its refusals name the function the user called
        said = str(exc)
        if not said.startswith(CAPTURE_PREFIX):
            raise
        raise type(exc)("diagnose_model:" + said[len(CAPTURE_PREFIX):]) from None
    options = dataclasses.replace(options or WalkOptions(), top=top)
    return walk_model(bundle, options, progress).report
