"""The one mapping -> ConvCase rule: every format decodes into one flat mapping, and this
module checks its entries and builds the case, so the rules are the same for all formats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..case import FLOWS, ConvCase, ModuleState, QuantSetup, build_case
from ..errors import CaseError, CaseFileError, QParamsError
from ..quantization.qparams import QParams, dequantize32, from_mapping
from .entries import KNOWN_KEYS, Quantized


def case_from_mapping(mapping: Mapping[str, Any], source: str = "") -> ConvCase:
    """Build a ConvCase from the flat mapping every format decodes to."""
    where = source or "case"
    _check_known_keys(mapping, where)
    quant = _quant_entries(mapping, where)
    inp, weight, float_notes = _float_tensors(mapping, quant, where)
    _check_float_entries(mapping, where)
    setup = _quant_setup(mapping, quant, where)
    engine = _engine_entry(mapping.get("engine"), where)
    notes = (*quant.notes, *float_notes, *_extra_notes(mapping))
    if engine is not None:
        notes = (*notes, f"captured with torch.backends.quantized.engine = {engine!r}: the "
                 "default engine here (--engine names another)")
    try:
        return build_case(
            inp, weight, mapping.get("bias"),
            stride=mapping.get("stride", 1),
            padding=mapping.get("padding", 0),
            dilation=mapping.get("dilation", 1),
            groups=mapping.get("groups", 1),
            setup=setup,
            source=source,
            notes=notes,
            activation=_activation_entry(mapping.get("activation"), where),
            flow=_flow_entry(mapping.get("flow"), where),
            engine=engine,
        )
    except CaseError as exc:
        raise CaseError(f"{where}: {exc}") from None
    except QParamsError as exc:
        raise CaseFileError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class _QuantEntries:
    """The user's quantization entries of a case file, read and reconciled."""

    input_qparams: QParams | None
    weight_qparams: QParams | None
    output_qparams: QParams | None
    #: The input's codes ('qinput'), with their qparams.
    qinput: Quantized | None
    #: The weight's codes ('qweight'), with their qparams.
    qweight: Quantized | None
    #: A quantized conv module's state ('qconv.*').
    module: ModuleState | None
    #: Whether the file held torch's quantized tensors (not integer codes beside qparams).
    used_quantized_dtypes: bool
    #: What was reconciled, for the report's case notes.
    notes: tuple[str, ...]

    def any_given(self) -> bool:
        return any(x is not None for x in (self.input_qparams, self.weight_qparams,
                                           self.output_qparams, self.qinput, self.qweight,
                                           self.module))


def _check_known_keys(mapping: Mapping[str, Any], where: str) -> None:
    unknown = sorted(k for k in mapping if k not in KNOWN_KEYS)
    if any(k.startswith("qconv._packed_params") for k in unknown):
        raise CaseFileError(
            f"{where}: 'qconv' holds a quantized Linear's state_dict (_packed_params): "
            "qconvdiag diagnoses convs; Linear layers are not supported")
    if unknown:
        raise CaseFileError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown[:5])}; known keys are "
            "input, weight, bias, stride, padding, dilation, groups, input_qparams, "
            "weight_qparams, output_qparams, qinput, qweight, qconv.*, activation, flow, notes, "
            "provenance (README 'Case files')"
        )


def _quant_entries(mapping: Mapping[str, Any], where: str) -> _QuantEntries:
    """The quantization entries; a tensor's own qparams win over the separate entry's."""
    try:
        in_qp = _qparams_entry(mapping, "input_qparams")
        w_qp = _qparams_entry(mapping, "weight_qparams")
        out_qp = _qparams_entry(mapping, "output_qparams")
        qinput = _codes_entry(mapping, "qinput", in_qp, where)
        qweight = _codes_entry(mapping, "qweight", w_qp, where)
        module = _module_entry(mapping, where)
    except QParamsError as exc:
        raise CaseFileError(f"{where}: {exc}") from None
    notes: list[str] = []
    if qinput is not None:
        if in_qp is not None and in_qp.source != "tensor" and _differs(in_qp, qinput.qparams):
            notes.append("input_qparams differ from qinput's own; qinput's were used")
        in_qp = qinput.qparams.with_source("user")
    if qweight is not None:
        if w_qp is not None and _differs(w_qp, qweight.qparams):
            notes.append("weight_qparams differ from qweight's own; qweight's were used")
        w_qp = qweight.qparams.with_source("user")
    if module is None and qweight is not None:
        notes.append(FUNCTIONAL_NOTE)
    used_qdtypes = (
        any(q is not None and q.qparams.source == "tensor" for q in (qinput, qweight))
        or (module is not None and isinstance(mapping.get("qconv.weight"), Quantized))
    )
    return _QuantEntries(in_qp, w_qp, out_qp, qinput, qweight, module, used_qdtypes,
                         tuple(notes))


def _float_tensors(
    mapping: Mapping[str, Any], quant: _QuantEntries, where: str
) -> tuple[Any, Any, list[str]]:
    """The float input and weight, dequantized from their codes when the file has none."""
    notes: list[str] = []
    inp = mapping.get("input")
    weight = mapping.get("weight")
    if inp is None and quant.qinput is not None:
        inp = dequantize32(quant.qinput.codes, quant.qinput.qparams)
        notes.append("no float 'input': it is the dequantized qinput")
    if weight is None and quant.qweight is not None:
        weight = dequantize32(quant.qweight.codes, quant.qweight.qparams)
        notes.append("no float 'weight': it is the dequantized qweight")
    if weight is None and quant.module is not None:
        weight = dequantize32(quant.module.weight_codes, quant.module.weight_qparams)
        notes.append("no float 'weight': it is the dequantized qconv.weight")
    missing = [k for k, v in (("input", inp), ("weight", weight)) if v is None]
    if missing:
        raise CaseFileError(
            f"{where}: missing {' and '.join(repr(m) for m in missing)}; a case needs at least "
            "'input' and 'weight' tensors (or 'qinput'/'qweight')"
        )
    return inp, weight, notes


def _check_float_entries(mapping: Mapping[str, Any], where: str) -> None:
    """'input', 'weight' and 'bias', when given, are plain (not quantized) tensors."""
    for key in ("input", "weight", "bias"):
        if isinstance(mapping.get(key), Quantized):
            raise CaseFileError(
                f"{where}: '{key}' is a quantized tensor; store it as 'q{key}' (or the float "
                f"tensor as '{key}')"
            )
        if key in mapping and not isinstance(mapping[key], np.ndarray) and mapping[key] is not None:
            raise CaseFileError(
                f"{where}: '{key}' must be a tensor, got {type(mapping[key]).__name__}"
            )


def _quant_setup(
    mapping: Mapping[str, Any], quant: _QuantEntries, where: str
) -> QuantSetup | None:
    """The user's setup, with the provenance capture() recorded; None when there is none."""
    if not quant.any_given():
        return None
    prov = mapping.get("provenance") or {}
    if not isinstance(prov, Mapping):
        raise CaseFileError(f"{where}: 'provenance' must be a dict")
    apis = tuple(str(a) for a in prov.get("apis", ()) if isinstance(a, str))
    return QuantSetup(
        input_qparams=quant.input_qparams,
        weight_qparams=quant.weight_qparams,
        output_qparams=quant.output_qparams,
        input_codes=None if quant.qinput is None else quant.qinput.codes,
        weight_codes=None if quant.qweight is None else quant.qweight.codes,
        module=quant.module,
        used_quantized_dtypes=bool(prov.get("used_quantized_dtypes", quant.used_quantized_dtypes)),
        apis=apis,
    )


#: A case of a quantized conv called without a module (the functional API: its quantized
#: weight given, no module): the fixes' ``qm`` is the module it does not have.
FUNCTIONAL_NOTE = ("no quantized module (a functional conv call): in the fixes, "
                   "qm.set_weight_bias(qw, conv.bias) means pass qw as the call's weight, and "
                   "qm.scale, qm.zero_point its scale= and zero_point=")


def _extra_notes(mapping: Mapping[str, Any]) -> list[str]:
    """The notes the file itself carries (a list; anything else is ignored)."""
    extra = mapping.get("notes") or []
    return [str(n) for n in extra] if isinstance(extra, list) else []


def _activation_entry(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CaseFileError(f"{where}: 'activation' must be a string ('relu'), got "
                            f"{type(value).__name__}")
    return value


def _flow_entry(value: Any, where: str) -> str:
    """``flow``: ``eager`` (the default) or ``pt2e`` (a conv of torchao's PT2E flow: engine
    x86_inductor)."""
    if value is None or value == "":
        return "eager"
    if not isinstance(value, str) or value not in FLOWS:
        raise CaseFileError(f"{where}: 'flow' must be one of {', '.join(FLOWS)}, got "
                            f"{str(value)[:40]!r}")
    return value


def _engine_entry(value: Any, where: str) -> str | None:
    """``engine``: the quantized engine the case was captured on (x86, fbgemm, onednn or
    qnnpack), or none."""
    from ..arithmetic.engines import ENGINES

    if value is None or value == "":
        return None
    if not isinstance(value, str) or value not in ENGINES:
        raise CaseFileError(f"{where}: 'engine' must be one of {', '.join(ENGINES)}, got "
                            f"{str(value)[:40]!r}")
    return value


def _differs(a: QParams, b: QParams) -> bool:
    return (a.scale, a.zero_point, a.dtype) != (b.scale, b.zero_point, b.dtype)


def _qparams_entry(mapping: Mapping[str, Any], key: str) -> QParams | None:
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(value, Mapping):
        clean = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in value.items()}
        return from_mapping(clean, key)
    raise QParamsError(
        f"{key} must be a dict with 'scale', 'zero_point', 'dtype', got {type(value).__name__}"
    )


def _codes_entry(
    mapping: Mapping[str, Any], key: str, qp: QParams | None, where: str
) -> Quantized | None:
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(value, Quantized):
        return value
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise CaseFileError(
            f"{where}: '{key}' must be a quantized tensor or an integer array of codes"
        )
    if qp is None:
        owner = "input_qparams" if key == "qinput" else "weight_qparams"
        raise CaseFileError(f"{where}: '{key}' holds integer codes but '{owner}' is missing")
    codes = value.astype(np.int64)
    if codes.size and (codes.min() < qp.dtype_min or codes.max() > qp.dtype_max):
        raise CaseFileError(f"{where}: '{key}' holds codes outside the {qp.dtype} range")
    return Quantized(codes, qp)


def _module_entry(mapping: Mapping[str, Any], where: str) -> ModuleState | None:
    keys = [k for k in mapping if k.startswith("qconv.")]
    if not keys:
        return None
    w = mapping.get("qconv.weight")
    if w is None:
        raise CaseFileError(f"{where}: qconv.* given without 'qconv.weight': save the "
                            "quantized conv's state_dict, {'qconv': qm.state_dict()}")
    if not isinstance(w, Quantized):
        qp = _qparams_entry(mapping, "qconv.weight_qparams")
        w = _codes_entry(mapping, "qconv.weight", qp, where)
        assert w is not None
    bias = mapping.get("qconv.bias")
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype.kind != "f":
            raise CaseFileError(
                f"{where}: 'qconv.bias' must be a float tensor: torch's quantized conv takes "
                "a float bias and quantizes it itself (a quantized one, qint32, is read as "
                "other numbers); set it with qm.set_weight_bias(qm.weight(), conv.bias)")
        if not np.isfinite(bias).all():
            raise CaseFileError(f"{where}: 'qconv.bias' holds NaN/Inf")
        bias = bias.astype(np.float32)
    scale = _scalar(mapping.get("qconv.scale", 1.0), "qconv.scale", where)
    zp = _scalar(mapping.get("qconv.zero_point", 0), "qconv.zero_point", where)
    out_qp = from_mapping(
        {"scale": scale, "zero_point": zp, "dtype": "quint8"}, "qconv.scale/zero_point", "module"
    )
    return ModuleState(w.codes, w.qparams.with_source("module"), bias, out_qp)


def _scalar(value: Any, name: str, where: str) -> float:
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise CaseFileError(f"{where}: '{name}' must hold one number")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CaseFileError(f"{where}: '{name}' must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise CaseFileError(f"{where}: '{name}' is too large for a float") from None
