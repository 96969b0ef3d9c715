"""The quantized ops between convs that set their own output scale, for QCD065 to name.

A signal lost between two convs (QCD065) is lost by a quantized op with its own output qparams:
a FloatFunctional's add or cat (QFunctional after convert), a quantized Hardswish or Linear, the
model's QuantStub (Quantize). The capture records, for each such module of an eager model, the
qparams of the output it computed, which conv ran last before it, and the float model's output
range at the same module (over the calibration batches when given, else over the captured
samples), per call where one module serves several (a FloatFunctional used for several adds).
QCD065 names an op that ran just before the lost conv when it does not compute what the float
model's does there: a BatchNorm whose running statistics moved, a step far coarser than that
range needs, a representable range that leaves out much of it, or one scale shared by calls
whose ranges differ far; each with its own fix.

Only minimum and maximum are kept (and a BatchNorm's running statistics against the float
model's): no op's tensors. A FloatFunctional is called through its methods (``add``, ``cat``),
which run no forward hook: its ``activation_post_process`` (an Identity, in the float model and
in the quantized one) sees its output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CaseFileError
from ..measure.budget import FAR, SAMPLE_RANGE
from ..quantization.qparams import DTYPE_RANGES
from .activations import ActivationCheck, WrongValues

#: An op's qparams leave out this share of the float model's range there or more: the op loses
#: the values beyond (they saturate).
MISSED_SHARE = 0.5
#: An op whose step is too coarse also leaves out this share of the float range on one side
#: or more: its message says so (the values there are clipped to the representable edge).
SIDE_SHARE = 0.1
#: A quantized BatchNorm's running statistics are not the float model's when a mean moved by
#: this many of the float model's standard deviations, or a variance by this factor (convert
#: copies them exactly: they differ only when BatchNorm updated them, in train mode).
MEAN_SHIFT = 0.01
VAR_FACTOR = 1.01


@dataclass(frozen=True)
class OpRange:
    """One quantized op with its own output qparams, as the capture saw it."""

    name: str
    """The module's path in the model (a FloatFunctional's, not its activation_post_process')."""
    kind: str
    """The quantized module's class name (QFunctional, Quantize, Hardswish, Linear, ...)."""
    scale: float
    zero_point: int
    dtype: str
    """quint8 or qint8: the codes' range."""
    float_low: float
    float_high: float
    """The float model's output range at the same module."""
    after: tuple[str, ...]
    """Per call in the quantized model's forward, the conv that ran last before it ("" for
    none)."""
    sampled: bool
    """The range is the captured samples' only (no calibration batches): narrower than the
    observers saw."""
    tensor_qparams: bool
    """The module holds its scale and zero point as tensors (Quantize): its fix assigns
    tensors."""
    stats: tuple[float, float, float] | None = None
    """A BatchNorm's running statistics against the float model's: the largest mean shift in
    the float model's standard deviations, the smallest and largest variance ratio."""
    packed: bool = False
    """The module holds a packed weight (a quantized Linear): on qnnpack its requantization is
    kept from its first run, so its fix packs it again there."""
    call_ranges: tuple[tuple[float, float], ...] = ()
    """Where the module serves several calls per forward (one FloatFunctional for several
    adds): the float model's range at each call, on the captured samples."""
    shared: int = 1
    """``between``'s view of one call of such a module: how many calls share its qparams."""
    wrong: WrongValues | None = None
    """An activation module whose quantized kernel computed wrong values on its own input
    (activations.py)."""
    own_qparams: bool = True
    """The module sets its output qparams (False: an activation that keeps its input's, such
    as ReLU6, recorded for its wrong values only: its float range is 0..0, unread)."""
    aliases: tuple[str, ...] = ()
    """The paths of one float module serving several calls (one FloatFunctional assigned to
    several attributes), this op's among them, in call order: convert gave each path a
    quantized module of its own, each with the one scale the shared observer fitted to all
    the calls (``call_ranges``; the float range is this path's call's)."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "scale": self.scale,
                "zero_point": self.zero_point, "dtype": self.dtype,
                "float_range": [self.float_low, self.float_high], "after": list(self.after),
                "sampled": self.sampled, "tensor_qparams": self.tensor_qparams,
                **({} if self.stats is None else {"stats": list(self.stats)}),
                **({"packed": True} if self.packed else {}),
                **({"call_ranges": [list(r) for r in self.call_ranges]}
                   if self.call_ranges else {}),
                **({"wrong": self.wrong.to_dict()} if self.wrong is not None else {}),
                **({"own_qparams": False} if not self.own_qparams else {}),
                **({"aliases": list(self.aliases)} if self.aliases else {})}

    @staticmethod
    def from_mapping(m: Any, source: str) -> OpRange:
        try:
            lo, hi = (float(v) for v in m["float_range"])
            stats = m.get("stats")
            op = OpRange(str(m["name"]), str(m["kind"]), float(m["scale"]),
                         int(m["zero_point"]), str(m["dtype"]), lo, hi,
                         tuple(str(a) for a in m["after"]),
                         bool(m["sampled"]), bool(m["tensor_qparams"]),
                         None if stats is None else (float(stats[0]), float(stats[1]),
                                                     float(stats[2])),
                         bool(m.get("packed", False)),
                         tuple((float(lo_), float(hi_)) for lo_, hi_ in m.get("call_ranges", ())),
                         1, None if m.get("wrong") is None
                         else WrongValues.from_mapping(m["wrong"]),
                         bool(m.get("own_qparams", True)),
                         _strings(m.get("aliases", [])))
            if op.aliases:
                if not (len(op.aliases) >= 2 and op.name in op.aliases and op.kind ==
                        "QFunctional" and len(op.call_ranges) == len(op.aliases)):
                    raise ValueError("aliases need a call range each, this op's among them")
                op = dataclasses.replace(op, shared=len(op.aliases))
        except (KeyError, TypeError, ValueError, OverflowError):
            raise CaseFileError(f"{source}: an entry of 'ops' is malformed; capture the model "
                                "again") from None
        from .names import is_kind, is_op_name, is_path

        # names a fix prints as code: module paths (or a function's call) and class names
        if not (is_op_name(op.name) and is_kind(op.kind)
                and all(is_path(a) for a in (*op.after, *op.aliases))):
            raise CaseFileError(f"{source}: an entry of 'ops' is malformed; capture the model "
                                "again")
        if op.dtype not in ("quint8", "qint8") or not op.scale > 0:
            raise CaseFileError(f"{source}: op {op.name!r} has qparams qconvdiag does not read; "
                                "capture the model again")
        return op

    @property
    def levels(self) -> tuple[int, int]:
        return DTYPE_RANGES[self.dtype]

    def representable(self) -> tuple[float, float]:
        qmin, qmax = self.levels
        return (qmin - self.zero_point) * self.scale, (qmax - self.zero_point) * self.scale

    def ideal_step(self) -> float:
        """The step minmax qparams over the float range (0 included) give."""
        qmin, qmax = self.levels
        return (max(self.float_high, 0.0) - min(self.float_low, 0.0)) / (qmax - qmin)

    def drifted(self) -> bool:
        """A BatchNorm whose running statistics are not the float model's (MEAN_SHIFT,
        VAR_FACTOR)."""
        return self.stats is not None and (self.stats[0] >= MEAN_SHIFT or self.stats[1]
                                           <= 1 / VAR_FACTOR or self.stats[2] >= VAR_FACTOR)

    def drift_db(self) -> float:
        """The SQNR of the error a BatchNorm's moved statistics (``stats``) put in its output:
        from the largest of the mean's shift (in standard deviations) and the change of the
        scale sqrt(var); inf for statistics that did not move or another op."""
        if self.stats is None:
            return math.inf
        shift, low, high = self.stats
        rel = max(shift, abs(1 - math.sqrt(low)), abs(math.sqrt(high) - 1))
        return math.inf if rel <= 0 else -20 * math.log10(rel)

    def misfit(self) -> str | None:
        """Why this op does not compute what the float model's does there (None: it does): a
        BatchNorm whose running statistics moved (``drifted``), a step FAR times too coarse
        for the float model's range there (SAMPLE_RANGE times on the captured samples'
        range), or a representable range that leaves out MISSED_SHARE of it; first, a kernel
        that computed wrong values (``wrong``)."""
        if self.wrong is not None:
            return self.wrong.message()
        if self.stats is not None and self.drifted():
            shift, low, high = self.stats
            return (f"its running statistics are not the float model's: a mean moved by "
                    f"{shift:.2f} standard deviations, variances by {low:.2f}x to {high:.2f}x "
                    "(BatchNorm updates them in train mode: the model was calibrated without "
                    ".eval(), or the float model given is not the one quantized)")
        ideal = self.ideal_step()
        if ideal <= 0 or not self.own_qparams:
            return None
        if self.shared > 1:
            return self._shared_misfit(ideal)
        lo, hi = self.representable()
        span = self.float_high - self.float_low
        covered = max(0.0, min(hi, self.float_high) - max(lo, self.float_low))
        rng = f"[{self.float_low:.4g}, {self.float_high:.4g}]"
        if span > 0 and 1 - covered / span >= MISSED_SHARE:
            return (f"its output qparams (scale {self.scale:.4g}, zero point "
                    f"{self.zero_point}) represent [{lo:.4g}, {hi:.4g}], which leaves out "
                    f"{1 - covered / span:.0%} of the float model's range there {rng}: the "
                    "values beyond saturate")
        if lo >= 0 > self.float_low and -self.float_low >= SIDE_SHARE * span:
            # qparams for a ReLU's output on a signed one: no negative value represented
            return (f"its output qparams (scale {self.scale:.4g}, zero point "
                    f"{self.zero_point}) represent no negative value, and the float model's "
                    f"range there is {rng}: every negative value is clipped to 0"
                    + self._coarse(ideal, rng))
        ratio = self._coarse_ratio(ideal)
        if ratio is not None:
            return (f"its output scale {self.scale:.4g} is {ratio:.1f}x the step the float "
                    f"model's range there {rng} needs ({ideal:.4g})"
                    + self._side_left_out(lo, hi, span))
        return None

    def _coarse_ratio(self, ideal: float) -> float | None:
        """The scale over ``ideal`` where it is FAR times it or more (SAMPLE_RANGE times on
        the captured samples' range alone), else None."""
        ratio = self.scale / ideal
        return ratio if ratio >= (SAMPLE_RANGE if self.sampled else FAR) else None

    def _coarse(self, ideal: float, rng: str) -> str:
        """The step's clause where it is too coarse too."""
        ratio = self._coarse_ratio(ideal)
        if ratio is None:
            return ""
        return f", and its scale is {ratio:.1f}x the step {rng} needs ({ideal:.4g})"

    def _side_left_out(self, lo: float, hi: float, span: float) -> str:
        """Where the representable range leaves out one side of the float range (a zero
        point 0 on an input normalized around 0: a helper's QuantStub clipped 58% of the
        values, every negative one, and the message named the scale alone)."""
        below, above = max(0.0, lo - self.float_low), max(0.0, self.float_high - hi)
        if span <= 0 or max(below, above) < SIDE_SHARE * span:
            return ""
        side, edge = ((f"[{self.float_low:.4g}, {lo:.4g})", lo) if below >= above
                      else (f"({hi:.4g}, {self.float_high:.4g}]", hi))
        return (f"; and its zero point {self.zero_point} leaves {side} out, "
                f"{max(below, above) / span:.0%} of that range: every value there is "
                f"clipped to {edge:.4g}")

    def _shared_misfit(self, ideal: float) -> str | None:
        """One call of a module that serves ``shared`` calls: its qparams fit the calls' union;
        a misfit where that union's step is FAR times this call's (on the same samples). Of a
        float module several paths share (``aliases``), so is each of their quantized
        modules'."""
        qmin, qmax = self.levels
        span = (max(max(hi for _, hi in self.call_ranges), 0.0)
                - min(min(lo for lo, _ in self.call_ranges), 0.0))
        ratio = span / (qmax - qmin) / ideal
        if ratio < FAR:
            return None
        serves = (f"its float module serves {', '.join(self.aliases)} (one module assigned "
                  f"to each: {self.shared} calls per forward), and convert gave each its own "
                  f"quantized module with the one output scale ({self.scale:.4g}) its observer "
                  "fitted to them all; at this call the float model's " if self.aliases else
                  f"it serves {self.shared} calls per forward with one output scale "
                  f"({self.scale:.4g}) fitted to them all, and at this call the float model's ")
        return (serves +
                f"range [{self.float_low:.4g}, {self.float_high:.4g}] is {ratio:.1f}x narrower "
                "than theirs together: one module per call gets its own scale")

    def label(self) -> str:
        """How a message names the op: its module path and kind, or a function's call."""
        return (self.name if self.wrong is not None and self.wrong.function
                else f"{self.name} ({self.kind})")

    def fix(self, engine: str = "", module: str = "quantized",
            others: tuple[OpRange, ...] = ()) -> str:
        """Minmax qparams over the float range, set on the quantized module (packed again on
        qnnpack, where it holds a packed weight). ``others``: the model's other ops, whose
        functions with wrong kernels a function's fix mends in the same pass."""
        import numpy as np

        from ..findings.base import minmax_qparams
        from ..findings.fixes import repacked

        if self.wrong is not None:
            return self.wrong_values_fix(module, others)
        if self.aliases:
            return self._aliases_fix()
        if self.shared > 1:
            owner, _, attr = self.name.rpartition(".")
            where = f" of {owner!r}" if owner else ""
            return (f"# one {self.kind.replace('QFunctional', 'FloatFunctional')} per call, in "
                    f"__init__{where} of the float model:\n"
                    + "".join(f"#     self.{attr}{i} = torch.ao.nn.quantized.FloatFunctional()\n"
                              for i in range(1, self.shared + 1))
                    + f"# each used at one call in forward (self.{attr}1.add(...), ...);\n"
                    "# then prepare, calibrate and convert again")
        scale, zp = minmax_qparams(np.array([self.float_low, self.float_high]), self.dtype)
        values = ((f"torch.tensor([{scale!r}])", f"torch.tensor([{zp}])")
                  if self.tensor_qparams else (repr(scale), str(zp)))
        return repacked(
            f"# {self.name}'s output qparams: minmax over the float model's range there\n"
            f"# [{self.float_low:.4g}, {self.float_high:.4g}] (or calibrate it again)\n"
            + ("import torch\n" if self.tensor_qparams else "")
            + f"op = {module}.get_submodule({self.name!r})\n"
            f"op.scale = {values[0]}\nop.zero_point = {values[1]}",
            engine if self.packed else None, "op")


    def _aliases_fix(self) -> str:
        """One float module per path (``aliases``), then the model quantized again."""
        from ..findings.fixes import model_calibration

        kind = self.kind.replace("QFunctional", "FloatFunctional")
        lines = []
        for path in self.aliases[1:]:
            owner, _, attr = path.rpartition(".")
            where = f"model.get_submodule({owner!r})" if owner else "model"
            lines.append(f"{where}.{attr} = torch.ao.nn.quantized.{kind}()\n")
        return (f"# one {kind} of the float model serves several paths (one module\n"
                "# assigned to each): give each its own, then quantize again (in\n"
                "# __init__: one module per attribute)\n" + "".join(lines)
                + model_calibration("eager"))

    def wrong_values_fix(self, module: str = "quantized", others: tuple[OpRange, ...] = ()
                         ) -> str:
        """A kernel that computed wrong values (``wrong``), worked around in the quantized
        model: the module given a contiguous input where that is what it gets wrong, else run
        in float (its float twin, a copy of ``model``'s module, between a dequantize and a
        quantize to the output qparams it computed with)."""
        assert self.wrong is not None
        # every module and function found wrong, mended in one pass (a fault after a broken
        # layer shows in no loss of its own: MobileNetV2 on qnnpack took four walks, one ReLU6
        # each), this op's kind first
        found = (self, *others)
        has_function = any(o.wrong is not None and o.wrong.function for o in found)
        has_module = any(o.wrong is not None and not o.wrong.function for o in found)
        parts = ([self._function_fix(module, others)] if has_function else []) + (
            [self._module_fix(module, others)] if has_module else [])
        return "\n".join(parts if self.wrong.function else parts[::-1])

    def _module_fix(self, module: str, others: tuple[OpRange, ...]) -> str:
        """``wrong_values_fix`` of the modules found wrong: each wrapped in a module that gives
        it a contiguous input, or runs its float twin."""
        wrong = list({o.name: o for o in (self, *others)
                      if o.wrong is not None and not o.wrong.function}.values())
        kinds = list(dict.fromkeys(o.wrong.kind for o in wrong if o.wrong is not None))
        one = len(kinds) == 1
        named = f"# torch's quantized {' and '.join(kinds)}"
        if all(o.wrong is not None and o.wrong.contiguous_ok for o in wrong):
            head = (f"{named} {'gets' if one else 'get'} a channels_last input wrong: give\n"
                    "# it a contiguous one\n")
            init, body = "op", "        return self.op(x.contiguous())\n"
            keep, listed = "", "".join(f"        {o.name!r},\n" for o in wrong)
            loop = ("for name in [\n" + listed + "]:\n"
                    "    owner, _, attr = name.rpartition('.')\n"
                    f"    owner = {module}.get_submodule(owner)\n"
                    "    setattr(owner, attr, Fixed(getattr(owner, attr)))")
        else:
            head = (f"{named} compute{'s' if one else ''} wrong values: run it in float,\n"
                    "# its output quantized to the qparams it computed with\n"
                    "import copy\n")
            init = "op, float_op, qparams"
            keep = ("        self.float_op = float_op\n"
                    "        self.qparams = qparams\n")
            body = ("        y = self.float_op(x.dequantize())\n"  # lines within 80 columns
                    "        return torch.quantize_per_tensor(y, *self.qparams)\n")
            listed = "".join(f"        ({o.name!r},\n"
                             f"         {o.scale!r}, {o.zero_point}, torch.{o.dtype}),\n"
                             for o in wrong)
            own = [o.name for o in wrong if o.wrong is not None and o.wrong.own_weight]
            loop = ("for name, *qparams in [\n" + listed + "]:\n"
                    "    owner, _, attr = name.rpartition('.')\n"
                    f"    owner = {module}.get_submodule(owner)\n"
                    "    float_op = copy.deepcopy(model.get_submodule(name))\n"
                    + (f"    if name in {own!r}:\n"
                       "        # a BatchNorm fused into it: its own weight, in float\n"
                       "        q = getattr(owner, attr)\n"
                       "        float_op.weight = torch.nn.Parameter(q.weight().dequantize())\n"
                       "        float_op.bias = torch.nn.Parameter(q.bias().detach())\n"
                       if own else "")
                    + "    setattr(owner, attr,\n"
                    "            Fixed(getattr(owner, attr), float_op, qparams))")
        return (head + "import torch\n"
                "class Fixed(torch.nn.Module):\n"
                f"    def __init__(self, {init}):\n"
                "        super().__init__()\n"
                "        self.op = op\n" + keep
                + "    def forward(self, x):\n" + body + loop)


    def _function_fix(self, module: str, others: tuple[OpRange, ...]) -> str:
        """``wrong_values_fix`` of a function's call: the quantized model's forward run under a
        TorchFunctionMode that gives the function a contiguous input, or runs it in float on
        the dequantized input and quantizes the result to the qparams the kernel chose. Every
        function whose kernel computed wrong values somewhere in the model (``others``) is
        mended with it: a fault after a broken layer shows in no loss of its own."""
        wrong = [w for w in (self.wrong, *(o.wrong for o in others)) if w is not None
                 and w.function]
        functions = list(dict.fromkeys(w.function for w in wrong))
        kinds = list(dict.fromkeys(w.kind for w in wrong))
        one = len(kinds) == 1
        named = f"# torch's quantized {' and '.join(kinds)}"
        if all(w.contiguous_ok for w in wrong):
            head = (f"{named} {'gets' if one else 'get'} a channels_last input wrong: give\n"
                    "# it a contiguous one (x.contiguous() in the model's forward), or on\n"
                    "# the quantized model as it is:\n")
            body = ("            x = args[0]\n"
                    "            out = func(x.contiguous(), *args[1:], **kwargs)\n")
        else:
            head = (f"{named} compute{'s' if one else ''} wrong values: run it in float,\n"
                    "# its output quantized to the qparams it computed with\n")
            body = ("            x = args[0]\n"
                    "            y = func(x.dequantize(), *args[1:], **kwargs)\n"
                    "            out = func(x.clone(), *args[1:], **kwargs)  # its qparams\n"
                    "            out = torch.quantize_per_tensor(\n"
                    "                y, out.q_scale(), out.q_zero_point(), out.dtype)\n")
        # an in-place call (F.hardtanh_, inplace=True) writes its result back: the caller may
        # read the tensor it passed, not what the call returns
        body += ("            in_place = kwargs.get('inplace') or func.__name__.endswith('_')\n"
                 "            return x.copy_(out) if in_place else out\n"
                 "        return func(*args, **kwargs)\n")
        return (head + "import torch\n"
                "WRONG = (" + ",\n         ".join(functions) + ",)\n"
                "class Mended(torch.overrides.TorchFunctionMode):\n"
                "    def __torch_function__(self, func, types, args=(), kwargs=None):\n"
                "        kwargs = kwargs or {}\n"
                "        if func in WRONG and args and getattr(args[0], 'is_quantized',\n"
                "                                              False):\n"
                + body
                + f"forward = {module}.forward\n"
                "def mended_forward(*args, **kwargs):\n"
                "    with Mended():\n"
                "        return forward(*args, **kwargs)\n"
                f"{module}.forward = mended_forward")


#: A cause explains a loss where the error it alone puts there is within this many dB of the
#: loss's SQNR or worse: half its error power or more. A BatchNorm's moved statistics
#: (``OpRange.drift_db``): a move of 0.01 standard deviations (32 dB) was blamed for a conv's
#: input at 24.4 dB, and the fix, calibrating in eval mode, left it at 24.6 dB (helper-65: the
#: loss was the unfused BatchNorm's, QCD072). A BatchNorm folded under a shortcut (QCD073,
#: refold.py): what its other readers get.
EXPLAINS_DB = 3.0


def _strings(value: Any) -> tuple[str, ...]:
    """A bundle's list of strings (a string is not one: its characters would be)."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError("a list of strings")
    return tuple(value)


def for_loss(op: OpRange, sqnr: float | None) -> OpRange:
    """``op`` as a loss at ``sqnr`` dB (None: unknown) judges it: a BatchNorm's moved
    statistics that do not explain it (EXPLAINS_DB) left out, its qparams judged alone."""
    if op.drifted() and sqnr is not None and op.drift_db() > sqnr + EXPLAINS_DB:
        return dataclasses.replace(op, stats=None)
    return op


def between(ops: tuple[OpRange, ...], order: list[str], layer: str,
            sqnr: float | None = None) -> list[OpRange]:
    """The ops that ran after the conv before ``layer`` (in ``order``, the convs' model order)
    and whose qparams do not fit the float model's range (``OpRange.misfit``). ``sqnr``: the
    loss's (the conv's input SQNR), which a BatchNorm's moved statistics must explain
    (EXPLAINS_DB) to be named for them; their qparams are judged all the same."""
    i = order.index(layer)
    before = order[i - 1] if i else ""
    found = []
    for op in ops:
        if before not in op.after:
            continue
        if len(op.after) > 1 and len(op.call_ranges) == len(op.after):
            k = op.after.index(before)  # the call that ran just before ``layer``
            lo, hi = op.call_ranges[k]
            op = dataclasses.replace(op, float_low=lo, float_high=hi, shared=len(op.after))
        op = for_loss(op, sqnr)
        if op.misfit() is not None:
            found.append(op)
    return found


def own_qparams_modules(quantized_model: Any, convs: set[str]) -> dict[str, Any]:
    """The quantized model's modules with their own output qparams (``scale`` and
    ``zero_point``), but the captured convs and the transposed ones (whose float twin may have
    a BatchNorm folded in after it): name -> module."""
    return {name: m for name, m in quantized_model.named_modules()
            if name and name not in convs and hasattr(m, "scale") and hasattr(m, "zero_point")
            and "Transpose" not in type(m).__name__}


def _hook_point(model: Any, name: str) -> Any | None:
    """The module whose forward output is the op's: a (Q/Float)Functional's
    activation_post_process (its methods run no forward hook), else the module itself; None
    where the model has none."""
    import torch

    try:
        m = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(m, torch.jit.ScriptModule):
        return None  # takes no hooks
    if type(m).__name__ in ("QFunctional", "FloatFunctional", "FXFloatFunctional"):
        return getattr(m, "activation_post_process", None)
    return m


class OpRecorder:
    """Hooks on both models for the ops ``own_qparams_modules`` finds: in the quantized
    model's first forward, each op's output qparams and the convs that ran last before its
    calls; in every forward of the float model, its output's range."""

    def __init__(self, float_model: Any, quantized_model: Any, qconvs: dict[str, Any]) -> None:
        self.handles: list[Any] = []
        self.last = ""
        self.ran_last = ""
        """The conv the quantized model ran last in its latest forward."""
        self.first = True
        self.qparams: dict[str, tuple[str, float, int, str, bool]] = {}
        self.after: dict[str, list[str]] = {}
        self.ranges: dict[str, tuple[float, float]] = {}
        self.float_points: dict[str, Any] = {}
        self.stats: dict[str, tuple[float, float, float]] = {}
        self.packed: set[str] = set()
        self.calls_now: dict[str, int] = {}
        self.order: dict[str, int] = {}
        """Each op's place among the ops' first calls in the quantized model's forward."""
        self.call_ranges: dict[str, list[tuple[float, float]]] = {}
        self.activations = ActivationCheck(float_model, quantized_model, lambda: self.last)
        try:
            self._register(float_model, quantized_model, qconvs)
        except BaseException:  # no hook left behind on the user's models
            self.remove()
            raise

    def _register(self, float_model: Any, quantized_model: Any, qconvs: dict[str, Any]
                  ) -> None:
        for name, qconv in qconvs.items():
            self.handles.append(qconv.register_forward_hook(self._conv_ran(name)))
        for name, m in own_qparams_modules(quantized_model, set(qconvs)).items():
            q_point, f_point = _hook_point(quantized_model, name), _hook_point(float_model, name)
            if q_point is None or f_point is None:
                continue
            self.float_points[name] = f_point
            stats = _stats(m, f_point)
            if stats is not None:
                self.stats[name] = stats
            if callable(getattr(m, "set_weight_bias", None)):
                self.packed.add(name)
            self.handles.append(q_point.register_forward_hook(self._op_ran(name, m)))
            self.handles.append(f_point.register_forward_hook(self._float_ran(name)))
        self.handles.append(quantized_model.register_forward_hook(self._forward_done))
        self.handles.append(float_model.register_forward_hook(self._float_done))

    def _conv_ran(self, name: str) -> Callable[..., None]:
        def hook(_m: Any, _args: Any, _out: Any) -> None:
            self.last = name
        return hook

    def _op_ran(self, name: str, module: Any) -> Callable[..., None]:
        import torch

        def hook(_m: Any, _args: Any, out: Any) -> None:
            if not self.first or not isinstance(out, torch.Tensor) or not out.is_quantized:
                return
            if out.qscheme() != torch.per_tensor_affine or out.dtype not in (torch.quint8,
                                                                              torch.qint8):
                return
            scale = float(out.q_scale())
            if not math.isfinite(scale) or scale <= 0:  # torch runs it; nothing to compare
                return
            self.qparams[name] = (type(module).__name__, scale,
                                  int(out.q_zero_point()), str(out.dtype).split(".")[-1],
                                  isinstance(getattr(module, "scale", None), torch.Tensor))
            self.after.setdefault(name, []).append(self.last)
            self.order.setdefault(name, len(self.order))
        return hook

    def _float_ran(self, name: str) -> Callable[..., None]:
        import torch

        def hook(_m: Any, _args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                low, high = torch.aminmax(out.detach())  # one pass
                lo, hi = float(low), float(high)
                old = self.ranges.get(name, (lo, hi))
                self.ranges[name] = (min(old[0], lo), max(old[1], hi))
                k = self.calls_now.get(name, 0)  # this forward's call of the module
                self.calls_now[name] = k + 1
                calls = self.call_ranges.setdefault(name, [])
                if k == len(calls):
                    calls.append((lo, hi))
                else:
                    calls[k] = (min(calls[k][0], lo), max(calls[k][1], hi))
        return hook

    def _float_done(self, _m: Any, _args: Any, _out: Any) -> None:
        self.calls_now.clear()

    def _forward_done(self, _m: Any, _args: Any, _out: Any) -> None:
        self.first = False
        self.ran_last, self.last = self.last, ""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.activations.remove()

    def results(self, calibration: dict[str, tuple[float, float]] | None
                ) -> tuple[OpRange, ...]:
        """What was recorded, the float range widened by ``calibration``'s (None: the
        samples' alone)."""
        out = []
        aliases = self._aliases()
        for name, (kind, scale, zp, dtype, tensors) in self.qparams.items():
            if name not in self.ranges:
                continue
            lo, hi = self.ranges[name]
            if calibration is not None and name in calibration:
                lo, hi = min(lo, calibration[name][0]), max(hi, calibration[name][1])
            if "ReLU" in kind:  # a fused ReLU (LinearReLU): the float module's output is
                lo, hi = max(lo, 0.0), max(hi, 0.0)  # before it
            if not (math.isfinite(lo) and math.isfinite(hi)):
                continue
            calls = self.call_ranges.get(name, [])
            shared = len(calls) > 1 and len(calls) == len(self.after[name]) and all(
                math.isfinite(a) and math.isfinite(b) for a, b in calls)
            paths = aliases.get(name, ())
            if paths:  # this path's call of the float module, on the samples
                lo, hi = calls[paths.index(name)]
                shared = True
            out.append(OpRange(name, kind, scale, zp, dtype, lo, hi, tuple(self.after[name]),
                               calibration is None or bool(paths), tensors,
                               self.stats.get(name), name in self.packed,
                               tuple(calls) if shared else (),
                               wrong=self.activations.found.get(name), aliases=paths,
                               shared=len(paths) or 1))
        # an activation that keeps its input's qparams (ReLU6): recorded where it was wrong,
        # with no float range (its qparams are not judged: ``misfit``)
        recorded = {op.name for op in out}
        for name, wrong in self.activations.found.items():
            if name not in recorded:
                scale, zp, dtype = self.activations.qparams[name]
                out.append(OpRange(name, wrong.kind, scale, zp, dtype, 0.0, 0.0,
                                   tuple(self.activations.calls[name]), calibration is None,
                                   False, wrong=wrong, own_qparams=False))
        return tuple(out)


    def _aliases(self) -> dict[str, tuple[str, ...]]:
        """The ops whose float module several of them share (one FloatFunctional assigned to
        several attributes; convert gives each its own QFunctional), each called once in
        the quantized model's forward and the float module once per op: op -> the paths in
        call order (its call of the float module is the one at its place)."""
        groups: dict[int, list[str]] = {}
        for name, (kind, *_rest) in self.qparams.items():
            if kind == "QFunctional":  # a FloatFunctional's: its fix builds one per path
                groups.setdefault(id(self.float_points[name]), []).append(name)
        found: dict[str, tuple[str, ...]] = {}
        for names in groups.values():
            calls = self.call_ranges.get(names[0], [])
            if len(names) < 2 or len(calls) != len(names) or any(
                    len(self.after[n]) != 1 for n in names) or not all(
                    math.isfinite(a) and math.isfinite(b) for a, b in calls):
                continue
            paths = tuple(sorted(names, key=self.order.__getitem__))
            found.update((n, paths) for n in names)
        return found


def _stats(quantized: Any, float_module: Any) -> tuple[float, float, float] | None:
    """A BatchNorm's running statistics against the float model's (``OpRange.stats``); None
    for other modules."""
    import torch

    tensors = [getattr(m, k, None) for m in (quantized, float_module)
               for k in ("running_mean", "running_var")]
    found = [t.detach().double() for t in tensors if isinstance(t, torch.Tensor)]
    if len(found) != 4:
        return None
    q_mean, q_var, f_mean, f_var = found
    if q_mean.shape != f_mean.shape or q_var.shape != f_var.shape or not len(f_var):
        return None
    std = f_var.clamp(min=1e-12).sqrt()
    ratio = q_var.clamp(min=1e-12) / f_var.clamp(min=1e-12)
    return (float(((q_mean - f_mean).abs() / std).max()), float(ratio.min()),
            float(ratio.max()))
