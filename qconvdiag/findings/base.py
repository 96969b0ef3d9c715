"""What every finding rule reads, and the helpers they share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..case import ConvCase
from ..evidence import PathRun
from ..qparams import QParams
from ..report import Finding


@dataclass(frozen=True)
class Context:
    case: ConvCase
    runs: tuple[PathRun, ...]
    torch_warnings: tuple[str, ...]

    @property
    def engines(self) -> tuple[str, ...]:
        seen: list[str] = []
        for r in self.runs:
            if r.report.engine not in seen:
                seen.append(r.report.engine)
        return tuple(seen)

    def run(self, name: str, engine: str | None = None) -> PathRun | None:
        engine = engine or self.engines[0]
        for r in self.runs:
            if r.report.name == name and r.report.engine == engine:
                return r
        return None

    @property
    def as_given(self) -> PathRun | None:
        return self.run("as_given")

    @property
    def production(self) -> PathRun | None:
        return self.run("production")


@dataclass(frozen=True)
class Rule:
    code: str
    title: str
    check: Callable[[Context], Iterable[Finding]]


def severity_for(impact: float, error_at: float = 0.5, warning_at: float = 0.05) -> str:
    if impact >= error_at:
        return "error"
    if impact >= warning_at:
        return "warning"
    return "info"


def share(run: PathRun | None, *stage_ids: str) -> float:
    """Summed signed share of the total error of these stages (0 when unknown)."""
    if run is None:
        return 0.0
    total = 0.0
    for sid in stage_ids:
        s = run.report.stage(sid)
        if s.applies and s.share is not None:
            total += s.share
    return max(0.0, min(1.0, total))


def fmt(x: float) -> str:
    """Short human number: 4 significant digits, no exponent for everyday magnitudes."""
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e6:
        return f"{x:.4f}".rstrip("0").rstrip(".") if ax < 1000 else f"{x:.2f}"
    return f"{x:.4g}"


def minmax_qparams(t: np.ndarray, dtype: str) -> tuple[float, int]:
    """MinMax affine qparams over the dtype's full range, range extended to include 0."""
    lo = min(float(t.min()), 0.0)
    hi = max(float(t.max()), 0.0)
    qmin, qmax = (0, 255) if dtype == "quint8" else (-128, 127)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zp = int(np.clip(qmin - round(lo / scale), qmin, qmax))
    return scale, zp


def symmetric_scale(t: np.ndarray) -> float:
    """torch's per-tensor symmetric qint8 scale: max|t| / ((127 - -128) / 2)."""
    m = float(np.abs(t).max())
    return m / 127.5 if m > 0 else 1.0


def conv_name(case: ConvCase) -> str:
    return {1: "Conv1d", 2: "Conv2d", 3: "Conv3d"}[case.spatial_dims]


def qp_desc(qp: QParams) -> str:
    if qp.per_channel:
        return f"{qp.dtype} per-channel (axis {qp.axis}), {len(qp.scale)} scales"
    return f"{qp.dtype} scale {fmt(qp.scale[0])}, zero_point {qp.zero_point[0]}"


def torch_dtype(dtype: str) -> str:
    return f"torch.{dtype}"
