"""The model walk's report: one row per quantized conv of a model, in model order, the ranking by
each conv's own error, and the full single-conv reports of the layers explained. Frozen
dataclasses of plain values (no torch, no numpy), like report.py; ``to_dict`` is the JSON
(``report.schema.json``, ``"kind": "model"``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .report import SCHEMA_VERSION, CpuInfo, Finding, Report, _jsonable

#: Findings that explain a conv's other findings, so count as its cause in a model-wide one:
#: a module made from other float weights (QCD024) has their bias too (QCD030), whichever
#: costs more.
EXPLAINS_THE_REST = ("QCD024",)


@dataclass(frozen=True)
class ErrorSummary:
    """An output against its float reference, in three numbers."""

    sqnr_db: float | None
    """None when the error is exactly 0 (infinite SQNR) or the reference is all zero."""
    rmse: float
    max_abs: float

    def to_dict(self) -> dict[str, Any]:
        return {"sqnr_db": self.sqnr_db, "rmse": self.rmse, "max_abs": self.max_abs}


@dataclass(frozen=True)
class LayerFinding:
    """A finding of the layer's judged (as_given) path, in brief; the layer's detailed report
    has the whole finding."""

    code: str
    severity: str
    title: str

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "title": self.title}


@dataclass(frozen=True)
class LayerRow:
    """One quantized conv of the model."""

    name: str
    """The module's path in the model."""
    op: str
    """conv1d, conv2d or conv3d, with ``+relu`` for a fused ReLU."""
    input_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    engine: str
    own: ErrorSummary
    """This conv alone: its quantized output on the quantized input it really received,
    against the float conv (the float model's weight and bias) on that input dequantized."""
    propagated: ErrorSummary
    """The quantized model's output of this conv against the float model's, both models run
    on the original input: this conv's error plus everything before it."""
    input: ErrorSummary
    """The quantized input this conv received, dequantized, against the float model's input
    at this conv: everything before it."""
    floor_rmse: float
    """The own error a good quantization of this conv would have (budget.py's floor, without
    the input's rounding: the input is the one received)."""
    verdict: str
    """at_floor, above_floor or broken (budget.py's thresholds on own RMSE / floor)."""
    dominant_stage: str | None
    """The stage that adds most of the own error (None when it is exactly 0)."""
    findings: tuple[LayerFinding, ...]
    """The judged path's findings, most severe first (empty at the floor)."""
    torch_mismatches: int | None
    """Output elements where the emulation of the module on its captured input differs from
    the codes the quantized model computed; None when not checked (a conv at its floor that
    was not explained, unless every conv is checked)."""
    torch_total: int
    diagnosed: bool
    """Whether a diagnosis (ladder and findings) ran on this layer: always for a layer above
    its floor or explained; a layer at its floor is screened only (its findings are empty by
    construction: findings fire on excess over the floor)."""
    bn_folded: str | None = None
    """The BatchNorm folded into the float weight and bias, as the quantized model folded it."""
    notes: tuple[str, ...] = ()
    output_dtype: str = "quint8"
    """What the conv's kernel writes: quint8 codes, or float32 (a PT2E conv whose consumer
    takes float, e.g. a residual add: screened only, with no output stages)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "op": self.op, "input_shape": list(self.input_shape),
            "weight_shape": list(self.weight_shape), "engine": self.engine,
            "own": self.own.to_dict(), "propagated": self.propagated.to_dict(),
            "input": self.input.to_dict(),
            "floor_rmse": self.floor_rmse, "verdict": self.verdict,
            "dominant_stage": self.dominant_stage,
            "findings": [f.to_dict() for f in self.findings],
            "torch_check": {"mismatches": self.torch_mismatches, "total": self.torch_total},
            "diagnosed": self.diagnosed, "bn_folded": self.bn_folded, "notes": list(self.notes),
            "output_dtype": self.output_dtype,
        }


@dataclass(frozen=True)
class UpstreamLoss:
    """A conv whose input is already far from the float model's, more than the convs before it
    explain: the quantization before it (the model's input quantization, or an op between
    convs: an add, a pool, a cat, with its own output scale) loses the signal."""

    layer: str
    input: ErrorSummary
    """The quantized input the conv received against the float model's input there."""
    floor_ratio: float | None
    """For a conv no earlier conv feeds: the input's RMSE over the 8-bit rounding floor of
    quantizing it (ideal step / sqrt(12))."""
    worst_before: str | None
    """Else: the earlier conv with the worst propagated error; its SQNR is
    ``worst_before_sqnr_db``."""
    worst_before_sqnr_db: float | None
    message: str
    op: str | None = None
    """The quantized op (module path) whose output qparams do not fit the float model's range
    there, when the capture saw one just before the conv (an eager model's)."""
    blamed_on: str | None = None
    """The finding that explains the loss instead of QCD065 (QCD064: an activation the
    quantized model lost), if any."""
    lost_after: tuple[str, ...] = ()
    """With QCD064: the convs after which the quantized model lost the activation."""

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "input": self.input.to_dict(),
                "floor_ratio": self.floor_ratio, "worst_before": self.worst_before,
                "worst_before_sqnr_db": self.worst_before_sqnr_db, "message": self.message,
                "op": self.op, "blamed_on": self.blamed_on,
                "lost_after": list(self.lost_after)}


@dataclass(frozen=True)
class LayerBreach:
    layer: str
    breach: str

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "breach": self.breach}


@dataclass(frozen=True)
class ModelGate:
    """The CI thresholds, applied to every layer's judged path."""

    fail_under_sqnr: float | None
    max_abs_error: float | None
    fail_on: str
    breaches: tuple[LayerBreach, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"fail_under_sqnr": self.fail_under_sqnr, "max_abs_error": self.max_abs_error,
                "fail_on": self.fail_on, "breaches": [b.to_dict() for b in self.breaches]}


@dataclass(frozen=True)
class LayerDetail:
    """The full single-conv report of one explained layer."""

    layer: str
    report: Report

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, **self.report.to_dict()}


@dataclass(frozen=True)
class ModelReport:
    qconvdiag_version: str
    torch_version: str
    cpu: CpuInfo
    source: str
    """The bundle file (empty when diagnosed in-process)."""
    engine: str
    """The quantized engine the model ran on when captured."""
    layers: tuple[LayerRow, ...]
    """In model order."""
    ranking: tuple[str, ...]
    """Layer names by own error, worst (lowest own SQNR) first."""
    details: tuple[LayerDetail, ...]
    status: str
    gate: ModelGate
    notes: tuple[str, ...] = ()
    upstream: tuple[UpstreamLoss, ...] = ()
    """Convs whose input lost more than the convs before them explain."""
    findings: tuple[Finding, ...] = ()
    """Findings about the model as a whole (how it was compiled: model/compiled.py)."""

    def shared_cause(self) -> tuple[LayerFinding, int] | None:
        """A finding that is the first serious one (warning or error) of at least half the convs
        (two or more): a model-wide cause, with how many convs report it."""
        counts: dict[str, tuple[LayerFinding, int]] = {}
        for row in self.layers:
            serious = [f for f in row.findings if f.severity != "info"]
            if serious:
                first = next((f for f in serious if f.code in EXPLAINS_THE_REST), serious[0])
                f, n = counts.get(first.code, (first, 0))
                counts[first.code] = (f, n + 1)
        best = max(counts.values(), key=lambda fn: fn[1], default=None)
        if best is None or best[1] < 2 or 2 * best[1] < len(self.layers):
            return None
        return best

    def layer(self, name: str) -> LayerRow | None:
        return next((lay for lay in self.layers if lay.name == name), None)

    def detail(self, name: str) -> Report | None:
        return next((d.report for d in self.details if d.layer == name), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "model",
            "schema_version": SCHEMA_VERSION,
            "qconvdiag_version": self.qconvdiag_version,
            "torch_version": self.torch_version,
            "cpu": self.cpu.to_dict(),
            "source": self.source,
            "engine": self.engine,
            "layers": [_jsonable(lay.to_dict()) for lay in self.layers],
            "ranking": list(self.ranking),
            "details": [d.to_dict() for d in self.details],
            "status": self.status,
            "gate": self.gate.to_dict(),
            "notes": list(self.notes),
            "upstream": [_jsonable(u.to_dict()) for u in self.upstream],
            "findings": [f.to_dict() for f in self.findings],
        }
