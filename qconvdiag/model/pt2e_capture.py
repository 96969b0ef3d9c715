"""``capture_model`` for torchao's PT2E flow: a ``convert_pt2e`` GraphModule beside its float
model.

There a quantized conv is a pattern, not a module (torchao 0.18, ``X86InductorQuantizer``)::

    codes = quantize_per_tensor(x, in_s, in_zp, 0, 255, uint8)      (or the layer before's)
    x_dq  = dequantize_per_tensor(codes, in_s, in_zp, 0, 255, uint8)
    w_dq  = dequantize_per_channel(_frozen_paramN, _scale_N, _zero_point_N, 0, -128, 127, int8)
    y     = aten.conv2d(x_dq, w_dq, bias, stride, padding, dilation, groups)
    [y    = aten.relu(y)]
    q     = quantize_per_tensor(y, out_s, out_zp, 0, 255, uint8)     (where a consumer needs it)

``prepare_pt2e`` folded each BatchNorm into the conv's weight and bias; the float model's is
folded the same way for the reference (``capture.float_reference``), and the layer says so.

What the graph computes eagerly is an fp32 conv on dequantized values; what runs after
``torch.compile`` with freezing (and ``lower_pt2e_quantized_to_x86``) is the integer kernel
``torch.ops.onednn.qconv_pointwise``, engine ``x86_inductor``. The capture runs the graph as
that kernel runs it: an ``fx.Interpreter`` computes each captured pattern's output codes with
the kernel, on the codes the conv received, and hands them on; every other op runs as the
graph says. How many codes the eager Q/DQ graph would have given differently is a bundle note.

A conv whose output is not quantized (its consumer takes float32, e.g. a residual add that
inductor fuses into the conv as a binary post-op) runs as the same kernel with a float32
output (``qconv_pointwise(..., output dtype float32)``, output scale 1.0, zero point 0): it is
captured with that float32 output (``LayerCapture.output_float32``) and judged on it; the fused
add itself is not modelled (the graph's add runs on the kernel's float32 output as it is).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import QAT_PT2E_NOTE, ModuleState, QuantSetup
from ..errors import CaseError
from ..quantization.qparams import QParams, make_qparams
from .bundle import LayerCapture, ModelBundle
from .capture import (
    Progress,
    finish_bundle,
    float_conv_at,
    float_reference,
    layer_capture,
    output_ranges,
    sample_notes,
)
from .compiled import CompiledWith
from .hooks import Seen, run_both

ENGINE = "x86_inductor"
#: The output qparams inductor passes qconv_pointwise for a float32 output (scale 1.0, zero
#: point 0: the kernel skips them); no code is written with them.
FLOAT32_OUTPUT = make_qparams([1.0], [0.0], "quint8", None, "float32 output", "engine")


@dataclass(frozen=True)
class ConvPattern:
    """One conv's Q/DQ pattern in a ``convert_pt2e`` graph."""

    name: str
    """The float model's module path (the conv node's ``nn_module_stack``)."""
    conv: Any
    """The ``aten.conv{1,2,3}d`` node."""
    input_codes: Any
    """The node whose value is the uint8 codes the conv receives (a quantize_per_tensor)."""
    input_qparams: QParams
    weight_codes: np.ndarray
    """int8 codes of ``_frozen_paramN`` (int64)."""
    weight_qparams: QParams
    bias: np.ndarray | None
    """float32, BatchNorm folded in by prepare_pt2e."""
    geometry: tuple[list[int], list[int], list[int], int]
    """stride, padding, dilation, groups as the node holds them."""
    relu: bool
    output: Any
    """The quantize_per_tensor node of the conv's (or its ReLU's) output; with a float32
    output, the conv's (or its ReLU's) node itself."""
    output_qparams: QParams
    """The output's; with a float32 output, ``FLOAT32_OUTPUT`` (what the kernel takes)."""
    float_output: bool = False
    """The conv's output stays float32 (a consumer takes float, e.g. a residual add)."""
    qat: bool = False
    """Its quantizer annotated it with fake quantization (``fake_quantized``: a QAT config, as
    ``prepare_qat_pt2e`` takes): judged as trained through it (``QAT_PT2E_NOTE``)."""


def is_pt2e_graph(model: Any) -> bool:
    """A GraphModule holding quantized_decomposed Q/DQ ops (a ``convert_pt2e`` result)."""
    import torch

    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(n.op == "call_function" and "quantized_decomposed" in str(n.target)
               for n in model.graph.nodes)


def _ops() -> dict[str, Any]:
    import torch

    qd = torch.ops.quantized_decomposed
    aten = torch.ops.aten
    return {"q": qd.quantize_per_tensor.default, "dq": qd.dequantize_per_tensor.default,
            "dq_channel": qd.dequantize_per_channel.default,
            "convs": {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3},
            "relus": (aten.relu.default, aten.relu_.default)}


def _not_a_pattern(x: Any, w: Any, model: Any = None) -> str:
    """Why a conv whose input ``x`` and weight ``w`` (graph nodes) are not the int8 pattern's
    (a dequantize_per_tensor of the input, a dequantize_per_channel of the weight) is none:
    a per-tensor weight, or an input quantized at run time (is_dynamic=True), both of which
    torch.compile ran as float32 convs (aten mkldnn_convolution, measured with torch 2.13 and
    torchao 0.18: no int8 kernel), or no quantization at all."""
    def target(node: Any) -> str:
        return str(getattr(node, "target", ""))

    if "dequantize_per_tensor" in target(w):
        symmetric = list(getattr(w, "args", ())[3:5]) == [-127, 127]
        return ("its weight is quantized per tensor"
                + (" to -127..127 (XNNPACKQuantizer's config, is_per_channel=False, as the PT2E "
                   "tutorial's)" if symmetric else "")
                + ", and X86InductorQuantizer's int8 conv takes per-channel weights: "
                "torch.compile runs this conv in float32 (quantize with X86InductorQuantizer's "
                "default config, per-channel weights, to run and diagnose it in int8)")
    if "dequantize_per_tensor.tensor" in target(x) or "choose_qparams" in target(
            getattr(x, "args", [None])[0] if getattr(x, "args", None) else None):
        return ("its input is quantized at run time (is_dynamic=True), which the int8 conv "
                "kernel does not take: torch.compile runs this conv in float32 (use the "
                "static config, calibrated)" + _unobserved_weight(model, w))
    return "not a quantized conv pattern (its input or weight is not dequantized from int codes)"


def _unobserved_weight(model: Any, w: Any) -> str:
    """A sentence for a per-channel weight whose observer never ran (one scale, 1.0, for every
    channel: the prepared model was not run before convert_pt2e), else ""."""
    import torch

    if model is None or getattr(w, "target", None) != torch.ops.quantized_decomposed \
            .dequantize_per_channel.default:
        return ""
    try:
        codes = _attr(model, w.args[0], "weight")
        scales = _attr(model, w.args[1], "weight scales")
    except CaseError:
        return ""
    if scales.numel() != 1 or float(scales.reshape(-1)[0]) != 1.0 or codes.shape[0] == 1:
        return ""
    zeros = int((codes == 0).sum())
    return (f"; and its weight observer never ran: one scale, 1.0, for its {codes.shape[0]} "
            f"channels puts {zeros} of its {codes.numel()} weights on code 0 (run the "
            "prepared model on calibration batches before convert_pt2e)")


def _attr(model: Any, node: Any, what: str) -> Any:
    if node.op != "get_attr":
        raise CaseError(f"capture_model: {what} is computed by {node.name}, not a constant of "
                        "the graph; capture a convert_pt2e result as it comes")
    value = model
    for part in str(node.target).split("."):
        value = getattr(value, part)
    return value


def _activation_qparams(node: Any, what: str) -> QParams:
    """uint8 per-tensor qparams of a quantize/dequantize_per_tensor node's literal arguments:
    0..255 (X86InductorQuantizer's default config) or 0..127 (its ``reduce_range=True``,
    which torchao advises on CPUs without VNNI). The kernel clamps to the uint8 range either
    way: inductor's qconv fusion matches the quantize node's 0..127 but does not pass it to
    ``qconv_pointwise`` (torch/_inductor/fx_passes/quantization.py), so an output beyond the
    calibrated range reaches codes above 127 there, as the emulation's uint8 clamp gives. The
    captured qparams keep the dtype's range (a bundle stores no other): the ladder's eager
    Q/DQ stages clamp at 255 too, where the converted graph clamps at 127."""
    import torch

    _x, scale, zero_point, qmin, qmax, dtype = node.args[:6]
    if dtype != torch.uint8 or (qmin, qmax) not in ((0, 255), (0, 127)):
        raise CaseError(f"capture_model: {what} is quantized to {dtype} {qmin}..{qmax}; the "
                        "x86_inductor kernel takes uint8 activations, 0..255 or 0..127 "
                        "(X86InductorQuantizer's default config, or with reduce_range=True)")
    return make_qparams([float(scale)], [float(zero_point)], "quint8", None, what, "graph")


def module_path(node: Any) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        raise CaseError(f"capture_model: the graph's {node.name} names no module "
                        "(nn_module_stack): export the model with torch.export.export")
    return str(list(stack.values())[-1][0])


def find_patterns(model: Any) -> tuple[list[ConvPattern], list[str]]:
    """Every conv pattern of a convert_pt2e graph, in graph order (a float32 output
    included), and notes on the convs left out (not a quantized conv pattern)."""
    ops = _ops()
    patterns, skipped = [], []
    one_scale: list[str] = []  # convs whose weight holds one scale for all its channels
    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in ops["convs"]:
            continue
        name = module_path(node)
        x, w = node.args[0], node.args[1]
        if getattr(x, "target", None) != ops["dq"] or getattr(w, "target", None) != \
                ops["dq_channel"]:
            skipped.append(f"{name}: {_not_a_pattern(x, w, model)}: left out")
            continue
        w_codes_node, w_scales, w_zps, axis, wmin, wmax = w.args[:6]
        if (wmin, wmax) == (-127, 127):
            raise CaseError(f"capture_model: {name}'s weight is quantized to -127..127 (a "
                            "quantizer other than X86InductorQuantizer, e.g. "
                            "XNNPACKQuantizer); qconvdiag models the PT2E flow's x86_inductor "
                            "kernels: quantize with X86InductorQuantizer to diagnose it")
        if axis != 0 or (wmin, wmax) != (-128, 127):
            raise CaseError(f"capture_model: {name}'s weight is per-channel on axis {axis}, "
                            f"{wmin}..{wmax}; x86_inductor takes int8 -128..127 on axis 0")
        weight = _attr(model, w_codes_node, f"{name}'s weight").detach()
        scales = _attr(model, w_scales, f"{name}'s weight scales").detach().double()
        zps = _attr(model, w_zps, f"{name}'s weight zero points").detach()
        out_channels = int(weight.shape[0])
        if scales.numel() == 1 and zps.numel() == 1 and out_channels > 1:
            # a weight observer that never ran (convert_pt2e without calibration) leaves one
            # scale, 1.0; the graph's dequantize_per_channel broadcasts it to every channel
            one_scale.append(f"{name} ({float(scales[0]):g} for {out_channels})")
            scales, zps = scales.repeat(out_channels), zps.repeat(out_channels)
        w_qp = make_qparams(scales.tolist(), zps.tolist(), "qint8", 0, f"{name}.weight",
                            "graph")
        bias_node = node.args[2] if len(node.args) > 2 else None
        bias = None if bias_node is None else _attr(model, bias_node, f"{name}'s bias")
        dims = ops["convs"][node.target]
        rest = list(node.args[3:]) + [None] * 4
        stride, padding, dilation, groups = (rest[0] or [1] * dims, rest[1] or [0] * dims,
                                             rest[2] or [1] * dims, rest[3] or 1)
        after, relu = node, False
        users = list(after.users)
        if len(users) == 1 and users[0].target in ops["relus"]:
            after, relu = users[0], True
            users = list(after.users)
        quantized = len(users) == 1 and users[0].target == ops["q"]
        patterns.append(ConvPattern(
            name, node, x.args[0], _activation_qparams(x, f"{name}.input"),
            weight.numpy().astype(np.int64), w_qp,
            None if bias is None else bias.detach().float().numpy().copy(),
            (list(stride), list(padding), list(dilation), int(groups)), relu,
            users[0] if quantized else after,
            _activation_qparams(users[0], f"{name}.output") if quantized else FLOAT32_OUTPUT,
            float_output=not quantized, qat=fake_quantized(node)))
    if one_scale:
        skipped.append(f"{', '.join(one_scale)}: each weight's per-channel qparams hold one "
                       "scale for all its output channels, as an observer that never ran "
                       "leaves them (no calibration between prepare_pt2e and convert_pt2e?); "
                       "the graph's dequantize applies it to every channel, and so does "
                       "qconvdiag")
    return patterns, skipped


def fake_quantized(node: Any) -> bool:
    """The quantizer annotated the conv ``node`` with fake quantization (its qspecs'
    constructors are FakeQuantize classes: ``prepare_qat_pt2e``, a QAT config); the
    annotation stays in the node's meta through ``convert_pt2e``."""
    annotation = node.meta.get("quantization_annotation")
    specs = list(getattr(annotation, "input_qspec_map", {}).values())
    return any("FakeQuantize" in _constructor_name(getattr(q, "observer_or_fake_quant_ctr",
                                                           None)) for q in specs)


def _constructor_name(ctr: Any) -> str:
    """The class name behind an observer constructor (``with_args``' wrapper of a
    functools.partial of the class)."""
    for attribute in ("p", "func"):
        ctr = getattr(ctr, attribute, ctr)
    return str(getattr(ctr, "__name__", ""))


def kernel_codes(p: ConvPattern, codes: Any) -> Any:
    """The x86_inductor kernel (``onednn.qconv_pointwise``) on ``codes``: uint8 output codes,
    or float32 values when the pattern's output stays float32."""
    import torch

    from ..arithmetic.torch_ref import run_inductor_conv
    from ..case import Geometry

    stride, padding, dilation, groups = p.geometry
    out = p.output_qparams
    r = run_inductor_conv(codes.numpy(), p.input_qparams, p.weight_codes, p.weight_qparams,
                          p.bias, out.scale[0], out.zero_point[0],
                          Geometry(tuple(stride), tuple(padding), tuple(dilation), groups),
                          p.relu, p.float_output)
    got = r.output_float if p.float_output else r.output_codes
    if not r.ran or got is None:
        raise CaseError(f"capture_model: torch's x86_inductor kernel refused {p.name}: "
                        f"{r.error}")
    return torch.from_numpy(got if p.float_output else got.astype(np.uint8))


def _runner(model: Any, patterns: list[ConvPattern], seen: dict[str, Seen],
            differ: list[int]) -> Callable[[Any], Any]:
    """Run the graph with each pattern's output codes from the kernel; record every
    pattern's input and output codes in ``seen``, and in ``differ`` (outputs, of which
    different) how the eager Q/DQ codes compare."""
    import torch

    by_output = {p.output: p for p in patterns}
    by_dequantize: dict[Any, list[ConvPattern]] = {}
    for p in patterns:
        by_dequantize.setdefault(p.conv.args[0], []).append(p)

    # each pattern's input codes, kept from its dequantize (the interpreter frees a value
    # after its last use)
    received: dict[str, Any] = {}

    class KernelInterpreter(torch.fx.Interpreter):
        def run_node(self, n: Any) -> Any:
            for waiting in by_dequantize.get(n, ()):
                received[waiting.name] = self.env[waiting.input_codes]
            eager = super().run_node(n)
            p = by_output.get(n)
            if p is None:
                return eager
            codes = received.pop(p.name)
            out = kernel_codes(p, codes)
            seen[p.name].qinput.append(codes.detach().clone())
            seen[p.name].qoutput.append(out)
            if not p.float_output:  # the eager graph's float32 conv is no code to compare
                differ[0] += int(out.numel())
                differ[1] += int(torch.count_nonzero(out != eager))
            return out

    def run(batch: Any) -> Any:
        try:
            return KernelInterpreter(model).run(batch)
        except (AssertionError, RuntimeError) as exc:  # e.g. an exported shape's guard
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise CaseError(f"capture_model: the convert_pt2e model refused a batch of shape "
                            f"{tuple(batch.shape)} ({first[:200]}); torch.export fixed the "
                            "shapes it saw: pass batches of the exported shape, or export with "
                            "dynamic_shapes") from None

    return run


def capture_pt2e(float_model: Any, converted: Any, batches: list[Any], limit: int,
                 path: str | os.PathLike[str] | None, calibration: Any,
                 say: Progress, compiled: CompiledWith | None = None) -> ModelBundle:
    """``capture_model`` of a ``convert_pt2e`` GraphModule (see the module's docstring)."""
    import torch

    from ..torchao_import import require_torchao

    require_torchao("a convert_pt2e model")
    patterns, skipped = find_patterns(converted)
    if not patterns and skipped:  # its Q/DQ nodes are convert_pt2e's form; not the int8 conv's
        n = len(skipped)
        raise CaseError(f"capture_model: none of the convert_pt2e model's {n} conv"
                        f"{'s' if n > 1 else ''} is the pattern x86_inductor's int8 conv runs "
                        "(dequantize -> aten.conv with a per-channel int8 weight -> quantize; "
                        "the dequantize and quantize nodes themselves are convert_pt2e's "
                        f"form); {skipped[0].removesuffix(': left out')}"
                        + (f" (and {n - 1} more)" if n > 1 else ""))
    if not patterns:
        raise CaseError("capture_model: the convert_pt2e model holds no quantized conv "
                        "pattern (dequantize -> aten.conv -> quantize)")
    fconvs = {}
    for p in patterns:
        if p.name in fconvs:
            raise CaseError(f"capture_model: {p.name!r} runs twice in the graph; capture_model "
                            "takes convs that run once per forward")
        fconvs[p.name] = _float_conv(float_model, p)
    graph_bns = _graph_batchnorms(converted)
    seen = {p.name: Seen() for p in patterns}
    differ = [0, 0]
    say(f"running both models on {len(batches)} batch(es), {len(patterns)} quantized convs")
    floats = [p.name for p in patterns if p.float_output]
    run_both(float_model, _runner(converted, patterns, seen, differ), fconvs, seen, batches,
             limit, [], lambda bn: bn not in graph_bns, quantized_model=converted)
    keep, notes = sample_notes(seen, batches, limit)
    compared = (f"the eager Q/DQ graph (an fp32 conv on dequantized values) gives "
                f"{differ[1]:,} of these {differ[0]:,} output codes differently" if differ[0]
                else "no conv outputs codes to compare with the eager Q/DQ graph's")
    notes.append("a PT2E model (torchao convert_pt2e): its convs run as torch.compile with "
                 "freezing runs them, torch.ops.onednn.qconv_pointwise (engine x86_inductor) "
                 f"on the codes they received; {compared}"
                 + (f" ({len(floats)} conv(s) output float32, not codes: "
                    + ", ".join(floats) + ")" if floats else ""))
    notes.extend(skipped)
    bns = {p.name: _folded_bn(seen[p.name], graph_bns) for p in patterns}
    points = {p.name: (fconvs[p.name] if bns[p.name] is None
                       else float_model.get_submodule(bns[p.name]), p.relu) for p in patterns}
    ranges = output_ranges(float_model, points, calibration, notes, say)
    layers = []
    with torch.no_grad():
        for p in patterns:
            say(f"capturing {p.name}")
            layers.append(_layer(p, fconvs[p.name], seen[p.name], keep, float_model,
                                 bns[p.name], ranges.get(p.name)))
    from .shared import PT2E_CAT, pt2e_shared_groups, with_shared_ranges

    outputs = {p.output: (p.name, (float(p.output_qparams.scale[0]),
                                   int(p.output_qparams.zero_point[0])))
               for p in patterns if not p.float_output}
    layers = with_shared_ranges(layers, pt2e_shared_groups(
        converted, outputs, [p.name for p in patterns]), PT2E_CAT)
    if compiled is not None:  # what the compiled model computes, if it runs the Q/DQ graph
        compiled = dataclasses.replace(compiled, qdq_differ=differ[1], qdq_outputs=differ[0])
        if compiled.error is not None:
            notes.append("the compiled model, run once on the first batch under "
                         f"torch.no_grad(), failed ({compiled.error}); captured is the graph it "
                         "wraps")
    from .refold import shared_folds

    folds = shared_folds(float_model, {p.name: (fconvs[p.name], bn) for p in patterns
                                       if (bn := bns[p.name]) is not None}, seen, batches[0])
    return finish_bundle(layers, ENGINE, path, notes, compiled, flow="pt2e",
                         bn_training=training_batchnorms(converted), shared_folds=folds)


def _float_conv(float_model: Any, p: ConvPattern) -> Any:
    fconv = float_conv_at(float_model, p.name, "the PT2E model was exported from")
    if tuple(fconv.weight.shape) != p.weight_codes.shape:
        raise CaseError(f"capture_model: {p.name!r}'s weight is {tuple(fconv.weight.shape)} "
                        f"in the float model, {p.weight_codes.shape} quantized")
    return fconv


def training_batchnorms(converted: Any) -> tuple[str, ...]:
    """Module paths of the graph's batch_norm calls that run in training mode (their
    ``training`` argument True: the model was not moved to eval with
    ``move_exported_model_to_eval`` before ``convert_pt2e``, as a QAT flow must): each batch
    is normalised with its own statistics (QCD069)."""
    found = []
    for n in converted.graph.nodes:
        target = str(n.target)
        if n.op != "call_function" or "batch_norm" not in target or "no_training" in target:
            continue
        if len(n.args) > 5 and n.args[5] is True and n.meta.get("nn_module_stack"):
            found.append(module_path(n))
    return tuple(dict.fromkeys(found))


def _graph_batchnorms(converted: Any) -> set[str]:
    """Module paths of the BatchNorms the graph still computes (not folded)."""
    return {module_path(n) for n in converted.graph.nodes
            if n.op == "call_function" and "batch_norm" in str(n.target)
            and n.meta.get("nn_module_stack")}


def _folded_bn(s: Seen, graph_bns: set[str]) -> str | None:
    """The float BatchNorm that consumed the conv's output, when the graph no longer has it
    (prepare_pt2e folded it into the conv)."""
    return s.bn if s.bn is not None and s.bn not in graph_bns else None


def _layer(p: ConvPattern, fconv: Any, s: Seen, keep: int, float_model: Any,
           bn_name: str | None, calibration_range: tuple[float, float] | None) -> LayerCapture:
    # codes in their 8-bit dtype, as the eager capture keeps them
    x_codes = np.concatenate([t.numpy() for t in s.qinput])[:keep]
    y_all = np.concatenate([t.numpy() for t in s.qoutput])[:keep]
    y_codes = np.ascontiguousarray(y_all, dtype=np.float32) if p.float_output else y_all
    module = ModuleState(p.weight_codes, p.weight_qparams.with_source("module"), p.bias,
                         p.output_qparams.with_source("module"))
    setup = QuantSetup(input_qparams=p.input_qparams.with_source("user"), input_codes=x_codes,
                       module=module)
    float_side = float_reference(fconv, s, keep, float_model, bn_name, p.relu)
    if p.qat:  # judged as trained through the fake quantization these qparams come from
        float_side = dataclasses.replace(float_side, notes=(*float_side.notes, QAT_PT2E_NOTE))
    stride, padding, dilation, groups = p.geometry
    if (list(fconv.stride), list(fconv.dilation), fconv.groups) != (stride, dilation, groups):
        raise CaseError(f"capture_model: {p.name!r}'s geometry differs between the float model "
                        "and the graph")
    return layer_capture(p.name, fconv, float_side, x_codes, p.input_qparams, setup, padding,
                         p.relu, y_codes, p.output_qparams, bn_name, calibration_range,
                         flow="pt2e", output_float32=p.float_output)
