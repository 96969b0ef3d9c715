"""QCD071: the signal is lost after the last conv. The walk screens convs; the layers after the
last one (a classifier's Linear, a pool, a DeQuantStub) are not, so a model whose output is
noise could read as healthy (measured in a sweep: a digits CNN whose quantized Linear held
another checkpoint's weight, 18% accuracy, every conv at its floor). The capture compares the
two models' outputs with the last conv's, and records the loss only where there is one: a
model whose output keeps its last conv's SQNR writes nothing (its bundle's bytes unchanged)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..report import Finding

CODE = "QCD071"
#: The model's output is lost after its last conv when it is this many dB below that conv's
#: propagated SQNR (as QCD065 judges a conv's input against the convs before it).
AFTER_DB = 10.0
#: Below this output SQNR the signal is mostly gone: an error; a loss above it a warning.
LOST_DB = 10.0
#: The fewest output values an SQNR is compared on: fewer are one sample's few logits, whose
#: SQNR scatters with what the float head makes of the last conv's rounding (a helper's Conv3d
#: classifier, 4 logits per sample, every conv at its floor: 13.5% of single samples fell 10
#: dB below the last conv; 64 samples gave 35.6 dB, within 5 dB of it).
MIN_VALUES = 32


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

    def to_dict(self) -> dict[str, Any]:
        return {"last_conv": self.last_conv, "last_conv_sqnr_db": self.last_conv_sqnr_db,
                "output_sqnr_db": self.output_sqnr_db, "after": list(self.after),
                **({"output": self.output} if self.output else {})}

    @staticmethod
    def from_mapping(m: Any, source: str) -> LostAfter:
        from ..errors import CaseFileError
        from .names import is_op_name, is_path

        try:
            out = m["output_sqnr_db"]
            lost = LostAfter(str(m["last_conv"]), float(m["last_conv_sqnr_db"]),
                             None if out is None else float(out),
                             tuple(str(a) for a in m.get("after") or ()),
                             m.get("output", ""))
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError):
            lost = None
        if lost is None or not is_path(lost.last_conv) or not all(
                is_op_name(a) for a in lost.after) or not is_path(lost.output):
            raise CaseFileError(f"{source}: 'lost_after' is malformed; capture the model "
                                "again")
        return lost


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
    if lost is None:
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
        "the float model's. A Linear holding other weights than the float model's (another "
        "checkpoint, a weight set without set_weight_bias), or an output scale far from its "
        "range, does this.")
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
