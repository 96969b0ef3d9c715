"""``capture_model``'s recording: both models run batch by batch, hooks keeping what each
captured conv saw (``Seen``), what the float model computed at it, and which activation modules
the float model calls on which conv's output (reuse.py)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ..errors import CaseError

#: Activation modules X86InductorQuantizer fuses into the conv before them. Measured with torch
#: 2.13 and torchao 0.18: one such module called after two convs makes a non-strict
#: ``torch.export`` of the model fail in ``prepare_pt2e`` ("Input partition has more than one
#: output node"); GELU, LeakyReLU, Sigmoid and pools do not.
FUSED_ACTIVATIONS = frozenset({"ReLU", "ReLU6", "Hardtanh", "Hardswish", "SiLU"})


class Seen:
    """What the hooks saw of one conv, batch by batch."""

    def __init__(self) -> None:
        self.qinput: list[Any] = []
        self.qoutput: list[Any] = []
        self.float_input: list[np.ndarray] = []
        self.float_output: list[np.ndarray] = []
        """The float conv's output (copied: an in-place ReLU may overwrite it next)."""
        self.bn: str | None = None
        self.bn_output: list[np.ndarray] = []


def run_both(float_model: Any, run_quantized: Callable[[Any], Any], fconvs: dict[str, Any],
             seen: dict[str, Seen], batches: list[Any], limit: int, handles: list[Any],
             folded: Callable[[str], bool],
             activations: dict[str, list[tuple[str, str, bool]]] | None = None,
             quantized_model: Any = None,
             writers: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> None:
    """Run the quantized model (``run_quantized``, whose own recording fills ``seen``'s
    quantized side) and the float model, batch by batch, the float convs and BatchNorms
    hooked (``_FloatRecorder``); every hook in ``handles`` is removed at the end. ``folded``:
    whether the quantized model folded the float model's BatchNorm of this name into its conv.
    ``activations`` gets, per activation module of the float model (``FUSED_ACTIVATIONS``), its
    calls in the first forward, in order: the conv whose output (or its BatchNorm's) each was
    called on ("" for another op's output), the conv that ran last before it, and whether it
    read that conv's own output. ``writers`` gets, per conv of ``fconvs`` whose input in the
    first forward is another one's output through modules alone (its BatchNorm, activation
    modules of FUSED_ACTIVATIONS), that conv and those modules' paths. A forward
    that raises is refused in one line naming the module (``quantized_model``: the quantized
    side's modules, for their names)."""
    import torch

    from ..torch_calls import capture_warnings

    recorder = _FloatRecorder(seen, fconvs, folded, {} if activations is None else activations,
                              {} if writers is None else writers)
    for name, fconv in fconvs.items():
        handles.append(fconv.register_forward_hook(recorder.conv_hook(name)))
    for name, module in float_model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            continue  # takes no hooks
        handles.append(module.register_forward_pre_hook(recorder.before_hook(name)))
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            handles.append(module.register_forward_hook(recorder.bn_hook(name)))
        elif type(module).__name__ in FUSED_ACTIVATIONS:
            handles.append(module.register_forward_hook(recorder.activation_hook(name)))
        elif name not in fconvs and not any(True for _ in module.children()):
            # a module that returns its input (Identity, Dropout in eval mode) is on the chain
            handles.append(module.register_forward_hook(recorder.passthrough_hook(name)))
    try:
        with torch.no_grad(), capture_warnings():
            for run, batch in enumerate(batches, 1):
                for which, forward, model in (("quantized", run_quantized, quantized_model),
                                              ("float", float_model, float_model)):
                    forward_or_refuse(forward, batch, which, model)
                recorder.end_forward()
                _check_once_per_forward(seen, run)
                if _stored(seen) >= _room(seen, limit):
                    break  # memory stays bounded: later batches would be dropped anyway
    finally:
        for h in handles:
            h.remove()


class _FloatRecorder:
    """The float model's hooks. A float conv's output is copied only when it is needed: a
    BatchNorm folded into the quantized conv takes its place (its output is copied instead).
    Until the conv's consumer is known the output stays pending, and it is copied before any
    other module runs (an in-place ReLU would overwrite it); a folded BatchNorm that reads it
    after that (another module ran between them) drops the copy. An in-place op between
    modules (``x += y``) bumps the output's version: the output is then computed again by the
    conv, on its copied input. An edit through ``.data`` bumps no version and goes unseen
    (torch keeps no trace of it)."""

    def __init__(self, seen: dict[str, Seen], fconvs: dict[str, Any],
                 folded: Callable[[str], bool],
                 calls: dict[str, list[tuple[str, str, bool]]],
                 writers: dict[str, tuple[str, tuple[str, ...]]]) -> None:
        self.seen, self.folded, self.calls, self.writers = seen, folded, calls, writers
        self.pending = _PendingOutputs(seen, fconvs)
        self.produced = _ConvOutputs()
        self.chains = _ConvOutputs()  # first forward: a conv's output, through modules alone
        self.first = True  # the first forward: the activations' calls are recorded in it
        self.last = ""  # the conv that ran last

    def conv_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> None:
            self.seen[name].float_input.append(copy_float(args[0]))
            self.pending.add(name, out)
            self.produced.add(out, name)
            self.last = name
            if self.first:
                chain = self.chains.chain_of(args[0])
                if chain is not None:
                    self.writers[name] = chain
                self.chains.add(out, name)
        return hook

    def activation_hook(self, act_name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> None:
            self._extend(args, out, act_name)
        return hook

    def passthrough_hook(self, name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> None:
            if args and out is args[0]:
                self._extend(args, out, name)
        return hook

    def _extend(self, args: tuple[Any, ...], out: Any, module: str) -> None:
        """In the first forward: ``out`` continues the chain ``args[0]`` belongs to."""
        chain = self.chains.chain_of(args[0]) if self.first and args else None
        if chain is not None:
            self.chains.add(out, chain[0], path=(*chain[1], module))

    def bn_hook(self, bn_name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], out: Any) -> None:
            conv = self.produced.of(args[0], direct=True)  # the conv whose output it read
            if conv is not None and self.seen[conv].bn in (None, bn_name):
                s = self.seen[conv]
                s.bn = bn_name
                s.bn_output.append(copy_float(out))
                if self.folded(bn_name) and not self.pending.drop(conv):
                    s.float_output.pop()  # copied already: the BatchNorm's stands
            self.pending.settle()
            conv = self.produced.of(args[0])
            if conv is not None:
                self.produced.add(out, conv, direct=False)
            self._extend(args, out, bn_name)
        return hook

    def before_hook(self, name: str) -> Callable[..., None]:
        import torch

        def hook(module: Any, args: tuple[Any, ...]) -> None:
            is_bn = isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            self.pending.settle(but=args[0] if is_bn and args else None)
            if self.first and args and type(module).__name__ in FUSED_ACTIVATIONS:
                # and whether it read the conv's own output, not its BatchNorm's
                self.calls.setdefault(name, []).append(
                    (self.produced.of(args[0]) or "", self.last,
                     self.produced.of(args[0], direct=True) is not None))
        return hook

    def end_forward(self) -> None:
        self.first = False
        self.produced.clear()
        self.chains.clear()
        self.pending.settle()


class _ConvOutputs:
    """The float convs' outputs of one forward (and their BatchNorms'), by tensor: which conv
    a tensor came from. Weak references: a freed tensor's id may be reused."""

    def __init__(self) -> None:
        self.by_id: dict[int, tuple[Any, str, bool, tuple[str, ...]]] = {}

    def add(self, t: Any, conv: str, direct: bool = True, path: tuple[str, ...] = ()) -> None:
        """``t`` came from ``conv``: its output (``direct``) or its BatchNorm's (``path``:
        the modules it went through)."""
        import weakref

        self.by_id[id(t)] = (weakref.ref(t), conv, direct and not path, path)

    def chain_of(self, t: Any) -> tuple[str, tuple[str, ...]] | None:
        """The conv ``t`` came from and the modules between."""
        hit = self.by_id.get(id(t))
        if hit is None or hit[0]() is not t:
            return None
        return hit[1], hit[3]

    def of(self, t: Any, direct: bool = False) -> str | None:
        """The conv ``t`` came from (with ``direct``: only a conv's own output)."""
        hit = self.by_id.get(id(t))
        if hit is None or hit[0]() is not t or (direct and not hit[2]):
            return None
        return hit[1]

    def clear(self) -> None:
        self.by_id.clear()


class _PendingOutputs:
    """Float convs' outputs whose consumer is not known yet (see ``_FloatRecorder``)."""

    def __init__(self, seen: dict[str, Seen], fconvs: dict[str, Any]) -> None:
        self.seen, self.fconvs = seen, fconvs
        self.waiting: dict[str, tuple[Any, int]] = {}  # conv -> (output, its version)

    def add(self, name: str, out: Any) -> None:
        version = _version(out)
        if version is None:  # an inference tensor keeps no version: copied now
            self.seen[name].float_output.append(copy_float(out))
        else:
            self.waiting[name] = (out, version)

    def drop(self, name: str) -> bool:
        """Forget ``name``'s pending output (False: it was not pending, copied already)."""
        return self.waiting.pop(name, None) is not None

    def settle(self, but: Any = None) -> None:
        """Copy every pending output (but ``but``, which a BatchNorm is about to read)."""
        for name, (out, version) in list(self.waiting.items()):
            if out is but:
                continue
            del self.waiting[name]
            s = self.seen[name]
            if _version(out) == version:
                s.float_output.append(copy_float(out))
            else:  # overwritten in place: the conv computes it again on its input
                import torch

                conv = self.fconvs[name]
                with torch.no_grad():
                    again = conv.forward(torch.from_numpy(s.float_input[-1]).to(
                        conv.weight.dtype))
                s.float_output.append(copy_float(again))


def _version(t: Any) -> int | None:
    """A tensor's version counter (bumped by every in-place op), None for an inference
    tensor, which keeps none."""
    try:
        return int(t._version)
    except RuntimeError:
        return None


def copy_float(t: Any) -> np.ndarray:
    """A float32, C-ordered copy of a float tensor (an in-place op may overwrite it next), made
    by numpy: measured 3x faster than torch's copy of a 25 MB tensor, whose fresh memory
    faults in page by page."""
    return np.array(t.detach().float().numpy(), dtype=np.float32, order="C", copy=True)


def forward_or_refuse(forward: Callable[[Any], Any], batch: Any, which: str, model: Any,
                      on: str = "") -> None:
    """``forward(batch)``; a forward that raises is refused in one line (``failed_forward``:
    ``which`` model, ``on`` what), but for an error of qconvdiag's own hooks, which keeps its
    traceback."""
    try:
        forward(batch)
    except (RuntimeError, TypeError, ValueError) as exc:
        if _raised_by_us(exc):
            raise  # a bug of qconvdiag's hooks: its traceback, not a verdict
        raise CaseError(failed_forward(which, exc, model, on)) from None


def _raised_by_us(exc: BaseException) -> bool:
    """The error was raised in qconvdiag's own code (a hook's): its innermost frame is ours,
    but the activation check's TorchFunctionMode, which passes the model's own torch calls
    on (activations.py: a float op fed a quantized tensor raises there)."""
    import os

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the package
    frames = []
    tb = exc.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    mode = os.path.join(here, "model", "activations.py")  # the mode's pass-through frames
    while frames and frames[-1].co_name == "__torch_function__" and os.path.abspath(
            frames[-1].co_filename) == mode:
        frames.pop()
    return bool(frames) and os.path.abspath(frames[-1].co_filename).startswith(here + os.sep)


def failed_forward(which: str, exc: BaseException, model: Any = None, on: str = "") -> str:
    """One line for a model's forward that raised: the innermost module it was in (from the
    traceback's frames; its path in ``model``), torch's first sentence, and what that error
    usually means."""
    import torch

    module = None
    tb = exc.__traceback__
    while tb is not None:
        me = tb.tb_frame.f_locals.get("self")
        if isinstance(me, torch.nn.Module) and tb.tb_frame.f_code.co_name == "forward":
            module = me
        tb = tb.tb_next
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = first.split(". ")[0].rstrip(".")[:240]
    names = {} if model is None else {id(m): n for n, m in model.named_modules() if n}
    where = ("" if module is None else f" at {names[id(module)]} ({type(module).__name__})"
             if id(module) in names else f" in a {type(module).__name__}")
    lower = first.lower()
    if "Could not run 'quantized::" in first:
        hint = ("a float tensor reached a quantized op: is a QuantStub missing before it, or "
                "defined but not called in forward?")
    elif "quint8" in lower and ("qint8" in lower.replace("quint8", "")
                                or "should be quint8" in lower):
        # pytorch#76298, #83156: a qconfig whose activation observer has dtype qint8 (e.g.
        # default_symmetric_qnnpack_qconfig); every quantized conv refuses such an input
        engine = torch.backends.quantized.engine
        hint = ("its input is qint8: torch's quantized convs take quint8 activations, and the "
                "qconfig's activation observer has dtype torch.qint8, as "
                "default_symmetric_qnnpack_qconfig's does; quantize with "
                f"get_default_qconfig({engine!r}), or get_default_qat_qconfig({engine!r}) "
                "for QAT; QCD011")
    elif "QuantizedCPU" in first and any(f"'aten::{op}" in first for op in ("add", "mul")):
        # a `+` or `*` on two quantized tensors (a residual add written as x + y)
        hint = ("an add or mul on quantized tensors (x + y in forward): eager quantization "
                "needs a torch.ao.nn.quantized.FloatFunctional module for it, "
                "self.add = FloatFunctional() and self.add.add(x, y)")
    elif "not supported on quantized tensors" in first:
        # torch 2.13's x + y on two quantized tensors fails in empty_strided
        hint = ("a float op on quantized tensors: an add or mul written x + y needs a "
                "torch.ao.nn.quantized.FloatFunctional module (self.add.add(x, y)); another "
                "float op needs a DeQuantStub before it")
    elif "QuantizedCPU" in first or "quint8" in lower or "qint8" in lower:
        hint = ("a quantized tensor reached a float op: is a DeQuantStub missing before a "
                "module its qconfig left in float?")
    else:
        hint = "does the model run on these inputs outside capture_model?"
    return f"capture_model: the {which} model fails{on}{where}: {first} ({hint})"


def _check_once_per_forward(seen: dict[str, Seen], runs: int) -> None:
    """Each conv ran once per forward of each model (a conv called twice, or skipped, would
    mix its calls up as samples)."""
    for name, s in seen.items():
        if len(s.qinput) != runs or len(s.float_input) != runs:
            raise CaseError(f"capture_model: {name!r} ran {len(s.qinput)} times in the quantized "
                            f"model and {len(s.float_input)} in the float one over {runs} "
                            "forward(s); capture_model takes convs that run once per forward")


def _stored(seen: dict[str, Seen]) -> int:
    return sum(int(q.shape[0]) for q in next(iter(seen.values())).qinput)


def _room(seen: dict[str, Seen], limit: int) -> int:
    """How many samples every layer's tensors can hold within ``limit`` elements (at least
    one)."""
    per_sample = max((math.prod(q.shape[1:]) for s in seen.values() for q in s.qinput + s.qoutput),
                     default=1)
    return max(1, limit // max(per_sample, 1))


def samples_within(seen: dict[str, Seen], limit: int) -> int:
    """How many of the samples run every layer's tensors keep within ``limit`` elements."""
    return min(_stored(seen), _room(seen, limit))
