"""Finding rules: one function per root cause, with a stable code. ``REGISTRY`` drives which
rules run and ``--ignore``; each row names the budget stages whose excess the cause explains,
and whether it is a root cause (a formula, a default left in place) or its symptom."""

from __future__ import annotations

from collections.abc import Sequence

from ..case import ConvCase
from ..errors import UsageError
from ..measure.evidence import PathRun
from ..report import SEVERITIES, Finding
from . import (
    accumulation_rules,
    backend_rules,
    bias_rules,
    input_rules,
    output_rules,
    qparams_rules,
    weight_rules,
)
from .base import Context, Rule

IN = ("input_clipping", "input_rounding")
W = ("weight_clipping", "weight_rounding")
OUT = ("output_rounding", "output_clipping")

REGISTRY: tuple[Rule, ...] = (
    Rule("QCD001", qparams_rules.qcd001),
    Rule("QCD002", qparams_rules.qcd002, IN + W),
    Rule("QCD003", qparams_rules.qcd003),
    Rule("QCD010", input_rules.qcd010, IN[:1]),
    Rule("QCD011", input_rules.qcd011, root=True),
    Rule("QCD012", input_rules.qcd012, IN[1:]),
    Rule("QCD013", qparams_rules.qcd013, IN, root=True),
    Rule("QCD020", weight_rules.qcd020, W[:1]),
    Rule("QCD021", weight_rules.qcd021, W, root=True),
    Rule("QCD022", weight_rules.qcd022, root=True),
    Rule("QCD023", weight_rules.qcd023, W, root=True),
    Rule("QCD024", weight_rules.qcd024, ("module_state",), root=True),
    Rule("QCD025", weight_rules.qcd025, W, root=True),
    Rule("QCD026", weight_rules.qcd026, W[1:]),
    Rule("QCD027", weight_rules.qcd027, ("module_state",), root=True),
    Rule("QCD028", weight_rules.qcd028, W, root=True),
    Rule("QCD030", bias_rules.qcd030, ("module_state",), root=True),
    Rule("QCD031", bias_rules.qcd031, ("bias_quantization",)),
    Rule("QCD040", accumulation_rules.qcd040, ("accumulation", "integer_kernel")),
    Rule("QCD041", accumulation_rules.qcd041, ("accumulation",), root=True),
    Rule("QCD042", accumulation_rules.qcd042),
    Rule("QCD050", output_rules.qcd050, OUT + ("module_state",), root=True),
    Rule("QCD051", output_rules.qcd051, OUT[1:]),
    Rule("QCD052", output_rules.qcd052, OUT[:1]),
    Rule("QCD053", output_rules.qcd053, OUT, root=True),
    Rule("QCD054", output_rules.qcd054, OUT, root=True),
    Rule("QCD060", backend_rules.qcd060),
    Rule("QCD061", backend_rules.qcd061, ("backend_residual",)),
    Rule("QCD062", backend_rules.qcd062, root=True),
)
#: Runs last: it only speaks on a path no other rule found a problem on.
FLOOR_CODE = "QCD070"
#: Findings about a whole model, which a model walk gives (QCD063: model/compiled.py; QCD064:
#: model/reuse.py; QCD065 and QCD069: model/lost.py; QCD066: model/channels.py; QCD067:
#: model/engine.py; QCD068: model/stale.py; QCD071: model/after.py; QCD072:
#: model/batchnorm.py; QCD073: model/refold.py; QCD074: model/constant.py; QCD075:
#: model/relu.py; QCD076: model/calibration.py).
MODEL_CODES = ("QCD063", "QCD064", "QCD065", "QCD066", "QCD067", "QCD068", "QCD069",
               "QCD071", "QCD072", "QCD073", "QCD074", "QCD075",
               "QCD076")
CODES = tuple(sorted([r.code for r in REGISTRY] + [FLOOR_CODE, *MODEL_CODES]))
ROOTS = frozenset(r.code for r in REGISTRY if r.root)


def run_findings(
    case: ConvCase, runs: Sequence[PathRun], torch_warnings: Sequence[str],
    ignore: Sequence[str] = (),
) -> list[Finding]:
    unknown = [c for c in ignore if c not in CODES]
    if unknown:
        raise UsageError(f"--ignore: unknown finding code(s) {', '.join(unknown)}; "
                         f"codes are {CODES[0]}..{CODES[-1]}")
    ctx = Context(case, tuple(runs), tuple(torch_warnings))
    found: list[Finding] = []
    for rule in REGISTRY:
        if rule.code in ignore:
            continue
        found.extend(rule.check(ctx))
    if FLOOR_CODE not in ignore:
        found.extend(backend_rules.qcd070(ctx, found))
    judged = runs[0].report.name if runs else None
    rank = {s: i for i, s in enumerate(SEVERITIES)}
    found.sort(key=lambda f: (rank[f.severity], f.path != judged, -f.impact, f.code))
    return found
