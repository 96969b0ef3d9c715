"""``--engine all``: each path on every engine against the path's first engine that ran it, by
output values in that engine's steps, and the cause of every difference in plain words."""

from __future__ import annotations

import numpy as np

from ..arithmetic.engines import ENGINES, refusal_message, refusals, torch_engines
from ..arithmetic.torch_ref import run_conv
from ..case import Geometry
from ..quantization.paths import PathSpec
from ..quantization.qparams import QParams
from ..report import EngineRow
from .evidence import PathRun, exec_weight_qparams

#: Outputs closer than this (in the reference's output steps) count as the same: two engines'
#: grids (127 * 6.3283 and 255 * 3.1517 for 803.69) rarely meet exactly, and a hundredth of a
#: step is below anything the report weighs.
SAME_VALUE_STEPS = 0.01


def compare_engines(runs: list[PathRun]) -> tuple[EngineRow, ...]:
    """Per path, each engine against the first engine that ran it: how many output values of
    the path's own setup (the ladder's) differ and why: torch's refusal, different default
    qparams, int16 pair saturation, or the requantization arithmetic."""

    engines = {r.report.engine for r in runs}
    if len(engines) < 2:
        return ()
    rows: list[EngineRow] = []
    for name in dict.fromkeys(r.report.name for r in runs):
        group = [r for r in runs if r.report.name == name]
        refused = {r.report.engine: _intended_refusal(r) for r in group}
        ref = next((r for r in group if not refused[r.report.engine]
                    and r.emulation is not None), None)
        rows.extend(_row(r, ref, refused[r.report.engine]) for r in group)
    rows.extend(EngineRow(None, e, None, None, None, None, None,
                          (f"{e} is not available in this torch build: skipped",))
                for e in ENGINES if e not in engines and e not in torch_engines())
    return tuple(rows)


def _row(r: PathRun, ref: PathRun | None, refused: str | None) -> EngineRow:
    causes: list[str] = []
    if refused:
        causes.append(f"{r.report.engine} refuses this setup: {refused}")
    differing: int | None = None
    max_diff: float | None = None
    em = r.emulation
    if ref is not None and em is not None and ref.emulation is not None and r is not ref \
            and not refused:
        ref_em = ref.emulation
        # values, not codes: engines with other default qparams write other codes for the
        # same output; the difference is counted in the reference's output steps
        step = float(ref.spec.output_qparams.scale[0])
        diff = np.abs(_values(em.output_codes, r.spec) -
                      _values(ref_em.output_codes, ref.spec)) / step
        diff[diff < SAME_VALUE_STEPS] = 0.0
        differing = int(np.count_nonzero(diff))
        max_diff = float(diff.max()) if diff.size else 0.0
        if not _same_qparams(r.spec, ref.spec):
            causes.extend(_qparams_causes(r, ref, differing))
        elif differing:
            causes.extend(_difference_causes(r, ref, diff))
        elif np.any(em.acc != ref_em.acc):
            n = int(np.count_nonzero(em.acc != ref_em.acc))
            sat = "; ".join(f"{x.report.engine}: {_saturated(x)} saturated pairs"
                            for x in (r, ref))
            causes.append(f"accumulators differ in {n} elements (int16 pair saturation: "
                          f"{sat}), hidden in the outputs by rounding or clamping")
    return EngineRow(r.report.name, r.report.engine, r.kernel.kernel, r.kernel.accumulation,
                     None if ref is None else ref.report.engine, differing, max_diff,
                     tuple(causes))


def _saturated(run: PathRun) -> int:
    return 0 if run.emulation is None else run.emulation.saturated_pairs


def _same_qparams(a: PathSpec, b: PathSpec) -> bool:
    return all(
        (x.scale, x.zero_point, x.dtype, x.axis) == (y.scale, y.zero_point, y.dtype, y.axis)
        for x, y in ((a.input_qparams, b.input_qparams), (a.weight_qparams, b.weight_qparams),
                     (a.output_qparams, b.output_qparams))
    )


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


def _values(codes: np.ndarray, spec: PathSpec) -> np.ndarray:
    qp = spec.output_qparams
    return (codes.astype(np.float64) - qp.zero_point[0]) * qp.scale[0]


def _short(qp: QParams) -> str:
    r = qp.report()
    if r.per_channel:
        return f"per-channel {r.scales()}"
    return r.scales() + (f" (zero point {r.zero_point[0]})" if r.zero_point[0] else "")


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
        sat = [f"{x.report.engine}: {_saturated(x)} saturated pairs ({x.kernel.accumulation})"
               for x in (r, ref)]
        causes.append(f"{n_acc} outputs: int16 pair saturation in accumulation ({'; '.join(sat)})")
    if n_req:
        kinds = {r.kernel.kernel, ref.kernel.kernel}
        why = ("the bias is rounded to int32 on qnnpack, added in float elsewhere"
               if "qnnpack" in kinds and len(kinds) > 1
               else "float32 rounding of the requantization")
        causes.append(f"{n_req} outputs: requantization arithmetic ({why})")
    return causes
