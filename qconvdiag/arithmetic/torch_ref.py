"""Run torch's real quantized conv kernels on given integer codes (for the torch check).

Quantized tensors are built from codes with ``_make_per_tensor_quantized_tensor`` (no rounding
involved), packed fresh for every call (qnnpack caches the output scale at the first forward of
a packed weight), and run under the requested engine. torch's deprecation warnings are caught
here and handed back to the caller, never printed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..case import Geometry
from ..quantization.qparams import QParams
from ..torch_calls import capture_warnings, conv_function
from .engines import PT2E_ENGINES


@dataclass
class TorchRun:
    """Outcome of one torch kernel call."""

    ran: bool
    output_codes: np.ndarray | None = None
    """int32 codes of torch's quantized output."""
    error: str | None = None
    """torch's own message when it refused the setup."""
    warnings: list[str] = field(default_factory=list)
    output_float: np.ndarray | None = None
    """float32: the output of a kernel that writes float32 (``x86_inductor`` with an fp32
    output); ``output_codes`` is then None."""


def quantized_conv(dims: int, relu: bool = False) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(prepack, conv) of torch's quantized ops for 1, 2 or 3 spatial dims:
    ``torch.ops.quantized.conv2d_prepack`` and ``conv2d`` (``conv2d_relu`` with ``relu``)."""
    import torch

    ops = torch.ops.quantized
    prepack = {1: ops.conv1d_prepack, 2: ops.conv2d_prepack, 3: ops.conv3d_prepack}[dims]
    conv = ({1: ops.conv1d_relu, 2: ops.conv2d_relu, 3: ops.conv3d_relu} if relu
            else {1: ops.conv1d, 2: ops.conv2d, 3: ops.conv3d})[dims]
    return prepack, conv


#: torch's quantized engine is one setting for the whole process: a thread that switches it
#: holds this lock until it has put the old one back (two threads switching at once would
#: leave the wrong one behind, and run each other's convs on it).
_ENGINE_LOCK = threading.RLock()


@contextlib.contextmanager
def engine(name: str) -> Iterator[None]:
    import torch

    with _ENGINE_LOCK:
        old = torch.backends.quantized.engine
        torch.backends.quantized.engine = name
        try:
            yield
        finally:
            torch.backends.quantized.engine = old


def quantized_tensor(codes: np.ndarray, qp: QParams):  # type: ignore[no-untyped-def]
    import torch

    dtype = getattr(torch, qp.dtype)
    code_t = torch.from_numpy(np.ascontiguousarray(codes))
    if qp.per_channel:
        storage = {"quint8": torch.uint8, "qint8": torch.int8, "qint32": torch.int32}[qp.dtype]
        return torch._make_per_channel_quantized_tensor(
            code_t.to(storage),
            torch.tensor(qp.scale, dtype=torch.float64),
            torch.tensor(qp.zero_point, dtype=torch.int64),
            int(qp.axis or 0),
        )
    storage = {"quint8": torch.uint8, "qint8": torch.int8, "qint32": torch.int32}[qp.dtype]
    q = torch._make_per_tensor_quantized_tensor(
        code_t.to(storage), float(qp.scale[0]), int(qp.zero_point[0])
    )
    assert q.dtype == dtype
    return q


def run_conv(
    engine_name: str,
    input_codes: np.ndarray,
    input_qp: QParams,
    weight_codes: np.ndarray,
    weight_qp: QParams,
    bias: np.ndarray | None,
    output_scale: float,
    output_zero_point: int,
    geometry: Geometry,
    relu: bool = False,
) -> TorchRun:
    """torch.ops.quantized.conv{1,2,3}d on these codes; refusals come back as ``error``, and so
    do layers torch's kernel would corrupt memory on (``fbgemm_groupwise_overrun``)."""
    import torch

    from .engines import fbgemm_groupwise_overrun

    if engine_name in PT2E_ENGINES:
        return run_inductor_conv(input_codes, input_qp, weight_codes, weight_qp, bias,
                                 output_scale, output_zero_point, geometry, relu)
    dims = weight_codes.ndim - 2
    o, cin_g = weight_codes.shape[0], weight_codes.shape[1]
    hazard = fbgemm_groupwise_overrun(engine_name, weight_qp, geometry.groups, cin_g,
                                      o // geometry.groups, geometry, weight_codes.shape[2:])
    if hazard is not None:
        return TorchRun(False, None, hazard)
    with capture_warnings() as caught, engine(engine_name):
        try:
            qx = quantized_tensor(input_codes, input_qp)
            qw = quantized_tensor(weight_codes, weight_qp)
            b = None if bias is None else torch.from_numpy(np.asarray(bias, dtype=np.float32))
            prepack, conv = quantized_conv(dims, relu)
            packed = prepack(
                qw, b, list(geometry.stride), list(geometry.padding), list(geometry.dilation),
                geometry.groups,
            )
            out = conv(qx, packed, float(output_scale), int(output_zero_point))
            codes = out.int_repr().numpy().astype(np.int32)
            result = TorchRun(True, codes)
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            result = TorchRun(False, None, msg[:300])
    result.warnings = list(caught)
    return result


def run_inductor_conv(
    input_codes: np.ndarray,
    input_qp: QParams,
    weight_codes: np.ndarray,
    weight_qp: QParams,
    bias: np.ndarray | None,
    output_scale: float,
    output_zero_point: int,
    geometry: Geometry,
    relu: bool = False,
    float_output: bool = False,
) -> TorchRun:
    """The ``x86_inductor`` engine: ``torch.ops.onednn.qconv_prepack`` then
    ``qconv_pointwise``, as inductor calls them (uint8 activations and int8 weights as plain
    tensors, the float32 weight scales, a float32 bias, ``attr`` "relu" for a fused ReLU;
    ``float_output``: fp32 output, which takes output scale 1.0 and zero point 0)."""
    import torch

    with capture_warnings() as caught:
        try:
            if input_qp.dtype != "quint8" or weight_qp.dtype != "qint8":
                raise ValueError(f"x86_inductor takes uint8 activations and int8 weights, got "
                                 f"{input_qp.dtype} and {weight_qp.dtype}")
            qx = torch.from_numpy(np.ascontiguousarray(input_codes)).to(torch.uint8)
            qw = torch.from_numpy(np.ascontiguousarray(weight_codes)).to(torch.int8)
            w_scale = torch.tensor(weight_qp.scale, dtype=torch.float32)
            w_zp = torch.tensor(weight_qp.zero_point, dtype=torch.int64)
            x_scale, x_zp = float(input_qp.scale[0]), int(input_qp.zero_point[0])
            g = geometry
            args = (list(g.stride), list(g.padding), list(g.dilation), g.groups)
            packed = torch.ops.onednn.qconv_prepack(qw, w_scale, x_scale, x_zp, *args,
                                                    list(qx.shape))
            b = None if bias is None else torch.from_numpy(np.asarray(bias, dtype=np.float32))
            out = torch.ops.onednn.qconv_pointwise(
                qx, x_scale, x_zp, packed, w_scale, w_zp, b, *args,
                1.0 if float_output else float(output_scale),
                0 if float_output else int(output_zero_point),
                torch.float32 if float_output else torch.uint8,
                "relu" if relu else "none", [], "")
            out = out.contiguous()
            if float_output:
                result = TorchRun(True, None, output_float=out.numpy().copy())
            else:
                result = TorchRun(True, out.numpy().astype(np.int32))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            msg = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            result = TorchRun(False, None, msg[:300])
    result.warnings = list(caught)
    return result


def run_eager_qdq(
    input_codes: np.ndarray,
    input_qp: QParams,
    weight_codes: np.ndarray,
    weight_qp: QParams,
    bias: np.ndarray | None,
    output_qp: QParams,
    geometry: Geometry,
) -> np.ndarray | None:
    """The eager Q/DQ graph ``convert_pt2e`` leaves, on these codes (what the GraphModule
    computes without compiling): ``quantized_decomposed.dequantize_per_tensor`` of the uint8
    input, ``dequantize_per_channel`` (or ``_per_tensor``) of the int8 weight, an fp32 conv
    with the float32 bias, then ``quantize_per_tensor``'s rounding,
    ``round(y * (1 / out_s)) + out_zp``, not clamped (int64 codes; a fused ReLU and the uint8
    range clamp after, as in the graph). None when torch refuses it."""
    import torch
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)

    if input_qp.dtype != "quint8" or weight_qp.dtype != "qint8":
        return None  # the kernel refuses these too (run_inductor_conv)
    qd = torch.ops.quantized_decomposed
    with capture_warnings():
        try:
            x = qd.dequantize_per_tensor(
                torch.from_numpy(np.ascontiguousarray(input_codes)).to(torch.uint8),
                float(input_qp.scale[0]), int(input_qp.zero_point[0]), 0, 255, torch.uint8)
            w_int = torch.from_numpy(np.ascontiguousarray(weight_codes)).to(torch.int8)
            if weight_qp.per_channel:
                w = qd.dequantize_per_channel(
                    w_int, torch.tensor(weight_qp.scale, dtype=torch.float32),
                    torch.tensor(weight_qp.zero_point, dtype=torch.int64),
                    int(weight_qp.axis or 0), -128, 127, torch.int8)
            else:
                w = qd.dequantize_per_tensor(w_int, float(weight_qp.scale[0]),
                                             int(weight_qp.zero_point[0]), -128, 127,
                                             torch.int8)
            b = None if bias is None else torch.from_numpy(np.asarray(bias, dtype=np.float32))
            g = geometry
            with torch.no_grad():
                y = conv_function(len(g.stride))(x, w, b, list(g.stride), list(g.padding),
                                                 list(g.dilation), g.groups)
            codes = qd.quantize_per_tensor(y, float(output_qp.scale[0]),
                                           int(output_qp.zero_point[0]), -(2**31), 2**31 - 1,
                                           torch.int32)
        except (RuntimeError, ValueError, TypeError, IndexError, AssertionError):
            return None
    return codes.numpy().astype(np.int64)
