"""QCD067: the convs ran on another engine's kernels than the one torch names.

A quantized conv of torch.ao's eager or FX flow runs the kernels of the engine its weight was
packed for: ``torch.backends.quantized.engine`` when ``convert`` (or ``load_state_dict``, or
``set_weight_bias``) packed it. Setting the engine afterwards changes nothing for the convs
already packed (measured with torch 2.13: a model converted on fbgemm and run with the engine
set to qnnpack computes fbgemm's outputs, bit for bit). A capture records the engine set at
capture, so the walk would emulate kernels that did not run: its torch check then counts
mismatches and its verdicts rest on the wrong arithmetic.

The evidence is the torch check itself: where a checked conv's emulation on the recorded engine
differs from the codes the model computed, the other engines are emulated on the checked convs;
one that reproduces every one of them bit for bit is the engine that ran, and the walk runs
again on it. Only on the CPU the bundle was captured on (its ISA flags, recorded at capture):
another CPU's kernels differ for that reason alone (int16 pair sums without VNNI), and another
engine could reproduce a few small convs by chance. No engine is inferred from a conv that
matches: where the engines agree, the choice does not change a number.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arithmetic.engines import ENGINES, torch_engines
from ..report import Finding
from .bundle import ModelBundle
from .screen import torch_check

CODE = "QCD067"


@dataclass(frozen=True)
class EngineThatRan:
    """The engine whose emulation reproduces the checked convs, where the recorded one does
    not."""

    engine: str
    """The first of ``ENGINES`` that reproduces them (the walk runs on it)."""
    also: tuple[str, ...]
    """The other engines that reproduce them too (on this CPU their kernels agree there)."""
    recorded: str
    """torch.backends.quantized.engine at capture."""
    mismatches: dict[str, int]
    """Per checked conv that mismatched: its mismatches on the recorded engine."""
    checked: int
    """How many convs were checked."""


def engine_that_ran(bundle: ModelBundle, checks: dict[str, int | None]
                    ) -> EngineThatRan | None:
    """The engine whose emulation gives 0 mismatches on every checked conv (``checks``: the
    torch check's mismatches on ``bundle.engine``, None where not checked), when some checked
    conv mismatches on ``bundle.engine``; None when none does, or no other engine reproduces
    them all (then the mismatches stand in the report)."""
    from ..arithmetic.cpu import isa_flags

    checked = {name: n for name, n in checks.items() if n is not None}
    wrong = {name: n for name, n in checked.items() if n}
    if not wrong or bundle.engine not in ENGINES or bundle.cpu_flags != isa_flags():
        return None  # a bundle from another CPU (or not known) mismatches for that reason
    # the mismatching convs first: most candidates fail on the first of them
    order = [*wrong, *(name for name in checked if name not in wrong)]
    layers = [bundle.layer(name) for name in order]
    # a packed weight's engine is among torch's
    found = [engine for engine in torch_engines() if engine != bundle.engine
             and all(torch_check(lay, engine) == 0 for lay in layers)]
    if not found:
        return None
    return EngineThatRan(found[0], tuple(found[1:]), bundle.engine, wrong, len(checked))


def qcd067(ran: EngineThatRan | None) -> Finding | None:
    """The finding for a model whose convs ran on ``ran.engine``'s kernels: a warning (the
    numbers a user takes for ``ran.recorded``'s are another engine's, and a weight packed again,
    on ``load_state_dict``, changes them)."""
    if ran is None:
        return None
    engines = (ran.engine if not ran.also else
               f"{', '.join([ran.engine, *ran.also[:-1]])} or {ran.also[-1]} (on this CPU "
               "they compute the same codes here)")
    total = sum(ran.mismatches.values())
    where = ", ".join(f"{name} {n}" for name, n in ran.mismatches.items())
    message = (
        f"torch.backends.quantized.engine was {ran.recorded!r} at capture, but the convs ran "
        f"the kernels of {engines}: the emulation of {ran.recorded} differs from the codes the "
        f"model computed in {total} output element(s) ({where}), that of {ran.engine} in none "
        f"of the {ran.checked} conv(s) checked. A quantized conv runs the kernels of the engine "
        "its weight was packed for (at convert, or at load_state_dict); setting the engine "
        "afterwards does not repack it. This report gives the kernels that ran; the model "
        f"packed for {ran.recorded} computes other numbers.")
    evidence = {"recorded_engine": ran.recorded, "engine_that_ran": ran.engine,
                "also_reproduce": list(ran.also), "mismatches": dict(ran.mismatches),
                "convs_checked": ran.checked}
    fix = (f"# to run (and judge) {ran.recorded}'s kernels: pack every weight again for it\n"
           "import torch\n"
           f"torch.backends.quantized.engine = {ran.recorded!r}\n"
           "quantized.load_state_dict(quantized.state_dict())\n"
           f"# or to quantize for {ran.recorded}, set the engine before prepare and use\n"
           f"# get_default_qconfig({ran.recorded!r}); to keep the kernels that ran, set\n"
           f"# torch.backends.quantized.engine = {ran.engine!r} before capture_model")
    return Finding(CODE, "warning", f"the convs ran another engine's kernels than "
                   f"{ran.recorded}'s", message, evidence, fix)


def layer_engine(bundle: ModelBundle, name: str) -> str:
    """The engine whose kernels ran conv ``name``: the recorded one, unless its emulation
    mismatches that conv's codes and another's reproduces them (``engine_that_ran``)."""
    if bundle.engine not in ENGINES:
        return bundle.engine
    ran = engine_that_ran(bundle, {name: torch_check(bundle.layer(name), bundle.engine)})
    return bundle.engine if ran is None else ran.engine
