"""QCD065: the signal is lost before a conv, by the model's input quantization or an op
between convs (``walk.upstream_losses`` finds where). Each conv there is at its floor on what
it received, so no conv's finding names it; without this one the gate would pass a model whose
output is noise (measured: a MobileNetV2-like model on qnnpack, 0 dB at its output, every conv
at its floor, from torch's quantized ReLU6 on a channels_last input)."""

from __future__ import annotations

import dataclasses
import math

from ..findings.fixes import model_calibration
from ..model_report import UpstreamLoss
from ..report import Finding
from .bundle import UNLIKE_RANGE, LayerCapture, sample_range, span_ratio
from .ops import OpRange, for_loss

CODE = "QCD065"
#: Below this input SQNR the signal is mostly gone (the error carries a tenth of its power or
#: more): an error; a loss above it a warning.
LOST_DB = 10.0

#: The start of a drifted BatchNorm's fix: the model was not fused (its BatchNorm runs), so the
#: fix says fusing folds it away, rather than "fused as before".
_EVAL_CALIBRATION = ("# calibrate in eval mode: BatchNorm then keeps its statistics (fusing each\n"
                     "# conv with its BatchNorm first, fuse_modules, folds it in: none runs)\n"
                     "model.eval()\n")
_SCALES = ("# the op between them with a far-off output scale (an add, a pool, a cat,\n"
           "# a ReLU6 or another module): each quantized module's output qparams\n"
           "for name, m in quantized.named_modules():\n"
           "    if hasattr(m, \"scale\") and hasattr(m, \"zero_point\"):\n"
           "        print(name, type(m).__name__, float(m.scale), int(m.zero_point))")
#: convert_fx's graph holds an add's or a cat's output qparams as the attributes its node reads
_SCALES_FX = (_SCALES + "\n"
              "for node in quantized.graph.nodes:  # convert_fx's functions (add, mul, ...)\n"
              "    qp = [a for a in node.args if getattr(a, \"op\", \"\") == \"get_attr\"]\n"
              "    if node.op == \"call_function\" and len(qp) == 2:\n"
              "        print(node.name, [getattr(quantized, str(a.target)).item() for a in qp])")


#: The captured samples reach this many times the calibration batches' range at the first
#: conv (or span this many times less, UNLIKE_RANGE): they are not prepared as those batches
#: were, and a stub that loses them says so, not "calibrate" alone (helper-65's model,
#: calibrated on [0, 1] and run on [0, 255]: calibrating on those inputs left it at 10.6%, the
#: float model's own on them; normalizing them gave 99.7%).
UNLIKE_INPUTS = 2.0


def inputs_unlike(lay: LayerCapture) -> float | None:
    """The captured samples' range at the first conv ``lay`` over the calibration batches'
    there, where they differ UNLIKE_INPUTS-fold wider or UNLIKE_RANGE-fold narrower; None
    where they are alike, or without calibration batches."""
    if lay.calibration_range is None:
        return None
    ratio = span_ratio(sample_range(lay.case, lay.float_output), lay.calibration_range)
    if not 0 < ratio < math.inf:  # all zeros on one side: no factor to tell
        return None
    return ratio if ratio >= UNLIKE_INPUTS or ratio * UNLIKE_RANGE <= 1 else None


def unlike_inputs_sentence(ratio: float, layer: str) -> str:
    """Why a stub fitted to the calibration batches loses inputs unlike them: at the first
    conv ``layer`` the float model reaches ``ratio`` times its range on those batches
    (``inputs_unlike``)."""
    pixels = ", e.g. 8-bit pixel values not divided by 255" if ratio > 1 else ""
    return (f"The inputs here are not like those batches: at {layer} the float model's output "
            f"{_spread(ratio)} its range on them. They are not prepared as the calibration "
            f"batches were (normalized otherwise{pixels}), or those batches are not like the "
            "inputs at inference.")


def _spread(ratio: float) -> str:
    return f"reaches {ratio:.3g}x" if ratio >= 1 else f"spans 1/{1 / ratio:.3g} of"


def _unlike_fix(ratio: float) -> str:
    """The comment before the calibration code of a stub that loses inputs unlike the
    calibration batches (``inputs_unlike``): normalize first, or calibrate on such inputs."""
    return ("# the inputs here are not like the calibration batches (at the first conv\n"
            f"# the float model {_spread(ratio)} its range on them): prepare\n"
            "# both alike. If the model was trained on inputs like the calibration\n"
            + ("# batches, normalize these as those were (e.g. x / 255 for 8-bit pixels);\n"
               if ratio > 1 else "# batches, normalize these as those were;\n") +
            "# if these are what it gets at inference, calibrate on inputs like them:\n")


def calibration_fix(pt2e: bool, flow: str) -> str:
    """The code that prepares, calibrates and converts the model again, in its flow."""
    return model_calibration("pt2e" if pt2e else flow)


DRIFT_CODE = "QCD069"
#: A drifted BatchNorm is a warning where its statistics move its output by as much as 8-bit
#: rounding costs a tensor or more: the output's relative error, the mean's shift in standard
#: deviations or the change of the scale sqrt(var), is that of an SQNR below this; info above.
DRIFT_DB = 30.0


def qcd069(ops: tuple[OpRange, ...], named: bool, flow: str = "eager") -> Finding | None:
    """QCD069: BatchNorm modules of the quantized model whose running statistics are not the
    float model's (``OpRange.drifted``: convert copies them exactly, so they moved in train
    mode, in calibration), whether or not a conv's input shows the loss (``named``: QCD065
    names them already, with the loss)."""
    drifted = [o for o in ops if o.drifted() and o.stats is not None]
    if not drifted or named:
        return None
    worst = min(drifted, key=OpRange.drift_db)
    assert worst.stats is not None
    level = "warning" if worst.drift_db() < DRIFT_DB else "info"
    names = ", ".join(o.name for o in drifted)
    shift, low, high = worst.stats
    message = (
        f"The quantized model's BatchNorm {names} hold running statistics other than the float "
        f"model's: {worst.name}'s means moved by up to {shift:.3g} standard deviations and its "
        f"variances by {low:.3g}x to {high:.3g}x: an error in its output on the order of "
        f"{worst.drift_db():.1f} dB SQNR. convert copies a BatchNorm's statistics exactly, so "
        "they moved in calibration: the model was calibrated in train mode (without .eval()), "
        "or the float model given is not the one quantized. The quantized model then computes "
        "another function than the float one, whatever each conv's numbers say.")
    fix = _EVAL_CALIBRATION + calibration_fix(False, flow)
    return Finding(DRIFT_CODE, level,
                   f"BatchNorm statistics moved in calibration ({names})", message,
                   {"batchnorms": [o.name for o in drifted], "mean_shift": shift,
                    "var_low": low, "var_high": high, "output_sqnr_db": worst.drift_db()}, fix)


def qcd069_training(batchnorms: tuple[str, ...]) -> Finding | None:
    """QCD069 for a PT2E graph whose BatchNorms run in training mode (``ModelBundle
    .bn_training``): every batch is normalised with its own statistics, so the model computes
    another function than the float one, and one that changes with the batch (pytorch#114547:
    a DenseNet's standalone BatchNorms, 1.7% top-1). A warning: nothing a conv measures shows
    it, the fix is one call."""
    if not batchnorms:
        return None
    names = ", ".join(batchnorms)
    return Finding(
        DRIFT_CODE, "warning", f"BatchNorm in training mode in the converted graph ({names})",
        f"The converted graph's batch_norm calls for {names} run with training=True: each "
        "batch is normalised with its own mean and variance, not the running statistics the "
        "float model uses in eval, so the quantized model's output depends on what else is in "
        "the batch. The prepared model was not moved to eval before convert_pt2e (a QAT flow "
        "trains it; move_exported_model_to_eval switches its BatchNorms and dropout).",
        {"batchnorms": list(batchnorms)},
        "from torchao.quantization.pt2e import move_exported_model_to_eval\n"
        "# after calibration or QAT training, before convert_pt2e:\n"
        "move_exported_model_to_eval(prepared)\n"
        "converted = convert_pt2e(prepared)")


def qcd065(losses: tuple[UpstreamLoss, ...], pt2e: bool, ops: tuple[OpRange, ...] = (),
           engine: str = "", flow: str = "eager", carried: tuple[str, float] | None = None,
           unlike: float | None = None) -> list[Finding]:
    """QCD065 for each conv whose input was lost before it (``UpstreamLoss``), but those a
    missing activation module explains (QCD064 names that). Where the loss names an op
    (``UpstreamLoss.op``, one of ``ops``), an op between convs gets that op's qparams as its
    fix. ``flow``: the model's (``ModelBundle.flow``), whose code the fixes are. An error
    where the conv's input is below LOST_DB, or where the model carries the loss to its last
    conv below LOST_DB (``carried``: that conv and its propagated SQNR, given where no conv is
    broken by its own error: a loss compounding over several ops, each under UPSTREAM_DB, took
    a helper's EfficientNet-like model to -0.8 dB and 51% accuracy with warnings only).
    ``unlike``: the captured samples' range at the first conv over the calibration batches'
    (``inputs_unlike``): a loss at the model's input quantization says to prepare them
    alike, normalizing first."""
    found = []
    for loss in losses:
        if loss.blamed_on is not None:  # QCD064 or QCD072 names it, with its cost
            continue
        sqnr = loss.input.sqnr_db
        lost_at_end = carried is not None and carried[1] < LOST_DB
        level = "error" if (sqnr is not None and sqnr < LOST_DB) or lost_at_end else "warning"
        op = next((for_loss(o, sqnr) for o in ops if o.name == loss.op), None)
        # the model's input quantization (its stub, a Quantize op, or none seen)
        first = loss.worst_before is None and (op is None or op.kind == "Quantize")
        if op is not None and len(op.after) > 1 and op.call_ranges:  # one module, several calls
            op = dataclasses.replace(op, shared=len(op.after))
        where = ("the model's input quantization" if first else
                 f"an op between {loss.worst_before} and {loss.layer}" if op is None else
                 f"{op.name}, whose quantized kernel computes wrong values"
                 if op.wrong is not None else
                 f"{op.name}'s running statistics" if op.drifted() else
                 f"{op.name}, one float module for {op.shared} paths" if op.aliases else
                 f"{op.name}, one module for {op.shared} calls" if op.shared > 1 else
                 f"{op.name}'s output qparams")
        if first:
            fix = (_unlike_fix(unlike) if unlike is not None else
                   "# calibrate the model's input quantization on inputs as at inference\n"
                   ) + calibration_fix(pt2e, flow)
        elif op is not None and op.drifted():  # every BatchNorm moved, and its observer saw it
            moved = ", ".join(o.name for o in ops if o.drifted())
            fix = (f"# BatchNorm updated its running statistics in calibration ({moved}),\n"
                   "# and the observers saw its batch statistics\n"
                   + _EVAL_CALIBRATION + calibration_fix(False, flow))
        elif op is not None:
            fix = op.fix(engine, others=ops)
        else:
            fix = (_SCALES_FX if flow == "fx" else _SCALES if not pt2e else
                   "# the op between them with a far-off output scale (an add, a pool, a cat):\n"
                   "# the quantize_per_tensor nodes of the converted graph\n"
                   "for node in converted.graph.nodes:\n"
                   "    if \"quantize_per_tensor\" in str(node.target):\n"
                   "        print(node.name, node.args[1:3])")
        message = loss.message
        if lost_at_end and carried is not None and carried[0] != loss.layer:
            message += (f" The model carries it to its last conv ({carried[0]}), "
                        f"{carried[1]:.1f} dB from the float model's output there.")
        found.append(Finding(CODE, level, f"the signal is lost before {loss.layer}, by {where}",
                             message, loss.to_dict(), fix))
    return found
