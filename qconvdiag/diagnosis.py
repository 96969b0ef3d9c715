"""diagnose(): case -> paths -> emulation + stages -> findings -> Report. No printing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .budget import compute_budget
from .case import ConvCase, Geometry
from .emulate import emulate
from .engines import ENGINES, probe, refusal_message, refusals, select_kernel
from .errors import UsageError
from .evidence import PathRun, exec_weight_qparams, saturation_without_vnni
from .findings import ROOTS, run_findings
from .findings.verdict import verdicts
from .metrics import error_metrics, summary
from .paths import PathSpec, ProductionOptions, build_as_given, build_production
from .qparams import QParams
from .report import Finding, PathReport, Report, TorchCheck
from .stages import (
    STAGE_IDS,
    LadderInputs,
    StageResult,
    conv64,
    float_reference,
    run_ladder,
)
from .torch_ref import TorchRun, capture_warnings, captured_warnings, run_conv

FAIL_ON = ("error", "warning", "never")


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


def resolve_engines(engine: str | None) -> tuple[str, ...]:
    import torch

    supported = tuple(e for e in ENGINES if e in torch.backends.quantized.supported_engines)
    if engine is None:
        current = torch.backends.quantized.engine
        return (current if current in supported else supported[0],)
    if engine == "all":
        return supported
    if engine not in ENGINES:
        raise UsageError(f"unknown engine '{engine}': use one of {', '.join(ENGINES)} or all")
    if engine not in supported:
        raise UsageError(
            f"engine '{engine}' is not available in this torch build (available: "
            f"{', '.join(supported)})"
        )
    return (engine,)


def reference_engine() -> str:
    """The engine whose default production grid the float reference is derived from."""
    import torch

    supported = torch.backends.quantized.supported_engines
    return next((e for e in ENGINES if e in supported), "x86")


def torch_run(case: ConvCase, spec: PathSpec, engine: str) -> TorchRun:
    """torch's own quantized conv on the path's codes (the module's weight and output qparams
    when the case holds a module): what the ladder's last rung and the torch check compare."""
    m = spec.module
    w_qp = exec_weight_qparams(m.weight_qparams if m else spec.weight_qparams)
    final_out_qp = m.output_qparams if m else spec.output_qparams
    return run_conv(
        engine, spec.input_codes, spec.input_qparams,
        m.weight_codes if m else spec.weight_codes, w_qp,
        m.bias if m else spec.bias,
        final_out_qp.scale[0], final_out_qp.zero_point[0], case.geometry,
    )


def run_path(case: ConvCase, spec: PathSpec, engine: str, y0: np.ndarray | None = None,
             keep: bool = False, tr: TorchRun | None = None) -> PathRun:
    """Emulate, ladder and torch-check one path (``tr``: torch's run, when already made)."""
    import math

    from .runtime import single_threaded_blas

    with single_threaded_blas(math.prod(case.output_shape)):
        return _run_path(case, spec, engine, y0, keep, tr)


def _run_path(case: ConvCase, spec: PathSpec, engine: str, y0: np.ndarray | None,
              keep: bool, tr: TorchRun | None) -> PathRun:
    g = case.geometry
    out_c, cin_g = case.weight.shape[0], case.weight.shape[1]
    w_exec = exec_weight_qparams(spec.weight_qparams)
    out_g = out_c // g.groups
    ksize = case.kernel_size
    kernel = select_kernel(engine, w_exec, g.groups, cin_g, out_g, g, ksize)
    m = spec.module
    run_w_qp = exec_weight_qparams(m.weight_qparams) if m else w_exec
    run_kernel = select_kernel(engine, run_w_qp, g.groups, cin_g, out_g, g, ksize) if m else kernel
    refused_rows = refusals(run_kernel.kernel, spec.input_qparams, run_w_qp, out_c)
    can_emulate = not any(
        r.rule == "per_channel_count" for r in
        refusals(kernel.kernel, spec.input_qparams, w_exec, out_c)
        + refused_rows
    )
    qparams = {"input": spec.input_qparams, "weight": spec.weight_qparams,
               "output": spec.output_qparams}
    if m is not None:
        qparams["module_weight"] = m.weight_qparams
        qparams["module_output"] = m.output_qparams
    if tr is None:
        tr = torch_run(case, spec, engine)
    refused = tr.error if not tr.ran else None
    if refused is None and refused_rows:
        refused = "; ".join(refusal_message(r, spec.input_qparams, run_w_qp, out_c)
                            for r in refused_rows)
    em = mem = ladder = None
    torch_same: bool | None = None
    if can_emulate:
        em = emulate(kernel, spec.input_codes, spec.input_qparams, spec.weight_codes, w_exec,
                     spec.bias, spec.output_qparams, g)
        if m is not None:
            mem = emulate(run_kernel, spec.input_codes, spec.input_qparams, m.weight_codes,
                          run_w_qp, m.bias, m.output_qparams, g)
        ran_em = mem if mem is not None else em
        if tr.ran and tr.output_codes is not None:  # one comparison for the check and ladder
            torch_same = bool(np.array_equal(tr.output_codes, ran_em.output_codes))
        ladder = run_ladder(case, LadderInputs(
            input_qparams=spec.input_qparams,
            weight_qparams=spec.weight_qparams,
            weight_exec_qparams=w_exec,
            output_qparams=spec.output_qparams,
            input_codes=spec.input_codes,
            weight_codes=spec.weight_codes,
            bias=spec.bias,
            emulation=em,
            module_emulation=mem,
            module_output_qparams=m.output_qparams if m else None,
            module_reason=(
                "the production path builds its own module with from_float"
                if spec.name == "production"
                else "the case holds no quantized module state (qconv.*)"
            ),
            torch_codes=tr.output_codes if tr.ran else None,
            torch_reason=f"torch did not run it on {engine}: {tr.error}",
            torch_same=torch_same,
        ), y0=y0, keep=keep)
    final_em = mem if mem is not None else em
    if torch_same:
        check = TorchCheck(True, engine, 0, 0.0)
    elif tr.ran and final_em is not None and tr.output_codes is not None:
        diff = np.abs(tr.output_codes.astype(np.int64) - final_em.output_codes)
        check = TorchCheck(True, engine, int(np.count_nonzero(diff)), float(diff.max()))
    else:
        check = TorchCheck(False, engine, None, None, tr.error)
    if y0 is None:
        y0 = ladder.float_output if ladder is not None else conv64(
            case.input, case.weight, case.bias, g)
    if ladder is not None:
        stages = ladder.stages
        total = ladder.total
        out_summary = ladder.final_summary
    else:
        reason = f"cannot run: {refused}"
        stages = tuple(StageResult(s, False, reason, None, None, None, None) for s in STAGE_IDS)
        total = error_metrics(np.zeros_like(y0), y0, None)
        out_summary = {}
    budget = None
    if ladder is not None:
        budget = compute_budget(case, spec, kernel, stages, total.rmse, y0, em)
    report = PathReport(
        name=spec.name, engine=engine, kernel=run_kernel.kernel,
        accumulation=run_kernel.accumulation, setup_kernel=kernel.kernel,
        setup_accumulation=kernel.accumulation, qparams=qparams, stages=stages, total=total,
        output_summary=out_summary, torch_check=check,
        saturated_pairs=final_em.saturated_pairs if final_em is not None else 0,
        observers=spec.observers, notes=spec.notes, refused=refused, budget=budget,
    )
    # what a CPU without VNNI would do to the user's own setup (advice for the judged path)
    hypothetical = saturation_without_vnni(spec, run_kernel, g) \
        if spec.name == "as_given" and em is not None else None
    return PathRun(report, spec, kernel, em, mem, ladder,
                   tr.output_codes if tr.ran else None, tuple(tr.warnings), g, y0, hypothetical)


def _head(a: np.ndarray, n: int = 8) -> list[float]:
    return [float(v) for v in np.asarray(a, dtype=np.float64).reshape(-1)[:n]]


def cpu_info() -> dict[str, object]:
    import torch

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                       "amx_int8") if f in flags]
    return {
        "isa": isa,
        "torch_capability": torch.backends.cpu.get_cpu_capability(),
        "engines": {e: p.to_dict() for e, p in probe().items()},
    }


Progress = Callable[[str], None]


def diagnose_runs(
    case: ConvCase, options: Options, progress: Progress | None = None
) -> tuple[list[PathRun], list[str]]:
    """Every path on every requested engine, with torch's warnings captured."""
    say = progress or (lambda _msg: None)
    engines = resolve_engines(options.engine)
    runs: list[PathRun] = []
    from .memo import forget_all, memo_scope

    # Hashing array contents costs ~1 ms per MB; it pays off only when engines share work.
    with capture_warnings(), memo_scope(by_content=len(engines) > 1):
        say("probing the engines on this CPU")
        probe()
        keep = options.keep_arrays
        production_cache: dict[Any, Any] = {}
        # The float reference is derived from one fixed grid, the default production path of
        # the reference engine, so it does not depend on --engine, --observer or --calib
        # (bit for bit); with the defaults that path is diagnosed anyway and shares its work.
        grid = build_production(case, reference_engine(), ProductionOptions(), None,
                                production_cache)
        productions, given = {}, {}
        for engine in engines:
            say(f"{engine}: calibrating the production observers")
            productions[engine] = build_production(case, engine, options.production,
                                                   options.calib, production_cache)
            given[engine] = build_as_given(case, productions[engine])
        production_cache.pop("float32_output", None)  # calibration is over
        # torch's quantized convs first, while little else is held: their working memory is
        # then reused by the arrays that follow instead of adding to the peak
        say("torch's quantized convs (the torch check)")
        checks = {(engine, spec.name): torch_run(case, spec, engine) for engine in engines
                  for spec in (productions[engine], given[engine]) if spec is not None}
        say("float reference (exact integer conv + float32 convs of rounding differences)")
        y0 = float_reference(case, grid.input_qparams, grid.input_codes, grid.weight_qparams,
                             grid.weight_codes)
        for engine in engines:
            production, as_given = productions[engine], given[engine]
            # production first: it reuses the reference's convs; with one engine nothing is
            # reused after it, so the shared results are dropped before the as_given path
            say(f"{engine}: production path (emulation, stage ladder)")
            prod_run = run_path(case, production, engine, y0, keep,
                                checks.pop((engine, production.name)))
            if len(engines) == 1:
                forget_all()
            if as_given is not None:
                say(f"{engine}: as_given path (emulation, stage ladder)")
                runs.append(run_path(case, as_given, engine, y0, keep,
                                     checks.pop((engine, as_given.name))))
            runs.append(prod_run)
    return runs, list(captured_warnings())


def diagnose(
    case: ConvCase, options: Options | None = None, progress: Progress | None = None
) -> Report:
    """Explain ``case``: the full report (paths, stages, findings, gate status).

    ``progress`` (optional) is called with a short message before each long step.
    """
    import torch

    from .runtime import single_threaded_blas

    options = options or Options()
    if options.fail_on not in FAIL_ON:
        raise UsageError(f"--fail-on must be one of {', '.join(FAIL_ON)}")
    import math

    with single_threaded_blas(math.prod(case.output_shape)):
        runs, torch_warnings = diagnose_runs(case, options, progress)
        if progress is not None:
            progress("findings")
        y0 = runs[0].float_output  # the reference every path was measured against
        assert y0 is not None
        findings = run_findings(case, runs, torch_warnings, options.ignore)
        path_verdicts = verdicts(runs, findings, ROOTS)
    status, gate = evaluate_gate([r.report for r in runs], findings, options)
    tensors = collect_tensors(runs, y0, multi_engine=len({r.report.engine for r in runs}) > 1)
    comparison = compare_engines(runs)
    return Report(
        qconvdiag_version=__version__,
        torch_version=torch.__version__,
        cpu=cpu_info(),
        case=case.summary() | {"has_user_setup": case.setup is not None},
        float_output=summary(y0) | {"values": _head(y0)},
        paths=tuple(r.report for r in runs),
        findings=tuple(findings),
        status=status,
        gate=gate,
        torch_warnings=tuple(torch_warnings),
        tensors=tensors,
        engine_comparison=tuple(comparison),
        verdicts=path_verdicts,
    )


def evaluate_gate(
    paths: list[PathReport], findings: list[Finding], options: Options
) -> tuple[str, dict[str, Any]]:
    """CI thresholds. They judge the as_given path when there is one, else production; so do
    the --fail-on levels (a production finding is advice when there is an as_given path)."""
    judged = [p for p in paths if p.name == "as_given"] or [p for p in paths
                                                           if p.name == "production"]
    breaches: list[str] = []
    for p in judged:
        if options.fail_under_sqnr is not None:
            sqnr = p.total.sqnr_db
            if p.refused or (sqnr is not None and sqnr < options.fail_under_sqnr):
                breaches.append(
                    f"{p.name}@{p.engine}: SQNR {'n/a' if sqnr is None else f'{sqnr:.2f}'} dB "
                    f"< {options.fail_under_sqnr} dB"
                )
        if options.max_abs_error is not None and (
            p.refused or p.total.max_abs > options.max_abs_error
        ):
            breaches.append(
                f"{p.name}@{p.engine}: max abs error {p.total.max_abs:.6g} > "
                f"{options.max_abs_error}"
            )
    levels = {"error": ("error",), "warning": ("error", "warning"), "never": ()}[options.fail_on]
    judged_names = {p.name for p in judged}
    for f in findings:
        # findings of the other path are advice: only the judged path's trip the gate
        if f.severity in levels and f.path in judged_names:
            breaches.append(f"{f.code} ({f.severity}): {f.title}")
    gate = {
        "fail_under_sqnr": options.fail_under_sqnr,
        "max_abs_error": options.max_abs_error,
        "fail_on": options.fail_on,
        "judged_path": judged[0].name if judged else None,
        "breaches": breaches,
    }
    return ("fail" if breaches else "ok"), gate


def collect_tensors(
    runs: list[PathRun], y0: np.ndarray, multi_engine: bool
) -> dict[str, np.ndarray]:
    """The arrays --save-outputs writes, named as DESIGN.md says."""
    out: dict[str, np.ndarray] = {"float_output": np.asarray(y0, dtype=np.float64)}
    for r in runs:
        p = r.report
        prefix = f"{p.name}@{p.engine}" if multi_engine else p.name
        if r.ladder is None:
            continue
        final_em = r.module_emulation if r.module_emulation is not None else r.emulation
        if r.ladder.final is not None:  # kept when the arrays are (keep_arrays)
            out[f"{prefix}.quantized"] = r.ladder.final
        if final_em is not None:
            out[f"{prefix}.quantized_int"] = final_em.output_codes
        if r.torch_codes is not None:
            out[f"{prefix}.torch_int"] = r.torch_codes
        for sid, state in r.ladder.states.items():
            out[f"{prefix}.stage.{sid}"] = state
    return out


def _same_qparams(a: PathSpec, b: PathSpec) -> bool:
    return all(
        (x.scale, x.zero_point, x.dtype, x.axis) == (y.scale, y.zero_point, y.dtype, y.axis)
        for x, y in ((a.input_qparams, b.input_qparams), (a.weight_qparams, b.weight_qparams),
                     (a.output_qparams, b.output_qparams))
    )


def compare_engines(runs: list[PathRun]) -> list[dict[str, object]]:
    """Per path, each engine against the first engine that ran it: how many outputs of the
    path's own setup (the ladder's) differ and why: torch's refusal, different default
    qparams, int16 pair saturation, or the requantization arithmetic."""
    import torch

    engines = {r.report.engine for r in runs}
    if len(engines) < 2:
        return []
    rows: list[dict[str, object]] = []
    for name in dict.fromkeys(r.report.name for r in runs):
        group = [r for r in runs if r.report.name == name]
        refused = {r.report.engine: _intended_refusal(r) for r in group}
        ref = next((r for r in group if not refused[r.report.engine]
                    and r.emulation is not None), None)
        for r in group:
            row: dict[str, object] = {
                "path": name, "engine": r.report.engine, "kernel": r.kernel.kernel,
                "accumulation": r.kernel.accumulation,
                "reference_engine": None if ref is None else ref.report.engine,
                "differing_elements": None, "max_diff_lsb": None, "causes": [],
            }
            causes: list[str] = []
            if refused[r.report.engine]:
                causes.append(f"{r.report.engine} refuses this setup: {refused[r.report.engine]}")
            em = r.emulation
            if ref is not None and em is not None and ref.emulation is not None and r is not ref \
                    and not refused[r.report.engine]:
                ref_em = ref.emulation
                # values, not codes: engines with other default qparams write other codes for
                # the same output; the difference is counted in the reference's output steps
                step = float(ref.spec.output_qparams.scale[0])
                diff = np.abs(_values(em.output_codes, r.spec) -
                              _values(ref_em.output_codes, ref.spec)) / step
                diff[diff < SAME_VALUE_STEPS] = 0.0
                row["differing_elements"] = int(np.count_nonzero(diff))
                row["max_diff_lsb"] = float(diff.max()) if diff.size else 0.0
                if not _same_qparams(r.spec, ref.spec):
                    causes.extend(_qparams_causes(r, ref, int(np.count_nonzero(diff))))
                elif np.any(diff):
                    causes.extend(_difference_causes(r, ref, diff))
                elif np.any(em.acc != ref_em.acc):
                    n = int(np.count_nonzero(em.acc != ref_em.acc))
                    sat = "; ".join(f"{x.report.engine}: {x.emulation.saturated_pairs} saturated "  # type: ignore[union-attr]
                                    f"pairs" for x in (r, ref))
                    causes.append(f"accumulators differ in {n} elements (int16 pair saturation: "
                                  f"{sat}), hidden in the outputs by rounding or clamping")
            row["causes"] = causes
            rows.append(row)
    for e in ENGINES:
        if e not in engines and e not in torch.backends.quantized.supported_engines:
            rows.append({"path": None, "engine": e, "kernel": None, "accumulation": None,
                         "reference_engine": None, "differing_elements": None,
                         "max_diff_lsb": None,
                         "causes": [f"{e} is not available in this torch build: skipped"]})
    return rows


def _intended_refusal(run: PathRun) -> str | None:
    """torch's own message when the path's own setup (not the module's) is refused."""
    spec = run.spec
    w_exec = exec_weight_qparams(spec.weight_qparams)
    rows = refusals(run.kernel.kernel, spec.input_qparams, w_exec, spec.weight_codes.shape[0])
    if not rows:
        return None
    if spec.module is None and run.report.refused:
        return run.report.refused
    r = run_conv(run.report.engine, spec.input_codes, spec.input_qparams, spec.weight_codes,
                 w_exec, spec.bias, spec.output_qparams.scale[0],
                 spec.output_qparams.zero_point[0], run.geometry or Geometry((), (), ()))
    if r.error:
        return r.error
    return "; ".join(refusal_message(x, spec.input_qparams, w_exec, spec.weight_codes.shape[0])
                     for x in rows)


#: Outputs closer than this (in the reference's output steps) count as the same: two engines'
#: grids (127 * 6.3283 and 255 * 3.1517 for 803.69) rarely meet exactly, and a hundredth of a
#: step is below anything the report weighs.
SAME_VALUE_STEPS = 0.01


def _values(codes: np.ndarray, spec: PathSpec) -> np.ndarray:
    qp = spec.output_qparams
    return (codes.astype(np.float64) - qp.zero_point[0]) * qp.scale[0]


def _short(qp: QParams) -> str:
    if qp.per_channel:
        return f"per-channel {min(qp.scale):.4g}..{max(qp.scale):.4g}"
    return f"{qp.scale[0]:.4g}" + (f" (zero point {qp.zero_point[0]})" if qp.zero_point[0]
                                   else "")


def _qparams_causes(r: PathRun, ref: PathRun, differing: int) -> list[str]:
    a, b = r.spec, ref.spec
    parts = [f"{label} scale {_short(x)} vs {_short(y)}"
             for label, x, y in (("input", a.input_qparams, b.input_qparams),
                                 ("weight", a.weight_qparams, b.weight_qparams),
                                 ("output", a.output_qparams, b.output_qparams))
             if (x.scale, x.zero_point, x.axis) != (y.scale, y.zero_point, y.axis)]
    lead = f"{differing} outputs differ: " if differing else "same outputs, though "
    return [f"{lead}{r.report.engine}'s default qconfig gives other qparams than "
            f"{ref.report.engine}'s ({'; '.join(parts)})"]


def _difference_causes(r: PathRun, ref: PathRun, diff: np.ndarray) -> list[str]:
    causes = []
    em, ref_em = r.emulation, ref.emulation
    assert em is not None and ref_em is not None
    acc_differs = em.acc != ref_em.acc
    n_acc = int(np.count_nonzero(acc_differs & (diff > 0)))
    n_req = int(np.count_nonzero(~acc_differs & (diff > 0)))
    if n_acc:
        sat = [f"{x.report.engine}: {x.emulation.saturated_pairs} saturated pairs "  # type: ignore[union-attr]
               f"({x.kernel.accumulation})" for x in (r, ref)]
        causes.append(f"{n_acc} outputs: int16 pair saturation in accumulation ({'; '.join(sat)})")
    if n_req:
        kinds = {r.kernel.kernel, ref.kernel.kernel}
        why = ("the bias is rounded to int32 on qnnpack, added in float elsewhere"
               if "qnnpack" in kinds and len(kinds) > 1
               else "float32 rounding of the requantization")
        causes.append(f"{n_req} outputs: requantization arithmetic ({why})")
    return causes
