"""The Report: frozen dataclasses, no printing. Renderers in ``render/`` turn it into text.

``to_dict()`` gives the JSON form (schema_version 1, see ``report.schema.json``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .metrics import Metrics
from .qparams import QParams
from .stages import StageResult

SCHEMA_VERSION = 1
SEVERITIES = ("error", "warning", "info")


def qparams_dict(qp: QParams) -> dict[str, Any]:
    """JSON form of qparams: dtypes as names, one value per-tensor, lists per-channel."""
    one = not qp.per_channel
    out: dict[str, Any] = {
        "scale": qp.scale[0] if one else list(qp.scale),
        "zero_point": qp.zero_point[0] if one else list(qp.zero_point),
        "dtype": qp.dtype,
        "scheme": qp.scheme,
        "source": qp.source,
    }
    if qp.axis is not None:
        out["axis"] = qp.axis
    if qp.zero_point_given is not None:
        out["zero_point_given"] = (
            qp.zero_point_given[0] if one else list(qp.zero_point_given)
        )
    if qp.notes:
        out["notes"] = list(qp.notes)
    return out


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
    """Error energy above the floor, summed over stages (float units^2)."""
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
    qparams: Mapping[str, QParams]
    """input, weight, output (and module_weight / module_output when a module ran)."""
    stages: tuple[StageResult, ...]
    total: Metrics
    """Error of the final quantized output vs the float output."""
    output_summary: Mapping[str, Any]
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
            "qparams": {k: qparams_dict(v) for k, v in self.qparams.items()},
            "stages": [
                {
                    "id": s.id,
                    "applies": s.applies,
                    **({"reason": s.reason} if not s.applies else {}),
                    "delta": None if s.delta is None else s.delta.to_dict(),
                    "cumulative": None if s.cumulative is None else s.cumulative.to_dict(),
                    "isolated": None if s.isolated is None else s.isolated.to_dict(),
                    "share": s.share,
                }
                for s in self.stages
            ],
            "total": self.total.to_dict(),
            "output": dict(self.output_summary),
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
    """Share of the path's error energy above its floor this cause explains (0..1)."""

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
    """The fix of the first cause."""

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
    cpu: Mapping[str, Any]
    case: Mapping[str, Any]
    float_output: Mapping[str, Any]
    paths: tuple[PathReport, ...]
    findings: tuple[Finding, ...]
    status: str
    """ok or fail (a --fail-under-sqnr / --max-abs-error / --fail-on threshold breached)."""
    gate: Mapping[str, Any] = field(default_factory=dict)
    """The thresholds that were checked and which were breached."""
    torch_warnings: tuple[str, ...] = ()
    """Warnings torch raised during the diagnosis (captured, never printed raw)."""
    tensors: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    """Output tensors for --save-outputs (not part of the JSON)."""
    engine_comparison: tuple[Mapping[str, Any], ...] = ()
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
            "schema_version": SCHEMA_VERSION,
            "qconvdiag_version": self.qconvdiag_version,
            "torch_version": self.torch_version,
            "cpu": _jsonable(self.cpu),
            "case": _jsonable(self.case),
            "float_output": dict(self.float_output),
            "paths": [p.to_dict() for p in self.paths],
            "findings": [f.to_dict() for f in self.findings],
            "status": self.status,
            "gate": _jsonable(self.gate),
            "torch_warnings": list(self.torch_warnings),
            "engine_comparison": [_jsonable(r) for r in self.engine_comparison],
            "verdicts": [_jsonable(v.to_dict()) for v in self.verdicts],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        f = float(value)
        if f != f or f in (float("inf"), float("-inf")):
            return None
        return f
    if isinstance(value, np.bool_):
        return bool(value)
    return value
