"""Each path's verdict: at its floor, above it for named causes, or broken.

For every budget stage with excess, the verdict names the finding that explains it on that
path: a root cause (a formula, a default left in place) before its symptom (clipping, coarse
rounding), then the more severe. Each named cause is credited with the excess of the stages it
was picked for; up to three are kept, largest first.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

from ..arithmetic.engines import NOT_RUN
from ..measure.evidence import PathRun
from ..report import SEVERITIES, Budget, Cause, Finding, Verdict

#: Causes the verdict names at most.
MAX_CAUSES = 3
#: A cause with less of the excess than this is left to the findings list.
MIN_SHARE = 0.05
#: Severities, most severe first (error 0).
_RANK = {s: i for i, s in enumerate(SEVERITIES)}


def _credit_the_rest(credit: dict[str, float], b: Budget, mine: list[Finding],
                     pick: Callable[[list[Finding]], Finding]) -> None:
    """When no stage's effect alone explains most of the excess (it shows only in the chain),
    the rest goes to the most severe finding not yet named that claims at least half of it;
    failing that, to the finding that explains the stage the chain moves most above its floor
    (a stage whose effect alone is small, such as qnnpack's weight codes shifted past 255 by a
    zero point outside qint8's range, which only the chain shows), chosen as the stages'
    causes are (``pick``)."""
    rest = b.excess - sum(credit.values())
    if b.excess <= 0 or rest < b.excess / 2:
        return  # the stages explain most of it (the budget counts the whole only then)
    claims = [f for f in mine if f.code not in credit and f.severity != "info"
              and float(f.evidence.get("excess", 0.0) or 0.0) >= rest / 2]
    if claims:
        best = min(claims, key=lambda f: (_RANK[f.severity], f.code))
        credit[best.code] = credit.get(best.code, 0.0) + rest
        return
    for st in sorted(b.stages, key=lambda st: st.floor ** 2 - st.measured ** 2):
        explaining = [f for f in mine if st.id in f.stages and f.severity != "info"]
        if st.measured > st.floor and explaining:
            best = pick(explaining)
            credit[best.code] = credit.get(best.code, 0.0) + rest
            return


def _pick(explaining: list[Finding], roots: frozenset[str]) -> Finding:
    """The finding a stage's excess is credited to: a root cause before its symptom, then the
    more severe. An info finding costs nothing material: it takes a stage only when nothing
    else explains it (a root at no cost is no cause of another rule's excess)."""
    return min(explaining, key=lambda f: (f.severity == "info", f.code not in roots,
                                          _RANK[f.severity], f.code))


def _refusal(mine: list[Finding]) -> Finding | None:
    """The finding that names what torch refuses (its evidence holds torch's error: QCD011,
    QCD022, QCD025, QCD028), else the first error."""
    errors = [f for f in mine if f.severity == "error"]
    return next((f for f in errors if f.evidence.get("torch_error")),
                next((f for f in errors if "torch_error" in f.evidence),
                     errors[0] if errors else None))


def _refused_causes(refusal: Finding | None, mine: list[Finding], roots: frozenset[str]
                    ) -> tuple[Cause, ...]:
    """A path torch refuses: what stops it (``refusal``, share 1), then the warnings and errors
    that would remain once it runs, root causes before symptoms, errors before warnings
    (share 0: a path that does not run has no measured excess to share). Its fix alone would
    leave them in place."""
    if refusal is None:
        return ()
    rest = sorted((f for f in mine if f.severity != "info" and f.code != refusal.code),
                  key=lambda f: (f.code not in roots, _RANK[f.severity], f.code))
    seen: set[str] = {refusal.code}
    causes = [Cause(refusal.code, refusal.severity, refusal.title, 1.0)]
    for f in rest:
        if f.code not in seen and len(causes) < MAX_CAUSES:
            seen.add(f.code)
            causes.append(Cause(f.code, f.severity, f.title, 0.0))
    return tuple(causes)


def _remaining(causes: tuple[Cause, ...], mine: list[Finding], roots: frozenset[str]
               ) -> tuple[Cause, ...]:
    """Errors the named causes' fixes leave in place, listed after them (share 0, 'then'):
    those on stages none of the named causes is on (a fix mends its own stages: a weight
    zero point's symptoms go with it), root causes first, while MAX_CAUSES allows. A user who
    applied the first fix of a layer whose weight was never set found its output qparams still
    at the defaults, named only in the findings list (credited with 0.01% of the excess:
    the weight's error hid what the output's costs). The module's state is one stage for
    several fixes (its weight, its bias, its output qparams): there a fix mends only what
    MENDS says."""
    by_code = {f.code: f for f in mine}
    named = {c.code for c in causes}
    covered = {sid for c in named if c in by_code for sid in by_code[c].stages} - {MODULE}
    mended = {m for c in named for m in MENDS.get(c, ())}
    rest = sorted((f for f in mine if f.severity == "error" and f.code not in named
                   and f.code not in mended and f.stages),
                  key=lambda f: (f.code not in roots, f.code))
    out: list[Cause] = []
    for f in rest:
        if len(causes) + len(out) >= MAX_CAUSES or covered & set(f.stages):
            continue
        covered |= set(f.stages) - {MODULE}
        out.append(Cause(f.code, f.severity, f.title, 0.0))
    return tuple(out)


#: The module's state: the stage of every finding about what the quantized module holds.
MODULE = "module_state"
#: Findings a cause's fix mends beyond its own stages' (on the module's state): QCD024's
#: ``set_weight_bias(qw, conv.bias)`` repacks the float bias too (QCD030).
MENDS = {"QCD024": ("QCD030",)}


def verdicts(runs: Sequence[PathRun], findings: Sequence[Finding], roots: frozenset[str]
             ) -> tuple[Verdict, ...]:
    judged_name = runs[0].report.name if runs else None
    first_engine = runs[0].report.engine if runs else None
    out = []
    for run in runs:
        p = run.report
        mine = [f for f in findings if f.path == p.name and f.engine in (None, p.engine)]
        healthy = not any(f.severity in ("error", "warning") for f in mine)
        judged = p.name == judged_name and p.engine == first_engine
        b = p.budget
        refused = p.refused is not None and not p.refused.startswith(NOT_RUN)
        if b is None or refused:  # torch refuses it: what the emulation gives never runs
            refusal = _refusal(mine)
            out.append(Verdict(p.name, p.engine, "refused", judged, None, None, None, None,
                               None, _refused_causes(refusal, mine, roots), 0.0, False,
                               None if refusal is None else refusal.fix))
            continue
        credit: dict[str, float] = {}
        pick = functools.partial(_pick, roots=roots)
        for st in b.stages:
            if st.excess <= 0:
                continue
            explaining = [f for f in mine if st.id in f.stages]
            if not explaining:
                continue
            best = pick(explaining)
            credit[best.code] = credit.get(best.code, 0.0) + st.excess
        by_code = {f.code: f for f in mine}
        _credit_the_rest(credit, b, mine, pick)
        named = sorted(credit.items(), key=lambda kv: -kv[1])
        causes = tuple(
            Cause(code, by_code[code].severity, by_code[code].title, float(energy / b.excess))
            for code, energy in named[:MAX_CAUSES] if b.excess > 0 and energy / b.excess
            >= MIN_SHARE)
        if b.verdict != "at_floor":
            causes += _remaining(causes, mine, roots)
        unexplained = 0.0 if b.excess <= 0 else max(
            0.0, 1.0 - sum(e for _, e in named) / b.excess)
        sqnr = p.total.sqnr_db
        floor_sqnr = None
        if sqnr is not None and b.ratio > 0 and math.isfinite(b.ratio):
            floor_sqnr = sqnr + 20 * math.log10(b.ratio)
        out.append(Verdict(
            p.name, p.engine, b.verdict, judged, b.rmse, b.floor_rmse,
            b.ratio if math.isfinite(b.ratio) else None, sqnr, floor_sqnr, causes,
            unexplained, healthy, _first_fix(causes, by_code, b.verdict)))
    out.sort(key=lambda v: not v.judged)
    return tuple(out)


def _first_fix(causes: tuple[Cause, ...], by_code: dict[str, Finding], status: str
               ) -> str | None:
    """The first cause's fix; on a path at its floor only a warning's or an error's (an info
    cause there costs too little to trade for its fix, which may cost more: QCD040's 7-bit
    activations against a few saturated pairs cost a sweep's layer 2.7 dB)."""
    worth = [c for c in causes if status != "at_floor" or c.severity != "info"]
    return by_code[worth[0].code].fix if worth else None
