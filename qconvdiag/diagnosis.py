"""diagnose(): case -> paths -> emulation, stage ladder and budget per path -> findings and
verdicts -> Report. The orchestration only: each step lives in its own module, and nothing here
prints (``progress`` is the caller's)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .arithmetic.cpu import cpu_info
from .arithmetic.emulate import Emulation, Kernel, emulate
from .arithmetic.engines import (
    ENGINES,
    PT2E_ENGINES,
    LayerAttrs,
    probe,
    probe_pt2e,
    refusal_message,
    refusals,
    select_kernel,
    torch_engines,
)
from .arithmetic.float_conv import conv64
from .arithmetic.torch_ref import TorchRun, run_conv, run_eager_qdq
from .case import ConvCase
from .errors import UsageError
from .findings import ROOTS, run_findings
from .findings.verdict import verdicts
from .gate import FAIL_ON, evaluate_gate
from .measure.budget import compute_budget
from .measure.compare import compare_engines
from .measure.evidence import (
    OutputArrays,
    PathArrays,
    PathRun,
    exec_weight_qparams,
    saturation_without_vnni,
)
from .measure.ladder_plan import LadderInputs, stage_ids
from .measure.metrics import error_metrics, summary
from .measure.reference import float_reference
from .measure.stages import Ladder, run_ladder
from .quantization.paths import PathSpec, ProductionOptions, build_as_given, build_production
from .quantization.qparams import QParams
from .report import PathReport, Report, StageResult, TorchCheck
from .torch_calls import capture_warnings
from .versions import unverified_torch_note

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    engine: str | None = None
    """Engine name, ``all``, or None for torch's current default engine."""
    production: ProductionOptions = field(default_factory=ProductionOptions)
    calib: np.ndarray | None = None
    """Calibration inputs (B, C, *spatial) for the production observers."""
    fail_under_sqnr: float | None = None
    max_abs_error: float | None = None
    fail_on: str = "never"
    ignore: tuple[str, ...] = ()
    keep_arrays: bool = False
    """Keep every stage's state and delta (for --save-outputs and tests); costs memory."""
    production_path: bool = True
    """Diagnose the production path too (the engine's observers on this case). Without it a
    case with a complete setup gets its as_given path alone (the model walk's screening)."""


@dataclass(frozen=True, eq=False)
class Diagnosis:
    """The report, and what it was computed from: every path's run, when kept the output
    arrays (--save-outputs), and the case (its tensors, for --html's histograms)."""

    report: Report
    runs: tuple[PathRun, ...]
    arrays: OutputArrays
    case: ConvCase | None = None


def diagnose(case: ConvCase, options: Options | None = None,
             progress: Progress | None = None) -> Report:
    """Explain ``case``: the full report (paths, stages, budget, findings, verdicts, gate).

    ``progress`` (optional) is called with a short message before each long step.
    """
    return run_diagnosis(case, options, progress).report


def with_calibration_ranges(case: ConvCase, calib: np.ndarray) -> ConvCase:
    """``case`` with what its qparams were calibrated for, from the calibration batches
    ``calib``: their range and the input's, and the float conv's output range on them (after
    the fused ReLU; not for a reflect-padded case, whose input holds its padding). Each is
    judged against where it is like the case's own (``budget.calibrated_span``,
    ``budget.output_span_of``), as the production path's observers see them."""
    import torch

    from .case import REFLECT_NOTE
    from .quantization.paths import float_layer

    x = case.input
    case = dataclasses.replace(case, input_calibration_range=(
        float(min(calib.min(), x.min())), float(max(calib.max(), x.max()))))
    if REFLECT_NOTE in case.notes:
        return case
    with torch.no_grad():
        y = float_layer(case, torch.from_numpy(np.ascontiguousarray(calib, dtype=np.float32)))
    return dataclasses.replace(case, output_calibration_range=(float(y.min()), float(y.max())))


def run_diagnosis(case: ConvCase, options: Options | None = None,
                  progress: Progress | None = None) -> Diagnosis:
    import torch

    from .runtime import single_threaded_blas

    options = options or Options()
    if options.fail_on not in FAIL_ON:
        raise UsageError(f"--fail-on must be one of {', '.join(FAIL_ON)}")
    if options.calib is not None and options.calib.size and case.input_calibration_range is None:
        case = with_calibration_ranges(case, options.calib)
    with single_threaded_blas(math.prod(case.output_shape)):
        runs, torch_warnings = diagnose_runs(case, options, progress)
        if progress is not None:
            progress("findings")
        y0 = runs[0].float_output  # the reference every path was measured against
        assert y0 is not None
        findings = run_findings(case, runs, torch_warnings, options.ignore)
        path_verdicts = verdicts(runs, findings, ROOTS)
    status, gate = evaluate_gate([r.report for r in runs], findings, options.fail_under_sqnr,
                                 options.max_abs_error, options.fail_on)
    case_summary = case.summary()
    version_note = unverified_torch_note(torch.__version__)
    if version_note is not None:
        case_summary = dataclasses.replace(case_summary,
                                           notes=(*case_summary.notes, version_note))
    report = Report(
        qconvdiag_version=__version__,
        torch_version=torch.__version__,
        cpu=cpu_info(),
        case=case_summary,
        float_output=summary(np.maximum(y0, 0.0) if case.activation == "relu" else y0),
        paths=tuple(r.report for r in runs),
        findings=tuple(findings),
        status=status,
        gate=gate,
        torch_warnings=tuple(torch_warnings),
        engine_comparison=compare_engines(runs),
        verdicts=path_verdicts,
    )
    return Diagnosis(report, tuple(runs), output_arrays(runs, y0), case)


def diagnose_runs(
    case: ConvCase, options: Options, progress: Progress | None = None
) -> tuple[list[PathRun], list[str]]:
    """Every path on every requested engine (the as_given path first), and the warnings torch
    raised meanwhile."""
    from .memo import forget_all, memo_scope

    say = progress or (lambda _msg: None)
    engines = resolve_engines(options.engine, case.pt2e, case.engine)
    runs: list[PathRun] = []
    # Hashing array contents costs ~1 ms per MB; it pays off only when engines share work.
    with capture_warnings() as torch_warnings, memo_scope(by_content=len(engines) > 1):
        say("probing the engines on this CPU")
        probe()
        cache: dict[Any, Any] = {}
        specs = _build_paths(case, options, engines, cache, say)
        # the float reference's grid: the reference engine's default production path (with the
        # defaults a path diagnosed anyway), or, without production paths, the first path's
        first = next(iter(specs.values()))
        grid = (build_production(case, reference_engine(), ProductionOptions(), None, cache)
                if options.production_path else first[1] or first[0])
        assert grid is not None
        cache.pop("float32_output", None)  # calibration is over
        # torch's quantized convs first, while little else is held: their working memory is
        # then reused by the arrays that follow instead of adding to the peak
        say("torch's quantized convs (the torch check)")
        checks = {(e, spec.name): torch_run(case, spec, e) for e, pair in specs.items()
                  for spec in pair if spec is not None}
        say("float reference (exact integer conv + float32 convs of rounding differences)")
        # derived from one fixed grid (the reference engine's default production path), so it
        # does not depend on --engine, --observer or --calib, bit for bit
        y0 = float_reference(case, grid.input_qparams, grid.input_codes, grid.weight_qparams,
                             grid.weight_codes)
        for engine, (production, as_given) in specs.items():
            prod_run = None
            if production is not None:
                # production first: it reuses the reference's convs; with one engine nothing is
                # reused after it, so the shared results are dropped before the as_given path
                say(f"{engine}: production path (emulation, stage ladder)")
                prod_run = run_path(case, production, engine, y0, options.keep_arrays,
                                    checks.pop((engine, production.name)))
                if len(engines) == 1:
                    forget_all()
            if as_given is not None:
                say(f"{engine}: as_given path (emulation, stage ladder)")
                runs.append(run_path(case, as_given, engine, y0, options.keep_arrays,
                                     checks.pop((engine, as_given.name))))
            if prod_run is not None:
                runs.append(prod_run)
    return runs, list(torch_warnings)


def diagnose_path(case: ConvCase, name: str, options: Options) -> PathRun:
    """One path on one engine (what ``trace`` needs), not the whole diagnosis: the
    production observers (the as_given path falls back on them), torch's run of that path,
    and the same float reference the full diagnosis uses."""
    from .memo import memo_scope

    (engine,) = resolve_engines(options.engine, case.pt2e, case.engine)
    with capture_warnings(), memo_scope(by_content=False):
        probe()
        cache: dict[Any, Any] = {}
        grid = build_production(case, reference_engine(), ProductionOptions(), None, cache)
        production = build_production(case, engine, options.production, options.calib, cache)
        spec = production if name == "production" else build_as_given(case, production)
        if spec is None or name not in ("as_given", "production"):
            have = "as_given, production" if case.setup is not None else "production"
            raise UsageError(f"--path {name}: this case has no such path (it has: {have})")
        y0 = float_reference(case, grid.input_qparams, grid.input_codes, grid.weight_qparams,
                             grid.weight_codes)
        return run_path(case, spec, engine, y0)


def _build_paths(case: ConvCase, options: Options, engines: tuple[str, ...],
                 cache: dict[Any, Any], say: Progress
                 ) -> dict[str, tuple[PathSpec | None, PathSpec | None]]:
    """(production, as_given) per engine; ``cache`` shares observers where the engines'
    qconfigs agree (one per diagnosis)."""
    out: dict[str, tuple[PathSpec | None, PathSpec | None]] = {}
    for engine in engines:
        def production(engine: str = engine) -> PathSpec:
            say(f"{engine}: calibrating the production observers")
            return build_production(case, engine, options.production, options.calib, cache)

        if options.production_path or case.setup is None:
            built = production()
            out[engine] = (built, build_as_given(case, built))
        else:
            out[engine] = (None, build_as_given(case, production))
    return out


def resolve_engines(engine: str | None, pt2e: bool = False,
                    recorded: str | None = None) -> tuple[str, ...]:
    """The engines to diagnose on. A PT2E case (``pt2e``) runs on ``x86_inductor`` by default
    and with ``all`` on it first, then on torch's engines; an eager case keeps torch's engines
    (its default: the engine it was captured on, ``recorded``, else torch's current one;
    ``all``: every one this build has), and runs on ``x86_inductor`` only when asked by name.
    A PT2E engine needs torchao (the extra)."""
    import torch

    supported = torch_engines()
    if engine is None and pt2e:
        engine = PT2E_ENGINES[0]
    if engine is None and recorded is not None and recorded in supported:
        return (recorded,)
    if engine is None:
        current = torch.backends.quantized.engine
        return (current if current in supported else supported[0],)
    if engine == "all":
        if pt2e:
            return (*_pt2e_engines(PT2E_ENGINES), *supported)
        # the engine the case was captured on first: the verdict and the gate are its, as
        # without --engine (a qnnpack case's warning was x86's info under 'all')
        first = recorded if recorded in supported else None
        return (*([first] if first else []), *(e for e in supported if e != first))
    if engine in PT2E_ENGINES:
        return _pt2e_engines((engine,))
    if engine not in ENGINES:
        raise UsageError(f"unknown engine '{engine}': use one of "
                         f"{', '.join((*ENGINES, *PT2E_ENGINES))} or all")
    if engine not in supported:
        raise UsageError(
            f"engine '{engine}' is not available in this torch build (available: "
            f"{', '.join(supported)})"
        )
    return (engine,)


def _pt2e_engines(engines: tuple[str, ...]) -> tuple[str, ...]:
    """``engines`` (PT2E ones), once torchao is there and torch has their kernels."""
    from .torchao_import import require_torchao

    require_torchao(f"engine {engines[0]}")
    for engine in engines:
        if not probe_pt2e()[engine].available:
            raise UsageError(f"engine '{engine}' is not available in this torch build (its "
                             "oneDNN kernels, torch.ops.onednn.qconv_pointwise, refused to run)")
    return engines


def reference_engine() -> str:
    """The engine whose default production grid the float reference is derived from."""
    return next(iter(torch_engines()), "x86")


def torch_run(case: ConvCase, spec: PathSpec, engine: str) -> TorchRun:
    """torch's own quantized conv on the path's codes (the module's weight and output qparams
    when the case holds a module): what the ladder's last rung and the torch check compare."""
    out_qp = spec.final_output_qparams
    return run_conv(engine, spec.input_codes, spec.input_qparams, spec.run_weight_codes,
                    exec_weight_qparams(spec.run_weight_qparams), spec.run_bias,
                    out_qp.scale[0], out_qp.zero_point[0], case.geometry,
                    relu=case.activation == "relu")


def run_path(case: ConvCase, spec: PathSpec, engine: str, y0: np.ndarray | None = None,
             keep: bool = False, tr: TorchRun | None = None) -> PathRun:
    """Emulate, ladder, budget and torch-check one path (``tr``: torch's run, when made)."""
    from .runtime import single_threaded_blas

    with single_threaded_blas(math.prod(case.output_shape)):
        return _run_path(case, spec, engine, y0, keep, tr)


@dataclass(frozen=True)
class _Kernels:
    """The kernel of the path's own setup, and of what torch runs (the module's, if any)."""

    setup: Kernel
    run: Kernel
    refused: str | None
    """Why the engine refuses what torch runs (None: it runs)."""
    can_emulate: bool


def layer_kernel(case: ConvCase, engine: str, input_qp: QParams, weight_qp: QParams,
                 output_qp: QParams, float_output: bool = False) -> Kernel:
    """The kernel that runs this conv with these qparams on ``engine`` (``weight_qp`` as the
    kernel executes it); on a PT2E engine, the implementation oneDNN picks for this very
    layer (``engines.onednn_arithmetic``), with a float32 output when ``float_output``."""
    g = case.geometry
    out_c, cin_g = case.weight.shape[0], case.weight.shape[1]
    args = (g.groups, cin_g, out_c // g.groups, g, case.kernel_size)
    if engine not in PT2E_ENGINES:
        return select_kernel(engine, weight_qp, *args)
    attrs = LayerAttrs(input_qp.zero_point[0] != 0,
                       not float_output and output_qp.zero_point[0] != 0, float_output,
                       relu=case.activation == "relu", per_channel=weight_qp.per_channel)
    return select_kernel(engine, weight_qp, *args, input_shape=tuple(case.input.shape),
                         attrs=attrs)


#: Refusals whose arithmetic no kernel defines, so the path is not emulated either: a count of
#: weight scales other than the output channels', and per-channel activations.
UNDEFINED = ("per_channel_count", "input_per_channel")


def _kernels(case: ConvCase, spec: PathSpec, engine: str) -> _Kernels:
    out_c = case.weight.shape[0]
    w_exec = exec_weight_qparams(spec.weight_qparams)
    setup = layer_kernel(case, engine, spec.input_qparams, w_exec, spec.output_qparams)
    run_w_qp = exec_weight_qparams(spec.run_weight_qparams)
    run = (layer_kernel(case, engine, spec.input_qparams, run_w_qp, spec.final_output_qparams)
           if spec.module else setup)
    run_refusals = refusals(run.kernel, spec.input_qparams, run_w_qp, out_c)
    can_emulate = not any(r.rule in UNDEFINED for r in
                          refusals(setup.kernel, spec.input_qparams, w_exec, out_c)
                          + run_refusals)
    refused = "; ".join(refusal_message(r, spec.input_qparams, run_w_qp, out_c)
                        for r in run_refusals) or None
    return _Kernels(setup, run, refused, can_emulate)


def _run_path(case: ConvCase, spec: PathSpec, engine: str, y0: np.ndarray | None,
              keep: bool, tr: TorchRun | None) -> PathRun:
    g = case.geometry
    k = _kernels(case, spec, engine)
    tr = tr if tr is not None else torch_run(case, spec, engine)
    refused = (tr.error if not tr.ran else None) or k.refused
    em = mem = ladder = None
    if k.can_emulate:
        relu = case.activation == "relu"
        em = emulate(k.setup, spec.input_codes, spec.input_qparams, spec.weight_codes,
                     exec_weight_qparams(spec.weight_qparams), spec.bias, spec.output_qparams,
                     g, relu)
        if spec.module is not None:
            m = spec.module
            mem = emulate(k.run, spec.input_codes, spec.input_qparams, m.weight_codes,
                          exec_weight_qparams(m.weight_qparams), m.bias, m.output_qparams, g,
                          relu)
        ladder = _ladder(case, spec, engine, em, mem, tr, y0, keep)
    final_em = mem if mem is not None else em
    if y0 is None:
        y0 = ladder.float_output if ladder is not None else conv64(
            case.input, case.weight, case.bias, g)
    report = _path_report(case, spec, engine, k, refused, ladder, _torch_check(engine, tr,
                                                                               final_em), y0,
                          em, final_em)
    # what a CPU without VNNI would do to the user's own setup (advice for the judged path)
    hypothetical = saturation_without_vnni(spec, k.run, g) \
        if spec.name == "as_given" and em is not None else None
    return PathRun(report, spec, k.setup, em, mem, ladder,
                   tr.output_codes if tr.ran else None, tuple(tr.warnings), g, y0, hypothetical,
                   case.activation)


def _ladder(case: ConvCase, spec: PathSpec, engine: str, em: Emulation,
            mem: Emulation | None, tr: TorchRun, y0: np.ndarray | None, keep: bool) -> Ladder:
    ran = mem if mem is not None else em
    torch_same = None
    if tr.ran and tr.output_codes is not None:  # one comparison for the check and ladder
        torch_same = bool(np.array_equal(tr.output_codes, ran.output_codes))
    m = spec.module
    return run_ladder(case, LadderInputs(
        input_qparams=spec.input_qparams,
        weight_qparams=spec.weight_qparams,
        weight_exec_qparams=exec_weight_qparams(spec.weight_qparams),
        output_qparams=spec.output_qparams,
        input_codes=spec.input_codes,
        weight_codes=spec.weight_codes,
        bias=spec.bias,
        emulation=em,
        module_emulation=mem,
        module_output_qparams=m.output_qparams if m else None,
        module_weight=(m.weight_codes, m.weight_qparams) if m and mem is not None else None,
        module_bias=m.bias if m else None,
        module_reason=("the production path builds its own module with from_float"
                       if spec.name == "production"
                       else "the case holds no quantized module state (qconv.*)"),
        torch_codes=tr.output_codes if tr.ran else None,
        torch_reason=f"torch did not run it on {engine}: {tr.error}",
        torch_same=torch_same,
        relu=case.activation == "relu",
        eager_unclamped=(run_eager_qdq(spec.input_codes, spec.input_qparams, spec.weight_codes,
                                       exec_weight_qparams(spec.weight_qparams), spec.bias,
                                       spec.output_qparams, case.geometry)
                         if engine in PT2E_ENGINES else None),
    ), y0=y0, keep=keep)


def _torch_check(engine: str, tr: TorchRun, ran: Emulation | None) -> TorchCheck:
    if tr.ran and ran is not None and tr.output_codes is not None:
        diff = np.abs(tr.output_codes.astype(np.int64) - ran.output_codes)
        n = int(np.count_nonzero(diff))
        return TorchCheck(True, engine, n, float(diff.max()) if n else 0.0)
    return TorchCheck(False, engine, None, None, tr.error)


def _path_report(case: ConvCase, spec: PathSpec, engine: str, k: _Kernels, refused: str | None,
                 ladder: Ladder | None, check: TorchCheck, y0: np.ndarray,
                 em: Emulation | None, ran: Emulation | None) -> PathReport:
    qparams = {"input": spec.input_qparams, "weight": spec.weight_qparams,
               "output": spec.output_qparams}
    if spec.module is not None:
        qparams["module_weight"] = spec.module.weight_qparams
        qparams["module_output"] = spec.module.output_qparams
    if ladder is not None:
        stages, total, out_summary = ladder.stages, ladder.total, ladder.final_summary
        budget = compute_budget(case, spec, k.setup, stages, total.rmse, y0, em)
    else:
        reason = f"cannot run: {refused}"
        stages = tuple(StageResult(s, False, reason, None, None, None, None)
                       for s in stage_ids(engine in PT2E_ENGINES))
        total = error_metrics(np.zeros_like(y0), y0, None)
        out_summary, budget = None, None
    return PathReport(
        name=spec.name, engine=engine, kernel=k.run.kernel, accumulation=k.run.accumulation,
        qparams={key: qp.report() for key, qp in qparams.items()}, stages=stages, total=total,
        output_summary=out_summary, torch_check=check,
        saturated_pairs=ran.saturated_pairs if ran is not None else 0,
        observers=spec.observers, notes=spec.notes, refused=refused, budget=budget,
        setup_kernel=k.setup.kernel, setup_accumulation=k.setup.accumulation,
    )


def output_arrays(runs: list[PathRun], y0: np.ndarray) -> OutputArrays:
    """The arrays --save-outputs writes (the stage states only when they were kept)."""
    paths = []
    for r in runs:
        if r.ladder is None:
            continue
        final = r.module_emulation if r.module_emulation is not None else r.emulation
        paths.append(PathArrays(
            path=r.report.name, engine=r.report.engine, quantized=r.ladder.final,
            quantized_int=None if final is None else final.output_codes,
            torch_int=r.torch_codes, stages=dict(r.ladder.states)))
    return OutputArrays(np.asarray(y0, dtype=np.float64), tuple(paths))
