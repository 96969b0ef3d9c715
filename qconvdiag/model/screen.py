"""A captured conv's screen: the numbers of the model walk that need no stage ladder.

A conv's own error (its quantized output, as the quantized model computed it, against the float
conv on the input it really received), its propagated error (against the float model's output
at that point), the error of the input it received, and its floor (budget.py) cost one float
conv and one pass over its output and its input: no stage ladder, no emulation. The dominant
stage is estimated from the output codes. The torch check (the emulation of the module on its
captured input against the codes the model computed) is here too, for the walk to run where
it needs one.

A conv whose kernel writes float32 (``LayerCapture.output_float32``: a PT2E conv before a
residual add) is screened on those float32 values: no output rounding or clipping, so its floor
is the weight's (and the bias's), its dominant stage a weight stage (or the accumulation, where
saturated int16 pairs cost most of it), and its torch check the emulation's float32 output
against the kernel's, bit for bit; on a kernel that sums int16 pairs its saturation is counted
and named (``fp32_saturation``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..arithmetic.emulate import Emulation, Kernel, emulate
from ..case import ConvCase
from ..diagnosis import layer_kernel
from ..measure.budget import AT_FLOOR, FAR, MOST, SLACK, floors
from ..measure.evidence import exec_weight_qparams
from ..measure.metrics import chunked_energy, fused_pass
from ..model_report import ErrorSummary, LayerFinding
from ..quantization.paths import PathSpec, conv_output_qparams, holds_float_weight
from ..quantization.qparams import QParams, dequantize, dequantize32, wide_codes
from .batchnorm import KeptCost, kept_cost
from .bundle import LayerCapture
from .relu import ReluCost, relu_cost


@dataclass(frozen=True)
class Screen:
    """A layer's screen: the numbers that need no stage ladder."""

    own: ErrorSummary
    propagated: ErrorSummary
    input: ErrorSummary
    input_floor_ratio: float
    """The input's RMSE over the rounding floor of quantizing it (8-bit; 7-bit where its codes
    and step show 7-bit activations on a kernel that pairs them: ``budget.floors``' input
    bits) (inf for a constant
    input that is not exact)."""
    input_defaults: bool
    """The input's qparams are an uncalibrated observer's (scale 1.0, zero point 0)."""
    floor_rmse: float
    verdict: str
    dominant_stage: str | None
    findings: tuple[LayerFinding, ...] = ()
    """A float32-output conv's findings (it gets no diagnosis): QCD040 where its kernel's
    int16 pair sums saturated (``fp32_saturation``)."""
    bn_kept: KeptCost | None = None
    """Where the quantized model kept the BatchNorm after it (not fused): that BatchNorm's
    output from the conv's codes, and at a fused conv's floor (batchnorm.py)."""
    relu: ReluCost | None = None
    """Where an eager model left the ReLU after it unfused: that ReLU's output from the conv's
    codes, and at a fused conv's step (relu.py)."""




def module_spec(case: ConvCase) -> PathSpec:
    """The quantized module as it is, on the input codes it received and its weight codes (in
    the dtypes the capture kept them in: what the screen reads of them needs no arithmetic;
    the emulation widens them)."""
    s = case.setup
    assert s is not None and s.module is not None and s.input_qparams is not None
    assert s.input_codes is not None
    m = s.module
    return PathSpec("as_given", s.input_qparams, m.weight_qparams,
                    conv_output_qparams(m.output_qparams), s.input_codes, m.stored_codes, m.bias,
                    m)


def spec_kernel(case: ConvCase, spec: PathSpec, engine: str, float_output: bool = False
                ) -> Kernel:
    """The kernel that runs ``spec`` for this conv on ``engine`` (``layer_kernel``)."""
    return layer_kernel(case, engine, spec.input_qparams,
                        exec_weight_qparams(spec.weight_qparams), spec.output_qparams,
                        float_output)


def float_conv(case: ConvCase) -> np.ndarray:
    """The float conv on the case's input (float32, as the float model runs it), after the
    fused activation."""
    import torch

    from ..torch_calls import conv_function

    g = case.geometry
    conv = conv_function(case.spatial_dims)
    with torch.no_grad():
        y = conv(torch.from_numpy(case.input), torch.from_numpy(case.weight),
                 None if case.bias is None else torch.from_numpy(case.bias), list(g.stride),
                 list(g.padding), list(g.dilation), g.groups)
        if case.activation == "relu":
            torch.relu_(y)
    return y.numpy()


def screen_layer(lay: LayerCapture, engine: str) -> Screen:
    """Own and propagated error, floor and verdict, and the dominant stage estimated from the
    output codes: one float32 conv, one pass over the output and one over the input
    (``metrics.fused_pass``)."""
    case = lay.case
    spec = module_spec(case)
    y = float_conv(case)
    fp32 = lay.output_float32
    (own_d, propagated_d), (y_span,) = fused_pass(_output_values(lay), (y, lay.float_output),
                                                  (y,))
    x = np.ascontiguousarray(case.input).reshape(-1)
    (received_d,), (x_span, float_x_span) = fused_pass(lambda sl: x[sl], (lay.float_input,),
                                                       (case.input, lay.float_input))
    own, propagated, received = (ErrorSummary(*d) for d in (own_d, propagated_d, received_d))
    # outputs pinned at a limit of the dtype the float output lies beyond: the floors read
    # 7-bit codes beyond the calibration from them, the dominant stage their energy
    clipped = np.empty(0, dtype=np.int64) if fp32 else clipped_outputs(
        case, spec, lay.quantized_output, y)
    f = floors(case, spec, spec_kernel(case, spec, engine, fp32), y, None,
               np.empty(0, dtype=np.int64) if fp32 else lay.quantized_output, input_floor=False,
               spans=(x_span, y_span), saturated=None if fp32 else bool(clipped.size))
    # a float32 output is not rounded to a step: its floor is the weight's and the bias's
    floor = math.sqrt(f.energy - f.stages["output_rounding"] if fp32 else f.energy)
    ratio = own.rmse / floor if floor > 0 else (0.0 if own.rmse == 0 else math.inf)
    at_floor = AT_FLOOR + SLACK / math.sqrt(max(y.size, 1)) / 2
    verdict = "at_floor" if ratio <= at_floor else "broken" if ratio >= FAR else "above_floor"
    findings: tuple[LayerFinding, ...] = ()
    if fp32:
        dominant = weight_dominant(case, spec, own.rmse)
        if verdict != "at_floor":
            dominant, findings = fp32_saturation(lay, engine, own.rmse ** 2 * y.size,
                                                 floor ** 2 * y.size, verdict, dominant)
        if verdict != "at_floor" and dominant == "module_state":
            findings += (_other_weight(own.rmse ** 2 * y.size, floor ** 2 * y.size, verdict),)
    else:
        dominant = dominant_stage(case, spec, lay.quantized_output, y, own.rmse ** 2 * y.size,
                                  y_span.positive, clipped)
    in_qp = spec.input_qparams
    # 7-bit inputs (reduce_range) as the floors read them from the codes and the step
    levels = 127 if f.input_bits == 7 else 255
    input_floor = float_x_span.ideal_step(levels) / math.sqrt(12)
    input_ratio = (received.rmse / input_floor if input_floor > 0
                   else 0.0 if received.rmse == 0 else math.inf)
    defaults = (in_qp.scale[0], in_qp.zero_point[0]) == (1.0, 0)
    kept = None
    if lay.bn_kept is not None and case.activation is None and not fp32:
        kept = kept_cost(lay.bn_kept, dequantize32(lay.quantized_output,
                                                   lay.quantized_output_qparams), y,
                         own.sqnr_db)
    relu = None
    if lay.unfused_relu is not None and case.activation is None and not fp32:
        qp = lay.quantized_output_qparams
        relu = relu_cost(lay.unfused_relu, dequantize32(lay.quantized_output, qp), y,
                         float(qp.scale[0]), lay.calibration_range or (y_span.low, y_span.high),
                         lay.bn_folded or "")
    return Screen(own, propagated, received, input_ratio, defaults, floor, verdict, dominant,
                  findings, kept, relu)


def _other_weight(own_energy: float, floor_energy: float, verdict: str) -> LayerFinding:
    """QCD024 for a float32-output conv (it gets no diagnosis) whose weight is not the float
    weight quantized (``holds_float_weight``: a float model trained on after convert_pt2e, or
    another checkpoint), which then carries its excess: graded as any cause is."""
    from ..findings.base import severity_of

    excess = max(own_energy - floor_energy, 0.0)
    return LayerFinding("QCD024", severity_of(excess, floor_energy, excess, verdict),
                        "the conv's weight is not this float weight quantized")


def fp32_saturation(lay: LayerCapture, engine: str, own_energy: float, floor_energy: float,
                    verdict: str, dominant: str | None
                    ) -> tuple[str | None, tuple[LayerFinding, ...]]:
    """A float32-output conv above its floor whose kernel sums int16 pairs (no VNNI): the
    emulation on its captured input counts the saturated pair sums and what they cost (the
    squared difference of its output from the same kernel's with exact accumulation). When
    they cost most of the own error, the dominant stage is the accumulation's, not the
    weight's; QCD040 names them with the severity every cause gets (findings/base.py's
    severity_of: a warning from MATERIAL of the floor, an error on a broken conv when they
    explain most of its excess or alone are FAR from the floor).
    Returns the dominant stage and the findings."""
    import dataclasses

    from ..arithmetic.accumulate import EXACT
    from ..findings.base import severity_of

    kernel = spec_kernel(lay.case, module_spec(lay.case), engine, True)
    if kernel.accumulation == EXACT:
        return dominant, ()
    em = _module_emulation(lay, kernel)
    if not em.saturated_pairs:
        return dominant, ()
    exact = _module_emulation(lay, dataclasses.replace(kernel, accumulation=EXACT))
    assert em.output_float32 is not None and exact.output_float32 is not None
    # on the output (a fused ReLU zeroes some saturated sums anyway), in float64
    energy = float(np.sum(np.square(em.output_float32.astype(np.float64)
                                    - exact.output_float32)))
    level = severity_of(energy, floor_energy, max(own_energy - floor_energy, 0.0), verdict)
    if energy >= MOST * own_energy:
        dominant = "accumulation"
    return dominant, (LayerFinding("QCD040", level,
                                   f"int16 pair saturation in accumulation on {engine}"),)


def _output_values(lay: LayerCapture) -> Callable[[slice], np.ndarray]:
    """The layer's quantized output as float32 values, a flat chunk at a time (its codes
    dequantized as ``tensor.dequantize()`` does; a float32 output as it is)."""
    flat = np.ascontiguousarray(lay.quantized_output).reshape(-1)
    qp = lay.quantized_output_qparams
    if lay.output_float32:
        return lambda sl: flat[sl]
    if qp.per_channel:  # not a conv's output: dequantized whole, the channel axis known
        whole = dequantize32(lay.quantized_output, qp).reshape(-1)
        return lambda sl: whole[sl]
    return lambda sl: dequantize32(flat[sl], qp)


def clipped_outputs(case: ConvCase, spec: PathSpec, codes: np.ndarray, y: np.ndarray
                    ) -> np.ndarray:
    """Flat positions of the outputs pinned at a limit of their dtype while the float output
    ``y`` lies beyond it (below the lowest code only without a fused ReLU, whose zeros are its
    own clamp)."""
    qp = spec.output_qparams
    s, zp = float(qp.scale[0]), int(qp.zero_point[0])
    c, yf = codes.reshape(-1), y.reshape(-1)
    clipped = _beyond(c, yf, qp.dtype_max, (qp.dtype_max - zp + 0.5) * s, above=True)
    if case.activation != "relu":
        clipped = np.concatenate(
            [clipped, _beyond(c, yf, qp.dtype_min, (qp.dtype_min - zp - 0.5) * s, above=False)])
    return clipped


def _energy(v: np.ndarray) -> float:
    return chunked_energy(lambda sl: v[sl], v.size)


def dominant_stage(case: ConvCase, spec: PathSpec, codes: np.ndarray, y: np.ndarray,
                   own_energy: float, positive: int, clipped: np.ndarray | None = None
                   ) -> str | None:
    """The stage that adds most of the own error, estimated from the output codes (a layer
    above its floor gets the stage ladder's answer instead). Outputs pinned at a limit of the
    output dtype while the float output lies beyond it are clipped: their error is the
    clipping's; elsewhere output rounding adds step^2 / 12 per output it lets through, and what
    the error has beyond that is the weight's (split between its clipping and its rounding, or
    the module's state when its weight is not the float weight quantized). The input stages
    add nothing: the input is the one received. ``own_energy``: sum((quantized - y)^2);
    ``positive``: how many of ``y`` are above 0; ``clipped``: ``clipped_outputs``, when known
    already."""
    qp = spec.output_qparams
    s = float(qp.scale[0])
    c, yf = codes.reshape(-1), y.reshape(-1)
    if clipped is None:
        clipped = clipped_outputs(case, spec, codes, y)
    e_clipped = dequantize32(c[clipped], qp) - yf[clipped]
    at_limit = _energy(e_clipped)
    rest = max(own_energy - at_limit, 0.0)
    passed = (positive - int(np.count_nonzero(yf[clipped] > 0))
              if case.activation == "relu" else yf.size - clipped.size)
    rounding = min(rest, passed * s * s / 12)
    energy = {"output_clipping": at_limit, "output_rounding": rounding}
    if rest - rounding > max(energy.values()):
        for sid, part in _weight_split(case, spec).items():
            energy[sid] = (rest - rounding) * part
    best = max(energy, key=lambda sid: energy[sid])
    return best if energy[best] > 0 else None


def weight_dominant(case: ConvCase, spec: PathSpec, own_rmse: float) -> str | None:
    """The dominant stage of a conv with a float32 output: its input is the one received and
    its output is not rounded, so what error it has is the weight's (the float32 arithmetic
    adds ~1e-7 relative); None when it is exactly 0."""
    if own_rmse == 0:
        return None
    split = _weight_split(case, spec)
    return max(split, key=lambda sid: split[sid])


def _beyond(codes: np.ndarray, values: np.ndarray, limit: int, threshold: float, above: bool
            ) -> np.ndarray:
    """Positions whose code is ``limit`` and whose value lies beyond ``threshold`` (above or
    below it; only the few codes at the limit are compared)."""
    at = np.flatnonzero(codes == limit)
    v = values[at]
    return at[v > threshold] if above else at[v < threshold]


def _weight_split(case: ConvCase, spec: PathSpec) -> dict[str, float]:
    """The weight's error energy, as fractions: the module's state, or clipping and rounding."""
    assert spec.module is not None
    if not holds_float_weight(case, spec.module):
        return {"module_state": 1.0}
    qp: QParams = spec.weight_qparams
    w = case.weight.astype(np.float64)
    axis = None if qp.axis is None else qp.axis % w.ndim
    lo = dequantize(np.full((1,) * w.ndim, qp.dtype_min), qp) if axis is None else None
    if axis is None:
        hi = dequantize(np.full((1,) * w.ndim, qp.dtype_max), qp)
    else:
        n = w.shape[axis]
        shape = [1] * w.ndim
        shape[axis] = n
        lo = dequantize(np.full(shape, qp.dtype_min), qp)
        hi = dequantize(np.full(shape, qp.dtype_max), qp)
    clipped = np.clip(w, lo, hi)
    clip = float(np.sum((clipped - w) ** 2))
    rounding = float(np.sum((dequantize(spec.weight_codes, qp) - clipped) ** 2))
    total = clip + rounding
    if total == 0:
        return {"weight_rounding": 1.0}
    return {"weight_clipping": clip / total, "weight_rounding": rounding / total}


def torch_check(lay: LayerCapture, engine: str) -> int:
    """Output elements where the emulation of the module on its captured input differs from
    the codes the quantized model computed (a float32 output: from the float32 values its
    kernel wrote, bit for bit)."""
    fp32 = lay.output_float32
    em = _module_emulation(lay, spec_kernel(lay.case, module_spec(lay.case), engine, fp32))
    if fp32:
        assert em.output_float32 is not None
        mine, got = em.output_float32.view(np.int32), lay.quantized_output.view(np.int32)
        return int(np.count_nonzero(mine != got))
    return int(np.count_nonzero(em.output_codes != lay.quantized_output))


def emulated_codes(lay: LayerCapture, engine: str) -> np.ndarray:
    """The output codes ``engine``'s kernel computes for the quantized module on its captured
    input (an eager conv: quantized outputs)."""
    return _module_emulation(lay, spec_kernel(lay.case, module_spec(lay.case), engine)
                             ).output_codes


def _module_emulation(lay: LayerCapture, kernel: Kernel) -> Emulation:
    """The emulation of the quantized module on its captured input by ``kernel`` (a float32
    output where its kernel writes one)."""
    case = lay.case
    spec = module_spec(case)
    fp32 = lay.output_float32
    assert spec.module is not None
    return emulate(kernel,
                   wide_codes(spec.input_codes, spec.input_qparams), spec.input_qparams,
                   spec.module.weight_codes, exec_weight_qparams(spec.weight_qparams), spec.bias,
                   spec.output_qparams, case.geometry, case.activation == "relu", fp32)
