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
class PathReport:
    """One quantized path on one engine."""

    name: str
    """``as_given`` or ``production``."""
    engine: str
    kernel: str
    """Arithmetic family that runs: fbgemm, onednn or qnnpack."""
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

    def stage(self, sid: str) -> StageResult:
        return next(s for s in self.stages if s.id == sid)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "engine": self.engine,
            "kernel": self.kernel,
            "accumulation": self.accumulation,
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
    """Share of the total error this cause explains (for ordering; 0..1)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "code": self.code, "severity": self.severity, "title": self.title,
            "message": self.message, "evidence": _jsonable(self.evidence), "fix": self.fix,
            "path": self.path, "engine": self.engine, "impact": self.impact,
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
