"""What every finding rule reads, and how a finding's severity follows from what it costs.

A rule reads the evidence the measurement layer made (each path's report, its error budget and
arrays: ``evidence.PathRun``); it never runs a conv or the emulator itself.

Severity (thresholds in ``budget.py``):

* ``error``: the path is broken (RMSE at least ``FAR`` = 4x its floor) and this cause explains
  most of the excess (``MOST`` = half of it), or would put the path that far above its floor on
  its own;
* ``warning``: a real misuse with a measurable cost (its excess reaches ``MATERIAL`` = 25% of
  the floor's energy, about 1 dB), or torch refuses the setup;
* ``info``: true but harmless, or advice.

The production path is advice: its findings are at most warnings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from ..case import ConvCase
from ..measure.budget import FAR, MATERIAL, MOST
from ..measure.evidence import PathRun
from ..numbers import fmt as fmt  # the rules import it from here
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

    def paths(self, engine: str | None = None) -> list[PathRun]:
        """The paths of one engine (the first by default), the judged one first."""
        return [r for r in (self.run("as_given", engine), self.run("production", engine))
                if r is not None]


@dataclass(frozen=True)
class Rule:
    code: str
    check: Callable[[Context], Iterable[Finding]]
    stages: tuple[str, ...] = ()
    """Budget stages whose excess this cause can explain (the verdict's causes)."""
    root: bool = False
    """A root cause (a formula, a default left in place) rather than its symptom (clipping,
    coarse rounding): the verdict names the root cause when both explain a stage."""


def excess(run: PathRun | None, *stage_ids: str) -> float:
    """Error energy above the floor these stages are credited with (0 when unknown)."""
    if run is None or run.report.budget is None:
        return 0.0
    b = run.report.budget
    return float(sum(b.stage(s).excess for s in stage_ids))


def share_of_excess(run: PathRun | None, energy: float) -> float:
    """``energy`` as a share of the path's whole excess (0..1), for ordering."""
    if run is None or run.report.budget is None or run.report.budget.excess <= 0:
        return 0.0
    return max(0.0, min(1.0, energy / run.report.budget.excess))


def severity(run: PathRun | None, energy: float, floor: str = "info") -> str:
    """The severity a cause with ``energy`` of excess deserves on ``run`` (never below
    ``floor``; at most a warning on the production path)."""
    b = None if run is None else run.report.budget
    level = floor if b is None else severity_of(energy, b.floor_energy, b.excess, b.verdict,
                                                floor)
    if run is not None and run.report.name == "production" and level == "error":
        level = "warning"
    return level


def severity_of(energy: float, floor_energy: float, excess: float, verdict: str,
                floor: str = "info") -> str:
    """``severity`` from the numbers: a cause with ``energy`` of excess, on a path whose floor
    has ``floor_energy``, whose whole excess is ``excess`` and whose verdict is ``verdict``
    (also a model walk's screen, which has no budget: screen.fp32_saturation). A path at its
    floor gets ``floor``: a correctly quantized path gets no warning from its stages' scatter.
    """
    level = floor
    if verdict == "at_floor":  # the path as a whole is as good as good qparams make it
        return level
    if energy > 0:
        if energy >= MATERIAL * floor_energy and level == "info":
            level = "warning"
        alone_far = energy >= (FAR ** 2 - 1) * floor_energy
        if verdict == "broken" and (energy >= MOST * excess or alone_far) \
                and energy >= MATERIAL * floor_energy:
            level = "error"
    return level


def material(run: PathRun | None, energy: float) -> bool:
    b = None if run is None else run.report.budget
    return b is not None and energy > 0 and energy >= MATERIAL * b.floor_energy


def db_gain(run: PathRun, energy: float) -> float:
    """SQNR the path would gain if ``energy`` of its error went away (dB)."""
    b = run.report.budget
    assert b is not None
    total = b.rmse ** 2
    rest = max(total - energy, b.floor_energy * 0.5, 1e-300)
    return float(10 * np.log10(max(total, 1e-300) / rest)) if total > 0 else 0.0


def minmax_qparams(t: np.ndarray, dtype: str) -> tuple[float, int]:
    """MinMax affine qparams over the dtype's full range, range extended to include 0."""
    lo = min(float(t.min()), 0.0)
    hi = max(float(t.max()), 0.0)
    qmin, qmax = (0, 255) if dtype == "quint8" else (-128, 127)
    scale = (hi - lo) / (qmax - qmin) if hi > lo else 1.0
    zp = int(np.clip(qmin - round(lo / scale), qmin, qmax))
    return scale, zp


def conv_name(case: ConvCase) -> str:
    """The torch module's class name: ``Conv2d`` for a conv2d case."""
    return case.op.capitalize()


def judged(ctx: Context) -> PathRun | None:
    """The path the gates judge: as_given when the case has a user setup, else production."""
    return ctx.as_given or ctx.production


def finding(code: str, severity_: str, title: str, message: str, evidence: dict[str, object],
            fix: str, run: PathRun | None, energy: float = 0.0,
            stages: tuple[str, ...] = ()) -> Finding:
    """A Finding on ``run``'s path and engine, ranked by its share of the path's excess."""
    return Finding(
        code=code, severity=severity_, title=title, message=message, evidence=evidence,
        fix=fix, path=None if run is None else run.report.name,
        engine=None if run is None else run.report.engine,
        impact=share_of_excess(run, energy), stages=stages,
    )
