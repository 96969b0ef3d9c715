"""``qconvdiag trace``: the arithmetic of one output element, every number from the emulator
and checked against torch's output for that element.

It also answers the forum's two follow-ups with the user's numbers: what
``torch.ops.quantized.conv2d_prepack`` returns (an opaque packed-params object: the weight
re-laid out for the engine's kernel, with bias and geometry; ``unpack()`` gives copies back),
and how a conv on quantized tensors is computed (integer products of codes minus zero points,
an int32 accumulator, a float requantization to the output's scale and zero point).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .arithmetic.accumulate import EXACT, INT16_MAX, INT16_MIN, pair_list
from .arithmetic.emulate import (
    Emulation,
    Kernel,
    ZeroPoints,
    engine_weight_codes,
    engine_zero_points,
)
from .case import ConvCase
from .diagnosis import Options, diagnose_path
from .errors import UsageError
from .measure.evidence import PathRun, exec_weight_qparams

PREPACK_SENTENCE = (
    "torch.ops.quantized.conv{d}d_prepack returns a packed-params object (a ScriptObject): the "
    "quantized weight re-laid out for the {kernel} kernel, plus the float bias, stride, "
    "padding, dilation and groups. qm.weight() calls unpack() and returns a fresh copy, so "
    "`qm.weight().data = w` changes only that copy; qm.set_weight_bias(w, b) repacks."
)


@dataclass(frozen=True)
class Trace:
    position: tuple[int, ...]
    path: str
    engine: str
    kernel: str
    accumulation: str
    input_zero_point: int
    weight_zero_point: int
    terms: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    saturated_pairs: int
    accumulator_exact: int
    accumulator: int
    bias_float: float | None
    bias_int32: int | None
    bias_in_accumulator_units: float | None
    multiplier: float
    pre_round: float
    rounded: int
    output_zero_point: int
    unclamped: int
    output_int: int
    output_scale: float
    dequantized: float
    float_reference: float
    torch_output_int: int | None
    torch_agrees: bool | None
    packed_params: dict[str, Any] = field(default_factory=dict)
    module_note: str | None = None
    input_code_sum: dict[str, Any] | None = None
    """fbgemm's depthwise kernel: the window's input codes summed in saturating int16 for the
    weight zero point's correction (``sum``, ``saturated``, ``value`` kept); else None."""

    def to_dict(self) -> dict[str, Any]:
        from .report import _jsonable

        return _jsonable({k: getattr(self, k) for k in self.__dataclass_fields__})


def trace(case: ConvCase, position: tuple[int, ...] | None, path: str = "as_given",
          engine: str | None = None, options: Options | None = None) -> Trace:
    opts = options or Options(engine=engine)
    run = diagnose_path(case, path, opts)  # that path alone, not the whole diagnosis
    if run.emulation is None or run.ladder is None or run.report.refused:
        raise UsageError(f"the {path} path cannot run on {run.report.engine}: "
                         f"{run.report.refused}")
    out_shape = run.ladder.float_output.shape
    if position is None:
        # Default: the element with the largest error of the intended setup's emulation,
        # against the float output after the fused ReLU (what the quantized conv gives too)
        out_qp = run.spec.output_qparams
        emulated = (run.emulation.output_codes - out_qp.zero_point[0]) * out_qp.scale[0]
        err = np.abs(emulated - _float_output(case, run))
        position = tuple(int(i) for i in np.unravel_index(int(np.argmax(err)), out_shape))
    if len(position) != len(out_shape) or any(
            not 0 <= p < s for p, s in zip(position, out_shape)):
        raise UsageError(f"--at {','.join(map(str, position))} is outside the output "
                         f"{tuple(out_shape)}: give N,C,{'spatial,' * (len(out_shape) - 2)}"[:-1])
    return _trace_run(case, run, position)


def _trace_run(case: ConvCase, run: PathRun, pos: tuple[int, ...]) -> Trace:
    spec, em, kernel = run.spec, run.emulation, run.kernel
    assert em is not None and run.ladder is not None
    o = pos[1]
    x_zp = int(spec.input_qparams.zero_point[0])
    w_qp = spec.weight_qparams
    w_zp = int(w_qp.zero_point[o] if w_qp.per_channel else w_qp.zero_point[0])
    zps = engine_zero_points(kernel, x_zp, np.array([w_zp]), int(spec.output_qparams.zero_point[0]))
    terms = _terms(case, run, pos, zps)
    exact = sum(t["product"] for t in terms)
    assert exact == int(em.acc_exact[pos]), "trace and emulation disagree on the accumulator"
    pairs, input_code_sum, correction = _int16_sums(case, kernel, zps, terms, o)
    acc = exact + correction
    acc = (acc - (-(2**31))) % 2**32 - 2**31
    assert acc == int(em.acc[pos]), "trace and emulation disagree on the int16 sums"
    out_qp = spec.output_qparams
    out_zp = int(out_qp.zero_point[0])
    unclamped = int(em.unclamped[pos])
    codes = int(em.output_codes[pos])
    torch_code, agrees = _torch_code(case, run, pos, codes)
    bias_f, bias_int, bias_units = _bias(case, em, o)
    return Trace(
        position=pos, path=spec.name, engine=run.report.engine, kernel=kernel.kernel,
        accumulation=kernel.accumulation, input_zero_point=x_zp, weight_zero_point=w_zp,
        terms=[{k: v for k, v in t.items() if k != "t"} for t in terms], pairs=pairs,
        saturated_pairs=sum(1 for p in pairs if p["saturated"]),
        accumulator_exact=exact, accumulator=acc, bias_float=bias_f, bias_int32=bias_int,
        bias_in_accumulator_units=bias_units, multiplier=float(em.multiplier[o]),
        pre_round=float(em.pre_round[pos]), rounded=unclamped - zps.output,
        output_zero_point=out_zp, unclamped=unclamped, output_int=codes,
        output_scale=float(out_qp.scale[0]),
        dequantized=float((codes - out_zp) * out_qp.scale[0]),
        float_reference=float(_float_output(case, run)[pos]), torch_output_int=torch_code,
        torch_agrees=agrees, packed_params=packed_params(case, run),
        module_note=_module_note(run, pos), input_code_sum=input_code_sum,
    )


def _float_output(case: ConvCase, run: PathRun) -> np.ndarray:
    """The float output the quantized conv approximates: after the fused ReLU, if any."""
    assert run.ladder is not None
    y = run.ladder.float_output
    return np.maximum(y, 0.0) if case.activation == "relu" else y


def _terms(case: ConvCase, run: PathRun, pos: tuple[int, ...], zps: ZeroPoints
           ) -> list[dict[str, Any]]:
    """Every product of the output element's receptive field: (tap, channel) in K order."""
    spec, g = run.spec, case.geometry
    n, o, out_sp = pos[0], pos[1], pos[2:]
    cin_g = case.weight.shape[1]
    grp = o // (case.weight.shape[0] // g.groups)
    w_codes = engine_weight_codes(run.kernel, spec.weight_codes, spec.weight_qparams)
    x_zp, w_zp = zps.input, int(zps.weight[0])
    terms: list[dict[str, Any]] = []
    for t_i, tap in enumerate(itertools.product(*(range(k) for k in case.weight.shape[2:]))):
        for c in range(cin_g):
            ch = grp * cin_g + c
            idx = [out_sp[d] * g.stride[d] - g.padding[d] + tap[d] * g.dilation[d]
                   for d in range(len(tap))]
            inside = all(0 <= i < s for i, s in zip(idx, case.input.shape[2:]))
            if inside:
                x_code = int(spec.input_codes[(n, ch, *idx)])
                x_val = float(case.input[(n, ch, *idx)])
            else:
                x_code, x_val = zps.pad_code, 0.0
            w_code = int(w_codes[(o, c, *tap)])
            terms.append({
                "k": len(terms), "tap": list(tap), "channel": ch,
                "input_index": [n, ch, *idx] if inside else None,
                "x": x_val, "x_code": x_code, "w": float(case.weight[(o, c, *tap)]),
                "w_code": w_code, "product": (x_code - x_zp) * (w_code - w_zp),
                "raw_product": x_code * w_code, "t": t_i,
            })
    return terms


def _int16_sums(case: ConvCase, kernel: Kernel, zps: ZeroPoints, terms: list[dict[str, Any]],
                o: int) -> tuple[list[dict[str, Any]], dict[str, Any] | None, int]:
    """(the int16 pair sums, fbgemm's depthwise input-code sum or None, what both add to the
    exact accumulator)."""
    cin_g = case.weight.shape[1]
    grp = o // (case.weight.shape[0] // case.geometry.groups)
    taps = int(np.prod(case.weight.shape[2:]))
    pairs = []
    correction = 0
    by_tc = {(t["t"], t["channel"] - grp * cin_g): t for t in terms}
    if kernel.accumulation not in (EXACT, "unknown"):
        for members in pair_list(kernel.accumulation, cin_g, taps):
            ts = [by_tc[m] for m in members]
            raw = sum((zps.pair_pad_code if t["input_index"] is None else t["x_code"])
                      * t["w_code"] for t in ts)
            sat = int(np.clip(raw, INT16_MIN, INT16_MAX))
            correction += sat - raw
            pairs.append({"k": [t["k"] for t in ts], "sum": raw, "saturated": sat != raw,
                          "value": sat})
    input_code_sum = None
    w_zp = int(zps.weight[0])
    if kernel.row_sums_int16 and w_zp != 0:
        # fbgemm's depthwise kernel sums the window's codes in saturating int16
        total = sum(zps.pair_pad_code if t["input_index"] is None else t["x_code"]
                    for t in terms)
        kept = min(total, INT16_MAX)
        correction += w_zp * (total - kept)
        input_code_sum = {"sum": total, "saturated": kept != total, "value": kept}
    return pairs, input_code_sum, correction


def _torch_code(case: ConvCase, run: PathRun, pos: tuple[int, ...], codes: int
                ) -> tuple[int | None, bool | None]:
    """torch's output code for the intended setup at ``pos``, and whether it is ``codes``."""
    intended = run.torch_codes if run.spec.module is None else _torch_intended(case, run)
    if intended is None:
        return None, None
    torch_code = int(intended[pos])
    return torch_code, torch_code == codes


def _bias(case: ConvCase, em: Emulation, o: int
          ) -> tuple[float | None, int | None, float | None]:
    """(the float bias, qnnpack's int32 bias, the bias in accumulator steps) of channel o."""
    bias_f = None if case.bias is None else float(case.bias[o])
    bias_int = None if em.bias_int32 is None else int(em.bias_int32[o])
    bias_units = None
    if bias_f is not None:
        bias_units = float(em.bias_real[o] / em.acc_scale[o]) if em.bias_real is not None else None
    return bias_f, bias_int, bias_units


def _module_note(run: PathRun, pos: tuple[int, ...]) -> str | None:
    """What the quantized module really ran at ``pos``, when it differs from the setup."""
    spec, kernel = run.spec, run.kernel
    if spec.module is None or run.module_emulation is None:
        return None
    mcode = int(run.module_emulation.output_codes[pos])
    mqp = spec.module.output_qparams
    on = ("" if run.report.kernel == kernel.kernel else
          f" on kernel {run.report.kernel} (this setup: {kernel.kernel})")
    return (f"the quantized module really ran its own weight/bias/qparams{on}: "
            f"output code {mcode} = "
            f"{(mcode - mqp.zero_point[0]) * mqp.scale[0]:.6g}"
            + ("" if run.torch_codes is None else
               f"; torch returned code {int(run.torch_codes[pos])}"))


def _torch_intended(case: ConvCase, run: PathRun) -> np.ndarray | None:
    """torch's output for the intended setup (the path's own weight, not the module's)."""
    from .arithmetic.torch_ref import run_conv

    spec = run.spec
    r = run_conv(run.report.engine, spec.input_codes, spec.input_qparams, spec.weight_codes,
                 exec_weight_qparams(spec.weight_qparams), spec.bias,
                 spec.output_qparams.scale[0], spec.output_qparams.zero_point[0], case.geometry)
    return r.output_codes if r.ran else None


def packed_params(case: ConvCase, run: PathRun) -> dict[str, Any]:
    """What conv{d}d_prepack holds for this path's weight, unpacked again."""
    import torch

    from .arithmetic.torch_ref import engine, quantized_conv, quantized_tensor
    from .torch_calls import capture_warnings

    spec = run.spec
    dims = case.spatial_dims
    prepack, _ = quantized_conv(dims)
    g = case.geometry
    info: dict[str, Any] = {
        "returns": PREPACK_SENTENCE.format(d=dims, kernel=run.kernel.kernel),
    }
    from .arithmetic.engines import PT2E_ENGINES

    if run.report.engine in PT2E_ENGINES:
        return {"returns": (f"{run.report.engine} packs the int8 weight with "
                            "torch.ops.onednn.qconv_prepack (given the weight scales, the "
                            "input scale and zero point): an opaque oneDNN tensor, not "
                            "unpacked here; qconv_pointwise takes the scales and the float32 "
                            "bias at every call"), "opaque": True}
    with capture_warnings(), engine(run.report.engine):
        try:
            qw = quantized_tensor(spec.weight_codes, spec.weight_qparams)
            b = None if spec.bias is None else torch.from_numpy(spec.bias)
            packed = prepack(qw, b, list(g.stride), list(g.padding), list(g.dilation), g.groups)
            w, bias = packed.unpack()
            codes = w.int_repr().numpy().reshape(case.weight.shape)
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                scales = w.q_per_channel_scales().tolist()
                zps = w.q_per_channel_zero_points().tolist()
            else:
                scales, zps = [float(w.q_scale())], [int(w.q_zero_point())]
            info.update({
                "weight_int": codes.reshape(codes.shape[0], -1)[:, :16].tolist(),
                "weight_int_matches": bool(np.array_equal(codes, spec.weight_codes)),
                "scales": scales[:16], "zero_points": zps[:16],
                "bias": None if bias is None else bias.tolist()[:16],
                "stride": list(g.stride), "padding": list(g.padding),
                "dilation": list(g.dilation), "groups": g.groups,
            })
        except (RuntimeError, ValueError) as exc:
            info["error"] = str(exc).splitlines()[0][:200]
    return info
