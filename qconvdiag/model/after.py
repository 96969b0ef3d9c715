"""QCD071: the signal is lost after the last conv. The walk screens convs; the layers after the
last one (a classifier's Linear, a pool, a DeQuantStub) are not, so a model whose output is
noise could read as healthy (measured in a sweep: a digits CNN whose quantized Linear held
another checkpoint's weight, 18% accuracy, every conv at its floor). The capture compares the
two models' outputs with the last conv's, and records the loss only where there is one: a
model whose output keeps its last conv's SQNR writes nothing (its bundle's bytes unchanged)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..report import Finding
from .batchnorm import db_text

CODE = "QCD071"
#: The model's output is lost after its last conv when it is this many dB below that conv's
#: propagated SQNR (as QCD065 judges a conv's input against the convs before it).
AFTER_DB = 10.0
#: Below this output SQNR the signal is mostly gone: an error; a loss above it a warning.
LOST_DB = 10.0
#: An output this close to the float model's or closer is not named, whatever the last conv
#: keeps: its error carries a hundredth of its energy (helper-73's healthy digits CNN, two
#: Linears and a softmax after its last conv, 36.5 dB there and 25.0 dB at its output, as
#: accurate as the float model, was warned).
OUTPUT_DB = 20.0
#: A module after the last conv is named where its own SQNR is this many dB below the last
#: conv's or more; closer, what is lost is carried and grown, not added by one module.
NAMED_DB = 6.0
#: The fewest output values an SQNR is compared on: fewer are one sample's few logits, whose
#: SQNR scatters with what the float head makes of the last conv's rounding (a helper's Conv3d
#: classifier, 4 logits per sample, every conv at its floor: 13.5% of single samples fell 10
#: dB below the last conv; 64 samples gave 35.6 dB, within 5 dB of it).
MIN_VALUES = 32


@dataclass(frozen=True)
class HeadStep:
    """A module the quantized model ran after its last conv (an eager model's), against the
    float model's module of the same name, on the first batch."""

    name: str
    kind: str
    """The quantized module's class name (Linear, AdaptiveAvgPool2d, ...)."""
    sqnr_db: float | None
    """Its output against the float module's (None: exact)."""
    own_db: float | None = None
    """Its output against the float module's on the input it received, dequantized: its own
    error, nothing before it (None: exact, or not measured: ``own``)."""
    own: bool = False
    """``own_db`` was measured."""
    codes: int | None = None
    """How many codes its quantized output spans (None: a float output)."""
    weight_sqnr_db: float | None = None
    """A Linear's weight, dequantized, against the float module's (None: none, or exact)."""
    weight_per_channel: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "sqnr_db": self.sqnr_db,
                **({"own_db": self.own_db} if self.own else {}),
                **({} if self.codes is None else {"codes": self.codes}),
                **({} if self.weight_per_channel is None else {
                    "weight_sqnr_db": self.weight_sqnr_db,
                    "weight_per_channel": self.weight_per_channel})}

    @staticmethod
    def from_mapping(m: Any) -> HeadStep:
        """The record (raises TypeError, KeyError or ValueError where malformed)."""
        from .names import is_kind, is_path

        def number(v: Any) -> float | None:
            if v is None:
                return None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise TypeError
            return float(v)

        codes, per_channel = m.get("codes"), m.get("weight_per_channel")
        if (not is_path(m["name"]) or not m["name"] or not is_kind(m["kind"])
                or (codes is not None and (isinstance(codes, bool)
                                           or not isinstance(codes, int) or codes < 1))
                or (per_channel is not None and not isinstance(per_channel, bool))):
            raise ValueError
        return HeadStep(m["name"], m["kind"], number(m["sqnr_db"]), number(m.get("own_db")),
                        "own_db" in m, codes, number(m.get("weight_sqnr_db")), per_channel)


@dataclass(frozen=True)
class LostAfter:
    """The model's output against the float model's, and its last conv's."""

    last_conv: str
    """The conv the quantized model ran last."""
    last_conv_sqnr_db: float
    """That conv's output against the float model's there (its propagated SQNR)."""
    output_sqnr_db: float | None
    """The model's output against the float model's (None: no signal left at all)."""
    after: tuple[str, ...]
    """The quantized ops with their own qparams that ran after the last conv (a Linear, an
    add: ops.py's record), in order."""
    output: str = ""
    """Which of the model's outputs (a tuple's index, a dict's key: ``logits``) is the worst,
    where it returns several ("" for one tensor)."""
    steps: tuple[HeadStep, ...] = ()
    """The modules after the last conv, each against its float twin (an eager model's)."""

    def to_dict(self) -> dict[str, Any]:
        return {"last_conv": self.last_conv, "last_conv_sqnr_db": self.last_conv_sqnr_db,
                "output_sqnr_db": self.output_sqnr_db, "after": list(self.after),
                **({"output": self.output} if self.output else {}),
                **({"steps": [s.to_dict() for s in self.steps]} if self.steps else {})}

    @staticmethod
    def from_mapping(m: Any, source: str) -> LostAfter:
        from ..errors import CaseFileError
        from .names import is_op_name, is_path

        try:
            out = m["output_sqnr_db"]
            lost = LostAfter(str(m["last_conv"]), float(m["last_conv_sqnr_db"]),
                             None if out is None else float(out),
                             tuple(str(a) for a in m.get("after") or ()),
                             m.get("output", ""),
                             tuple(HeadStep.from_mapping(s) for s in m.get("steps") or ()))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            lost = None
        if lost is None or not is_path(lost.last_conv) or not all(
                is_op_name(a) for a in lost.after) or not is_path(lost.output):
            raise CaseFileError(f"{source}: 'lost_after' is malformed; capture the model "
                                "again")
        return lost


class HeadRecorder:
    """Hooks on an eager model's leaf modules for ``head_steps``: in the quantized model's first
    forward, the outputs of the modules that ran after its last conv (a conv's call clears
    them; Identity and DeQuantize add nothing); in the float model's, its same-named modules'.
    The tensors are kept, not copied: they are the head's, after the last conv."""

    def __init__(self, float_model: Any, quantized_model: Any, qconvs: set[str]) -> None:
        import torch

        self.after: list[tuple[str, str, Any, Any]] = []
        self.float_out: dict[str, Any] = {}
        self.float_calls: dict[str, int] = {}  # a module called twice pairs with no one call
        self.first = [True, True]  # the quantized model's first forward, the float one's
        self.handles: list[Any] = []
        self._tensor = torch.Tensor
        try:
            for name, m in quantized_model.named_modules():
                if name and _leaf(m):
                    self.handles.append(m.register_forward_hook(
                        self._quantized(name, name in qconvs)))
            for name, m in float_model.named_modules():
                if name and _leaf(m):
                    self.handles.append(m.register_forward_hook(self._float(name)))
            self.handles.append(quantized_model.register_forward_hook(self._done(0)))
            self.handles.append(float_model.register_forward_hook(self._done(1)))
        except BaseException:  # no hook left behind on the user's models
            self.remove()
            raise

    def _quantized(self, name: str, conv: bool) -> Any:
        def hook(m: Any, args: Any, out: Any) -> None:
            if not self.first[0]:
                return
            if conv:
                self.after.clear()
            elif isinstance(out, self._tensor) and type(m).__name__ not in HEAD_SKIPPED:
                x = args[0] if len(args) == 1 and isinstance(args[0], self._tensor) else None
                self.after.append((name, type(m).__name__, out, x))
        return hook

    def _float(self, name: str) -> Any:
        def hook(_m: Any, _a: Any, out: Any) -> None:
            if self.first[1] and not self.first[0] and isinstance(out, self._tensor):
                self.float_out[name] = out
                self.float_calls[name] = self.float_calls.get(name, 0) + 1
        return hook

    def _done(self, which: int) -> Any:
        def hook(*_: Any) -> None:
            self.first[which] = False
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _leaf(module: Any) -> bool:
    """A module with no children but its packed parameters (a quantized Linear's), and not a
    TorchScript one (which takes no hooks)."""
    import torch

    return not isinstance(module, torch.jit.ScriptModule) and all(
        name == "_packed_params" for name, _ in module.named_children())


#: Modules whose output is their input's, as far as a loss goes.
HEAD_SKIPPED = frozenset({"Identity", "DeQuantize", "DeQuantStub", "Dropout"})


def head_steps(recorder: HeadRecorder, float_model: Any, quantized_model: Any, keep: int
               ) -> tuple[HeadStep, ...]:
    """Each module after the last conv (``recorder``'s) against the float model's module of
    the same name, on the first batch's ``keep`` samples; a Linear's weight too."""
    import numpy as np
    import torch

    from ..measure.metrics import difference

    steps = []
    called = [name for name, _k, _o, _x in recorder.after]
    for name, kind, out, x in recorder.after:
        if called.count(name) > 1 or recorder.float_calls.get(name, 0) > 1:
            continue  # called twice: which float call is its twin is not known
        want = recorder.float_out.get(name)
        if want is None or tuple(want.shape) != tuple(out.shape) or out.numel() == 0:
            continue
        got = out.dequantize() if out.is_quantized else out
        if not got.is_floating_point() or not want.is_floating_point():
            continue
        a = got.detach().float().numpy()[:keep]
        b = want.detach().float().numpy()[:keep]
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            continue
        q_mod, f_mod = quantized_model.get_submodule(name), None
        try:
            f_mod = float_model.get_submodule(name)
        except AttributeError:
            pass
        fused = _fused_relu(kind, f_mod)
        if fused:  # a LinearReLU: its twin is the float Linear, the ReLU after it fused in
            b = np.maximum(b, 0.0)
        codes = None
        if out.is_quantized and out.qscheme() == torch.per_tensor_affine:
            r = out.int_repr()
            codes = int(r.max()) - int(r.min()) + 1
        w_db, per_channel = None, None
        weight = getattr(q_mod, "weight", None)
        if callable(weight) and f_mod is not None and isinstance(
                getattr(f_mod, "weight", None), torch.Tensor):
            qw = weight()
            if qw.is_quantized and tuple(qw.shape) == tuple(f_mod.weight.shape):
                w_db = difference(qw.dequantize().numpy(),
                                  f_mod.weight.detach().float().numpy()).sqnr_db
                per_channel = qw.qscheme() in (torch.per_channel_affine,
                                               torch.per_channel_symmetric)
        own = _own(f_mod, x, a, fused, keep)
        steps.append(HeadStep(name, kind, difference(a, b).sqnr_db,
                              None if own is None else own[0], own is not None, codes, w_db,
                              per_channel))
    return tuple(steps)


def _fused_relu(kind: str, f_mod: Any) -> bool:
    """The quantized module fused a ReLU its float twin does not apply (a LinearReLU)."""
    return "ReLU" in kind and f_mod is not None and "ReLU" not in type(f_mod).__name__


def _own(f_mod: Any, x: Any, got: Any, fused: bool, keep: int) -> tuple[float | None] | None:
    """The float module on the input the quantized one received (dequantized), after the ReLU
    the quantized one ``fused``, against the quantized module's output ``got``: its own SQNR;
    None where not measured (no float twin, an input of several tensors, another shape)."""
    import numpy as np
    import torch

    from ..measure.metrics import difference

    if f_mod is None or x is None or getattr(f_mod, "training", False):
        return None  # (a module in training mode would update its statistics)
    xf = x.dequantize() if x.is_quantized else x
    if not xf.is_floating_point():
        return None
    try:
        with torch.no_grad():
            ref = f_mod(xf[:keep].float())
    except (RuntimeError, TypeError, ValueError):
        return None
    if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != tuple(got.shape):
        return None
    r = ref.detach().float().numpy()
    if fused:
        r = np.maximum(r, 0.0)
    if not np.isfinite(r).all():
        return None
    return (difference(got, r).sqnr_db,)


#: A quantized output on this many codes or fewer is coarse for what it carries.
FEW_CODES = 32
#: A Linear's weight this many dB or less from the float model's is another weight.
OTHER_WEIGHT_DB = 10.0
#: Pools and other modules that keep their input's scale and zero point.
KEEPS_QPARAMS = ("Pool", "Flatten", "Upsample", "ReLU", "Hardtanh", "Dropout")


def _where(lost: LostAfter) -> str:
    """Each module after the last conv against its float twin, and where the most is lost:
    the lowest own SQNR where measured (the module on the input it received), else the
    largest drop from the module before; with what that module's record shows."""
    def inf(v: float | None) -> float:
        return math.inf if v is None else v

    listed = "; ".join(f"{s.name} ({s.kind}) {db_text(s.sqnr_db)}"
                       + (f", own {db_text(s.own_db)}" if s.own else "") for s in lost.steps)
    head = ("Module by module after it (the model's SQNR there"
            + ("; own: the module on the input it received" if any(s.own for s in lost.steps)
               else "") + f"): {listed}.")
    measured = [s for s in lost.steps if s.own]
    if measured:
        worst = min(measured, key=lambda s: inf(s.own_db))
        if inf(worst.own_db) > lost.last_conv_sqnr_db - NAMED_DB:
            return head + (f" Each one's own SQNR is within {NAMED_DB:.0f} dB of the last "
                           "conv's or above it: what is lost is carried and grown (a "
                           "Linear's sums cancel), not added by one of them.")
        text = f"{head} The lowest own SQNR is {worst.name}'s"
    else:
        before, drops = lost.last_conv_sqnr_db, []
        for s in lost.steps:
            drops.append((before - inf(s.sqnr_db), s))
            before = inf(s.sqnr_db)
        drop, worst = max(drops, key=lambda d: d[0])
        if drop <= 0:
            return head
        text = f"{head} The most is lost at {worst.name} ({drop:.1f} dB)"
    if worst.weight_per_channel is not None:
        w = worst.weight_sqnr_db
        if w is not None and w <= OTHER_WEIGHT_DB:
            return text + (f": its weight is {db_text(w)} from the float model's, another weight "
                           "(another checkpoint, a weight set without set_weight_bias).")
        return text + (f": its weight is {db_text(w)} from the float model's, quantized "
                       + ("per channel" if worst.weight_per_channel else
                          "per tensor (a per-channel weight observer gives each output its "
                          "own scale)") + "; and its output scale, for its output's range.")
    if worst.codes is not None and worst.codes <= FEW_CODES and any(
            k in worst.kind for k in KEEPS_QPARAMS):
        return text + (f": a quantized {worst.kind} keeps its input's scale and zero point, "
                       f"and its output spans only {worst.codes} codes of them (a pool's "
                       "average is narrower than its input).")
    if worst.codes is not None and worst.codes <= FEW_CODES:
        return text + f": its output spans only {worst.codes} codes."
    return text + "."


def lost_after(last_conv: str, last_sqnr: float | None, output_sqnr: float | None,
               after: tuple[str, ...], output: str = "") -> LostAfter | None:
    """The loss after the last conv, when the output (``output``, of several) is AFTER_DB
    below it (None: no loss, or nothing to compare: an exact last conv). The capture compares
    no output of fewer than MIN_VALUES values that keeps some signal."""
    if last_sqnr is None:  # the last conv is exact: any loss after it shows in QCD065's way
        return None
    if output_sqnr is not None and output_sqnr > last_sqnr - AFTER_DB:
        return None
    return LostAfter(last_conv, last_sqnr, output_sqnr, after, output)


def qcd071(lost: LostAfter | None) -> Finding | None:
    if lost is None or (lost.output_sqnr_db is not None and lost.output_sqnr_db >= OUTPUT_DB):
        return None
    out = lost.output_sqnr_db
    level = "error" if out is None or out < LOST_DB else "warning"
    out_text = "no signal left" if out is None else f"{out:.1f} dB from the float model's"
    ops = (f"the quantized ops with their own qparams after it: {', '.join(lost.after)}"
           if lost.after else "no quantized op with its own qparams was seen after it")
    which = f"output {lost.output!r}" if lost.output else "output"
    message = (
        f"The quantized model's {which} is {out_text}, while its last conv, {lost.last_conv}, "
        f"is {lost.last_conv_sqnr_db:.1f} dB: the signal is lost after the last conv ({ops}). "
        "qconvdiag screens convs only; whatever their verdicts, the model's output is not "
        "the float model's. " + (_where(lost) if lost.steps else
                                 "A Linear holding other weights than the float model's "
                                 "(another checkpoint, a weight set without set_weight_bias), "
                                 "or an output scale far from its range, does this."))
    from ..findings.fixes import python_list

    if not lost.after:  # nothing recorded after it: every module with output qparams
        fix = ("# each quantized module's output qparams\n"
               "for name, m in quantized.named_modules():\n"
               "    if hasattr(m, 'scale') and hasattr(m, 'zero_point'):\n"
               "        print(name, type(m).__name__, float(m.scale), int(m.zero_point))")
        return Finding(CODE, level, f"the signal is lost after the last conv, {lost.last_conv}",
                       message, lost.to_dict(), fix)
    fix = ("# each quantized module after the last conv, against its float twin (model: the\n"
           "# float model): its output qparams, and a Linear's weight\n"
           f"for name in {python_list(list(lost.after))}:\n"
           "    m, f = quantized.get_submodule(name), model.get_submodule(name)\n"
           "    print(name, type(m).__name__, getattr(m, 'scale', None))\n"
           "    if callable(getattr(m, 'weight', None)) and hasattr(f, 'weight'):\n"
           "        d = m.weight().dequantize() - f.weight.detach()\n"
           "        print('  max |w - float w|', float(d.abs().max()))")
    return Finding(CODE, level, f"the signal is lost after the last conv, {lost.last_conv}",
                   message, lost.to_dict(), fix)
