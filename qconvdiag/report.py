"""The Report: frozen dataclasses of plain Python values (no torch, no numpy, no printing).

Every layer builds these types and the renderers in ``render/`` read them; ``to_dict()`` gives
the JSON form (schema_version 2, see ``report.schema.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 2
SEVERITIES = ("error", "warning", "info")


@dataclass(frozen=True)
class Metrics:
    """How far an output is from the float reference."""

    max_abs: float
    """Largest absolute error, float units."""
    mean_abs: float
    """Mean absolute error, float units."""
    rmse: float
    """Root mean square error, float units."""
    sqnr_db: float | None
    """10*log10(sum(ref^2) / sum(err^2)) in dB; None when the error is exactly 0 (infinite)
    or the reference is all zero."""
    cosine: float
    """Cosine similarity of (reference + error) with the reference; 1.0 when both are zero."""
    max_abs_lsb: float | None
    """max_abs in output quantization steps (None when there is no output scale)."""
    affected: float
    """Fraction of output elements whose error is not 0."""

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


@dataclass(frozen=True)
class StageResult:
    """One rung of the ladder."""

    id: str
    applies: bool
    reason: str | None
    """Why the stage does not apply (None when it does)."""
    delta: Metrics | None
    """What this stage adds on the ladder (state after minus state before)."""
    cumulative: Metrics | None
    """Error of the state after this stage vs the float output."""
    isolated: Metrics | None
    """Error of this effect alone, applied to the float path."""
    share: float | None
    """This stage's share of the error energy all stages add (shares add up to 1)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "applies": self.applies,
            **({"reason": self.reason} if not self.applies else {}),
            "delta": None if self.delta is None else self.delta.to_dict(),
            "cumulative": None if self.cumulative is None else self.cumulative.to_dict(),
            "isolated": None if self.isolated is None else self.isolated.to_dict(),
            "share": self.share,
        }


@dataclass(frozen=True)
class QParamsReport:
    """One tensor's qparams as a path uses them (the report's one description of qparams)."""

    scale: tuple[float, ...]
    """One scale (per tensor) or one per channel, float units per integer step."""
    zero_point: tuple[int, ...]
    """Integer zero point(s), as torch applies them."""
    dtype: str
    """quint8, qint8 or qint32."""
    axis: int | None = None
    """Channel axis of per-channel qparams (None: per tensor)."""
    source: str = "user"
    """user, default, module, tensor or observer:<name>."""
    zero_point_given: tuple[float, ...] | None = None
    """The zero point(s) exactly as written, when not an integer."""
    notes: tuple[str, ...] = ()

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    @property
    def scheme(self) -> str:
        return "per_channel_affine" if self.per_channel else "per_tensor_affine"

    def scales(self) -> str:
        """The scale in short words: ``0.0748``, or the range ``0.0012..0.0031`` per channel."""
        if self.per_channel:
            return f"{min(self.scale):.4g}..{max(self.scale):.4g}"
        return f"{self.scale[0]:.4g}"

    def describe(self) -> str:
        """Short words: ``quint8 scale 0.0748 zero point 0`` or a per-channel range."""
        if self.per_channel:
            return f"{self.dtype} per-channel scale {self.scales()}"
        return f"{self.dtype} scale {self.scales()} zero point {self.zero_point[0]}"

    def to_dict(self) -> dict[str, Any]:
        """JSON form: dtypes as names, one value per tensor, lists per channel."""
        one = not self.per_channel
        out: dict[str, Any] = {
            "scale": self.scale[0] if one else list(self.scale),
            "zero_point": self.zero_point[0] if one else list(self.zero_point),
            "dtype": self.dtype,
            "scheme": self.scheme,
            "source": self.source,
        }
        if self.axis is not None:
            out["axis"] = self.axis
        if self.zero_point_given is not None:
            out["zero_point_given"] = (
                self.zero_point_given[0] if one else list(self.zero_point_given))
        if self.notes:
            out["notes"] = list(self.notes)
        return out


@dataclass(frozen=True)
class OutputSummary:
    """min / max / mean / abs_max of an output tensor and its first values (float units)."""

    min: float
    max: float
    mean: float
    abs_max: float
    values: tuple[float, ...] = ()
    """The first few values, in C order."""

    def to_dict(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max, "mean": self.mean, "abs_max": self.abs_max,
                "values": list(self.values)}


@dataclass(frozen=True)
class CaseSummary:
    """What was diagnosed."""

    op: str
    """conv1d, conv2d or conv3d."""
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    bias: bool
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    source: str
    """Where the case came from (a path, ``random --seed 3``, ``recipe forum``)."""
    notes: tuple[str, ...]
    """What the loader did that the user should know."""
    has_user_setup: bool
    activation: str | None = None
    """A fused activation (``relu``) applied after the conv, to the float output too."""

    def to_dict(self) -> dict[str, Any]:
        return {
            **({"activation": self.activation} if self.activation else {}),
            "op": self.op, "input_shape": list(self.input_shape),
            "weight_shape": list(self.weight_shape), "output_shape": list(self.output_shape),
            "bias": self.bias, "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "groups": self.groups, "source": self.source,
            "notes": list(self.notes), "has_user_setup": self.has_user_setup,
        }


@dataclass(frozen=True)
class EngineOnCpu:
    """What one engine does on this CPU (run-time probe)."""

    available: bool
    accumulation: Mapping[str, str]
    """Layer class (dense, grouped, ...) -> exact, int16_pairs_k, int16_pairs_channels or
    unknown."""
    dispatches_to_onednn: bool | None = None
    """x86 only: symmetric-weight convs go to oneDNN (VNNI CPUs)."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"available": self.available, "accumulation": dict(self.accumulation)}
        if self.dispatches_to_onednn is not None:
            d["dispatches_to_onednn"] = self.dispatches_to_onednn
        return d


@dataclass(frozen=True)
class CpuInfo:
    isa: tuple[str, ...]
    """ISA flags that decide the kernels' arithmetic (avx2, avx512_vnni, amx_int8, ...)."""
    torch_capability: str
    engines: Mapping[str, EngineOnCpu]

    def to_dict(self) -> dict[str, Any]:
        return {"isa": list(self.isa), "torch_capability": self.torch_capability,
                "engines": {k: v.to_dict() for k, v in self.engines.items()}}


@dataclass(frozen=True)
class GateResult:
    """The CI thresholds that were checked, on which path, and which were breached."""

    fail_under_sqnr: float | None
    max_abs_error: float | None
    fail_on: str
    judged_path: str | None
    breaches: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"fail_under_sqnr": self.fail_under_sqnr, "max_abs_error": self.max_abs_error,
                "fail_on": self.fail_on, "judged_path": self.judged_path,
                "breaches": list(self.breaches)}


@dataclass(frozen=True)
class EngineRow:
    """With several engines: one path on one engine against the path's first engine."""

    path: str | None
    engine: str
    kernel: str | None
    """The kernel that runs the path's own setup."""
    accumulation: str | None
    reference_engine: str | None
    differing_elements: int | None
    """Outputs whose values differ from the reference engine's by a hundredth of a step or
    more (None when either did not run)."""
    max_diff_lsb: float | None
    """Largest difference, in the reference engine's output steps."""
    causes: tuple[str, ...] = ()
    """Why they differ (or why this engine did not run), in plain words."""

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "engine": self.engine, "kernel": self.kernel,
                "accumulation": self.accumulation, "reference_engine": self.reference_engine,
                "differing_elements": self.differing_elements,
                "max_diff_lsb": self.max_diff_lsb, "causes": list(self.causes)}


@dataclass(frozen=True)
class TorchCheck:
    """torch's real kernel vs the emulation."""

    ran: bool
    engine: str
    mismatched_elements: int | None
    """Output elements where torch's integer output differs from the emulation."""
    max_abs_lsb: float | None
    """Largest difference, in output quantization steps."""
    error: str | None = None
    """torch's own message when it refused the setup."""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "ran": self.ran, "engine": self.engine,
            "mismatched_elements": self.mismatched_elements, "max_abs_lsb": self.max_abs_lsb,
        }
        if self.error is not None:
            d["error"] = self.error
        return d


@dataclass(frozen=True)
class StageBudget:
    """One stage of a path's error budget (see ``budget.py``)."""

    id: str
    measured: float
    """RMSE of the stage's delta on the ladder, float units (0 when exact)."""
    alone: float
    """RMSE of this effect alone, applied to the float path (the ladder's isolated view), float
    units: what the excess is judged on."""
    floor: float
    """RMSE this stage would add at the floor (good qparams for the dtype and the data)."""
    excess: float
    """Error energy (mean square, float units^2) above the floor this stage is credited with."""
    exact: bool
    """The delta is within the float reference's own noise: shown as exact."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "measured": self.measured, "alone": self.alone,
                "floor": self.floor, "excess": self.excess, "exact": self.exact}


@dataclass(frozen=True)
class Budget:
    """A path's error budget: what it measured against what good qparams would give."""

    stages: tuple[StageBudget, ...]
    rmse: float
    """The path's total RMSE, float units."""
    floor_rmse: float
    """RMSE at the floor of this configuration (7-bit activations counted when used)."""
    floor_rmse_8bit: float
    """RMSE at the floor with 8-bit activations."""
    ratio: float
    """rmse / floor_rmse."""
    excess: float
    """Error energy above the floor (float units^2): the stages' excess, or the path's whole
    energy above its floor when that is larger (effects that show only in the chain)."""
    floor_energy: float
    """floor_rmse^2."""
    verdict: str
    """at_floor, above_floor or broken (RMSE at least budget.FAR times the floor)."""
    input_bits: int
    """8, or 7 when the input uses 128 levels (reduce_range) on an engine that pairs int16."""
    output_bits: int
    input_step_ratio: float
    """Input scale over the ideal 8-bit step of the input's range."""
    output_step_ratio: float
    """Output scale over the ideal 8-bit step of the float output's range."""
    weight_step_ratio: float
    """Largest weight scale over its channel's ideal per-channel step."""
    outputs: int
    """Output elements the measurement rests on."""
    weight_candidates: Mapping[str, float] = field(default_factory=dict)
    """For a per-tensor weight with excess: the weight error RMSE of a good per-tensor scale
    (``per_tensor_symmetric``) and of per-channel weights (``per_channel_symmetric``)."""

    def stage(self, sid: str) -> StageBudget:
        return next(s for s in self.stages if s.id == sid)

    def excess_share(self, sb: StageBudget) -> float | None:
        """A stage's share of the path's excess; None at the floor, where the excess is what
        rounding scatters (a tiny weight clipping took 100% of it on a healthy layer), and
        where there is none."""
        if self.verdict == "at_floor" or self.excess <= 0:
            return None
        return sb.excess / self.excess

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict, "rmse": self.rmse, "floor_rmse": self.floor_rmse,
            "floor_rmse_8bit": self.floor_rmse_8bit, "ratio": self.ratio,
            "excess": self.excess, "input_bits": self.input_bits,
            "output_bits": self.output_bits, "input_step_ratio": self.input_step_ratio,
            "output_step_ratio": self.output_step_ratio,
            "weight_step_ratio": self.weight_step_ratio, "outputs": self.outputs,
            "weight_candidates": dict(self.weight_candidates),
            "stages": [s.to_dict() for s in self.stages],
        }


@dataclass(frozen=True)
class PathReport:
    """One quantized path on one engine."""

    name: str
    """``as_given`` or ``production``."""
    engine: str
    kernel: str
    """Arithmetic family torch ran (the quantized module's, when the case holds one): fbgemm,
    onednn or qnnpack."""
    accumulation: str
    """exact, int16_pairs_k, int16_pairs_channels or unknown (on this CPU, for this layer)."""
    qparams: Mapping[str, QParamsReport]
    """input, weight, output (and module_weight / module_output when a module ran)."""
    stages: tuple[StageResult, ...]
    total: Metrics
    """Error of the final quantized output vs the float output."""
    output_summary: OutputSummary | None
    torch_check: TorchCheck
    saturated_pairs: int
    """int16 pair sums that saturated in the emulated run (what really ran)."""
    observers: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    refused: str | None = None
    """torch's message when this engine refuses the setup."""
    budget: Budget | None = None
    """The error budget (None when the path could not run)."""
    setup_kernel: str = ""
    """Arithmetic family that runs the path's own setup (the stage ladder's): x86 hands
    symmetric weights to onednn and others to fbgemm, so a module whose weight differs from
    the setup's may run on another kernel."""
    setup_accumulation: str = ""

    def stage(self, sid: str) -> StageResult:
        return next(s for s in self.stages if s.id == sid)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "engine": self.engine,
            "kernel": self.kernel,
            "accumulation": self.accumulation,
            "setup_kernel": self.setup_kernel or self.kernel,
            "setup_accumulation": self.setup_accumulation or self.accumulation,
            "qparams": {k: v.to_dict() for k, v in self.qparams.items()},
            "stages": [s.to_dict() for s in self.stages],
            "total": self.total.to_dict(),
            "output": {} if self.output_summary is None else self.output_summary.to_dict(),
            "torch_check": self.torch_check.to_dict(),
            "saturated_pairs": self.saturated_pairs,
            "refused": self.refused,
            "budget": None if self.budget is None else _jsonable(self.budget.to_dict()),
        }
        if self.observers:
            d["observers"] = dict(self.observers)
        if self.notes:
            d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class Finding:
    """One root cause, with this case's numbers and a fix."""

    code: str
    severity: str
    """error, warning or info."""
    title: str
    message: str
    """Plain words, with this case's numbers."""
    evidence: Mapping[str, Any]
    fix: str
    """Text or code the user can paste."""
    path: str | None = None
    engine: str | None = None
    impact: float = 0.0
    """Share of the path's error above its floor this cause explains (0..1)."""
    stages: tuple[str, ...] = ()
    """The budget stages whose excess this cause explains."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code, "severity": self.severity, "title": self.title,
            "message": self.message, "evidence": _jsonable(self.evidence), "fix": self.fix,
            "path": self.path, "engine": self.engine, "impact": self.impact,
            "stages": list(self.stages),
        }


@dataclass(frozen=True)
class Cause:
    """One cause the verdict names: a finding and its part of the path's excess."""

    code: str
    severity: str
    title: str
    share: float
    """Share of the path's error energy above its floor this cause explains (0..1). On a path
    torch refuses: 1 for what stops it, 0 for the causes that would remain once it runs (no
    excess is measured on a path that does not run). On a path that runs, 0 for an error
    listed after the named causes because their fixes leave it in place ('then')."""

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "title": self.title,
                "share": self.share}


@dataclass(frozen=True)
class Verdict:
    """A path's verdict in plain words: at its floor, above it for named causes, or broken."""

    path: str
    engine: str
    status: str
    """at_floor, above_floor, broken (RMSE at least 4x the floor) or refused (torch refused
    the setup)."""
    judged: bool
    """The path the gates judge (as_given when the case has a user setup, else production)."""
    rmse: float | None
    floor_rmse: float | None
    ratio: float | None
    """rmse / floor_rmse."""
    sqnr_db: float | None
    floor_sqnr_db: float | None
    """The SQNR this layer would have at its floor."""
    causes: tuple[Cause, ...]
    """Up to three causes, by their part of the excess."""
    unexplained: float
    """Share of the excess no finding explains (0..1)."""
    healthy: bool
    """No warning or error on this path."""
    first_fix: str | None
    """The fix of the first cause (at the floor, of the first warning or error only)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "engine": self.engine, "status": self.status,
            "judged": self.judged, "rmse": self.rmse, "floor_rmse": self.floor_rmse,
            "ratio": self.ratio, "sqnr_db": self.sqnr_db, "floor_sqnr_db": self.floor_sqnr_db,
            "causes": [c.to_dict() for c in self.causes], "unexplained": self.unexplained,
            "healthy": self.healthy, "first_fix": self.first_fix,
        }


@dataclass(frozen=True, eq=False)
class Report:
    qconvdiag_version: str
    torch_version: str
    cpu: CpuInfo
    case: CaseSummary
    float_output: OutputSummary
    paths: tuple[PathReport, ...]
    findings: tuple[Finding, ...]
    status: str
    """ok or fail (a --fail-under-sqnr / --max-abs-error / --fail-on threshold breached)."""
    gate: GateResult
    """The thresholds that were checked and which were breached."""
    torch_warnings: tuple[str, ...] = ()
    """Warnings torch raised during the diagnosis (captured, never printed raw)."""
    engine_comparison: tuple[EngineRow, ...] = ()
    """With several engines: each engine's outputs against the first that ran, and why they
    differ."""
    verdicts: tuple[Verdict, ...] = ()
    """One per path and engine, the judged path first."""

    @property
    def verdict(self) -> Verdict | None:
        """The judged path's verdict (on the first engine)."""
        return next((v for v in self.verdicts if v.judged), None)

    def path(self, name: str, engine: str | None = None) -> PathReport | None:
        for p in self.paths:
            if p.name == name and (engine is None or p.engine == engine):
                return p
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "conv",
            "schema_version": SCHEMA_VERSION,
            "qconvdiag_version": self.qconvdiag_version,
            "torch_version": self.torch_version,
            "cpu": self.cpu.to_dict(),
            "case": self.case.to_dict(),
            "float_output": self.float_output.to_dict(),
            "paths": [p.to_dict() for p in self.paths],
            "findings": [f.to_dict() for f in self.findings],
            "status": self.status,
            "gate": self.gate.to_dict(),
            "torch_warnings": list(self.torch_warnings),
            "engine_comparison": [r.to_dict() for r in self.engine_comparison],
            "verdicts": [_jsonable(v.to_dict()) for v in self.verdicts],
        }


def _jsonable(value: Any) -> Any:
    """Plain JSON values: mappings and sequences recursed, numpy scalars and arrays (from a
    rule's evidence) through their ``tolist()``, non-finite floats as null."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else None
    return value
