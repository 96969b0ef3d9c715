"""The quantized paths to compare with the float reference.

* ``as_given``: the user's setup exactly as torch would execute it: zero points truncated,
  codes clipped to the dtype, the module's defaults (output scale 1.0, zero point 0) when no
  output qparams were set, and, when the case holds a quantized module, that module's actual
  weight, bias and output qparams (``module``), which may differ from what the user intended.
* ``production``: what the forum answer recommends, done for the user: the engine's default
  qconfig observers (or ``--observer``/``--per-channel``), calibrated on the case input (or
  ``--calib`` data), then the qparams ``from_float`` would use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..case import ConvCase, ModuleState
from ..errors import QParamsError, UsageError
from ..torch_calls import capture_warnings, conv_function
from .qparams import (
    QParams,
    compact_codes,
    dequantize32,
    make_qparams,
    per_tensor,
    quantize,
    wide_codes,
)

OBSERVERS = ("histogram", "minmax", "moving_average")


@dataclass(frozen=True, eq=False)
class PathSpec:
    """One quantized path: qparams, integer codes and the bias it intends to use."""

    name: str
    """``as_given`` or ``production``."""
    input_qparams: QParams
    weight_qparams: QParams
    output_qparams: QParams
    input_codes: np.ndarray
    """Integer codes: int32 for 8-bit dtypes with moderate zero points (``compact_codes``),
    else int64; user-given codes as loaded."""
    weight_codes: np.ndarray
    bias: np.ndarray | None
    """The float bias the path intends (the float layer's)."""
    module: ModuleState | None = None
    """as_given only: what the quantized module really holds (module_state stage)."""
    observers: dict[str, str] = field(default_factory=dict)
    """production only: observer class per tensor (input, weight, output)."""
    notes: tuple[str, ...] = ()

    @property
    def final_output_qparams(self) -> QParams:
        """The output qparams torch applies: the module's, when the case holds one."""
        return self.module.output_qparams if self.module else self.output_qparams

    @property
    def run_weight_codes(self) -> np.ndarray:
        """The weight torch runs: the module's, when the case holds one."""
        return self.module.weight_codes if self.module else self.weight_codes

    @property
    def run_weight_qparams(self) -> QParams:
        return self.module.weight_qparams if self.module else self.weight_qparams

    @property
    def run_bias(self) -> np.ndarray | None:
        return self.module.bias if self.module else self.bias


@dataclass(frozen=True)
class ProductionOptions:
    observer: str | None = None
    """Activation observer override: histogram, minmax, moving_average."""
    per_channel: bool | None = None
    """Weight granularity override (None: the engine's default qconfig)."""


def build_as_given(case: ConvCase, production: PathSpec | Callable[[], PathSpec]
                   ) -> PathSpec | None:
    """The user's setup as torch runs it; missing pieces come from the production path
    (``production``: the path, or a function that builds it only when a piece is missing)."""
    s = case.setup
    if s is None:
        return None
    built: list[PathSpec] = []

    def fallback_spec() -> PathSpec:
        if not built:
            built.append(production() if callable(production) else production)
        return built[0]

    notes: list[str] = []
    in_qp = s.input_qparams
    if in_qp is None:
        in_qp = fallback_spec().input_qparams
        notes.append("no input qparams given: the production observer's are used")
    w_qp = s.weight_qparams
    w_codes = s.weight_codes
    if w_qp is None and s.module is not None:
        if holds_float_weight(case, s.module):
            w_qp, w_codes = s.module.weight_qparams, s.module.weight_codes
            moved = moved_codes(case, s.module)
            if moved is None and requantized(case, s.module):
                notes.append(REQUANTIZED_NOTE)
            if moved is not None:  # the weight meant: this float weight, at the module's qparams
                w_codes = compact_codes(moved, w_qp)
                notes.append("the quantized module's weight codes are one step off the float "
                             "weight's in some weights: the weight meant is the float weight "
                             "quantized with the module's qparams")
        else:
            notes.append("the quantized module's weight is not the float weight quantized: the "
                         "weight meant is the production observer's")
    if w_qp is None:
        w_qp = fallback_spec().weight_qparams
        notes.append("no weight qparams given: the production observer's are used")
    out_qp = s.output_qparams
    if out_qp is None and s.module is not None:
        out_qp = s.module.output_qparams
    if out_qp is None:
        out_qp = per_tensor(1.0, 0, "quint8", "default")
        notes.append("no output scale/zero_point: the quantized module's defaults 1.0 / 0 apply")
    out_qp = conv_output_qparams(out_qp)
    x_codes = (wide_codes(s.input_codes, in_qp) if s.input_codes is not None
               else compact_codes(quantize(case.input, in_qp), in_qp))
    if w_codes is None:
        w_codes = compact_codes(quantize(case.weight, w_qp), w_qp)
    return PathSpec(
        "as_given", in_qp, w_qp, out_qp, x_codes, w_codes, case.bias, s.module, {}, tuple(notes)
    )


def conv_output_qparams(qp: QParams) -> QParams:
    """The output qparams torch's quantized conv really runs with.

    ``torch.ops.quantized.conv2d(qx, packed, scale, zero_point)`` (and a quantized module,
    which holds only ``scale`` and ``zero_point``) takes no output dtype: every engine allocates
    a quint8 output with that scale and zero point (aten/src/ATen/native/quantized/cpu/
    qconv.cpp, ``_empty_affine_quantized(..., kQUInt8, output_scale, output_zero_point)``). So
    qint8 output qparams with zero point 0 give codes 0..255, not -128..127: every negative
    output becomes 0 and positive ones reach 255 * scale. Returns quint8 qparams with the same
    scale and zero point, the dtype as written kept in ``dtype_given`` and a note saying so.
    """
    if qp.dtype == "quint8":
        return qp
    zp = qp.zero_point[0]
    note = (f"the output qparams say {qp.dtype}, but torch's quantized conv takes only the "
            f"scale and zero point and writes quint8: codes clamp(round(y / scale) + {zp}, 0, "
            f"255), i.e. outputs from {-zp * qp.scale[0]:.6g} to {(255 - zp) * qp.scale[0]:.6g}"
            f" instead of {qp.dtype}'s {(qp.dtype_min - zp) * qp.scale[0]:.6g} to "
            f"{(qp.dtype_max - zp) * qp.scale[0]:.6g}; emulated as torch runs it")
    return QParams(qp.scale, qp.zero_point, "quint8", qp.axis, qp.source, qp.zero_point_given,
                   None, None, qp.notes + (note,), qp.dtype)


#: A module's weight is the float weight quantized when at most this fraction of its codes is
#: more than one code away from quantizing the float weight with the module's own qparams.
FOREIGN_CODES = 0.01


def holds_float_weight(case: ConvCase, module: ModuleState) -> bool:
    """Does the quantized module hold the float weight, quantized with its own qparams (well or
    badly)? Not when it holds another weight, or a freshly built module's weight: scale 1.0
    and zero point 0 where the float weight's own symmetric scale (max|w| / 127.5) is below
    0.25, a scale no observer would pick, unless its codes show the float weight was packed
    at that scale by hand (``set_weight_bias``: some of them nonzero, or all zero with the
    float model's nonzero bias beside them; a fresh module's bias is zeros)."""
    qp = module.weight_qparams
    w = case.weight
    top = float(np.abs(w).max()) if w.size else 0.0
    try:
        expected = quantize(w, qp)
    except QParamsError:
        return True  # qparams that do not fit the weight: the weight rules say so
    off = np.abs(expected.astype(np.int64) - module.weight_codes.astype(np.int64)) > 1
    held = float(off.mean()) <= FOREIGN_CODES
    if not qp.per_channel and qp.scale[0] == 1.0 and qp.zero_point[0] == 0 and top / 127.5 < 0.25:
        return held and (bool(np.any(module.weight_codes)) or _float_bias_packed(case, module))
    return held or requantized(case, module)


REQUANTIZED_NOTE = ("the quantized module's weight is the float weight quantized twice: by "
                    "a default observer, then, dequantized, again at the module's qparams "
                    "(quantize_per_tensor/per_channel of qm.weight().dequantize()): quantize "
                    "the float weight itself")


#: The share of a module's codes that quantizing the float weight twice must give for
#: ``requantized`` to take them for that: all but the last bit of a scale's ties.
REQUANTIZED_CODES = 0.999


def requantized(case: ConvCase, module: ModuleState) -> bool:
    """The module holds the float weight quantized twice: by a default weight observer
    (symmetric, max|w| / 127.5 per output channel or per tensor, in float32 as torch's
    observers compute it), then, dequantized (``qm.weight().dequantize()``), again at the
    module's own qparams (a scale written after convert). Its codes are then one step off the
    float weight's at those qparams in many weights (rounded twice), or more where the first
    step was the coarser: not a weight that moved after convert, nor another weight."""
    w = np.asarray(case.weight, dtype=np.float32)
    if w.size == 0 or module.weight_codes.shape != w.shape:
        return False
    try:
        if np.array_equal(quantize(w, module.weight_qparams), module.weight_codes):
            return False  # quantized once, at the module's qparams
    except QParamsError:
        return False
    rows = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    eps = np.finfo(np.float32).eps
    for top, axis in ((rows, 0), (np.array([rows.max()]), None)):
        steps = np.maximum(top.astype(np.float32) / np.float32(127.5), eps)
        first = make_qparams([float(v) for v in steps], [0] * len(steps), "qint8", axis,
                             "observer", "default")
        try:
            twice = quantize(dequantize32(quantize(w, first), first), module.weight_qparams)
        except QParamsError:
            return False
        if np.mean(twice == module.weight_codes) >= REQUANTIZED_CODES:
            return True
    return False


def _float_bias_packed(case: ConvCase, module: ModuleState) -> bool:
    """The module holds the float model's bias, which is not all zeros."""
    b, held = case.bias, module.bias
    return (b is not None and held is not None and bool(np.any(b)) and b.shape == held.shape
            and bool(np.allclose(held, b, rtol=1e-6, atol=0.0)))


#: A module holding the float weight quantized with its own qparams holds exactly those codes:
#: torch's quantization and qconvdiag's agree on every one (0 of 11.2M on a ResNet-18 shape's
#: weights, converted on each engine). When at least this share of the codes is one step off
#: (and at least MOVED_MIN of them), the float weight moved after convert (trained on, or
#: another checkpoint loaded): small moves, which ``holds_float_weight`` still takes for it.
MOVED_CODES = 0.01
MOVED_MIN = 2


def moved_codes(case: ConvCase, module: ModuleState) -> np.ndarray | None:
    """The float weight quantized with the module's qparams, when the module's codes are one
    step off those in at least MOVED_CODES of the weights (else None: the module holds them,
    or another weight altogether, ``holds_float_weight``)."""
    try:
        expected = quantize(case.weight, module.weight_qparams)
    except QParamsError:
        return None
    off = int(np.count_nonzero(expected.astype(np.int64) != module.weight_codes.astype(np.int64)))
    if off < max(MOVED_MIN, MOVED_CODES * expected.size) or requantized(case, module):
        return None
    return expected


#: torchao's PT2E engines (arithmetic.engines.PT2E_ENGINES): their production path is the
#: quantizer's default config, not a torch.ao qconfig.
PT2E_PRODUCTION = ("x86_inductor",)


def advises_reduce_range(engine: str) -> bool:
    """Whether ``engine``'s dense convs sum u8*s8 products in saturating int16 pairs on this
    CPU (no VNNI; the probe, arithmetic.engines), which 8-bit activations can saturate. There
    torch and torchao advise 7-bit activations, reduce_range=True (the warning
    ``get_default_qconfig("onednn")`` gives on such a CPU, and the docstring of torchao's
    ``get_default_x86_inductor_quantization_config``), and the production path follows that
    advice. x86's and fbgemm's defaults take 7 bits anyway."""
    from ..arithmetic.accumulate import EXACT, PAIRS_CHANNELS, PAIRS_K
    from ..arithmetic.engines import PT2E_ENGINES, probe, probe_pt2e

    profile = (probe_pt2e() if engine in PT2E_ENGINES else probe()).get(engine)
    return (profile is not None and profile.available
            and profile.accumulation.get("dense", EXACT) in (PAIRS_K, PAIRS_CHANNELS))


def reduces_beyond_default(engine: str) -> bool:
    """The engine's default qconfig keeps 8-bit activations where this CPU needs 7
    (``advises_reduce_range``): oneDNN without VNNI. The fixes then write the reduce_range
    qconfig where they would write the default."""
    return advises_reduce_range(engine) and not default_reduces_range(engine)


def default_reduces_range(engine: str) -> bool:
    """The engine's default qconfig takes 7-bit activations (``reduce_range=True``: x86's and
    fbgemm's, on every CPU); the PT2E quantizer's default config keeps 8 bits."""
    if engine in PT2E_PRODUCTION:
        return False
    from torch.ao.quantization import get_default_qconfig

    with capture_warnings():  # onednn's "may have accuracy issues" without VNNI
        default = get_default_qconfig(engine).activation
    return bool(default.p.keywords.get("reduce_range", False))


def default_activation_observer(engine: str):  # type: ignore[no-untyped-def]
    """The activation observer of the engine's default qconfig (the PT2E quantizer's default
    config), with reduce_range where this CPU needs it (``advises_reduce_range``)."""
    from torch.ao.quantization import get_default_qconfig

    seven = reduces_beyond_default(engine)
    if engine in PT2E_PRODUCTION:
        return _pt2e_observer("input_activation", reduce_range=seven)
    factory = get_default_qconfig(engine).activation
    return (factory.with_args(reduce_range=True) if seven else factory)()


def _pt2e_observer(which: str, reduce_range: bool = False):  # type: ignore[no-untyped-def]
    """An observer of ``X86InductorQuantizer``'s default config (torchao 0.18,
    ``get_default_x86_inductor_quantization_config``), built as ``prepare_pt2e`` builds it
    (``_create_obs_or_fq_from_qspec``): activations uint8 0..255 per-tensor affine with
    torchao's HistogramObserver, weights int8 -128..127 per-channel symmetric on axis 0 with
    its PerChannelMinMaxObserver, both with eps 2**-12 (activations 0..127 with
    ``reduce_range``). ``which``: input_activation, output_activation or weight."""
    from ..torchao_import import require_torchao

    require_torchao("the x86_inductor production path")
    from torchao.quantization.pt2e.prepare import _create_obs_or_fq_from_qspec
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        get_default_x86_inductor_quantization_config,
    )

    spec = getattr(get_default_x86_inductor_quantization_config(reduce_range=reduce_range),
                   which)
    return _create_obs_or_fq_from_qspec(spec, {}, False)


def _activation_observer(engine: str, options: ProductionOptions):  # type: ignore[no-untyped-def]
    import torch
    from torch.ao.quantization.observer import (
        HistogramObserver,
        MinMaxObserver,
        MovingAverageMinMaxObserver,
    )

    from .observers import accelerate

    default = default_activation_observer(engine)
    reduce_range = seven_bits(default)
    if options.observer is None:
        return accelerate(default)
    cls = {
        "histogram": HistogramObserver,
        "minmax": MinMaxObserver,
        "moving_average": MovingAverageMinMaxObserver,
    }.get(options.observer)
    if cls is None:
        raise UsageError(
            f"unknown observer '{options.observer}': use one of {', '.join(OBSERVERS)}"
        )
    return accelerate(
        cls(dtype=torch.quint8, qscheme=torch.per_tensor_affine, reduce_range=reduce_range))


def _weight_observer(engine: str, options: ProductionOptions):  # type: ignore[no-untyped-def]
    import torch
    from torch.ao.quantization import get_default_qconfig
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    default = (_pt2e_observer("weight") if engine in PT2E_PRODUCTION
               else get_default_qconfig(engine).weight())
    if options.per_channel is None:
        return default
    if options.per_channel:
        return PerChannelMinMaxObserver(
            ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric
        )
    return MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)


def seven_bits(obs: Any) -> bool:
    """An activation observer on 128 levels: torch.ao's ``reduce_range``, or torchao's range
    0..127 (its x86_inductor config with ``reduce_range=True`` sets quant_max, not the
    attribute)."""
    return bool(getattr(obs, "reduce_range", False)) or (
        getattr(obs, "quant_min", None) == 0 and getattr(obs, "quant_max", None) == 127)


def _qparams_from_observer(obs, dtype: str, axis: int | None) -> QParams:  # type: ignore[no-untyped-def]
    scale, zp = obs.calculate_qparams()
    scale = scale.reshape(-1).double().tolist()
    zp = zp.reshape(-1).tolist()
    name = f"observer:{type(obs).__name__}"
    seven = dtype == "quint8" and seven_bits(obs)
    notes = ("reduce_range: 7-bit activations",) if seven else ()
    # torchao's range is the PT2E graph's quantize_per_tensor's, which clamps there; torch.ao's
    # reduce_range only narrows the scale (its QuantStub clamps to the dtype's range)
    narrow = seven and not getattr(obs, "reduce_range", False)
    if axis is None:
        return QParams((float(scale[0]),), (int(zp[0]),), dtype, None, name,
                       quant_min=0 if narrow else None, quant_max=127 if narrow else None,
                       notes=notes)
    return QParams(tuple(float(s) for s in scale), tuple(int(z) for z in zp), dtype, axis, name,
                   notes=notes)


def _signature(obs: Any) -> tuple[Any, ...]:
    """What determines an observer's result on given data (engines often share qconfigs)."""
    return tuple(str(getattr(obs, a, None)) for a in (
        "__class__", "dtype", "qscheme", "reduce_range", "quant_min", "quant_max", "bins",
        "ch_axis", "averaging_constant", "eps"))


def build_production(
    case: ConvCase, engine: str, options: ProductionOptions, calib: np.ndarray | None = None,
    cache: dict[Any, Any] | None = None,
) -> PathSpec:
    """Observers calibrated on the case input (or ``calib``), then from_float's qparams.

    ``cache`` (one per diagnosis) reuses observer results across engines whose qconfigs agree
    (x86 and fbgemm entirely, onednn and qnnpack for activations): observers are the costliest
    part of a small case. The output observer sees the float layer's float32 output, as in
    torch's own calibration (computed once per diagnosis and shared through ``cache``).
    """
    cache = {} if cache is None else cache
    with capture_warnings():
        act_in = _activation_observer(engine, options)
        act_out = _activation_observer(engine, options)
        w_obs = _weight_observer(engine, options)
    w_key = ("weight", _signature(w_obs))
    if w_key not in cache:
        cache[w_key] = _observed_weight(case, w_obs)
    w_qp, w_codes = cache[w_key]
    act_key = ("act", _signature(act_in), calib is None)
    if act_key not in cache:
        cache[act_key] = _observed_activations(case, act_in, act_out, calib, cache)
    in_qp, out_qp, x_codes, n_batches = cache[act_key]
    observers = {
        "input": type(act_in).__name__, "weight": type(w_obs).__name__,
        "output": type(act_out).__name__,
    }
    notes = []
    if calib is not None:
        notes.append(f"calibrated on {n_batches} inputs from --calib")
    return PathSpec(
        "production", in_qp, w_qp, out_qp, x_codes, w_codes, case.bias, None, observers,
        tuple(notes),
    )


def _observed_weight(case: ConvCase, w_obs: Any) -> tuple[QParams, np.ndarray]:
    """The weight observer run on the case weight: its qparams and the weight codes."""
    import torch

    with torch.no_grad():
        w_obs(torch.from_numpy(case.weight))
    per_channel_w = w_obs.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
    w_qp = _qparams_from_observer(w_obs, "qint8", 0 if per_channel_w else None)
    return w_qp, compact_codes(quantize(case.weight, w_qp), w_qp)


def _observed_activations(case: ConvCase, act_in: Any, act_out: Any, calib: np.ndarray | None,
                          cache: dict[Any, Any]) -> tuple[QParams, QParams, np.ndarray, int]:
    """The activation observers run on the calibration batches (the case input, or each
    ``calib`` sample) and on the float layer's outputs for them: (input qparams, output
    qparams, input codes, number of batches). The case input's float32 output is kept in
    ``cache`` as ``float32_output``."""
    import torch

    x = torch.from_numpy(case.input)
    batches = [x] if calib is None else [torch.from_numpy(c[None]) for c in calib]
    with torch.no_grad():
        for xb in batches:
            act_in(xb)
        in_qp = _qparams_from_observer(act_in, "quint8", None)
        x_codes = compact_codes(quantize(case.input, in_qp), in_qp)
        for xb in batches:
            if calib is None:
                if "float32_output" not in cache:
                    cache["float32_output"] = float_layer(case, xb)
                act_out(cache["float32_output"])
            else:
                act_out(float_layer(case, xb))
    return in_qp, _qparams_from_observer(act_out, "quint8", None), x_codes, len(batches)


def float_layer(case: ConvCase, x: Any) -> Any:
    """The float layer on a torch input: conv, then its fused activation."""
    import torch

    g = case.geometry
    b = None if case.bias is None else torch.from_numpy(case.bias)
    y = conv_function(case.spatial_dims)(x, torch.from_numpy(case.weight), b, g.stride,
                                         g.padding, g.dilation, g.groups)
    return torch.relu(y) if case.activation == "relu" else y
