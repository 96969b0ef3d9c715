"""One activation module called after several convs (``self.relu`` after conv1 and conv2): two
traps, seen by ``capture_model``'s hooks on the float model's first forward, named by QCD064.

- torch.ao's eager flow: ``fuse_modules(model, [["conv1", "relu"]])`` fuses the module into
  conv1 and leaves ``Identity`` in its place, so every other conv that called it loses its
  activation in the quantized model (its negative outputs pass, where the float model clips
  them); fusing the module into a second conv fails (``did not find fuser method``). A warning:
  it costs what the missing activation lets through, downstream.
- The PT2E flow: a non-strict ``torch.export`` of such a model fails in ``prepare_pt2e``
  ("Input partition has more than one output node"; ``capture.FUSED_ACTIVATIONS`` lists the
  module types measured). Info, on an eager or FX model: its migration (QCD060) will meet it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import CaseFileError
from ..report import Finding

CODE = "QCD064"


@dataclass(frozen=True)
class ReusedActivation:
    """An activation module the float model calls after more than one conv."""

    name: str
    """Its module path (``relu``)."""
    kind: str
    """Its type (``ReLU``)."""
    convs: tuple[str, ...]
    """The convs whose output (or their BatchNorm's) it was called on, in order."""
    lost: tuple[str, ...] = ()
    """Those whose quantized conv runs without it: the quantized model holds Identity in the
    module's place (fused into another conv), and their quantized conv fused no activation."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "convs": list(self.convs),
                "lost": list(self.lost)}

    @staticmethod
    def from_mapping(value: Any, where: str) -> ReusedActivation:
        lists: list[list[str]] = []
        ok = isinstance(value, dict) and all(isinstance(value.get(k), str)
                                             for k in ("name", "kind"))
        for key in ("convs", "lost"):
            v = value.get(key) if ok else None
            ok = ok and isinstance(v, list) and all(isinstance(s, str) for s in v)
            lists.append(list(v) if ok and v is not None else [])
        if not ok:
            raise CaseFileError(f"{where}: each 'reused' entry must hold name, kind, convs and "
                                "lost; capture the model again")
        return ReusedActivation(value["name"], value["kind"], tuple(lists[0]), tuple(lists[1]))


def reused_activations(calls: dict[str, list[str]], float_model: Any, quantized_model: Any,
                       qconvs: dict[str, Any]) -> tuple[ReusedActivation, ...]:
    """The activation modules called after two or more convs (``calls``: module -> convs, from
    the capture's hooks), with the convs each lost in the quantized model."""
    import torch

    out = []
    for name, convs in calls.items():
        unique = tuple(dict.fromkeys(convs))
        if len(unique) < 2:
            continue
        kind = type(float_model.get_submodule(name)).__name__
        try:
            now = quantized_model.get_submodule(name)
        except AttributeError:
            now = None
        fused_away = now is None or isinstance(now, torch.nn.Identity)
        lost = tuple(c for c in unique if fused_away and c in qconvs
                     and kind not in type(qconvs[c]).__name__)
        out.append(ReusedActivation(name, kind, unique, lost))
    return tuple(out)


def qcd064(reused: tuple[ReusedActivation, ...], pt2e: bool) -> list[Finding]:
    """QCD064 for each reused activation module of an eager or FX model (a PT2E model was
    exported already): a warning where convs lost it in the quantized model, else info."""
    if pt2e:
        return []
    found = []
    for r in reused:
        convs = ", ".join(r.convs)
        evidence = {"module": r.name, "kind": r.kind, "convs": list(r.convs),
                    "lost": list(r.lost)}
        owner, _, attr = r.name.rpartition(".")
        own = [f"self.{attr}{i}" for i in range(1, len(r.convs) + 1)]
        where = f" of {owner!r}" if owner else ""
        lasting = (f"# for good: one {r.kind} module per call, in __init__{where}\n"
                   + "".join(f"#     {o} = torch.nn.{r.kind}()\n" for o in own)
                   + "# each used after its own conv in forward, then each pair fused:\n"
                   + "#     fuse_modules(model, [" + ", ".join(
                       f"['{c}', '{o.removeprefix('self.')}']" for c, o in zip(r.convs, own))
                   + "])")
        parent = f"quantized.get_submodule({owner!r})" if owner else "quantized"
        if r.lost:
            fix = (f"# now: a {r.kind} where fusion left Identity (after the conv that fused\n"
                   f"# it, a second {r.kind} changes nothing)\n"
                   f"{parent}.{attr} = torch.nn.{r.kind}()\n" + lasting)
            lost = ", ".join(r.lost)
            runs, its = ("runs", "its") if len(r.lost) == 1 else ("run", "their")
            found.append(Finding(
                CODE, "warning", f"{r.kind} module {r.name!r} shared by several convs: fused "
                "into one, gone after the others",
                f"The float model calls {r.kind} module {r.name!r} after {len(r.convs)} convs "
                f"({convs}). fuse_modules fused it into one of them and left Identity in its "
                f"place, so in the quantized model {lost} {runs} without it: {its} negative "
                f"outputs pass where the float model's {r.kind} clips them, and the convs "
                "after receive those.", evidence, fix))
        else:
            fix = ("exported = torch.export.export(model.eval(), (x,), strict=True).module()\n"
                   + lasting)
            found.append(Finding(
                CODE, "info", f"{r.kind} module {r.name!r} shared by several convs: a "
                "non-strict torch.export fails in prepare_pt2e",
                f"The float model calls {r.kind} module {r.name!r} after {len(r.convs)} convs "
                f"({convs}). Quantizing it with torchao's PT2E flow (QCD060), a non-strict "
                "torch.export of it fails in prepare_pt2e ('Input partition has more than one "
                "output node', measured with torch 2.13 and torchao 0.18); "
                "torch.export.export(model, (x,), strict=True) works, and so does one module "
                "per call.", evidence, fix))
    return found

