"""The stage ladder: one effect at a time, in data-flow order, from the float output to what
torch really returned. Each stage's ``delta`` is the difference of two consecutive states, so
the deltas add up (telescope) exactly to the total error.

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

from dataclasses import dataclass

import numpy as np

from .case import ConvCase, Geometry
from .emulate import Emulation
from .metrics import Metrics, energy_shares, error_metrics
from .qparams import QParams, clip_bounds, dequantize

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


@dataclass(frozen=True)
class StageResult:
    """One rung of the ladder."""

    id: str
    applies: bool
    reason: str | None
    """Why the stage does not apply (None when it does)."""
    delta: Metrics | None
    """What this stage adds on the ladder (state after minus state before)."""
    cumulative: Metrics | None
    """Error of the state after this stage vs the float output."""
    isolated: Metrics | None
    """Error of this effect alone, applied to the float path."""
    share: float | None
    """This stage's share of the error energy all stages add (shares add up to 1)."""


@dataclass(frozen=True, eq=False)
class Ladder:
    stages: tuple[StageResult, ...]
    float_output: np.ndarray
    """float64 reference output."""
    states: dict[str, np.ndarray]
    """Cumulative output after each applicable stage (float64)."""
    deltas: dict[str, np.ndarray]
    final: np.ndarray
    """The quantized output the ladder ends at (torch's when it ran, else the emulation)."""
    total: Metrics
    output_scale: float


def conv64(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: Geometry) -> np.ndarray:
    """The float reference: conv in float64."""
    return _conv(x, w, b, g, np.float64)


def conv_diff(x: np.ndarray, w: np.ndarray, g: Geometry) -> np.ndarray:
    """conv of a (usually small or sparse) difference tensor, in float32, returned as float64.

    Stage states are built as ``previous state + conv_diff(change)``: linearity makes that the
    same conv, and float32 (oneDNN) is several times faster than float64. The float32 rounding
    (~1e-7 relative to the change) lands in the next exact state's delta, so deltas still add
    up exactly to the total. An all-zero change costs nothing and adds exactly 0.
    """
    if not np.any(x) or not np.any(w):
        from .case import output_shape

        return np.zeros(output_shape(x.shape, w.shape, g), dtype=np.float64)
    return _conv(x, w, None, g, np.float32).astype(np.float64)


def _conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: Geometry, dtype: type
          ) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    dims = w.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    with torch.no_grad():
        out = conv(
            torch.from_numpy(np.ascontiguousarray(x, dtype=dtype)),
            torch.from_numpy(np.ascontiguousarray(w, dtype=dtype)),
            None if b is None else torch.from_numpy(np.asarray(b, dtype=dtype)),
            g.stride, g.padding, g.dilation, g.groups,
        )
    return out.numpy()


def _bias_add(y: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if b is None:
        return y
    return y + np.asarray(b, dtype=np.float64).reshape((1, -1) + (1,) * (y.ndim - 2))


def _clip_tensor(t: np.ndarray, qp: QParams, axis: int | None) -> np.ndarray:
    lo, hi = clip_bounds(qp)
    if axis is None or lo.size == 1:
        return np.clip(t.astype(np.float64), float(lo.reshape(-1)[0]), float(hi.reshape(-1)[0]))
    shape = [1] * t.ndim
    shape[axis] = -1
    return np.clip(t.astype(np.float64), lo.reshape(shape), hi.reshape(shape))


def _round_only(t: np.ndarray, qp: QParams, axis: int | None) -> np.ndarray:
    """Rounding without clipping: rint(x / scale) * scale (per channel where per-channel)."""
    s = qp.scales()
    if axis is not None and s.size > 1:
        shape = [1] * t.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    else:
        s = float(s.reshape(-1)[0])
    return np.rint(t.astype(np.float64) / s) * s


def _requant_float(y: np.ndarray, out_qp: QParams, clip: bool) -> np.ndarray:
    s, zp = float(out_qp.scale[0]), int(out_qp.zero_point[0])
    q = np.rint(y / s) + zp
    if clip:
        q = np.clip(q, out_qp.dtype_min, out_qp.dtype_max)
    return (q - zp) * s


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


def run_ladder(case: ConvCase, li: LadderInputs, y0: np.ndarray | None = None) -> Ladder:
    """The ladder for one path; ``y0`` is the float reference when already computed."""
    g = case.geometry
    x, w, b = case.input, case.weight, case.bias
    if y0 is None:
        y0 = conv64(x, w, b, g)
    w_axis = None if li.weight_qparams.axis is None else li.weight_qparams.axis % w.ndim
    x_deq = dequantize(li.input_codes, li.input_qparams)
    x_clip = _clip_tensor(x, li.input_qparams, None)
    w_clip = _clip_tensor(w, li.weight_qparams, w_axis)
    em = li.emulation
    out_qp = li.output_qparams
    out_s, out_zp = float(out_qp.scale[0]), int(out_qp.zero_point[0])
    acc_scale = em.acc_scale.reshape((1, -1) + (1,) * (y0.ndim - 2))
    bias_real = em.bias_real

    states: dict[str, np.ndarray] = {}
    isolated: dict[str, np.ndarray] = {}
    reasons: dict[str, str] = {}
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    dx_clip = x_clip - x64
    dw_clip = w_clip - w64
    x_round = _round_only(x, li.input_qparams, None)
    isolated["input_clipping"] = conv_diff(dx_clip, w, g)
    states["input_clipping"] = y0 + isolated["input_clipping"]
    step_in = conv_diff(x_deq - x_clip, w, g)
    states["input_rounding"] = states["input_clipping"] + step_in
    if not dx_clip.any() and np.array_equal(x_round, x_deq):
        isolated["input_rounding"] = step_in  # nothing clipped: rounding alone is this step
    else:
        isolated["input_rounding"] = conv_diff(x_round - x64, w, g)
    isolated["weight_clipping"] = conv_diff(x, dw_clip, g)
    states["weight_clipping"] = states["input_rounding"] + conv_diff(x_deq, dw_clip, g)
    states["weight_rounding"] = _bias_add(em.acc_exact * acc_scale, b)
    isolated["weight_rounding"] = conv_diff(
        x, _round_only(w, li.weight_qparams, w_axis) - w64, g)
    if b is None:
        reasons["bias_quantization"] = "the layer has no bias"
    else:
        states["bias_quantization"] = _bias_add(em.acc_exact * acc_scale, bias_real)
        isolated["bias_quantization"] = np.broadcast_to(
            _bias_add(np.zeros_like(y0), bias_real) - _bias_add(np.zeros_like(y0), b), y0.shape
        ).copy()
    states["accumulation"] = _bias_add(em.acc * acc_scale, bias_real if b is not None else None)
    states["output_rounding"] = (em.unclamped - out_zp).astype(np.float64) * out_s
    isolated["output_rounding"] = _requant_float(y0, out_qp, clip=False) - y0
    states["output_clipping"] = (em.output_codes - out_zp).astype(np.float64) * out_s
    isolated["output_clipping"] = (
        np.clip(y0, (out_qp.dtype_min - out_zp) * out_s, (out_qp.dtype_max - out_zp) * out_s) - y0
    )
    final_qp = out_qp
    if li.module_emulation is not None and li.module_output_qparams is not None:
        final_qp = li.module_output_qparams
        ms, mzp = float(final_qp.scale[0]), int(final_qp.zero_point[0])
        states["module_state"] = (li.module_emulation.output_codes - mzp).astype(np.float64) * ms
    else:
        reasons["module_state"] = li.module_reason
    fs, fzp = float(final_qp.scale[0]), int(final_qp.zero_point[0])
    if li.torch_codes is not None:
        states["backend_residual"] = (li.torch_codes - fzp).astype(np.float64) * fs
    else:
        reasons["backend_residual"] = li.torch_reason

    order = [s for s in STAGE_IDS if s in states]
    final = states[order[-1]]
    total_err = final - y0
    deltas: dict[str, np.ndarray] = {}
    prev = y0
    for sid in order:
        deltas[sid] = states[sid] - prev
        prev = states[sid]
    if "accumulation" in deltas:
        isolated["accumulation"] = deltas["accumulation"]
    for sid in ("module_state", "backend_residual"):
        if sid in deltas:
            isolated[sid] = deltas[sid]
    shares = energy_shares(deltas)
    rr = float(np.dot(y0.reshape(-1), y0.reshape(-1)))
    results = []
    cumulative_prev: Metrics | None = None
    for sid in STAGE_IDS:
        if sid not in states:
            results.append(StageResult(sid, False, reasons.get(sid, "does not apply"),
                                       None, None, None, None))
            continue
        lsb = fs if sid in ("module_state", "backend_residual") else out_s
        delta = error_metrics(deltas[sid], y0, lsb, rr)
        if delta.max_abs == 0 and cumulative_prev is not None and lsb == out_s:
            cumulative = cumulative_prev  # nothing changed: same state, same error
        else:
            cumulative = error_metrics(states[sid] - y0, y0, lsb, rr)
        if sid in isolated and isolated[sid] is deltas[sid]:
            iso: Metrics | None = delta
        elif sid in isolated:
            iso = error_metrics(isolated[sid], y0, lsb, rr)
        else:
            iso = None
        cumulative_prev = cumulative
        results.append(StageResult(sid, True, None, delta, cumulative, iso, shares[sid]))
    return Ladder(tuple(results), y0, states, deltas, final,
                  error_metrics(total_err, y0, fs, rr), fs)
