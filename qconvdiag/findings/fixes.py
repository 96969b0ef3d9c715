"""Fix code the user can paste, filled in with this case's numbers.

Every fix is written against the names a user's script holds (README, "Fixes"):

* ``conv``: the float conv module (its ``weight`` and ``bias``), ``x``: its float input;
* ``qx``: the quantized input, ``qm``: the quantized conv (``torch.ao.nn.quantized.ConvNd``);
* ``calibration_batches``: a few real inputs (for the eager flow).

A fix ends with ``qx`` and ``qm`` updated, so ``qm(qx)`` gives the fixed output. Fixes that set
qparams are checked against the engine's refusals before they are printed (onednn takes only
symmetric weights), and every number is the one torch will use (integer zero points, in range).
tests/findings/test_fixes.py pastes each fix into such a script, runs it with torch, and checks the
cause is gone or smaller.
"""

from __future__ import annotations

import numpy as np

from ..arithmetic.engines import INPUT_REFUSALS, Refusal, refusals
from ..case import ConvCase
from ..errors import QconvdiagError
from ..measure.evidence import PathRun
from ..quantization.qparams import QParams, per_tensor
from .base import conv_name, fmt, minmax_qparams

#: Weight fixes are symmetric (zero point 0): accepted by every engine.
SYMMETRIC = 127.5


def weight_refusals(kernel: str, input_qp: QParams, weight_qp: QParams, out_channels: int
                    ) -> list[Refusal]:
    """What stops ``kernel`` from taking these weight qparams (the input's own refusals are
    the input fix's business: QCD011)."""
    return [r for r in refusals(kernel, input_qp, weight_qp, out_channels)
            if r.rule not in INPUT_REFUSALS]


def checked(kernel: str, input_qp: QParams, weight_qp: QParams, out_channels: int) -> None:
    """Refuse to print a weight fix the engine would refuse (a bug in the rule, never the
    user's)."""
    refused = weight_refusals(kernel, input_qp, weight_qp, out_channels)
    if refused:
        raise QconvdiagError(f"internal: a fix for {kernel} would be refused "
                             f"({', '.join(r.rule for r in refused)})")


def input_fix(case: ConvCase, run: PathRun | None = None) -> tuple[str, QParams]:
    """Minmax quint8 input qparams over the input's range (0 included): on 128 levels
    (reduce_range's 0..127) where ``run``'s kernel sums int16 pairs, or its input is on 7 bits
    already (8-bit inputs there saturate the pairs: a sweep's fbgemm depthwise conv went from
    25.2 to 9.4 dB with the 8-bit fix)."""
    from ..arithmetic.accumulate import EXACT

    seven = run is not None and (run.kernel.accumulation != EXACT or (
        run.report.budget is not None and run.report.budget.input_bits == 7))
    from ..measure.budget import calibrated_span
    from ..measure.metrics import Span

    span = calibrated_span(case, Span.of(case.input))  # the calibration batches' where like
    lo, hi = min(span.low, 0.0), max(span.high, 0.0)
    if seven:
        scale = (hi - lo) / 127 if hi > lo else 1.0
        zp = int(np.clip(-round(lo / scale), 0, 127))
    else:
        scale, zp = minmax_qparams(np.array([lo, hi], dtype=np.float32), "quint8")
    qp = per_tensor(scale, zp, "quint8", "fix")
    if seven:
        why = ("this kernel sums int16 pairs" if run is not None
               and run.kernel.accumulation != EXACT else "as the input had")
        return (f"# on 128 levels (7 bits): {why}\n# minmax over [{fmt(lo)}, {fmt(hi)}]\n"
                f"qx = torch.quantize_per_tensor(x, {scale!r}, {zp}, torch.quint8)"), qp
    return (f"qx = torch.quantize_per_tensor(x, {scale!r}, {zp}, torch.quint8)"
            f"  # minmax over [{fmt(lo)}, {fmt(hi)}]"), qp


#: A whole model prepared, calibrated and converted again, in each flow (a model walk's
#: fixes: ``model`` the float model, ``calibration_batches`` its inputs).
CALIBRATE_EAGER = ("from torch.ao.quantization import convert, prepare\n"
                   "# the float model, fused (fuse_modules) if it was, its qconfig set as before\n"
                   "prepared = prepare(model)\n"
                   "for batch in calibration_batches:  # inputs as at inference\n"
                   "    prepared(batch)\n"
                   "quantized = convert(prepared)")
CALIBRATE_FX = ("from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx\n"
                "# the float model, with the qconfig mapping and example inputs as before\n"
                "prepared = prepare_fx(model, qconfig_mapping, example_inputs)\n"
                "for batch in calibration_batches:  # inputs as at inference\n"
                "    prepared(batch)\n"
                "quantized = convert_fx(prepared)")
CALIBRATE_PT2E = ("from torchao.quantization.pt2e.quantize_pt2e import (\n"
                  "    convert_pt2e, prepare_pt2e)\n"
                  "# export the float model again (prepare_pt2e changed the graph it was\n"
                  "# given), with the quantizer as before\n"
                  "exported = torch.export.export(\n"
                  "    model.eval(), (calibration_batches[0],), strict=True).module()\n"
                  "prepared = prepare_pt2e(exported, quantizer)\n"
                  "with torch.no_grad():\n"
                  "    for batch in calibration_batches:  # inputs as at inference\n"
                  "        prepared(batch)\n"
                  "converted = convert_pt2e(prepared)")


def comment(text: str) -> str:
    """A fix said in words, as comment lines of 80 columns at most: whole lines where a
    report is piped at 80 columns (fixes print unwrapped, to stay pasteable)."""
    import textwrap

    return "\n".join("# " + line for line in textwrap.wrap(text, 78, break_long_words=False,
                                                          break_on_hyphens=False))


def model_calibration(flow: str) -> str:
    """The code that prepares, calibrates and converts a whole model again, in its ``flow``
    (eager, fx or pt2e)."""
    return CALIBRATE_PT2E if flow == "pt2e" else CALIBRATE_FX if flow == "fx" else CALIBRATE_EAGER


def weight_fix(case: ConvCase, kernel: str, per_channel: bool, input_qp: QParams,
               levels: float = SYMMETRIC) -> str:
    """Symmetric qint8 weights (per tensor or per output channel), repacked into ``qm``: scale
    max|w| / ``levels`` (torch's symmetric observers' 127.5; 127 keeps the largest weight
    unclipped)."""
    w = case.weight
    out_c = w.shape[0]
    if per_channel:
        m = np.abs(w.reshape(out_c, -1).astype(np.float64)).max(axis=1)
        qp = QParams(tuple(float(v / levels) if v > 0 else 1.0 for v in m), (0,) * out_c,
                     "qint8", 0, "fix")
        checked(kernel, input_qp, qp, out_c)
        return ("w = conv.weight.detach()\n"
                f"scales = w.flatten(1).abs().amax(dim=1).clamp(min=1e-30) / {levels:g}"
                "  # per output channel\n"
                "qw = torch.quantize_per_channel(w, scales.double(), "
                "torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)\n"
                "qm.set_weight_bias(qw, conv.bias)")
    top = float(np.abs(w).max())
    scale = top / levels if top > 0 else 1.0
    checked(kernel, input_qp, per_tensor(scale, 0, "qint8", "fix"), out_c)
    return (f"qw = torch.quantize_per_tensor(conv.weight.detach(), {scale!r}, 0, torch.qint8)"
            f"  # symmetric: max|w| {fmt(top)} / {levels:g}\n"
            "qm.set_weight_bias(qw, conv.bias)")


def given_weight_fix(case: ConvCase, kernel: str, weight_qp: QParams, input_qp: QParams,
                     note: str = "your weight qparams") -> str | None:
    """Repack the user's own quantized weight into ``qm`` (None when the engine refuses those
    qparams or they cannot be written as one quantize call)."""
    out_c = case.weight.shape[0]
    if weight_qp.per_channel or weight_refusals(kernel, input_qp, weight_qp, out_c):
        return None
    if not weight_qp.dtype_min <= weight_qp.zero_point[0] <= weight_qp.dtype_max:
        return None
    return (f"qw = torch.quantize_per_tensor(conv.weight.detach(), {weight_qp.scale[0]!r}, "
            f"{weight_qp.zero_point[0]}, torch.{weight_qp.dtype})  # {note}\n"
            "qm.set_weight_bias(qw, conv.bias)  # repacks weight and bias")


def output_fix(y0: np.ndarray, what: str = "the float output", engine: str | None = None,
               graph_conv: str | None = None) -> tuple[str, QParams]:
    """Minmax quint8 output qparams over the float output's range (0 included); ``what`` names
    the values ``y0`` spans in the fix's comment; on qnnpack, the weight packed again after
    (``repacked``). ``graph_conv``: a PT2E model's conv (its module path): the qparams are set
    in the ``converted`` graph, on the quantize after it and the dequantizes that read it."""
    scale, zp = minmax_qparams(y0, "quint8")
    lo, hi = min(float(y0.min()), 0.0), max(float(y0.max()), 0.0)
    # the comment on its own line: the code lines stay within 80 columns when piped
    head = f"# minmax over {what} [{fmt(lo)}, {fmt(hi)}]\n"
    chosen = per_tensor(scale, zp, "quint8", "fix")
    if graph_conv is not None:
        return head + graph_output_qparams(graph_conv, scale, zp), chosen
    return repacked(head + f"qm.scale = {scale!r}\nqm.zero_point = {zp}", engine), chosen


def graph_output_qparams(conv: str, scale: float, zero_point: int) -> str:
    """Code that sets a convert_pt2e graph's output qparams of ``conv`` (its module path, as
    the capture names it: the module stack of the conv node): on the quantize node after it
    (or after its ReLU) and on the dequantize nodes that read those codes."""
    return (f"# in the converted graph: the quantize after {conv} and the dequantizes\n"
            "# that read its codes (their scale and zero point arguments)\n"
            "conv = next(n for n in converted.graph.nodes if n.op == 'call_function'\n"
            "            and 'conv' in str(n.target)\n"
            "            and list(n.meta.get('nn_module_stack', {}).values())[-1][0]\n"
            f"            == {conv!r})\n"
            "q = next(iter(conv.users))\n"
            "if 'relu' in str(q.target):\n"
            "    q = next(iter(q.users))\n"
            "for node in (q, *q.users):\n"
            f"    node.args = (node.args[0], {scale!r}, {zero_point}, *node.args[3:])\n"
            "converted.recompile()")


def repacked(fix: str, engine: str | None, module: str = "qm") -> str:
    """A fix that sets a quantized module's output qparams (``module``: its name in the fix),
    followed on qnnpack by packing its weight again: qnnpack keeps the requantization it
    computed on the module's first run, so a scale set afterwards changes nothing (measured
    with torch 2.13) until it is packed again."""
    if engine != "qnnpack":
        return fix
    return (fix + "\n# qnnpack keeps the requantization of its first run: pack it again\n"
            f"{module}.set_weight_bias({module}.weight(), {module}.bias())")


def eager_flow(case: ConvCase, engine: str, qconfig_line: str | None = None) -> str:
    """The forum answer's route, done: observers, calibration between prepare and convert
    (``qconfig_line`` in place of the engine's default qconfig; the reduce_range qconfig where
    the default keeps 8-bit activations that this CPU's int16 pair sums saturate)."""
    from ..arithmetic.engines import PT2E_ENGINES
    from ..quantization.paths import reduces_beyond_default

    if case.in_model and engine in PT2E_ENGINES:  # the model's own flow, exported whole
        return model_calibration("pt2e")
    if case.in_model and case.model_flow == "fx":  # traced whole, with its qconfig if meant
        if qconfig_line is None and reduces_beyond_default(engine):
            qconfig_line = QCONFIG_IMPORTS + REDUCE_RANGE_QCONFIG.format(flag=True,
                                                                         engine=engine)
        return model_calibration("fx") if qconfig_line is None else _fx_flow(
            case, engine, qconfig_line)
    if engine in PT2E_ENGINES:  # no torch.ao qconfig: the quantizer's flow
        from .backend_rules import alternative

        return alternative()
    if qconfig_line is None and reduces_beyond_default(engine):
        return reduce_range_flow(case, engine, True)
    if case.in_model:  # the model's own flow: this conv's input comes from the layers before
        return "\n".join([
            "from torch.ao.quantization import convert, get_default_qconfig, prepare",
            f'torch.backends.quantized.engine = "{engine}"',
            "# model: the float model, fused (fuse_modules) if it was, in eval mode",
            qconfig_line or f'model.qconfig = get_default_qconfig("{engine}")',
            "prepared = prepare(model)  # observers on every quantized module",
            "for batch in calibration_batches:  # a few of the model's real inputs",
            "    prepared(batch)",
            "quantized = convert(prepared)  # from_float: weight, bias, scale, zero_point set",
            f"qm = quantized.get_submodule({case.layer!r})",
        ])
    shape = ", ".join(["N", *(str(d) for d in case.input.shape[1:])])
    # a fused ReLU stays fused: convert makes the intrinsic ConvReLU a quantized ConvReLU (a
    # plain conv there would drop the ReLU)
    relu = case.activation == "relu"
    fused = ([f"layer = torch.ao.nn.intrinsic.ConvReLU{case.spatial_dims}d(conv, "
              "torch.nn.ReLU())  # its fused ReLU"] if relu else [])
    return "\n".join([
        "from torch.ao.quantization import DeQuantStub, QuantStub, convert, "
        "get_default_qconfig, prepare",
        f'torch.backends.quantized.engine = "{engine}"',
        *fused,
        f"model = torch.nn.Sequential(QuantStub(), {'layer' if relu else 'conv'}, "
        "DeQuantStub()).eval()",
        qconfig_line or f'model.qconfig = get_default_qconfig("{engine}")',
        "prepared = prepare(model)  # observers on the input and the conv's output",
        f"for batch in calibration_batches:  # a few real inputs, shape ({shape})",
        "    prepared(batch)",
        "quantized = convert(prepared)  # from_float: weight, bias, scale, zero_point set",
        "qm, qx = quantized[1], quantized[0](x)",
    ])


REDUCE_RANGE_QCONFIG = (
    "model.qconfig = QConfig(activation=HistogramObserver.with_args(reduce_range={flag}), "
    "weight=get_default_qconfig(\"{engine}\").weight)"
)
QCONFIG_IMPORTS = ("from torch.ao.quantization import QConfig\n"
                   "from torch.ao.quantization.observer import HistogramObserver\n")


def _fx_flow(case: ConvCase, engine: str, qconfig_line: str) -> str:
    """An FX model prepared with ``qconfig_line``'s qconfig (``model.qconfig = ...``, as the
    eager flow sets it) for every module, calibrated and converted."""
    return "\n".join([
        "from torch.ao.quantization import QConfigMapping, get_default_qconfig",
        "from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx",
        f'torch.backends.quantized.engine = "{engine}"',
        qconfig_line.replace("model.qconfig = ", "qconfig = "),
        "# model: the float model, in eval mode; example_inputs as before",
        "mapping = QConfigMapping().set_global(qconfig)",
        "prepared = prepare_fx(model, mapping, example_inputs)",
        "for batch in calibration_batches:  # a few of the model's real inputs",
        "    prepared(batch)",
        "quantized = convert_fx(prepared)",
        f"qm = quantized.get_submodule({case.layer!r})",
    ])


def reduce_range_flow(case: ConvCase, engine: str, flag: bool) -> str:
    """``eager_flow`` with the engine's default weight observer and a histogram observer on
    ``flag``-reduced activations (7 bits when True); on a PT2E engine, the quantizer's flow with
    its config's ``reduce_range``."""
    from ..arithmetic.engines import PT2E_ENGINES

    if engine in PT2E_ENGINES:
        from .backend_rules import pt2e_flow

        return pt2e_flow(flag)
    return QCONFIG_IMPORTS + eager_flow(case, engine,
                                        REDUCE_RANGE_QCONFIG.format(flag=flag, engine=engine))


def per_channel_qconfig(engine: str) -> str:
    """A qconfig with per-channel symmetric weights and the engine's default activations (7-bit
    where the default keeps 8 that this CPU's int16 pair sums saturate)."""
    from ..quantization.paths import reduces_beyond_default

    if reduces_beyond_default(engine):
        return ("from torch.ao.quantization import QConfig\n"
                "from torch.ao.quantization.observer import HistogramObserver, "
                "PerChannelMinMaxObserver\n"
                "qconfig = QConfig(activation=HistogramObserver.with_args(reduce_range=True), "
                "weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, "
                "qscheme=torch.per_channel_symmetric))")
    return ("from torch.ao.quantization import QConfig, get_default_qconfig\n"
            "from torch.ao.quantization.observer import PerChannelMinMaxObserver\n"
            "qconfig = QConfig(activation=get_default_qconfig(torch.backends.quantized.engine)"
            ".activation, weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8, "
            "qscheme=torch.per_channel_symmetric))")


def module_name(case: ConvCase) -> str:
    return f"torch.ao.nn.quantized.{conv_name(case)}"


def python_list(names: list[str], room: int = 64) -> str:
    """``names`` as a Python list literal for a fix, one per line when it is longer than
    ``room`` (the fix's lines stay within 80 columns)."""
    flat = repr(names)
    if len(flat) <= room:
        return flat
    return "[\n" + "".join(f"    {n!r},\n" for n in names) + "]"
