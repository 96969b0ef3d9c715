"""The stage ladder's plan: each stage's state as data, a list of rungs in data-flow order, from
the float output to what torch really returned (``stages.py`` walks it and measures the
stages).

States (float64 output tensors), for the seed case's single output element:

====================  =====================================================  ==========
state after           computed as                                            seed case
====================  =====================================================  ==========
float                 conv(x, w) + b                                         803.69
input_clipping        conv(clip(x), w) + b                                   803.69
input_rounding        conv(dequant(x_codes), w) + b                          803.75
weight_clipping       conv(dequant(x_codes), clip(w)) + b                    564.43
weight_rounding       acc_exact * in_s * w_s + b                             564.62
bias_quantization     acc_exact * in_s * w_s + bias as the engine adds it    564.62
accumulation          acc_engine * in_s * w_s + bias as the engine adds it   564.62
output_rounding       (rint(requantized) + zp - zp) * out_s, unclamped       565
output_clipping       (clamp(...) - zp) * out_s: the emulated output         255
module_state          the quantized module's own weight/bias/qparams         0
backend_residual      torch's real output                                    0
====================  =====================================================  ==========
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arithmetic.emulate import Emulation
from ..arithmetic.float_conv import ChannelSparse, conv_diff, conv_diff_any
from ..case import ConvCase
from ..quantization.qparams import QParams, dequantize
from .blocks import Block, as_rows, reader
from .metrics import chunked_energy
from .reference import input_steps, qsig, weight_clip_step

STAGE_IDS = (
    "input_clipping",
    "input_rounding",
    "weight_clipping",
    "weight_rounding",
    "bias_quantization",
    "accumulation",
    "output_rounding",
    "output_clipping",
    "module_state",
    "backend_residual",
)
#: The PT2E engines' extra stage (after output clipping): the integer kernel against the eager
#: Q/DQ graph convert_pt2e leaves (an fp32 conv on dequantized values, quantize_per_tensor),
#: i.e. what compiling changes. On those engines the output rounding and clipping stages are
#: the eager graph's; elsewhere this stage is not part of the ladder.
INTEGER_KERNEL = "integer_kernel"
PT2E_STAGE_IDS = (*STAGE_IDS[:STAGE_IDS.index("module_state")], INTEGER_KERNEL,
                  *STAGE_IDS[STAGE_IDS.index("module_state"):])


def stage_ids(pt2e: bool) -> tuple[str, ...]:
    """The ladder's stage ids in data-flow order (``pt2e``: on a PT2E engine)."""
    return PT2E_STAGE_IDS if pt2e else STAGE_IDS


@dataclass(frozen=True, eq=False)
class LadderInputs:
    """What the ladder needs from a path."""

    input_qparams: QParams
    weight_qparams: QParams
    """As the user wrote them (axis included), for the clipping bounds."""
    weight_exec_qparams: QParams
    """As the engine applies them (scales per output channel)."""
    output_qparams: QParams
    input_codes: np.ndarray
    weight_codes: np.ndarray
    bias: np.ndarray | None
    emulation: Emulation
    module_emulation: Emulation | None
    module_output_qparams: QParams | None
    module_reason: str
    torch_codes: np.ndarray | None
    torch_reason: str
    torch_same: bool | None = None
    """Whether torch's codes equal the final emulation's (None: not compared yet)."""
    relu: bool = False
    """A fused ReLU (ConvReLU modules): every state is measured after the activation, against
    relu(float output); the states still chain before it."""
    eager_unclamped: np.ndarray | None = None
    """PT2E engines: the eager Q/DQ graph's output codes before the clamp
    (``torch_ref.run_eager_qdq``); the output stages are then its, and ``integer_kernel``
    follows. None elsewhere."""
    module_weight: tuple[np.ndarray, QParams] | None = None
    """The quantized module's own weight codes and qparams, with ``module_emulation``."""
    module_bias: np.ndarray | None = None
    """The quantized module's own float bias."""


Fill = Callable[[np.ndarray, np.ndarray, Block], Any]
"""Writes one block of a stage's state: fill(out, previous state, block)."""


@dataclass(frozen=True, eq=False)
class Rung:
    """One stage of the ladder's plan."""

    id: str
    fill: Fill | None
    """Writes the stage's state block by block; None (SAME): the state is the previous one."""
    isolated: object
    """The effect alone on the float path: an output-sized array, a ``ChannelSparse``, a
    ``PerChannel`` constant, an ``Elementwise`` function of the reference, or DELTA (the
    effect alone is the stage's own step)."""


@dataclass(frozen=True, eq=False)
class Plan:
    """The ladder as data: its rungs in data-flow order, and why the others do not apply."""

    rungs: tuple[Rung, ...]
    reasons: dict[str, str]
    """Stage id -> why it does not apply."""
    weight_error_rmse: float
    """RMSE of conv(x, dequant(w_codes) - w): the weight's whole quantization error alone."""


def plan_ladder(case: ConvCase, li: LadderInputs, y0: np.ndarray) -> Plan:
    """The rungs of one path, in data-flow order (see the table at the top)."""
    reasons: dict[str, str] = {}
    weight, w_rmse = _weight_rungs(case, li)
    rungs = (_input_rungs(case, li, y0) + weight + _accumulator_rungs(case, li, reasons)
             + _output_rungs(li) + _final_rungs(case, li, reasons))
    return Plan(tuple(rungs), reasons, w_rmse)


def _input_rungs(case: ConvCase, li: LadderInputs, y0: np.ndarray) -> list[Rung]:
    # rounding alone is the rounding of the in-range (clipped) input: the step itself (DELTA)
    iso_clip, step_in, _ = input_steps(case, li.input_qparams, li.input_codes)
    y0r, step_in_r = as_rows(y0), as_rows(step_in)
    if iso_clip is None:
        clipping = Rung("input_clipping", SAME, DELTA)
    else:
        iso_clip_r = as_rows(iso_clip)
        clipping = Rung("input_clipping",
                        lambda out, prev, k: np.add(k.of(y0r), k.of(iso_clip_r), out=out),
                        iso_clip)
    return [clipping, Rung("input_rounding",
                           lambda out, prev, k: np.add(prev, k.of(step_in_r), out=out), DELTA)]


def _weight_rungs(case: ConvCase, li: LadderInputs) -> tuple[list[Rung], float]:
    """Weight clipping and rounding. Everything up to weight rounding depends only on the
    input and weight qparams and codes, not on the engine: with several engines it is
    computed once (memo)."""
    from ..memo import memoized

    em, b = li.emulation, case.bias
    acc_scale = np.asarray(em.acc_scale, dtype=np.float64).reshape(-1)
    iso_wclip, step_w, iso_wround, w_rmse = memoized(
        "ladder_weight", (li.input_codes, li.weight_codes),
        (qsig(li.input_qparams), qsig(li.weight_qparams)), lambda: _weight_side(case, li))
    if step_w is None:
        clipping = Rung("weight_clipping", lambda out, prev, k: np.copyto(out, prev), iso_wclip)
    else:
        step_w_at = reader(step_w)
        clipping = Rung("weight_clipping",
                        lambda out, prev, k: np.add(prev, step_w_at(k), out=out), iso_wclip)
    acc_exact_r = as_rows(em.acc_exact)
    rounding = Rung("weight_rounding",
                    lambda out, prev, k: _scaled(out, k.of(acc_exact_r), k.per_channel(acc_scale),
                                                 None if b is None else k.per_channel(b)),
                    iso_wround)
    return [clipping, rounding], w_rmse


def _weight_side(case: ConvCase, li: LadderInputs
                 ) -> tuple[np.ndarray | ChannelSparse, np.ndarray | ChannelSparse | None,
                            np.ndarray, float]:
    """(clipping alone, the clipping step, rounding alone, the weight's whole error RMSE)."""
    x, w, g = case.input, case.weight, case.geometry
    dw_clip, step_w = weight_clip_step(case, li.input_qparams, li.input_codes,
                                       li.weight_qparams, li.weight_codes)
    # isolated: each effect on the float input; rounding is that of the in-range weight, so
    # clipping + rounding is the weight's whole quantization error
    iso_wclip = conv_diff_any(x, dw_clip, g, compact=True)
    w_round = dequantize(li.weight_codes, li.weight_qparams) - (w + dw_clip)
    iso_wround = conv_diff(x, w_round, g)
    c = iso_wround.reshape(-1)
    if isinstance(iso_wclip, ChannelSparse):
        energy = chunked_energy(lambda sl: c[sl].astype(np.float64), c.size)
        energy += iso_wclip.row_energy_added(as_rows(iso_wround))
    else:
        a = iso_wclip.reshape(-1)
        energy = chunked_energy(lambda sl: np.add(a[sl], c[sl], dtype=np.float64), c.size)
    return iso_wclip, step_w, iso_wround, float(np.sqrt(energy / max(c.size, 1)))


def _accumulator_rungs(case: ConvCase, li: LadderInputs, reasons: dict[str, str]) -> list[Rung]:
    """The bias as the engine adds it, and the engine's accumulator (int16 pairs)."""
    em, b = li.emulation, case.bias
    acc_scale = np.asarray(em.acc_scale, dtype=np.float64).reshape(-1)
    acc_exact_r = as_rows(em.acc_exact)
    rungs = []
    bias_real = None if b is None else np.asarray(em.bias_real, dtype=np.float64).reshape(-1)
    if bias_real is None:
        reasons["bias_quantization"] = "the layer has no bias"
    else:
        bias_shift = bias_real - np.asarray(b, dtype=np.float64).reshape(-1)
        rungs.append(Rung("bias_quantization",
                          lambda out, prev, k: _scaled(out, k.of(acc_exact_r),
                                                       k.per_channel(acc_scale),
                                                       k.per_channel(bias_real)),
                          PerChannel(bias_shift)))
    if li.eager_unclamped is not None:
        reasons["accumulation"] = (
            "the eager Q/DQ graph accumulates in float32 (its rounding shows in "
            "output_rounding); what the integer kernel's accumulation changes (int16 pairs "
            "without VNNI) shows in integer_kernel")
        return rungs
    exact_acc = (em.saturated_pairs == 0 and em.saturated_row_sums == 0
                 and em.acc_exact.dtype == np.int32)  # nothing saturated or wrapped
    acc_r = as_rows(em.acc)
    rungs.append(Rung("accumulation", SAME if exact_acc else lambda out, prev, k: _scaled(
        out, k.of(acc_r), k.per_channel(acc_scale),
        None if bias_real is None else k.per_channel(bias_real)), DELTA))
    return rungs


def _output_rungs(li: LadderInputs) -> list[Rung]:
    """Output rounding and clipping: the engine's (its float32 requantization), or on a PT2E
    engine the eager Q/DQ graph's, then the integer kernel's difference from it."""
    em, out_qp = li.emulation, li.output_qparams
    out_s, out_zp = float(out_qp.scale[0]), int(out_qp.zero_point[0])
    eager = li.eager_unclamped
    unclamped = em.unclamped if eager is None else eager
    unclamped_r = as_rows(unclamped)
    rounding = Rung("output_rounding",
                    lambda out, prev, k: _dequantized(out, k.of(unclamped_r), out_zp, out_s),
                    Elementwise(_rounding_error(out_s)))
    lo, hi = (out_qp.dtype_min - out_zp) * out_s, (out_qp.dtype_max - out_zp) * out_s
    in_range = unclamped.size == 0 or (
        out_qp.dtype_min <= int(unclamped.min()) and int(unclamped.max()) <= out_qp.dtype_max)
    codes = em.output_codes
    if eager is not None:  # the graph's clamp; a fused ReLU's floor at the zero point
        floor = min(max(out_zp, out_qp.dtype_min), out_qp.dtype_max) if li.relu \
            else out_qp.dtype_min
        codes = np.clip(eager, floor, out_qp.dtype_max)
    codes_r = as_rows(codes)
    clipping = Rung("output_clipping", SAME if in_range else lambda out, prev, k: _dequantized(
        out, k.of(codes_r), out_zp, out_s), Elementwise(_clipping_error(lo, hi)))
    if eager is None:
        return [rounding, clipping]
    kernel_r = as_rows(em.output_codes)
    same = bool(np.array_equal(codes, em.output_codes))
    kernel = Rung(INTEGER_KERNEL, SAME if same else lambda out, prev, k: _dequantized(
        out, k.of(kernel_r), out_zp, out_s), DELTA)
    return [rounding, clipping, kernel]


def _module_effect(case: ConvCase, li: LadderInputs) -> object:
    """The module's state alone on the float path, where it holds another weight or bias than
    the path's: conv(x, its weight - the path's, both dequantized) + its bias - the path's.
    In the chain a saturated output hides it (the forum's all-255 outputs with a never-set
    weight: a zero delta). Where it holds the path's weight and bias, its effect is its delta
    (its own output qparams); the budget takes the larger of the two (``isolated_energy``)."""
    if li.module_weight is None:
        return DELTA
    codes, qp = li.module_weight
    dw = dequantize(codes, qp) - dequantize(li.weight_codes, li.weight_qparams)
    n = case.weight.shape[0]
    mine = np.zeros(n) if li.module_bias is None else np.asarray(li.module_bias, np.float64)
    path = np.zeros(n) if li.bias is None else np.asarray(li.bias, np.float64)
    db = mine.reshape(-1) - path.reshape(-1)
    if not dw.any() and not db.any():
        return DELTA
    effect = conv_diff(case.input, dw, case.geometry).astype(np.float64)
    if db.any():
        effect += db.reshape((1, -1) + (1,) * (effect.ndim - 2))
    return effect


def _final_rungs(case: ConvCase, li: LadderInputs, reasons: dict[str, str]) -> list[Rung]:
    """What the quantized module really runs, and torch's own output."""
    em, out_qp = li.emulation, li.output_qparams
    rungs = []
    final_qp = out_qp
    if li.module_emulation is not None and li.module_output_qparams is not None:
        final_qp = li.module_output_qparams
        mem_r = as_rows(li.module_emulation.output_codes)
        ms, mzp = float(final_qp.scale[0]), int(final_qp.zero_point[0])
        rungs.append(Rung("module_state",
                          lambda out, prev, k: _dequantized(out, k.of(mem_r), mzp, ms),
                          _module_effect(case, li)))
    else:
        reasons["module_state"] = li.module_reason
    fs, fzp = float(final_qp.scale[0]), int(final_qp.zero_point[0])
    if li.torch_codes is None:
        reasons["backend_residual"] = li.torch_reason
        return rungs
    codes = li.torch_codes
    final = li.module_emulation if final_qp is not out_qp else em
    same = final is not None and (li.torch_same if li.torch_same is not None
                                  else np.array_equal(codes, final.output_codes))
    torch_r = as_rows(codes)
    rungs.append(Rung("backend_residual", SAME if same else lambda out, prev, k: _dequantized(
        out, k.of(torch_r), fzp, fs), DELTA))
    return rungs


def _rounding_error(s: float) -> Callable[[np.ndarray], np.ndarray]:
    """Output rounding alone: rint(r / s) * s - r (the zero point cancels exactly)."""
    def error(r: np.ndarray) -> np.ndarray:
        t = np.divide(r, s)
        np.rint(t, out=t)
        t *= s
        t -= r
        return t
    return error


def _clipping_error(lo: float, hi: float) -> Callable[[np.ndarray], np.ndarray]:
    """Output clipping alone: clip(r, lo, hi) - r."""
    def error(r: np.ndarray) -> np.ndarray:
        t = np.clip(r, lo, hi)
        t -= r
        return t
    return error


def _scaled(out: np.ndarray, acc: np.ndarray, scale: np.ndarray, bias: np.ndarray | None
            ) -> np.ndarray:
    """out = acc * scale (+ bias), in float64; scale and bias broadcast against ``acc``."""
    np.multiply(acc, scale, out=out)
    if bias is not None:
        out += bias
    return out


def _dequantized(out: np.ndarray, codes: np.ndarray, zp: int, scale: float) -> np.ndarray:
    """out = (codes - zp) * scale, in float64."""
    np.subtract(codes, zp, out=out)
    out *= scale
    return out


@dataclass(frozen=True, eq=False)
class Elementwise:
    """An isolated effect that is a function of the float output alone, element by element
    (evaluated chunk by chunk on the reference)."""

    error: Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True, eq=False)
class PerChannel:
    """An isolated effect that is one constant per output channel (the bias's)."""

    values: np.ndarray


SAME = None
"""In place of a state's fill: the state is the previous one (the stage changes nothing)."""

DELTA = object()
"""Marker: a stage's isolated effect is its own delta."""
