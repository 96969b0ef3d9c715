"""Finding rules: one function per root cause, with a stable code. ``REGISTRY`` drives which
rules run and ``--ignore``."""

from __future__ import annotations

from collections.abc import Sequence

from ..case import ConvCase
from ..errors import UsageError
from ..report import SEVERITIES, Finding
from . import (
    accumulation_rules,
    backend_rules,
    bias_rules,
    input_rules,
    output_rules,
    qparams_rules,
    rounding_rules,
    weight_rules,
)
from .base import Context, Rule

REGISTRY: tuple[Rule, ...] = (
    Rule("QCD001", "zero point not an integer", qparams_rules.qcd001),
    Rule("QCD002", "zero point outside the dtype's range", qparams_rules.qcd002),
    Rule("QCD003", "scale formula wastes levels", qparams_rules.qcd003),
    Rule("QCD010", "input values clipped by the input qparams", input_rules.qcd010),
    Rule("QCD011", "input dtype or scheme the engine does not accept", input_rules.qcd011),
    Rule("QCD012", "input rounding dominates", rounding_rules.qcd012),
    Rule("QCD020", "weight values clipped by the weight qparams", weight_rules.qcd020),
    Rule("QCD021", "unsigned-range zero point formula for a signed weight dtype",
         weight_rules.qcd021),
    Rule("QCD022", "engine requires symmetric weights", weight_rules.qcd022),
    Rule("QCD023", "per-channel weights would cut the weight error", weight_rules.qcd023),
    Rule("QCD024", "quantized module's weight is not the quantized weight", weight_rules.qcd024),
    Rule("QCD025", "per-channel weights along the wrong axis", weight_rules.qcd025),
    Rule("QCD026", "weight rounding dominates", rounding_rules.qcd026),
    Rule("QCD030", "quantized module's bias missing or different", bias_rules.qcd030),
    Rule("QCD031", "bias quantization error notable", bias_rules.qcd031),
    Rule("QCD040", "int16 pair saturation in accumulation", accumulation_rules.qcd040),
    Rule("QCD041", "int32 accumulator overflow possible", accumulation_rules.qcd041),
    Rule("QCD050", "output scale/zero_point left at module defaults", output_rules.qcd050),
    Rule("QCD051", "outputs saturated at the output dtype's limits", output_rules.qcd051),
    Rule("QCD052", "output rounding dominates", output_rules.qcd052),
    Rule("QCD053", "output zero point outside the output dtype's range", output_rules.qcd053),
    Rule("QCD060", "deprecated quantization API in use", backend_rules.qcd060),
    Rule("QCD061", "torch's output differs from the emulation", backend_rules.qcd061),
)
#: Runs last: it only speaks when no other rule found a problem.
FLOOR_RULE = Rule("QCD070", "error at the rounding floor", backend_rules.qcd070)  # type: ignore[arg-type]
CODES = tuple(r.code for r in REGISTRY) + (FLOOR_RULE.code,)


def run_findings(
    case: ConvCase, runs: Sequence[object], torch_warnings: Sequence[str],
    ignore: Sequence[str] = (),
) -> list[Finding]:
    unknown = [c for c in ignore if c not in CODES]
    if unknown:
        raise UsageError(f"--ignore: unknown finding code(s) {', '.join(unknown)}; "
                         f"codes are {CODES[0]}..{CODES[-1]}")
    ctx = Context(case, tuple(runs), tuple(torch_warnings))  # type: ignore[arg-type]
    found: list[Finding] = []
    for rule in REGISTRY:
        if rule.code in ignore:
            continue
        found.extend(rule.check(ctx))
    if FLOOR_RULE.code not in ignore:
        found.extend(backend_rules.qcd070(ctx, found))
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    found.sort(key=lambda f: (rank[f.severity], -f.impact, f.code))
    return found
