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
matches: where the engines agree, the choice does not change a number. The finding is graded
by what the recorded engine's kernels would cost (their emulation on each mismatching conv's
captured input, against the float conv there): a warning where a conv would lose MATERIAL of
its floor, info where they only compute other codes.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arithmetic.engines import ENGINES, torch_engines
from ..report import Finding
from .bundle import LayerCapture, ModelBundle
from .screen import emulated_codes, float_conv, torch_check

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
    extra: dict[str, tuple[float, float]]
    """Per conv that mismatched: its own error (mean square, against the float conv on its
    captured input) with the codes that ran, and what the recorded engine's kernels (its
    emulation on that input) would add to it (negative where they would do better)."""


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
    extra = {name: _extra_energy(bundle.layer(name), bundle.engine) for name in wrong}
    return EngineThatRan(found[0], tuple(found[1:]), bundle.engine, wrong, len(checked), extra)


def _extra_energy(lay: LayerCapture, engine: str) -> tuple[float, float]:
    """``EngineThatRan.extra`` of one conv: its own error with the codes the model computed,
    and with ``engine``'s codes less that (mean squares, float64)."""
    import numpy as np

    from ..quantization.qparams import dequantize32

    y = float_conv(lay.case).astype(np.float64)
    qp = lay.quantized_output_qparams
    mine = dequantize32(emulated_codes(lay, engine), qp) - y
    got = dequantize32(lay.quantized_output, qp) - y
    n = max(y.size, 1)
    own = float(np.vdot(got, got)) / n
    return own, float(np.vdot(mine, mine)) / n - own


def qcd067(ran: EngineThatRan | None, floors: dict[str, float]) -> Finding | None:
    """The finding for a model whose convs ran on ``ran.engine``'s kernels: the numbers a user
    takes for ``ran.recorded``'s are another engine's, and a weight packed again (on
    ``load_state_dict``) changes them. A warning where that costs: some conv's own error would
    gain at least MATERIAL of its floor's energy (``floors``: each conv's floor RMSE) with the
    recorded engine's kernels; info where they compute other codes at no cost."""
    from ..measure.budget import MATERIAL

    if ran is None:
        return None
    costly = [name for name, (_own, e) in ran.extra.items()
              if e > 0 and e >= MATERIAL * floors.get(name, 0.0) ** 2]
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
        f"packed for {ran.recorded} computes other numbers"
        + (f", and they cost more: with {ran.recorded}'s kernels {_losses(ran, costly)}."
           if costly else f", at no cost here (with {ran.recorded}'s kernels no conv's own "
           f"error grows by {MATERIAL:g} of its floor's energy)."))
    evidence = {"recorded_engine": ran.recorded, "engine_that_ran": ran.engine,
                "also_reproduce": list(ran.also), "mismatches": dict(ran.mismatches),
                "convs_checked": ran.checked,
                "extra_energy": {name: e for name, (_own, e) in ran.extra.items()},
                "costly": costly}
    fix = (f"# to run (and judge) {ran.recorded}'s kernels: pack every weight again for it\n"
           "import torch\n"
           f"torch.backends.quantized.engine = {ran.recorded!r}\n"
           "quantized.load_state_dict(quantized.state_dict())\n"
           f"# or to quantize for {ran.recorded}, set the engine before prepare and use\n"
           f"# get_default_qconfig({ran.recorded!r}); to keep the kernels that ran, set\n"
           f"# torch.backends.quantized.engine = {ran.engine!r} before capture_model")
    return Finding(CODE, "warning" if costly else "info", f"the convs ran another engine's "
                   f"kernels than {ran.recorded}'s", message, evidence, fix)


def _losses(ran: EngineThatRan, names: list[str]) -> str:
    """What the recorded engine's kernels would cost ``names``: 'conv2 would lose 3.1 dB of
    SQNR' (its own error energy with them over the one that ran), worst first, three at
    most."""
    import math

    def loss(name: str) -> float:
        own, extra = ran.extra[name]
        return math.inf if own <= 0 else 10 * math.log10(1 + extra / own)

    worst = sorted(names, key=loss, reverse=True)
    said = [f"{n} would lose {loss(n):.1f} dB of SQNR" if math.isfinite(loss(n)) else
            f"{n} would lose its exact output" for n in worst[:3]]
    return ", ".join(said) + ("" if len(worst) <= 3 else f" (and {len(worst) - 3} more)")


def layer_engine(bundle: ModelBundle, name: str) -> str:
    """The engine whose kernels ran conv ``name``: the recorded one, unless its emulation
    mismatches that conv's codes and another's reproduces them (``engine_that_ran``)."""
    if bundle.engine not in ENGINES:
        return bundle.engine
    ran = engine_that_ran(bundle, {name: torch_check(bundle.layer(name), bundle.engine)})
    return bundle.engine if ran is None else ran.engine
