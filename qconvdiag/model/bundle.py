"""A model bundle: every quantized conv of a model, captured by ``capture_model``, in one file of
the case formats (``.pt``, ``.npz``, ``.safetensors``), read as safely as a case file.

Layout: the key ``qconvdiag_bundle`` holds the bundle's facts (version, engine, notes, and per
layer its name, fused activation, the BatchNorm folded in); every layer ``i`` holds a case under
the prefix ``layer{i}.`` (the keys of a case file) plus what the model walk compares:
``float_input`` (the float model's input at that conv), ``float_output`` (the float model's
output there: after the folded BatchNorm and the fused activation) and ``quantized_output`` with
``quantized_output_qparams`` (the quantized module's output codes in the quantized model; for a
layer whose facts say ``"output": "float32"``, the float32 values its kernel wrote, and the
qparams the kernel took, scale 1.0 and zero point 0).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..case import MODEL_INPUT_NOTE, ConvCase, FoldedBatchNorm
from ..errors import CaseFileError
from ..measure.budget import SAMPLE_RANGE
from ..quantization.qparams import CODE_DTYPES, QParams, from_mapping
from .after import LostAfter
from .batchnorm import KeptBatchNorm
from .compiled import CompiledWith
from .ops import OpRange
from .refold import SharedFold
from .reuse import ReusedActivation
from .stale import StaleRequantization

BUNDLE_VERSION = 1
FLOAT32_NOTE = ("its output stays float32 (its consumer takes float, e.g. a residual add "
                "inductor fuses into the conv): judged on the x86_inductor kernel's float32 "
                "output (no output rounding or clipping); the fused add is not modelled")
EXTRA_KEYS = ("float_input", "float_output", "quantized_output", "quantized_output_qparams")


@dataclass(frozen=True)
class WriterChain:
    """The conv whose output a conv reads, and the modules between (its BatchNorm, activation
    modules), in the float model's first forward; recorded for a conv whose input has
    constant channels that 8-bit rounding moves (constant.py: QCD074)."""

    conv: str
    path: tuple[str, ...]
    sole: bool
    """No op but those modules, this conv and the writer's other such readers reads the
    writer's output or theirs."""
    readers: tuple[str, ...] = ()
    """The convs that read this conv's own output, through modules alone: where a loss it
    causes shows."""

    def to_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "path": list(self.path), "sole": self.sole,
                "readers": list(self.readers)}

    @staticmethod
    def from_mapping(value: Any, where: str) -> WriterChain:
        """The record, or a one-line refusal."""
        from .names import is_path

        def path_like(v: Any) -> bool:
            return isinstance(v, str) and bool(v) and is_path(v)

        if (not isinstance(value, dict) or not path_like(value.get("conv"))
                or not isinstance(value.get("path"), list)
                or not all(path_like(v) for v in value["path"])
                or not isinstance(value.get("sole"), bool)
                or not isinstance(value.get("readers", []), list)
                or not all(path_like(v) for v in value.get("readers", []))):
            raise CaseFileError(f"{where}: 'writer' must hold a conv's path, a list of module "
                                "paths, whether they read alone and the convs reading it; "
                                "capture the model again")
        return WriterChain(value["conv"], tuple(value["path"]), value["sole"],
                           tuple(value.get("readers", [])))


def _check_writers(layers: Sequence[LayerCapture], source: str) -> None:
    """Each 'writer' names another conv of the bundle, and its readers convs of the bundle;
    an 'unfused_relu' follows one conv only, and is none of them."""
    names = {lay.name for lay in layers}
    relus = [lay.unfused_relu for lay in layers if lay.unfused_relu is not None]
    if len(set(relus)) != len(relus) or set(relus) & names:
        raise CaseFileError(f"{source}: each 'unfused_relu' must name a module after one conv "
                            "only; capture the model again")
    for lay in layers:
        w = lay.writer
        if w is not None and (w.conv == lay.name or w.conv not in names
                              or not set(w.readers) <= names):
            raise CaseFileError(f"{source}: {lay.name}'s 'writer' must name another conv of "
                                "the bundle, and its readers convs of it; capture the model "
                                "again")


def _module_path(value: Any, where: str, key: str) -> str | None:
    """A module path (None where absent), or a one-line refusal."""
    from .names import is_path

    if value is None:
        return None
    if not isinstance(value, str) or not value or not is_path(value):
        raise CaseFileError(f"{where}: '{key}' must be a module path; capture the model again")
    return value


@dataclass(frozen=True, eq=False)
class LayerCapture:
    """One quantized conv of a model, as the model walk needs it."""

    name: str
    """The module's path in the model (``features.3.conv``)."""
    case: ConvCase
    """The conv fed the quantized input it really received: input = that input dequantized,
    weight and bias the float model's there (BatchNorm folded as the quantized model folded
    it), setup = that quantized input and the quantized module's state."""
    float_input: np.ndarray
    """The float model's input at this conv (same samples)."""
    float_output: np.ndarray
    """The float model's output at this point: conv, folded BatchNorm, fused activation."""
    quantized_output: np.ndarray
    """The quantized module's output codes in the quantized model (as a capture keeps them: in
    their 8-bit dtype); float32 values when ``output_float32``."""
    quantized_output_qparams: QParams
    bn_folded: str | None = None
    """The BatchNorm module folded into this conv (its name), if any."""
    notes: tuple[str, ...] = ()
    calibration_range: tuple[float, float] | None = None
    """The float model's output range at this conv over the calibration batches given to
    ``capture_model`` (None: none given)."""
    output_float32: bool = False
    """The conv's kernel writes float32, not codes (a PT2E conv whose consumer takes float, e.g.
    a residual add: x86_inductor's fp32 output): ``quantized_output`` holds those values and
    ``quantized_output_qparams`` is scale 1.0, zero point 0, as the kernel takes them."""
    shared_range: tuple[float, float] | None = None
    """Its output qparams are shared with other convs' (an FX cat's inputs: one observer for
    all of them, ``shared.py``): the float model's range over all of them, which they serve."""
    bn_kept: KeptBatchNorm | None = None
    """The BatchNorm that reads its output and stays in the quantized model, not fused into
    it (an eager model's: batchnorm.py)."""
    writer: WriterChain | None = None
    """The conv that writes its input, where that input has constant channels that rounding
    moves (constant.py)."""
    unfused_relu: str | None = None
    """The ReLU module the float model calls on its own output, alone there, where an eager
    model's quantized conv fused none (relu.py: QCD075)."""


#: The flows a quantized model comes from (``ModelBundle.flow``).
FLOWS = ("eager", "fx", "pt2e")


@dataclass(frozen=True, eq=False)
class ModelBundle:
    layers: tuple[LayerCapture, ...]
    """In model order (the order the quantized model runs them)."""
    engine: str
    """torch's quantized engine when the model was captured (the kernels that ran it)."""
    source: str = ""
    notes: tuple[str, ...] = ()
    compiled: CompiledWith | None = None
    """How ``torch.compile`` compiled the model given to ``capture_model`` (None: it was not
    a compiled module)."""
    reused: tuple[ReusedActivation, ...] = ()
    """Activation modules the float model calls after several convs (reuse.py)."""
    cpu_flags: tuple[str, ...] | None = None
    """The capture CPU's flags that change the kernels' arithmetic (``cpu.ISA_FLAGS``), for
    QCD067; None in a PT2E model's bundle, and in one written before they were recorded."""
    ops: tuple[OpRange, ...] = ()
    """The quantized ops with their own output qparams an eager model runs (ops.py)."""
    stale: tuple[StaleRequantization, ...] = ()
    """Convs qnnpack ran with a requantization kept from before their qparams changed
    (stale.py)."""
    lost_after: LostAfter | None = None
    """The model's output lost after its last conv (after.py); None where it is not, or not
    compared (a PT2E model, an output that is not one tensor)."""
    flow: str = "eager"
    """The flow that quantized the model: ``eager`` (prepare/convert), ``fx`` (convert_fx's
    GraphModule) or ``pt2e`` (convert_pt2e's): the fixes that quantize it again are its
    flow's."""
    bn_training: tuple[str, ...] = ()
    """A PT2E graph's BatchNorms that run in training mode (pt2e_capture.training_batchnorms),
    by module path."""
    shared_folds: tuple[SharedFold, ...] = ()
    """A PT2E graph's convs whose BatchNorm prepare_pt2e folded while the float model reads
    their output elsewhere too (refold.py)."""

    def layer(self, name: str) -> LayerCapture:
        for lay in self.layers:
            if lay.name == name:
                return lay
        raise CaseFileError(f"no conv named {name!r} in this bundle; its convs are: "
                            + ", ".join(lay.name for lay in self.layers))


#: Calibration batches whose float output range spans this many times the captured samples'
#: (0 included), or more, at every conv are unlike the inputs diagnosed (another scale or
#: preprocessing: a PT2E user's batches were x255): each conv's output step is judged on the
#: samples' range, as without calibration batches (a floor of 2.4 dB, from the batches'
#: range, called broken convs healthy). At every conv: one dull image among varied batches
#: reaches 13x at some convs, not at all.
UNLIKE_RANGE = SAMPLE_RANGE


def with_model_range(case: ConvCase, float_output: np.ndarray,
                     calibration_range: tuple[float, float] | None = None,
                     unlike: bool = False,
                     shared_range: tuple[float, float] | None = None) -> ConvCase:
    """The case with the float model's output range at this conv (``ConvCase.output_range``):
    over the captured samples and the calibration batches; from the samples alone (no
    batches, or batches ``unlike`` the samples: ``calibration_unlike``), it is marked as
    sampled; widened to ``shared_range`` where its output qparams serve other convs' outputs
    too (``LayerCapture.shared_range``); and the float model's own output there
    (``ConvCase.model_output``)."""
    lo, hi = sample_range(case, float_output)
    used = None if unlike else calibration_range
    if used is not None:
        lo, hi = min(lo, used[0]), max(hi, used[1])
    if shared_range is not None:
        lo, hi = min(lo, shared_range[0]), max(hi, shared_range[1])
    return dataclasses.replace(case, output_range=(lo, hi), output_range_sampled=used is None,
                               calibration_range=calibration_range, model_output=float_output)


def sample_range(case: ConvCase, float_output: np.ndarray) -> tuple[float, float]:
    """The float model's output range at a conv on the captured samples: after its fused
    ReLU, the range the module's output qparams serve (a float model may not apply it)."""
    lo, hi = ((float(float_output.min()), float(float_output.max())) if float_output.size
              else (0.0, 0.0))
    if case.activation == "relu":
        lo, hi = max(lo, 0.0), max(hi, 0.0)
    return lo, hi


def span_ratio(calibration: tuple[float, float], samples: tuple[float, float]) -> float:
    """The calibration batches' range over the samples' (each with 0 included; inf where the
    samples are all 0)."""
    span = max(samples[1], 0.0) - min(samples[0], 0.0)
    wide = max(calibration[1], 0.0) - min(calibration[0], 0.0)
    return wide / span if span > 0 else math.inf


def calibration_ratios(layers: Sequence[LayerCapture]) -> dict[str, float]:
    """Per conv that has both, the calibration batches' range over the captured samples'
    (``span_ratio``; convs whose samples are all 0 left out)."""
    ratios = {lay.name: span_ratio(lay.calibration_range,
                                   sample_range(lay.case, lay.float_output))
              for lay in layers if lay.calibration_range is not None}
    return {name: r for name, r in ratios.items() if math.isfinite(r)}


def calibration_unlike(layers: Sequence[LayerCapture]) -> bool:
    """The calibration batches reach UNLIKE_RANGE times the captured samples' range or more at
    every conv that has both (``calibration_ratios``, at least one)."""
    ratios = calibration_ratios(layers)
    return bool(ratios) and min(ratios.values()) >= UNLIKE_RANGE


def judged_ranges(layers: Sequence[LayerCapture]) -> tuple[LayerCapture, ...]:
    """``layers`` with each conv's output range judged on the samples alone where the
    calibration batches are unlike them (``calibration_unlike``), else as captured."""
    if not calibration_unlike(layers):
        return tuple(layers)
    return tuple(dataclasses.replace(lay, case=with_model_range(
        lay.case, lay.float_output, lay.calibration_range, unlike=True,
        shared_range=lay.shared_range)) for lay in layers)


def _range_entry(value: Any, where: str, key: str = "calibration_range"
                 ) -> tuple[float, float] | None:
    if value is None:
        return None
    try:
        pair = [float(v) for v in value] if isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value) else None
    except OverflowError:  # an integer beyond float's range
        pair = None
    if pair is None or len(pair) != 2 or not all(math.isfinite(v) for v in pair) \
            or pair[0] > pair[1]:
        raise CaseFileError(f"{where}: {key} must be [low, high], finite numbers")
    return pair[0], pair[1]


def _float_array(extra: dict[str, Any], what: str, shape: tuple[int, ...], where: str
                 ) -> np.ndarray:
    """A layer's ``float_input`` or ``float_output`` (``what``): finite float32 values of the
    conv's input or output shape."""
    a = np.asarray(extra[f"float_{what}"], dtype=np.float32)
    if a.shape != tuple(shape) or not np.isfinite(a).all():
        raise CaseFileError(f"{where}: float_{what} must be finite with the conv's {what} "
                            f"shape {tuple(shape)}; capture the model again")
    return a


def _folded_stats(value: Any, name: Any, channels: int, where: str) -> FoldedBatchNorm:
    """A layer's ``bn_folded_stats``: the folded BatchNorm's eps and running variance (one
    per output channel, finite, at least 0: a BatchNorm may have eps 0)."""
    from .names import is_path

    try:
        eps, var = value["eps"], value["running_var"]
        if not isinstance(var, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in (eps, *var)):
            raise TypeError
        stats = FoldedBatchNorm(str(name), float(eps), tuple(float(v) for v in var))
    except (KeyError, TypeError, ValueError, OverflowError):
        stats = None
    if stats is None or not is_path(name) or not name or len(stats.running_var) != channels \
            or not (math.isfinite(stats.eps) and stats.eps >= 0) \
            or not all(math.isfinite(v) and v >= 0 for v in stats.running_var):
        raise CaseFileError(f"{where}: 'bn_folded_stats' is malformed; capture the model again")
    return stats


def _output_codes(q_out: np.ndarray, qp: QParams, where: str) -> np.ndarray:
    """A layer's output codes, in their 8-bit dtype as a capture keeps them (checked first:
    a cast would wrap a code outside the dtype's range around)."""
    if q_out.dtype.kind not in "iu" or (q_out.size and (
            int(q_out.min()) < qp.dtype_min or int(q_out.max()) > qp.dtype_max)):
        raise CaseFileError(f"{where}: quantized_output must hold integer codes within the "
                            f"{qp.dtype} range; capture the model again")
    return q_out.astype(CODE_DTYPES[qp.dtype], copy=False)


def bundle_to_mapping(bundle: ModelBundle) -> dict[str, Any]:
    from ..io import BUNDLE_KEY, case_to_mapping

    # "output" is written for a float32 output only: a bundle of codes reads as before
    meta = {"version": BUNDLE_VERSION, "engine": bundle.engine, "notes": list(bundle.notes),
            "layers": [{"name": lay.name, "bn_folded": lay.bn_folded, "notes": list(lay.notes),
                        "calibration_range": (None if lay.calibration_range is None
                                              else list(lay.calibration_range)),
                        **({"output": "float32"} if lay.output_float32 else {}),
                        **({"shared_range": list(lay.shared_range)}
                           if lay.shared_range is not None else {}),
                        **({"bn_kept": lay.bn_kept.to_dict()} if lay.bn_kept else {}),
                        **({"writer": lay.writer.to_dict()} if lay.writer else {}),
                        **({"unfused_relu": lay.unfused_relu} if lay.unfused_relu else {}),
                        **({"bn_folded_stats": {"eps": lay.case.folded_bn.eps,
                                                "running_var": list(
                                                    lay.case.folded_bn.running_var)}}
                           if lay.case.folded_bn is not None else {})}
                       for lay in bundle.layers]}
    if bundle.compiled is not None:
        meta["compiled"] = bundle.compiled.to_dict()
    if bundle.reused:
        meta["reused"] = [r.to_dict() for r in bundle.reused]
    if bundle.cpu_flags is not None:
        meta["cpu_flags"] = list(bundle.cpu_flags)
    if bundle.ops:
        meta["ops"] = [op.to_dict() for op in bundle.ops]
    if bundle.stale:
        meta["stale"] = [s.to_dict() for s in bundle.stale]
    if bundle.lost_after is not None:
        meta["lost_after"] = bundle.lost_after.to_dict()
    if bundle.flow == "fx":  # the engine tells a PT2E bundle; an eager one reads as before
        meta["flow"] = bundle.flow
    if bundle.bn_training:
        meta["bn_training"] = list(bundle.bn_training)
    if bundle.shared_folds:
        meta["shared_folds"] = [f.to_dict() for f in bundle.shared_folds]
    out: dict[str, Any] = {BUNDLE_KEY: meta}
    for i, lay in enumerate(bundle.layers):
        case = case_to_mapping(lay.case)
        case.pop("input", None)  # the dequantized qinput: read back from the codes
        qp = lay.quantized_output_qparams
        case.update({
            "float_input": np.ascontiguousarray(lay.float_input, dtype=np.float32),
            "float_output": np.ascontiguousarray(lay.float_output, dtype=np.float32),
            "quantized_output": (np.ascontiguousarray(lay.quantized_output, dtype=np.float32)
                                 if lay.output_float32
                                 else lay.quantized_output.astype(CODE_DTYPES[qp.dtype])),
            "quantized_output_qparams": qp.to_dict(),
        })
        out.update({f"layer{i}.{k}": v for k, v in case.items()})
    return out


def bundle_from_mapping(mapping: dict[str, Any], source: str) -> ModelBundle:
    from ..io import BUNDLE_KEY, case_from_mapping

    meta = mapping.get(BUNDLE_KEY)
    if not isinstance(meta, dict) or meta.get("version") != BUNDLE_VERSION:
        raise CaseFileError(f"{source}: not a version-{BUNDLE_VERSION} model bundle; capture it "
                            "again with qconvdiag.capture_model")
    layers_meta = meta.get("layers")
    if not isinstance(layers_meta, list) or not layers_meta:
        raise CaseFileError(f"{source}: the bundle lists no layers")
    layers = []
    for i, info in enumerate(layers_meta):
        from .names import is_path

        if not isinstance(info, dict) or not is_path(info.get("name")) or not info["name"]:
            raise CaseFileError(f"{source}: layer {i} has no name (a module path); capture "
                                "the model again")
        prefix = f"layer{i}."
        own = {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}
        extra = {k: own.pop(k, None) for k in EXTRA_KEYS}
        where = f"{source} [{info['name']}]"
        for key in EXTRA_KEYS:
            if extra[key] is None:
                raise CaseFileError(f"{where}: missing '{key}'; capture the model again")
        case = case_from_mapping(own, source=f"{source}:{info['name']}")
        case = dataclasses.replace(case, notes=tuple(
            MODEL_INPUT_NOTE if n.startswith("no float 'input'") else n for n in case.notes))
        out_qp = from_mapping(extra["quantized_output_qparams"],
                              f"{where} quantized_output_qparams")
        q_out = np.asarray(extra["quantized_output"])
        output = info.get("output", "codes")
        if output not in ("codes", "float32"):
            raise CaseFileError(f"{where}: output must be 'codes' or 'float32', got {output!r}")
        as_float = output == "float32"
        if as_float and (q_out.dtype != np.float32 or not np.isfinite(q_out).all()):
            raise CaseFileError(f"{where}: a float32 output must be finite float32 values")
        if q_out.shape != case.output_shape:
            raise CaseFileError(f"{where}: quantized_output has shape {q_out.shape}, the conv's "
                                f"output is {case.output_shape}")
        if info.get("bn_folded_stats") is not None:
            case = dataclasses.replace(case, folded_bn=_folded_stats(
                info["bn_folded_stats"], info.get("bn_folded"), case.weight.shape[0], where))
        cal = _range_entry(info.get("calibration_range"), where)
        shared = _range_entry(info.get("shared_range"), where, "shared_range")
        float_output = _float_array(extra, "output", case.output_shape, where)
        float_input = _float_array(extra, "input", case.input.shape, where)
        layers.append(LayerCapture(
            name=info["name"], case=with_model_range(case, float_output, cal,
                                                     shared_range=shared),
            float_input=float_input,
            float_output=float_output,
            quantized_output=q_out if as_float else _output_codes(q_out, out_qp, where),
            quantized_output_qparams=out_qp,
            bn_folded=info.get("bn_folded") if is_path(info.get("bn_folded")) else None,
            notes=tuple(str(n) for n in info.get("notes") or ()), calibration_range=cal,
            output_float32=as_float, shared_range=shared,
            bn_kept=None if info.get("bn_kept") is None else KeptBatchNorm.from_mapping(
                info["bn_kept"], case.weight.shape[0], where),
            writer=None if info.get("writer") is None else WriterChain.from_mapping(
                info["writer"], where),
            unfused_relu=_module_path(info.get("unfused_relu"), where, "unfused_relu")))
    _check_writers(layers, source)
    compiled, reused = meta.get("compiled"), meta.get("reused") or []
    if not isinstance(reused, list):
        raise CaseFileError(f"{source}: 'reused' must be a list; capture the model again")
    ops, stale = meta.get("ops") or [], meta.get("stale") or []
    if not isinstance(ops, list) or not isinstance(stale, list):
        raise CaseFileError(f"{source}: 'ops' and 'stale' must be lists; capture the model "
                            "again")
    from ..arithmetic.engines import PT2E_ENGINES

    flow = meta.get("flow", "pt2e" if meta.get("engine") in PT2E_ENGINES else "eager")
    if flow not in FLOWS or (flow == "pt2e") != (meta.get("engine") in PT2E_ENGINES):
        raise CaseFileError(f"{source}: 'flow' must be one of {', '.join(FLOWS)}, pt2e with a "
                            "PT2E engine only; capture the model again")
    training = meta.get("bn_training") or []
    from .names import is_path as _is_path

    if not isinstance(training, list) or not all(_is_path(t) and t for t in training):
        raise CaseFileError(f"{source}: 'bn_training' must be a list of module paths; capture "
                            "the model again")
    flags = meta.get("cpu_flags")
    if flags is not None and not (isinstance(flags, list)
                                  and all(isinstance(f, str) for f in flags)):
        raise CaseFileError(f"{source}: 'cpu_flags' must be a list of strings; capture the "
                            "model again")
    return ModelBundle(judged_ranges(layers), str(meta.get("engine", "")), source,
                       tuple(str(n) for n in meta.get("notes") or ()),
                       None if compiled is None else CompiledWith.from_mapping(compiled, source),
                       tuple(ReusedActivation.from_mapping(r, source) for r in reused),
                       None if flags is None else tuple(flags),
                       tuple(OpRange.from_mapping(op, source) for op in ops),
                       tuple(StaleRequantization.from_mapping(s, source) for s in stale),
                       None if meta.get("lost_after") is None
                       else LostAfter.from_mapping(meta["lost_after"], source), flow,
                       tuple(training), _shared_folds(meta.get("shared_folds"), source))


def _shared_folds(value: Any, source: str) -> tuple[SharedFold, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise CaseFileError(f"{source}: 'shared_folds' must be a list; capture the model again")
    return tuple(SharedFold.from_mapping(f, source) for f in value)


def save_bundle(bundle: ModelBundle, path: str | os.PathLike[str]) -> Path:
    """Write the bundle (the format follows the extension, as for a case); atomic."""
    from ..io import FORMATS, encode_case
    from ..writes import atomic_write

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise CaseFileError(f"{p}: unknown extension '{p.suffix}'; use one of {', '.join(FORMATS)}")
    data = encode_case(bundle_to_mapping(bundle), suffix)
    atomic_write(p, data)
    return p


def load_bundle(path: str | os.PathLike[str], max_elements: int | None = None) -> ModelBundle:
    """Read a bundle file as safely as a case file (no tensor, nor a conv's output, over
    ``max_elements``)."""
    loaded = load_case_or_bundle(path, max_elements)
    if not isinstance(loaded, ModelBundle):
        raise CaseFileError(f"{path} is a case file, not a model bundle: load it with "
                            "qconvdiag.load_case")
    return loaded


def load_case_or_bundle(path: str | os.PathLike[str], max_elements: int | None = None
                        ) -> ConvCase | ModelBundle:
    """A case file's case, or a bundle file's bundle (told apart by the bundle's key)."""
    from ..io import BUNDLE_KEY, MAX_ELEMENTS, case_from_mapping, check_size, read_mapping

    limit = MAX_ELEMENTS if max_elements is None else max_elements
    mapping = read_mapping(path, limit)
    if BUNDLE_KEY in mapping:
        bundle = bundle_from_mapping(mapping, str(path))
        for lay in bundle.layers:
            check_size(lay.case, limit)
        return bundle
    case = case_from_mapping(mapping, source=str(path))
    check_size(case, limit)
    return case
