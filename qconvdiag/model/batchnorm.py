"""QCD072: a BatchNorm left unfused after a conv, which rescales the conv's quantized output
channel by channel.

``fuse_modules`` folds a conv's BatchNorm into its weight and bias, so the conv's output is
quantized once, after the BatchNorm's per-channel scaling. Left out of the fusion, the
BatchNorm stays a quantized module of its own: the conv's output is quantized first, with one
step for all its channels, and the BatchNorm then multiplies each channel's rounding error by
its gain (``weight / sqrt(running_var + eps)``). A trained network's gains span one to two
orders of magnitude (a MobileNetV2's do), so channels with a small output and a large gain
arrive as noise, while every conv is at its floor on what it computes (discuss.pytorch.org
85477: "without fusing, my accuracy is very poor": a MobileNetV2-like net at 48% unfused, 98%
fused). The capture records the kept BatchNorm's per-channel gain and shift; the screen
measures the BatchNorm's output twice on the conv's own input: as it comes from the quantized
conv's codes, and at the floor a fused conv would give (its output's range over 255 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CaseFileError
from ..findings.fixes import CALIBRATE_EAGER
from ..model_report import UpstreamLoss
from ..report import Finding

CODE = "QCD072"
#: The BatchNorm's output is this many dB worse than a fused conv's floor gives, or more: the
#: fusion is worth naming (its rounding error 4x the fused floor's energy).
COST_DB = 6.0
#: Below this SQNR the BatchNorm's output is mostly lost: an error.
LOST_DB = 10.0


@dataclass(frozen=True)
class KeptBatchNorm:
    """A BatchNorm that read a conv's output and stays in the quantized model (not fused)."""

    name: str
    """Its module path."""
    gain: tuple[float, ...]
    """Per channel, ``weight / sqrt(running_var + eps)`` (the float model's)."""
    shift: tuple[float, ...]
    """Per channel, ``bias - running_mean * gain``."""
    activation: str = ""
    """The ReLU module the float model applies to its output, called there only ("" for none,
    another kind: ``fuse_modules`` fuses conv, BatchNorm and ReLU, not ReLU6; or a module
    called elsewhere too, which fusing would remove from its other calls)."""
    alone: bool = True
    """It is the only reader of the conv's output (a pre-activation network's shortcut may read
    it too: fusing would change the float model)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "gain": list(self.gain), "shift": list(self.shift),
                "activation": self.activation, **({} if self.alone else {"alone": False})}

    @staticmethod
    def from_mapping(value: Any, channels: int, where: str) -> KeptBatchNorm:
        from .names import is_path

        def numbers(v: Any) -> tuple[float, ...]:
            if not isinstance(v, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise TypeError
            return tuple(float(x) for x in v)

        try:
            name, activation = value["name"], value.get("activation", "")
            alone = value.get("alone", True)
            if not isinstance(name, str) or not isinstance(activation, str) \
                    or not isinstance(alone, bool):
                raise TypeError
            kept = KeptBatchNorm(name, numbers(value["gain"]), numbers(value["shift"]),
                                 activation, alone)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            kept = None
        if kept is None or not is_path(kept.name) or not kept.name \
                or not is_path(kept.activation) or len(kept.gain) != channels \
                or len(kept.shift) != channels \
                or not all(math.isfinite(v) for v in (*kept.gain, *kept.shift)):
            raise CaseFileError(f"{where}: 'bn_kept' is malformed; capture the model again")
        return kept


def kept_batchnorm(name: str, bn: Any, activation: str, alone: bool = True
                   ) -> KeptBatchNorm | None:
    """The record of the float model's BatchNorm module ``name`` (None when it keeps no
    running statistics: its output depends on the batch)."""
    import torch

    if bn.running_mean is None or bn.running_var is None:
        return None
    with torch.no_grad():
        var = bn.running_var.detach().double()
        gain = 1.0 / torch.sqrt(var + bn.eps)
        if bn.weight is not None:
            gain = gain * bn.weight.detach().double()
        shift = -bn.running_mean.detach().double() * gain
        if bn.bias is not None:
            shift = shift + bn.bias.detach().double()
    return KeptBatchNorm(name, tuple(gain.tolist()), tuple(shift.tolist()), activation, alone)


def sole_readers(float_model: Any, convs: dict[str, Any], batch: Any,
                 until: dict[str, Any] | None = None) -> dict[str, bool]:
    """Per conv of ``convs`` (name -> the float model's module): is one op alone (its
    BatchNorm) reading its output, in one more forward of ``batch``? Every torch function
    called on a tensor is seen (a TorchFunctionMode: module calls, and ``x + shortcut`` in a
    forward alike); a read that returns no tensor (``x.shape``) is not counted. ``until``: per
    conv, the module whose forward ends the watch (an in-place ReLU returns the conv's output
    itself, which the ops after it read as the ReLU's)."""
    import torch
    from torch.overrides import TorchFunctionMode


    watched: dict[int, str] = {}
    held: list[Any] = []  # the outputs kept alive for the forward: their ids stay theirs
    reads = dict.fromkeys(convs, 0)

    def hook(name: str) -> Any:
        def record(_m: Any, _a: Any, out: Any) -> None:
            watched[id(out)] = name
            held.append(out)
        return record

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (),
                               kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if watched and isinstance(out, torch.Tensor):
                seen = {watched[id(a)] for a in flat_args((args, kwargs)) if id(a) in watched}
                for name in seen:
                    reads[name] += 1
            return out

    def done(name: str) -> Any:
        def forget(_m: Any, _a: Any, out: Any) -> None:
            if watched.get(id(out)) == name:  # in place: the conv's output is its output now
                del watched[id(out)]
        return forget

    handles = [m.register_forward_hook(hook(name)) for name, m in convs.items()]
    handles += [m.register_forward_hook(done(name)) for name, m in (until or {}).items()]
    forward_watched(float_model, batch, handles, Reads())
    return {name: n <= 1 for name, n in reads.items()}


def forward_watched(float_model: Any, batch: Any, handles: list[Any], mode: Any) -> None:
    """One more forward of ``batch`` under the TorchFunctionMode ``mode``, without grad or
    torch's warnings, every hook in ``handles`` removed after it, whatever happens."""
    import torch

    from ..torch_calls import capture_warnings

    try:
        with torch.no_grad(), capture_warnings(), mode:
            float_model(batch)
    finally:
        for h in handles:
            h.remove()


def flat_args(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in flat_args(v)]
    if isinstance(value, dict):
        return [x for v in value.values() for x in flat_args(v)]
    return [value]


@dataclass(frozen=True)
class KeptCost:
    """The kept BatchNorm's output, on the conv's own input: from the quantized conv's codes,
    and at a fused conv's floor."""

    sqnr_db: float | None
    """The BatchNorm applied to the quantized conv's output against it applied to the float
    conv's (None: exact)."""
    fused_db: float | None
    """What a conv fused with it gives there: the conv's own SQNR before the BatchNorm (a fused
    conv's weight takes the gains per channel, and its output step the BatchNorm's range, so
    its error keeps its size relative to the output)."""
    gain_spread: float
    """The largest |gain| over the smallest nonzero one."""

    @property
    def cost_db(self) -> float:
        if self.sqnr_db is None:
            return 0.0
        return (math.inf if self.fused_db is None else self.fused_db) - self.sqnr_db


def kept_cost(kept: KeptBatchNorm, quantized: np.ndarray, y: np.ndarray,
              own_db: float | None) -> KeptCost:
    """``KeptCost`` of ``kept`` after a conv whose dequantized output is ``quantized`` and
    whose float output on the same input is ``y`` (both (N, C, ...)), at ``own_db`` SQNR."""
    shape = (1, -1) + (1,) * (y.ndim - 2)
    gain = np.asarray(kept.gain, dtype=np.float64).reshape(shape)
    shift = np.asarray(kept.shift, dtype=np.float64).reshape(shape)
    z = y * gain + shift
    error = (quantized - y) * gain
    if kept.activation:
        zq = np.maximum(z + error, 0.0)
        z = np.maximum(z, 0.0)
        error = zq - z
    signal, noise = float(np.vdot(z, z)), float(np.vdot(error, error))
    magnitudes = np.abs(np.asarray(kept.gain))
    nonzero = magnitudes[magnitudes > 0]
    spread = float(nonzero.max() / nonzero.min()) if nonzero.size else 1.0
    return KeptCost(energy_db(signal, noise), own_db, spread)


def energy_db(signal: float, noise: float) -> float | None:
    """The SQNR of ``noise`` on ``signal`` (energies): None where the noise is 0 (exact),
    -inf where the signal is."""
    if noise <= 0:
        return None
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def qcd072(layers: list[tuple[str, KeptBatchNorm, KeptCost]],
           losses: tuple[UpstreamLoss, ...] = ()) -> Finding | None:
    """QCD072 for the convs whose kept BatchNorm's output is COST_DB or more below a fused
    conv's floor, in one finding (one fix fuses them all, and every other kept BatchNorm in
    ``layers`` too: fused one by one, the cheaper ones left a helper's model 2.5 points short
    of the fused model's accuracy with a clean report): an error where one's output is
    below LOST_DB, or where a conv after one receives an input lost to it (``losses`` blamed
    on QCD072: walk.upstream_losses) below LOST_DB, else a warning; a level lower where none
    can be fused without changing the float model (its output read by a shortcut too, or one
    BatchNorm after two convs)."""
    costly = [(conv, kept, cost) for conv, kept, cost in layers if cost.cost_db >= COST_DB]
    if not costly:
        return None
    mine = [loss for loss in losses if loss.blamed_on == CODE
            and loss.input.sqnr_db is not None]
    worst = min(costly, key=lambda c: -math.inf if c[2].sqnr_db is None else c[2].sqnr_db)
    lowest = min((loss.input.sqnr_db for loss in mine if loss.input.sqnr_db is not None),
                 default=math.inf)
    got = -math.inf if worst[2].sqnr_db is None else worst[2].sqnr_db
    level = "error" if min(got, lowest) < LOST_DB else "warning"
    shared = {k.name for _c, k, _x in layers
              if sum(k2.name == k.name for _c2, k2, _x2 in layers) > 1}
    if not any(k.alone and k.name not in shared for _c, k, _x in costly):
        # nothing to fuse without changing the model (a pre-activation network's stem):
        # worth knowing, a breach only where the signal is mostly lost
        level = "warning" if level == "error" else "info"
    conv, kept, cost = worst
    others = [c for c in costly if c is not worst]
    more = "".join(f" {k.name} after {c}: {db_text(x.sqnr_db)} against {db_text(x.fused_db)}."
                   for c, k, x in others[:4])
    if len(others) > 4:
        more += f" And {len(others) - 4} more."
    after = "".join(f" {loss.layer}'s input is {loss.input.sqnr_db:.1f} dB from the float "
                    "model's there." for loss in mine[:1] if loss.input.sqnr_db is not None)
    groups = [[c, k.name, *([k.activation] if k.activation else [])] for c, k, _x in layers
              if k.alone and k.name not in shared]
    cheaper = [k.name for c, k, x in layers if x.cost_db < COST_DB and k.alone
               and k.name not in shared]
    if cheaper:
        more += (f" The fix fuses the {len(cheaper)} other BatchNorm(s) kept after a conv too "
                 f"({', '.join(cheaper[:4])}{', ...' if len(cheaper) > 4 else ''}), which "
                 f"cost less here (under {COST_DB:.0f} dB each) but add up along the model.")
    listed = "".join(f"\n    {g!r}," for g in groups)
    left = "".join(
        f"# {c}: its output is read by more than {k.name} (a shortcut): fusing them would\n"
        "#   change the float model; not fused here\n" if not k.alone else
        f"# {c}: {k.name} also follows another conv: give each conv its own BatchNorm\n"
        "#   module (in __init__ and forward), then fuse each pair\n"
        for c, k, _x in costly if not k.alone or k.name in shared)
    return Finding(
        CODE, level,
        f"BatchNorm {kept.name} not fused into {conv}" if not others else
        f"{len(costly)} BatchNorms not fused into the convs before them",
        f"BatchNorm {kept.name} reads {conv}'s output and stays in the quantized model: "
        f"{conv}'s output is quantized first, with one step for all its channels, and "
        f"{kept.name} then multiplies each channel's rounding error by its gain (spanning "
        f"{cost.gain_spread:.3g}x here). Its output is {db_text(cost.sqnr_db)} from the float "
        f"model's on {conv}'s own input, where a conv fused with it gives "
        f"{db_text(cost.fused_db)}.{more}{after}",
        {"batchnorms": [{"conv": c, "batchnorm": k.name, "sqnr_db": x.sqnr_db,
                         "fused_sqnr_db": x.fused_db, "gain_spread": x.gain_spread}
                        for c, k, x in costly]},
        left + ("from torch.ao.quantization import fuse_modules\n"
                "# the float model in eval mode, fused as before, and each conv with the\n"
                "# BatchNorm after it (and its ReLU) too:\n"
                f"model = fuse_modules(model.eval(), [{listed}\n])\n" + CALIBRATE_EAGER
                if groups else ""))


def db_text(sqnr: float | None) -> str:
    return "exact" if sqnr is None else f"{sqnr:.1f} dB"
