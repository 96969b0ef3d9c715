"""A model given to ``capture_model`` as ``torch.compile`` returned it: what it wraps is
captured, and how it was compiled is kept (``CompiledWith``), since that decides which numbers
the compiled model computes.

A ``convert_pt2e`` graph runs its convs as the int8 kernel (``onednn.qconv_pointwise``, engine
x86_inductor) only when inductor compiles it with freezing on. Without freezing, inductor keeps
each conv's Q/DQ pattern: a float32 conv (``aten.mkldnn_convolution``) on dequantized values,
the eager Q/DQ graph's arithmetic, and no int8 kernel runs. Another backend (``eager``,
``aot_eager``) runs the Q/DQ graph as well. QCD063 names both.

Measured on torch 2.13 with torchao 0.18, under ``torch.no_grad()``: with
``torch._inductor.config.freezing = True``, ``torch.compile(converted)`` runs
``onednn.qconv_pointwise`` and gives torchao's lowering's outputs bit for bit; without it,
``aten.mkldnn_convolution`` runs and the outputs follow the eager Q/DQ graph (bit for bit on a
two-conv model, up to float32 rounding of fused ops on one with a float32-output conv);
``options={"freezing": False}`` overrides the config; and ``options={"freezing": True}`` with
the config off fails at the first call (``InductorError: UnsupportedOperatorException:
onednn.qconv_prepack.default``), so the fix sets the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..errors import CaseFileError
from ..report import Finding

CODE = "QCD063"


@dataclass(frozen=True)
class CompiledWith:
    """How the captured model was compiled."""

    backend: str
    """torch.compile's backend (``inductor``, ``eager``, ...)."""
    freezing_option: bool | None
    """``options={"freezing": ...}`` as given to torch.compile (None: not given)."""
    freezing_config: bool
    """``torch._inductor.config.freezing`` when the model was captured."""
    qdq_differ: int | None = None
    """Output codes of the captured convs where the eager Q/DQ graph differs from the int8
    kernel (a PT2E model's), of ``qdq_outputs``."""
    qdq_outputs: int | None = None

    @property
    def freezing(self) -> bool:
        """Whether inductor freezes the graph: the option overrides the config."""
        return self.freezing_option if self.freezing_option is not None else self.freezing_config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_mapping(value: Any, where: str) -> CompiledWith:
        """The bundle's ``compiled`` entry, checked."""
        def bad() -> CaseFileError:
            return CaseFileError(f"{where}: 'compiled' must hold backend, freezing_option, "
                                 "freezing_config, qdq_differ and qdq_outputs; capture the "
                                 "model again")

        if not isinstance(value, dict) or not isinstance(value.get("backend"), str):
            raise bad()
        option, config = value.get("freezing_option"), value.get("freezing_config")
        counts = [value.get("qdq_differ"), value.get("qdq_outputs")]
        if (option not in (None, True, False) or config not in (True, False)
                or any(c is not None and (isinstance(c, bool) or not isinstance(c, int)
                                          or c < 0) for c in counts)):
            raise bad()
        return CompiledWith(value["backend"], option, config, *counts)


def unwrap(model: Any) -> tuple[Any, CompiledWith | None]:
    """The module ``torch.compile`` wrapped, and how it was compiled (``model`` and None when
    it is no compiled module)."""
    inner = getattr(model, "_orig_mod", None)
    if type(model).__name__ != "OptimizedModule" or inner is None:
        return model, None
    import torch
    from torch._dynamo.eval_frame import innermost_backend

    ctx = getattr(model, "dynamo_ctx", None)
    backend = innermost_backend(ctx.callback) if ctx is not None else None
    name = str(getattr(backend, "compiler_name", None)
               or getattr(backend, "__name__", None) or type(backend).__name__)
    options = getattr(backend, "config", None) or {}
    option = options.get("freezing") if isinstance(options, dict) else None
    return inner, CompiledWith(name, None if option is None else bool(option),
                               bool(torch._inductor.config.freezing))


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
    """A convert_pt2e model compiled so that its int8 kernels do not run: inductor without
    freezing, or another backend. Evidence: the compiled module's backend and options, and
    inductor's config when it was captured. A warning: the model runs float32 convs on
    dequantized values plus the Q/DQ ops (no int8 speed), and computes the Q/DQ graph's
    numbers, not the kernel's this report gives."""
    if compiled is None or not pt2e or (compiled.backend == "inductor" and compiled.freezing):
        return None
    if compiled.backend == "inductor":
        how = ("with options={'freezing': False}" if compiled.freezing_option is False else
               "with freezing off (torch._inductor.config.freezing is False and its options "
               "do not set it)")
    else:
        how = f"with backend {compiled.backend!r}"
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
               "(onednn.qconv_pointwise) that inductor's freezing lowers it to. The model gets "
               "no int8 speed, and its outputs follow the eager Q/DQ graph's arithmetic, not "
               f"the kernel's that this report gives{differ}.")
    return Finding(CODE, "warning", "compiled without freezing: the int8 kernels do not run",
                   message, {"backend": compiled.backend,
                             "freezing_option": compiled.freezing_option,
                             "freezing_config": compiled.freezing_config,
                             "qdq_differ": compiled.qdq_differ,
                             "qdq_outputs": compiled.qdq_outputs}, FIX)
