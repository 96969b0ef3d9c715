"""A model given to ``capture_model`` as ``torch.compile`` returned it (or compiled in place
with ``module.compile()``): what it wraps is captured, and how it was compiled is kept
(``CompiledWith``), since that decides which numbers the compiled model computes.

A ``convert_pt2e`` graph runs its convs as the int8 kernel (``onednn.qconv_pointwise``, engine
x86_inductor) only when inductor compiles it with freezing on. Without freezing, inductor keeps
each conv's Q/DQ pattern: a float32 conv (``aten.mkldnn_convolution``) on dequantized values,
the eager Q/DQ graph's arithmetic, and no int8 kernel runs. Another backend (``eager``,
``aot_eager``) runs the Q/DQ graph as well. QCD063 names both. Its evidence is what ran: the
compiled PT2E model is run once on the first batch under ``torch.no_grad()`` (torch compiles it
then, if it has not yet) and torch's profiler names the conv ops it ran. The configuration
alone would mislead: torch compiles at the first call and keeps no record of the config it
compiled under (``config.patch(freezing=True)`` around that call, a config changed after it).

Measured on torch 2.13 with torchao 0.18, under ``torch.no_grad()``: with
``torch._inductor.config.freezing = True``, ``torch.compile(converted)`` runs
``onednn.qconv_pointwise`` and gives torchao's lowering's outputs bit for bit; without it,
``aten.mkldnn_convolution`` runs and the outputs follow the eager Q/DQ graph (bit for bit on a
two-conv model, up to float32 rounding of fused ops on one with a float32-output conv);
``options={"freezing": False}`` overrides the config; and ``options={"freezing": True}`` with
the config off fails at the first call (``InductorError: UnsupportedOperatorException:
onednn.qconv_prepack.default``), so the fix sets the config. A model called with gradients on
runs the float32 conv even when frozen; the run here, under ``no_grad``, is inference's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import CaseFileError
from ..report import Finding

CODE = "QCD063"


@dataclass(frozen=True)
class CompiledWith:
    """How the captured model was compiled, and what its compiled form ran."""

    backend: str
    """torch.compile's backend (``inductor``, ``eager``, ...; ``unknown`` when not found)."""
    freezing_option: bool | None
    """``options={"freezing": ...}`` as given to torch.compile (None: not given)."""
    freezing_config: bool
    """``torch._inductor.config.freezing`` when the model was captured."""
    qdq_differ: int | None = None
    """Output codes of the captured convs where the eager Q/DQ graph differs from the int8
    kernel (a PT2E model's), of ``qdq_outputs``."""
    qdq_outputs: int | None = None
    conv_ops: tuple[str, ...] | None = None
    """The conv ops torch's profiler saw the compiled model run on the first batch under
    ``no_grad`` (None: not run)."""
    error: str | None = None
    """The first line of what that run raised, if it failed."""

    @property
    def freezing(self) -> bool:
        """Whether inductor is set to freeze the graph: the option overrides the config."""
        return self.freezing_option if self.freezing_option is not None else self.freezing_config

    @property
    def int8_kernels(self) -> bool | None:
        """Whether the compiled model ran the int8 conv kernel (None: not known)."""
        if self.conv_ops is None:
            return None
        return any("qconv" in op for op in self.conv_ops)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["conv_ops"] = None if self.conv_ops is None else list(self.conv_ops)
        return d

    @staticmethod
    def from_mapping(value: Any, where: str) -> CompiledWith:
        """The bundle's ``compiled`` entry, checked."""
        def bad() -> CaseFileError:
            return CaseFileError(f"{where}: 'compiled' must hold backend, freezing_option, "
                                 "freezing_config, qdq_differ, qdq_outputs, conv_ops and "
                                 "error; capture the model again")

        if not isinstance(value, dict) or not isinstance(value.get("backend"), str):
            raise bad()
        option, config = value.get("freezing_option"), value.get("freezing_config")
        counts = [value.get("qdq_differ"), value.get("qdq_outputs")]
        ops, error = value.get("conv_ops"), value.get("error")
        if (option not in (None, True, False) or config not in (True, False)
                or any(c is not None and (isinstance(c, bool) or not isinstance(c, int)
                                          or c < 0) for c in counts)
                or not (ops is None or isinstance(ops, list)
                        and all(isinstance(o, str) for o in ops))
                or not (error is None or isinstance(error, str))):
            raise bad()
        return CompiledWith(value["backend"], option, config, counts[0], counts[1],
                            None if ops is None else tuple(ops), error)


def unwrap(model: Any) -> tuple[Any, CompiledWith | None]:
    """The module ``torch.compile`` wrapped (``model`` itself when compiled in place), and how
    it was compiled (``model`` and None when it is no compiled module)."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ == "OptimizedModule" and inner is not None:
        ctx = getattr(model, "dynamo_ctx", None)
        callback = None if ctx is None else ctx.callback
    elif getattr(model, "_compiled_call_impl", None) is not None:  # module.compile()
        inner, callback = model, _callback_of(model._compiled_call_impl)
    else:
        return model, None
    import torch
    from torch._dynamo.eval_frame import innermost_backend

    backend = None if callback is None else innermost_backend(callback)
    name = ("unknown" if backend is None else str(
        getattr(backend, "compiler_name", None) or getattr(backend, "__name__", None)
        or type(backend).__name__))
    options = getattr(backend, "config", None) or {}
    option = options.get("freezing") if isinstance(options, dict) else None
    return inner, CompiledWith(name, None if option is None else bool(option),
                               bool(torch._inductor.config.freezing))


@contextlib.contextmanager
def eager_calls(model: Any) -> Iterator[None]:
    """Inside, a module compiled in place (``module.compile()``) is called as it is, not
    through its compiled call."""
    compiled_call = getattr(model, "_compiled_call_impl", None)
    if compiled_call is None:
        yield
        return
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled_call


def _callback_of(fn: Any) -> Any:
    """The dynamo callback a ``torch.compile``d function holds (in its closure), or None."""
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if hasattr(value, "_torchdynamo_orig_backend"):
            return value
    return None


def observed(compiled: CompiledWith, model: Any, batch: Any) -> CompiledWith:
    """``compiled`` with the conv ops ``model`` (as torch.compile returned it) runs on
    ``batch`` under ``no_grad``, or the error that run raised. torch's log lines, warnings and
    the profiler's own lines on stderr are kept off the terminal."""
    import logging

    import torch

    from ..torch_calls import capture_warnings, quiet_stderr

    log = logging.getLogger("torch")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad(), capture_warnings(), quiet_stderr(), \
                contextlib.ExitStack() as stack:
            try:
                model(batch)  # compiles, when not compiled yet
                prof = stack.enter_context(torch.profiler.profile())
                model(batch)
            except Exception as exc:  # noqa: BLE001 - whatever the compile raised is evidence
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                return dataclasses.replace(compiled, error=f"{type(exc).__name__}: {first}")
        ops = sorted({e.key for e in prof.key_averages() if "conv" in e.key.lower()}
                     - {"aten::convolution", "aten::_convolution"})
        return dataclasses.replace(compiled, conv_ops=tuple(ops))
    finally:
        log.setLevel(level)


FIX = (
    "import torch._inductor.config\n"
    "torch._dynamo.reset()  # forget what was compiled without freezing\n"
    "# freezing on before the first call (torch.compile compiles then); in torch\n"
    "# 2.13 options={'freezing': True} fails there instead\n"
    "torch._inductor.config.freezing = True\n"
    "with torch.no_grad():\n"
    "    compiled = torch.compile(converted)\n"
    "    y = compiled(x)"
)
"""QCD063's fix, written against the script's ``converted`` (the convert_pt2e model) and ``x``;
tests/model/test_pt2e_compiled.py runs it."""


def qcd063(compiled: CompiledWith | None, pt2e: bool) -> Finding | None:
    """A convert_pt2e model compiled so that its int8 kernels do not run. Evidence: the conv ops
    torch's profiler saw it run (``CompiledWith.conv_ops``); without them (not run), the
    compiled module's backend and options and inductor's config at capture. A warning: the
    model runs float32 convs on dequantized values plus the Q/DQ ops (no int8 speed) and
    computes the Q/DQ graph's numbers, not the kernel's this report gives. An error when the
    compiled model failed at its first call with freezing set through its options and the
    config off (the torch 2.13 failure the module docstring describes)."""
    if compiled is None or not pt2e:
        return None
    evidence = {"backend": compiled.backend, "freezing_option": compiled.freezing_option,
                "freezing_config": compiled.freezing_config, "conv_ops": compiled.conv_ops,
                "error": compiled.error, "qdq_differ": compiled.qdq_differ,
                "qdq_outputs": compiled.qdq_outputs}
    if compiled.error is not None:
        if not (compiled.freezing_option is True and not compiled.freezing_config):
            return None  # a failure this finding knows nothing about (the bundle notes it)
        return Finding(
            CODE, "error", "freezing set through torch.compile's options: the model fails at "
            "its first call",
            "torch.compile was given options={'freezing': True} with "
            "torch._inductor.config.freezing off; run once on the first batch under "
            f"torch.no_grad(), the compiled model failed: {compiled.error}. Setting the config "
            "instead compiles it to the int8 kernels (measured with torch 2.13).", evidence, FIX)
    ran = compiled.int8_kernels
    if ran or (ran is None and compiled.backend == "inductor" and compiled.freezing):
        return None
    if compiled.backend != "inductor":
        how = f"with backend {compiled.backend!r}"
    elif compiled.freezing_option is False:
        how = "with options={'freezing': False}"
    elif compiled.freezing:  # set now, but the model compiled before (at its first call)
        how = ("without freezing (torch._inductor.config.freezing is True now, but the model "
               "was compiled before, at its first call)")
    else:
        how = ("with freezing off (torch._inductor.config.freezing is False and its options "
               "do not set it)")
    seen = ("" if ran is None else
            f" Run once on the first batch under torch.no_grad(), it ran "
            f"{', '.join(compiled.conv_ops or ()) or 'no conv op'} (torch's profiler), and no "
            "onednn::qconv_pointwise.")
    differ = ""
    if compiled.qdq_differ and compiled.qdq_outputs:
        differ = (f": here they differ on {compiled.qdq_differ:,} of {compiled.qdq_outputs:,} "
                  "output codes of the captured convs (near ties)")
    elif compiled.qdq_outputs:
        differ = (f" (they differ only at near ties: here on none of the "
                  f"{compiled.qdq_outputs:,} output codes of the captured convs, so what it "
                  "costs here is speed)")
    message = (f"torch.compile wraps this convert_pt2e model {how}: each conv's Q/DQ pattern "
               "then runs as a float32 conv on dequantized values, not as the int8 kernel "
               f"(onednn.qconv_pointwise) that inductor's freezing lowers it to.{seen} The "
               "model gets no int8 speed, and its outputs follow the eager Q/DQ graph's "
               f"arithmetic, not the kernel's that this report gives{differ}.")
    return Finding(CODE, "warning", "compiled without freezing: the int8 kernels do not run",
                   message, evidence, FIX)
