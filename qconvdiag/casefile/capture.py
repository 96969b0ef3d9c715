"""Capturing a case from live modules and tensors (``qconvdiag.capture``)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..case import NO_OUTPUT_NOTE, PADDING_MODES, REFLECT_NOTE, ConvCase, reflect_padded
from ..errors import CaseError
from ..torch_calls import capture_warnings
from .entries import Quantized
from .pt_reader import tensor_to_numpy
from .validate import case_from_mapping
from .write import save_case


def capture(
    conv: Any,
    input: Any,
    qconv: Any = None,
    qinput: Any = None,
    *,
    qweight: Any = None,
    output_qparams: Any = None,
    path: str | os.PathLike[str] | None = "qconvdiag_case.pt",
) -> ConvCase:
    """Capture a case from live modules and tensors, and write it to ``path`` (unless None).

    ``conv``: the float ``nn.Conv1d/2d/3d``; ``input``: its float input (or None with
    ``qinput``); ``qconv``: the quantized conv module that disagrees; ``qinput``: the quantized
    tensor you fed it (``qconv`` is run once on its first sample: a module whose kernel computes
    other codes than its state gives is refused, see ``_refuse_stale``). Without a module (the
    functional API, ``torch.ao.nn.quantized.functional.conv2d``): ``qweight``, the quantized
    weight, and ``output_qparams``, the output ``(scale, zero_point)`` the call was given (a
    module holds both itself). Example::

        qconvdiag.capture(m, x, qconv=qm, qinput=qx, path="my_case.pt")
        qconvdiag.capture(m, x, qinput=qx, qweight=qw, output_qparams=(0.0009, 121))
    """
    import torch

    _refuse_other_modules(conv, qconv)
    if qconv is not None and (qweight is not None or output_qparams is not None):
        raise CaseError("capture(): qweight and output_qparams are for a conv without a module "
                        "(the functional API); the quantized module holds its own: pass qconv "
                        "alone")
    if conv.padding_mode not in PADDING_MODES:
        raise CaseError(
            f"padding_mode='{conv.padding_mode}' is not supported by torch's quantized conv "
            "(it takes 'zeros' and 'reflect'): use one of those")
    padding = _explicit_padding(conv)
    mapping: dict[str, Any] = {
        "weight": conv.weight.detach().float().cpu().numpy().copy(),
        "stride": list(conv.stride),
        "padding": list(padding) if not isinstance(padding, int) else padding,
        "dilation": list(conv.dilation),
        "groups": conv.groups,
    }
    if conv.bias is not None:
        mapping["bias"] = conv.bias.detach().float().cpu().numpy().copy()
    if input is not None:
        mapping["input"] = torch.as_tensor(input).detach().cpu().numpy().copy()
    with capture_warnings():
        if qinput is not None:
            mapping["qinput"] = tensor_to_numpy(qinput, "qinput", "capture")
        if qweight is not None:
            if not getattr(qweight, "is_quantized", False):
                raise CaseError("capture(): qweight must be the quantized weight (what "
                                "torch.quantize_per_tensor or quantize_per_channel returned)")
            mapping["qweight"] = tensor_to_numpy(qweight, "qweight", "capture")
        if output_qparams is not None:
            mapping["output_qparams"] = _output_qparams(output_qparams)
        elif qconv is None and (qinput is not None or qweight is not None):
            mapping["notes"] = [NO_OUTPUT_NOTE]
        if qconv is not None:
            mapping.update(_module_entries(conv, qconv))
            if qinput is not None:
                _refuse_stale(qconv, qinput)
    if qconv is not None and "ReLU" in type(qconv).__name__:
        mapping["activation"] = "relu"  # ConvReLU: the float conv's output goes through a ReLU
    from ..arithmetic.engines import ENGINES

    if qconv is not None and torch.backends.quantized.engine in ENGINES:
        # the engine its weight is packed for, as a model bundle records it (explain runs on it)
        mapping["engine"] = torch.backends.quantized.engine
    if conv.padding_mode == "reflect":
        _padded_as_the_quantized_conv_pads(mapping, padding, conv.weight.dim() - 2)
    quantized_tensors = qinput is not None or qweight is not None
    mapping["provenance"] = {
        "used_quantized_dtypes": qconv is not None or quantized_tensors,
        "apis": (["torch.ao.nn.quantized"] if qconv is not None else [])
        + (["torch.quantize_per_tensor"] if quantized_tensors else []),
    }
    case = case_from_mapping(mapping, source="capture")
    if path is not None:
        save_case(case, path)
    return case


def _output_qparams(value: Any) -> dict[str, Any]:
    """``capture``'s output_qparams, a (scale, zero_point) pair or a dict with those keys, as
    a case's entry (quint8: what torch's quantized convs write)."""
    dtype = "quint8"
    if isinstance(value, dict):  # as a case file writes them: its dtype kept (QCD054 reads it)
        dtype = str(value.get("dtype", dtype))
        value = (value.get("scale"), value.get("zero_point"))
    try:
        scale, zero_point = value
        return {"scale": float(scale), "zero_point": float(zero_point), "dtype": dtype}
    except (TypeError, ValueError):
        raise CaseError("capture(): output_qparams must be (scale, zero_point), e.g. "
                        "output_qparams=(0.0009, 121)") from None


def _padded_as_the_quantized_conv_pads(mapping: dict[str, Any], padding: Any, dims: int
                                       ) -> None:
    """A reflect-padded conv's entries as torch's quantized conv runs it: its forward pads the
    input (F.pad, mode 'reflect'), then runs the packed conv with padding 0; a note says so."""
    each = [padding] * dims if isinstance(padding, int) else list(padding)
    if "input" in mapping:
        mapping["input"] = reflect_padded(mapping["input"], each)
    q = mapping.get("qinput")
    if isinstance(q, Quantized):
        mapping["qinput"] = Quantized(reflect_padded(q.codes, each), q.qparams)
    elif q is not None:
        mapping["qinput"] = reflect_padded(q, each)
    mapping["padding"] = 0
    mapping["notes"] = [*mapping.get("notes", []), REFLECT_NOTE]


def _refuse_other_modules(conv: Any, qconv: Any) -> None:
    """Refuse what is not a float conv and its quantized twin, naming what was given: a
    transposed conv, a Linear layer (quantized Linear layers are not diagnosed), a float conv
    given as ``qconv``."""
    import torch
    from torch.ao.nn.quantized.modules.conv import _ConvNd as QuantizedConv

    def kind(m: Any) -> str:
        return f"{type(m).__module__}.{type(m).__name__}"

    if not isinstance(conv, torch.nn.modules.conv._ConvNd):
        raise CaseError(
            f"capture() needs a float nn.Conv1d/Conv2d/Conv3d as 'conv', got {kind(conv)}"
            + (": qconvdiag diagnoses convs; Linear layers are not supported"
               if isinstance(conv, torch.nn.Linear) else ""))
    if getattr(conv, "transposed", False) or getattr(qconv, "transposed", False):
        raise CaseError(
            "capture(): transposed convs (ConvTranspose1d/2d/3d) are not supported: qconvdiag "
            "emulates torch's quantized Conv1d/Conv2d/Conv3d")
    if qconv is not None and not isinstance(qconv, QuantizedConv):
        raise CaseError(
            f"capture() needs the quantized conv as 'qconv' (torch.ao.nn.quantized.Conv2d, "
            f"ConvReLU2d, ... as convert() leaves it), got {kind(qconv)}"
            + (": Linear layers are not supported" if "Linear" in type(qconv).__name__ else
               "; in a model, qconvdiag.capture_model finds each conv's twin"))


def _refuse_stale(qconv: Any, qinput: Any) -> None:
    """Refuse a module whose kernel computes other codes than its state gives: qnnpack keeps
    the weight and the requantization it packed, and its ``qm.weight()`` returns the packed
    weight's source tensor, so ``qm.weight().data = w`` changes the state a case would hold
    but not what runs (measured: the state at its floor, the module at -9.8 dB). Checked on
    the first sample, packed again on each engine torch has (model/stale.py: a module packed
    for another engine than the current one is not stale); a module torch refuses to run is
    left to the diagnosis, which reports the refusal."""
    import torch

    from ..model.stale import stale_requantization
    from ..torch_calls import int_codes

    if not getattr(qinput, "is_quantized", False) or qinput.dim() < 2:
        return
    first = qinput[:1]
    try:
        with torch.no_grad():
            ran = qconv(first)
    except (RuntimeError, TypeError, ValueError):
        return
    if not getattr(ran, "is_quantized", False):
        return
    stale = stale_requantization("qconv", qconv, first, int_codes(ran))
    if stale is not None:
        raise CaseError(
            f"capture: qconv computes other codes than its own state gives ({stale.differ} of "
            f"{stale.total} outputs of the first sample differ from the same module packed "
            "again): on qnnpack a module runs the weight and the scale it packed, so "
            "`qm.weight().data = w` or a scale set after its first run never reach its kernel; "
            "pack it again, qm.set_weight_bias(qm.weight(), qm.bias()), so it runs what it "
            "states, then capture it")


def _explicit_padding(conv: Any) -> Any:
    """The conv's padding as numbers: 'valid' is 0, 'same' half the dilated kernel (refused
    when asymmetric)."""
    padding: Any = conv.padding
    if not isinstance(padding, str):
        return padding
    if padding == "valid":
        return 0
    total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(t % 2 for t in total):
        raise CaseError("padding='same' with an even kernel is asymmetric: pad explicitly")
    return tuple(t // 2 for t in total)


def _module_entries(conv: Any, qconv: Any) -> dict[str, Any]:
    """The quantized module's state as case-file entries (``qconv.weight``, ...), after checking
    that it has the float conv's geometry."""
    out = {}
    try:
        sd = qconv.state_dict()
    except RuntimeError as exc:  # e.g. qnnpack cannot unpack a conv3d's weight
        import torch

        raise CaseError(f"capture(): torch cannot read back the quantized conv's weight on "
                        f"engine {torch.backends.quantized.engine} "
                        f"({str(exc).strip().splitlines()[0]}); quantize and capture it on "
                        "another engine (x86, fbgemm or onednn)") from None
    for key in ("weight", "bias", "scale", "zero_point"):
        v = sd.get(key)
        if v is not None:
            out[f"qconv.{key}"] = tensor_to_numpy(v, f"qconv.{key}", "capture")
    for attr in ("stride", "padding", "dilation", "groups"):
        mine, theirs = getattr(conv, attr), getattr(qconv, attr, None)
        if theirs is not None and attr != "padding" and tuple(np.atleast_1d(mine)) != tuple(
            np.atleast_1d(theirs)
        ):
            raise CaseError(f"conv.{attr}={mine} but qconv.{attr}={theirs}: they are not twins")
    return out
