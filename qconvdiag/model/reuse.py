"""One activation module called more than once per forward, once at least after a conv
(``self.relu`` after conv1 and conv2, or after conv1 and after a residual add): two traps, seen
by ``capture_model``'s hooks on the float model's first forward, named by QCD064.

- torch.ao's eager flow: ``fuse_modules(model, [["conv1", "relu"]])`` fuses the module into
  conv1 and leaves ``Identity`` in its place, so every other call of it runs without the
  activation in the quantized model (negative values pass, where the float model clips them);
  fusing the module into a second conv fails (``did not find fuser method``). A warning: it
  costs what the missing activation lets through, downstream.
- The PT2E flow: a non-strict ``torch.export`` of such a model fails in ``prepare_pt2e``
  ("Input partition has more than one output node"; ``hooks.FUSED_ACTIVATIONS`` lists the
  module types measured). Info, on an eager or FX model: its migration (QCD060) will meet it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import CaseFileError
from ..findings.fixes import CALIBRATE_EAGER
from ..model_report import UpstreamLoss
from ..report import Finding

CODE = "QCD064"


@dataclass(frozen=True)
class ReusedActivation:
    """An activation module the float model calls more than once per forward, at least once
    after a conv; or one the quantized model fused into a conv it never follows."""

    name: str
    """Its module path (``relu``)."""
    kind: str
    """Its type (``ReLU``)."""
    convs: tuple[str, ...]
    """The convs whose output (or their BatchNorm's) it was called on, in order."""
    other_calls: int = 0
    """Its calls on another op's output (an add, a pool)."""
    lost: tuple[str, ...] = ()
    """Convs whose quantized conv runs without it: the quantized model holds Identity in the
    module's place (fused into another conv), and their quantized conv fused no activation."""
    lost_other: int = 0
    """Its calls on another op's output that run as Identity in the quantized model."""
    other_after: tuple[str, ...] = ()
    """For each call on another op's output, the conv that ran last before it ("" if none)."""
    bns: tuple[str, ...] = ()
    """Per conv of ``convs``, the BatchNorm between it and the module ("" if none)."""
    misfused: tuple[str, ...] = ()
    """Convs (of the module's owner) that fused an activation of its kind in the quantized
    model, where the float model calls none on their output: fused into a conv it never
    follows (``['conv3', 'bn3', 'relu']`` for a ReLU the float model applies after the add),
    so the quantized conv clips what the float model keeps. Also a conv it follows through a
    BatchNorm that the fusion left out (``[['conv', 'relu']]`` on conv-BatchNorm-ReLU): the
    quantized conv clips before the BatchNorm, which stays in the quantized model (``across``)."""
    across: tuple[str, ...] = ()
    """The BatchNorms a fusion skipped (kept, quantized, after the conv that fused the
    module), one per such conv of ``misfused``."""

    @property
    def calls(self) -> int:
        return len(self.convs) + self.other_calls

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "convs": list(self.convs),
                "other_calls": self.other_calls, "lost": list(self.lost),
                "lost_other": self.lost_other, "other_after": list(self.other_after),
                "bns": list(self.bns), "misfused": list(self.misfused),
                **({"across": list(self.across)} if self.across else {})}

    def missing_after(self) -> tuple[str, ...]:
        """The convs after which the quantized model runs without the module: those that lost
        it, and the last conv before each of its other calls that did."""
        return tuple(dict.fromkeys([*self.lost, *(c for c in self.other_after if c and
                                                  self.lost_other)]))

    @staticmethod
    def from_mapping(value: Any, where: str) -> ReusedActivation:
        def bad() -> CaseFileError:
            return CaseFileError(f"{where}: each 'reused' entry must hold name, kind, convs, "
                                 "other_calls, lost and lost_other; capture the model again")

        if not isinstance(value, dict) or not all(isinstance(value.get(k), str)
                                                  for k in ("name", "kind")):
            raise bad()
        lists = [value.get(k) for k in ("convs", "lost")] + [value.get(k, []) for k in (
            "other_after", "bns", "misfused", "across")]
        counts = [value.get(k) for k in ("other_calls", "lost_other")]
        if not all(isinstance(v, list) and all(isinstance(c, str) for c in v) for v in lists):
            raise bad()
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise bad()
        convs, lost, after, bns, misfused, across = (tuple(str(c) for c in v or ())
                                                     for v in lists)
        from .hooks import FUSED_ACTIVATIONS
        from .names import is_path

        # names a fix prints as code: module paths and a torch.nn activation only
        if value["kind"] not in FUSED_ACTIVATIONS or not all(
                is_path(c) for c in (value["name"], *convs, *lost, *after, *bns, *misfused,
                                     *across)):
            raise bad()
        return ReusedActivation(value["name"], value["kind"], convs, int(counts[0] or 0),
                                lost, int(counts[1] or 0), after, bns, misfused, across)


def reused_activations(calls: dict[str, list[tuple[str, str, bool]]], float_model: Any,
                       quantized_model: Any, qconvs: dict[str, Any], bns: dict[str, str]
                       ) -> tuple[ReusedActivation, ...]:
    """The activation modules called more than once per forward, once at least after a conv
    (``calls``: module -> per call, the conv whose output it read ("" for another op's), the
    conv that ran last before it, and whether it read that conv's own output (not its
    BatchNorm's): the capture's hooks), with the calls each lost in the
    quantized model. ``bns``: the BatchNorm each conv's output went through, if any."""
    import torch

    out = []
    followed = {c for sites in calls.values() for c, _last, _direct in sites if c}
    for name, sites in calls.items():
        convs = tuple(dict.fromkeys(c for c, _last, _direct in sites if c))
        after = tuple(last for c, last, _direct in sites if not c)
        other = len(after)
        kind = type(float_model.get_submodule(name)).__name__
        try:
            now = quantized_model.get_submodule(name)
        except AttributeError:
            now = None
        # eager fusion leaves Identity; a module missing from an FX graph proves nothing (FX
        # fuses each call on its own, and drops the module when no call is left)
        fused_away = isinstance(now, torch.nn.Identity)
        lost = tuple(c for c in convs if fused_away and c in qconvs
                     and kind not in type(qconvs[c]).__name__)
        owner = name.rpartition(".")[0]
        # fused away, into none of the convs it follows: into one it never follows
        fused_where_called = any(c in qconvs and kind in type(qconvs[c]).__name__
                                 for c in convs)
        misfused = tuple(c for c, q in qconvs.items()
                         if fused_away and not fused_where_called and kind in type(q).__name__
                         and c not in followed and c.startswith(f"{owner}." if owner else ""))
        # fused into a conv it follows through a BatchNorm the quantized model still runs:
        # the fusion left the BatchNorm out, and the conv clips before it
        # (it read the BatchNorm's output: an in-place activation between the conv and its
        # BatchNorm hands the BatchNorm the conv's own tensor, fused rightly with the conv)
        through_bn = {c for c, _last, direct in sites if c and not direct}
        skipped = [(c, bns[c]) for c in convs if fused_away and c in qconvs and bns.get(c)
                   and c in through_bn and kind in type(qconvs[c]).__name__
                   and _kept(quantized_model, bns[c])]
        misfused += tuple(c for c, _bn in skipped)
        # called more than once, once at least after a conv; or, once, fused into a conv it
        # never follows (a ReLU after a residual add fused into the conv before the add)
        if not ((len(sites) >= 2 and convs) or misfused):
            continue
        out.append(ReusedActivation(name, kind, convs, other, lost,
                                    other if fused_away else 0, after,
                                    tuple(bns.get(c, "") for c in convs), misfused,
                                    tuple(bn for _c, bn in skipped)))
    return tuple(out)


def _kept(quantized_model: Any, bn: str) -> bool:
    """The quantized model still runs BatchNorm ``bn`` (not folded into a conv: fusion leaves
    Identity, or nothing, in its place)."""
    import torch

    try:
        m = quantized_model.get_submodule(bn)
    except AttributeError:
        return False
    return not isinstance(m, torch.nn.Identity) and "BatchNorm" in type(m).__name__


def _calls_text(r: ReusedActivation) -> str:
    """``after 2 convs (conv1, conv2)``, ``3 times per forward: after conv1 and after 2 other
    ops (an add, a pool)``."""
    convs = ", ".join(r.convs)
    if not r.convs:  # fused into a conv it never follows
        return ("once per forward, after another op (an add, a pool)" if r.other_calls == 1
                else f"{r.other_calls} times per forward, after other ops (an add, a pool)")
    if not r.other_calls:
        return f"after {len(r.convs)} convs ({convs})"
    ops = "another op (an add, a pool)" if r.other_calls == 1 else (
        f"{r.other_calls} other ops (an add, a pool)")
    return f"{r.calls} times per forward: after {convs} and after {ops}"


def qcd064(reused: tuple[ReusedActivation, ...], pt2e: bool,
           losses: tuple[UpstreamLoss, ...] = ()) -> list[Finding]:
    """QCD064 for each reused activation module of an eager or FX model (a PT2E model was
    exported already): a warning where calls lost it in the quantized model, an error where a
    conv's input lost to it (``losses`` blamed on QCD064) is below LOST_DB, else info."""
    if pt2e:
        return []
    from .lost import LOST_DB

    blamed = [loss for loss in losses if loss.blamed_on == CODE]
    found = []
    for r in reused:
        evidence = {"module": r.name, "kind": r.kind, "convs": list(r.convs),
                    "other_calls": r.other_calls, "lost": list(r.lost),
                    "lost_other": r.lost_other}
        owner, _, attr = r.name.rpartition(".")
        own = [f"self.{attr}{i}" for i in range(1, r.calls + 1)]
        where = f" of {owner!r}" if owner else ""
        bns = r.bns or ("",) * len(r.convs)
        # fuse_modules takes paths from the model it is given: the new modules' too
        paths = [f"{owner}.{o.removeprefix('self.')}" if owner else o.removeprefix("self.")
                 for o in own]
        groups = ", ".join("[" + ", ".join(f"{m!r}" for m in (c, b, o) if m) + "]"
                           for c, b, o in zip(r.convs, bns, paths))
        lasting = ((f"# for good: one {r.kind} module per call, in __init__{where}\n"
                    + "".join(f"#     {o} = torch.nn.{r.kind}()\n" for o in own)
                    + "# each used at one call in forward; each conv's fused with it:\n"
                    + f"#     fuse_modules(model, [{groups}])" if r.calls > 1 and r.convs
                    else f"# for good: keep {r.name!r} out of fuse_modules")
                   + "".join(f"\n# and {c} without a {r.kind} (the float model applies\n"
                             "# none after it): fuse it with its BatchNorm alone, if any"
                             for c in r.misfused))
        parent = f"quantized.get_submodule({owner!r})" if owner else "quantized"
        calls = _calls_text(r)
        if r.across and not (r.lost or r.lost_other) and len(r.misfused) == len(r.across):
            found.append(_across(r, evidence, blamed))
            continue
        if r.lost or r.lost_other or r.misfused:
            gone = [*r.lost, *([f"{r.lost_other} call(s) after other ops"]
                               if r.lost_other else [])]
            into = (f" It was fused into {', '.join(r.misfused)}, whose output the float "
                    f"model does not pass through it: there the quantized conv clips the "
                    f"negative values the float model keeps." if r.misfused else "")
            now = (f"# now: a {r.kind} where fusion left Identity (after the conv that fused\n"
                   f"# it, a second {r.kind} changes nothing); the scales after it were\n"
                   "# calibrated without it: quantizing again, as below, fits them\n"
                   if not r.misfused else
                   f"# now, at its own calls: a {r.kind} where fusion left Identity\n"
                   f"# ({', '.join(r.misfused)} still clips: only quantizing again mends it)\n")
            fix = (now + f"{parent}.{attr} = torch.nn.{r.kind}()\n" + lasting
                   if r.lost or r.lost_other else lasting.replace("# for good: ", "# ", 1))
            mine = [loss for loss in blamed if set(loss.lost_after) & set(r.missing_after())]
            worst = min(mine, key=lambda loss: loss.input.sqnr_db
                        if loss.input.sqnr_db is not None else math.inf, default=None)
            cost = ""
            level = "error" if r.misfused else "warning"  # a conv clips what float keeps
            if worst is not None and worst.input.sqnr_db is not None:
                cost = (f" {worst.layer}'s input is {worst.input.sqnr_db:.1f} dB from the float "
                        "model's there.")
                level = ("error" if worst.input.sqnr_db < LOST_DB or r.misfused
                         else "warning")
                evidence = {**evidence, "conv": worst.layer,
                            "input_sqnr_db": worst.input.sqnr_db}
            found.append(Finding(
                CODE, level, f"{r.kind} module {r.name!r} called several times: fused "
                "into one conv, gone at its other calls" if r.convs and r.calls > 1 else
                f"{r.kind} module {r.name!r} fused into a conv it does not follow",
                f"The float model calls {r.kind} module {r.name!r} {calls}. fuse_modules "
                "fused it into one conv and left Identity in its place, so the quantized "
                + (f"model runs without it at {', '.join(gone)}: negative values pass there "
                   f"where the float model's {r.kind} clips them, and what follows receives "
                   "them." if gone else "model keeps it at its own calls.")
                + f"{into}{cost}", {**evidence, "misfused": list(r.misfused)}, fix))
        else:
            fix = ("exported = torch.export.export(model.eval(), (x,), strict=True).module()\n"
                   + lasting)
            found.append(Finding(
                CODE, "info", f"{r.kind} module {r.name!r} called several times: a "
                "non-strict torch.export fails in prepare_pt2e",
                f"The float model calls {r.kind} module {r.name!r} {calls}. Quantizing it "
                "with torchao's PT2E flow (QCD060), a non-strict torch.export of it fails in "
                "prepare_pt2e ('Input partition has more than one output node', measured with "
                "torch 2.13 and torchao 0.18); torch.export.export(model, (x,), strict=True) "
                "works, and so does one module per call.", evidence, fix))
    return found


def _across(r: ReusedActivation, evidence: dict[str, Any], blamed: list[UpstreamLoss]
            ) -> Finding:
    """QCD064 for an activation fused into the conv it follows through a BatchNorm the fusion
    left out: the quantized conv clips its output before the BatchNorm, which then runs
    quantized on the clipped values; the float model clips after it. An error where a conv
    after it receives an input lost to it (``blamed``: walk.upstream_losses), else a warning:
    the model is not what its author meant, but no conv measured pays for it (a branch whose
    clipped values the BatchNorm and what follows mostly discard)."""
    pairs = list(zip(r.misfused, r.across))
    where = ", ".join(f"{c} (then {bn})" for c, bn in pairs)
    groups = ", ".join(f"[{c!r}, {bn!r}, {r.name!r}]" for c, bn in pairs)
    mine = [loss for loss in blamed if set(loss.lost_after) & set(r.misfused)]
    cost = "".join(f" {loss.layer}'s input is {loss.input.sqnr_db:.1f} dB from the float "
                   "model's there." for loss in mine[:1] if loss.input.sqnr_db is not None)
    if not mine:
        cost = (" No conv after it receives an input far worse than the convs before it "
                "deliver: on these inputs it costs little.")
    return Finding(
        CODE, "error" if mine else "warning",
        f"{r.kind} module {r.name!r} fused into {r.misfused[0]} across BatchNorm {r.across[0]}",
        f"The float model applies {r.kind} module {r.name!r} to the output of BatchNorm "
        f"{', '.join(r.across)}, after {', '.join(r.misfused)}. fuse_modules was given the "
        f"conv and the {r.kind} without the BatchNorm between them: it fused the {r.kind} "
        f"into the conv and left Identity in its place, so the quantized model runs "
        f"{where}: the conv clips its output before the BatchNorm, where the float model "
        f"clips after it, and the BatchNorm's scale and shift then act on the clipped "
        f"values.{cost}",
        {**evidence, "misfused": list(r.misfused), "across": list(r.across)},
        "from torch.ao.quantization import fuse_modules\n"
        f"# the float model in eval mode, fused with your other groups (not the conv and\n"
        f"# the {r.kind} alone): each conv with its BatchNorm and the {r.kind} in one group\n"
        f"model = fuse_modules(model.eval(), [{groups}])\n" + CALIBRATE_EAGER)
