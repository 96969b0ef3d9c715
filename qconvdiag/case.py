"""ConvCase: the float tensors, the conv geometry and (optionally) the user's quantization setup.

Everything is numpy here: no torch import, no quantized dtypes. Validation lives in
``validate``; loaders and generators build cases through ``build_case`` so every case that
reaches the diagnosis has passed the same checks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import CaseError
from .quantization.qparams import QParams, narrowed_weight_range, wide_codes
from .report import CaseSummary

OPS = {1: "conv1d", 2: "conv2d", 3: "conv3d"}
#: Fused activations a quantized conv module may apply (torch.ao.nn.intrinsic ConvReLU).
ACTIVATIONS = (None, "relu")
#: How the quantized conv was made: torch.ao's eager/FX flow (quantized modules, the engines of
#: ``torch.backends.quantized``) or torchao's PT2E flow (``convert_pt2e``: a Q/DQ pattern that
#: inductor lowers to the ``x86_inductor`` engine's oneDNN kernels).
FLOWS = ("eager", "pt2e")
#: float32's largest value: torch runs the float conv and the observers in float32.
F32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class Geometry:
    """Convolution hyper-parameters, one entry per spatial dimension."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int = 1

    def to_dict(self) -> dict[str, object]:
        return {
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }


@dataclass(frozen=True, eq=False)
class ModuleState:
    """What a quantized conv module (``nnq.Conv2d`` ...) really holds: it is what runs."""

    stored_codes: np.ndarray
    """Integer codes of the module's packed weight (weight's shape), as given: int32 or int64,
    or, in a model capture, the 8-bit dtype torch stores them in (a quarter of int32's memory,
    and no widening for the many convs a model walk only screens)."""
    weight_qparams: QParams
    bias: np.ndarray | None
    """Float bias as the module stores it (``None`` = no bias)."""
    output_qparams: QParams
    """The module's ``scale``/``zero_point`` (1.0 / 0 when never set)."""

    @functools.cached_property
    def weight_codes(self) -> np.ndarray:
        """The codes in a dtype arithmetic on them may use: 8-bit ones widened
        (``qparams.wide_codes``: int32), once; others as given."""
        c = self.stored_codes
        return c if c.dtype.itemsize >= 4 else wide_codes(c, self.weight_qparams)


@dataclass(frozen=True, eq=False)
class QuantSetup:
    """The user's own quantization setup, exactly as they wrote it."""

    input_qparams: QParams | None = None
    weight_qparams: QParams | None = None
    output_qparams: QParams | None = None
    input_codes: np.ndarray | None = None
    """Codes of a quantized input the user made (``qinput``): int32 or int64, or, in a model
    capture, the 8-bit dtype the model stored them in (``qparams.wide_codes`` widens them
    before arithmetic)."""
    weight_codes: np.ndarray | None = None
    """Codes of a quantized weight the user made (``qweight``), int64."""
    module: ModuleState | None = None
    used_quantized_dtypes: bool = False
    """The case was built with torch's quantized dtypes (deprecated from torch 2.13)."""
    apis: tuple[str, ...] = ()
    """Quantization APIs the case was built with (for QCD060)."""


#: A model walk's conv: the note its case carries (its input is what the quantized model gave it).
MODEL_INPUT_NOTE = ("the input is the quantized input this conv received in the quantized model, "
                    "dequantized: this conv's own error, nothing before it")


#: The padding modes torch's quantized convs take: their forward pads a 'reflect' conv's input
#: with F.pad first, then runs the packed conv with padding 0 (any other mode is refused).
PADDING_MODES = ("zeros", "reflect")
REFLECT_NOTE = ("padding_mode='reflect': the input is reflect-padded as torch's quantized conv "
                "pads it (F.pad), and the conv runs with padding 0")
#: Notes a case file keeps (``notes``): what capture knew and the file cannot show. Every
#: other note is made again when the file is read.
#: A case ``capture`` made without a module or output qparams: what its as_given output runs
#: on (a dict case says what it holds; a capture's caller may not know what it left out).
NO_OUTPUT_NOTE = ("no quantized module or output qparams given: the as_given output uses a "
                  "fresh module's scale 1.0 / zero point 0 (capture(..., output_qparams=(scale, "
                  "zero_point)) gives the ones your call uses)")
#: A model walk's conv whose float twin is a QAT module's (``capture_model`` given the model
#: ``prepare_qat`` made): QAT trained its weight through the fake quantization the converted
#: conv's qparams come from, so what those qparams clip of it, training saw.
QAT_NOTE = ("the float weight is a QAT module's (its to_float()): QAT trained it through its "
            "fake quantization, with the clip of the converted qparams")
#: A model walk's conv of a ``convert_pt2e`` graph whose quantizer annotated it with fake
#: quantization (``prepare_qat_pt2e``): the same, for torchao's QAT flow, on the annotation
#: alone (a PTQ flow given a QAT config gets it too: helper-61's review).
QAT_PT2E_NOTE = ("its quantizer annotated the conv with fake quantization (a QAT config, as "
                 "prepare_qat_pt2e takes): judged as a model trained through it, with the clip "
                 "of the converted qparams (the converted graph keeps no other trace of "
                 "training)")
PERSISTED_NOTES = (REFLECT_NOTE, NO_OUTPUT_NOTE, QAT_NOTE, QAT_PT2E_NOTE)


def trained_with_qat(notes: Sequence[str]) -> bool:
    """A case's notes say QAT trained its model through the fake quantization its qparams come
    from (eager ``prepare_qat`` or torchao's ``prepare_qat_pt2e``): what those qparams clip,
    training saw."""
    return QAT_NOTE in notes or QAT_PT2E_NOTE in notes


def reflect_padded(a: np.ndarray, padding: Sequence[int]) -> np.ndarray:
    """``a`` (N, C, *spatial) reflect-padded by ``padding`` on each side of each spatial dim,
    as F.pad(mode='reflect') pads it (codes are copied, so quantized inputs pad exactly)."""
    return np.pad(a, [(0, 0), (0, 0), *((p, p) for p in padding)], mode="reflect")


@dataclass(frozen=True)
class FoldedBatchNorm:
    """A model walk's conv: the float model's BatchNorm that ``capture_model`` folded into its
    float weight and bias, as the quantized model folded it (its statistics, for telling a fold
    with other statistics or another eps apart: QCD027)."""

    name: str
    """Its module path."""
    eps: float
    running_var: tuple[float, ...]
    """Per output channel."""


@dataclass(frozen=True, eq=False)
class ConvCase:
    """One convolution to explain."""

    input: np.ndarray
    """Float input, float32, shape (N, C, *spatial)."""
    weight: np.ndarray
    """Float weight, float32, shape (O, C / groups, *kernel)."""
    bias: np.ndarray | None
    """Float bias, float32, shape (O,), or None."""
    geometry: Geometry
    setup: QuantSetup | None = None
    source: str = ""
    """Where the case came from (a path, ``random --seed 3``, ``recipe forum``)."""
    notes: tuple[str, ...] = field(default=())
    """Things the loader did that the user should know (e.g. integers converted to float32)."""
    activation: str | None = None
    """A fused activation after the conv (``relu``: ConvReLU modules), applied to the float
    output too; None for a plain conv."""
    output_range: tuple[float, float] | None = None
    """A model walk's conv: the range of its output in the float model, the data its output
    qparams were calibrated for. The output's ideal step covers it as well as this case's own
    float output (which may shrink when an earlier layer damaged this conv's input)."""
    output_range_sampled: bool = False
    """``output_range`` comes from a few captured samples only, not the calibration batches
    the observer saw (a narrower range): an output step up to ``budget.SAMPLE_RANGE`` times
    the ideal step of that range counts as the floor."""
    calibration_range: tuple[float, float] | None = None
    """A model walk's conv: the float model's output range at it over the calibration batches
    alone (``capture_model(calibration=...)``), what its output observer saw; None without
    them. Not written to a case file."""
    model_output: np.ndarray | None = None
    """A model walk's conv: the float model's own output at it on the captured samples (the
    fused activation applied), for telling saturations the float model gives there from those
    only the received input gives (``output_rules._beyond_float_model``). Not written to a
    case file."""
    model_flow: str | None = None
    """A model walk's conv: the flow its model was quantized with (``ModelBundle.flow``:
    eager, fx or pt2e), whose code its fixes write. Not written to a case file."""
    input_calibration_range: tuple[float, float] | None = None
    """The range of the calibration batches given with the case (``--calib``,
    ``Options.calib``) and of its input together: what the input's qparams were calibrated for.
    Where it is like the input's (``budget.calibrated_span``), the input's step is judged
    against it. Not written to a case file."""
    output_calibration_range: tuple[float, float] | None = None
    """The float conv's output range on those calibration batches (``--calib``): what the
    output's qparams were calibrated for, judged against where it is like the output's own
    (``budget.output_span_of``). Not written to a case file."""
    folded_bn: FoldedBatchNorm | None = None
    """A model walk's conv: the BatchNorm folded into its float weight and bias (the float
    model's, as the quantized model folded it). Not written to a case file."""
    flow: str = "eager"
    """``eager`` or ``pt2e`` (FLOWS). A PT2E case runs on ``x86_inductor`` unless ``--engine``
    says otherwise, its production path is X86InductorQuantizer's default config, and its
    setup's ``module`` holds the pattern's int8 weight, float32 bias and output qparams."""

    engine: str | None = None
    """The engine ``torch.backends.quantized.engine`` named when the case was captured with
    its quantized module (``capture``), as a model bundle records it: ``explain`` runs on it
    unless ``--engine`` says otherwise. None: not recorded (torch's current engine)."""

    @property
    def pt2e(self) -> bool:
        return self.flow == "pt2e"

    @property
    def in_model(self) -> bool:
        """A conv of a captured model (a model walk's case), not one captured alone."""
        return MODEL_INPUT_NOTE in self.notes

    @property
    def layer(self) -> str:
        """A model walk's conv: its module path (its source, a loaded bundle's prefixed with
        the file's path: ``<path>:<layer>``; a module path holds no colon)."""
        return self.source.rsplit(":", 1)[-1]

    @property
    def spatial_dims(self) -> int:
        return self.weight.ndim - 2

    @property
    def op(self) -> str:
        return OPS[self.spatial_dims]

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def output_shape(self) -> tuple[int, ...]:
        return output_shape(self.input.shape, self.weight.shape, self.geometry)

    def summary(self) -> CaseSummary:
        g = self.geometry
        return CaseSummary(
            op=self.op, input_shape=tuple(self.input.shape), weight_shape=tuple(self.weight.shape),
            output_shape=tuple(self.output_shape), bias=self.bias is not None,
            stride=g.stride, padding=g.padding, dilation=g.dilation, groups=g.groups,
            source=self.source, notes=tuple(self.notes), has_user_setup=self.setup is not None,
            activation=self.activation,
        )


def output_shape(
    input_shape: tuple[int, ...], weight_shape: tuple[int, ...], g: Geometry
) -> tuple[int, ...]:
    spatial = []
    for i, (size, k) in enumerate(zip(input_shape[2:], weight_shape[2:])):
        eff = g.dilation[i] * (k - 1) + 1
        spatial.append((size + 2 * g.padding[i] - eff) // g.stride[i] + 1)
    return (input_shape[0], weight_shape[0], *spatial)


#: Largest stride, padding, dilation or groups accepted (torch's conv overflows far beyond).
GEOMETRY_MAX = 2**31 - 1


def _geometry_int(value: object, name: str) -> int:
    """An integer entry of the geometry: an int or an integral float, at most GEOMETRY_MAX."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not value.is_integer()):
        raise CaseError(f"{name} must be integers, got {str(value)[:40]!r}")
    number = int(value)
    if abs(number) > GEOMETRY_MAX:
        raise CaseError(f"{name} must be at most {GEOMETRY_MAX:,}, got a number of "
                        f"{len(str(abs(number)))} digits")
    return number


def _int_tuple(value: object, name: str, dims: int, minimum: int) -> tuple[int, ...]:
    if hasattr(value, "tolist"):
        value = value.tolist()  # type: ignore[union-attr]
    if isinstance(value, bool):
        raise CaseError(f"{name} must be an int or {dims} ints, got {value!r}")
    if isinstance(value, (int, float)):
        items = [_geometry_int(value, name)] * dims
    elif isinstance(value, (list, tuple)):
        if len(value) == 1:
            value = list(value) * dims
        if len(value) != dims:
            raise CaseError(
                f"{name} has {len(value)} entries but the weight has {dims} spatial dimensions"
            )
        items = [_geometry_int(v, name) for v in value]
    else:
        raise CaseError(f"{name} must be an int or a list of ints, got {type(value).__name__}")
    for v in items:
        if v < minimum:
            raise CaseError(f"{name} must be >= {minimum}, got {v}")
    return tuple(items)


def make_geometry(
    dims: int,
    stride: object = 1,
    padding: object = 0,
    dilation: object = 1,
    groups: object = 1,
) -> Geometry:
    if hasattr(groups, "item"):
        groups = groups.item()  # type: ignore[union-attr]
    group_count = _geometry_int(groups, "groups")
    if group_count < 1:
        raise CaseError(f"groups must be >= 1, got {group_count}")
    return Geometry(
        stride=_int_tuple(stride, "stride", dims, 1),
        padding=_int_tuple(padding, "padding", dims, 0),
        dilation=_int_tuple(dilation, "dilation", dims, 1),
        groups=group_count,
    )


def as_float_tensor(array: object, name: str, notes: list[str]) -> np.ndarray:
    """Check a tensor's dtype and values and return it as float32."""
    a = np.asarray(array)
    if a.dtype == np.bool_:
        raise CaseError(f"'{name}' is a bool tensor: convert it to float32")
    if np.iscomplexobj(a):
        raise CaseError(f"'{name}' is complex: qconvdiag needs real float32 tensors")
    if a.dtype.kind in "iu":
        notes.append(f"'{name}' holds integers ({a.dtype}); converted to float32")
        a = a.astype(np.float32)
    elif a.dtype.kind != "f":
        raise CaseError(f"'{name}' has dtype {a.dtype}: save it as a float32 tensor")
    if a.size == 0:
        raise CaseError(f"'{name}' is empty (shape {tuple(a.shape)}): give at least one element")
    if a.dtype != np.float32:
        if a.dtype == np.float64:
            finite = a[np.isfinite(a)]
            largest = float(np.abs(finite).max()) if finite.size else 0.0
            if largest > F32_MAX:
                raise CaseError(
                    f"'{name}' is float64 with values up to {largest:.3g}, beyond float32's "
                    "range (3.4e38) in which torch's conv runs: scale it down"
                )
            notes.append(f"'{name}' is float64; converted to float32 as torch's conv would run it")
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise CaseError(f"'{name}' holds {bad} NaN/Inf values: fix the tensor before diagnosing")
    return np.ascontiguousarray(a)


def validate(
    inp: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, g: Geometry
) -> None:
    """Shape and geometry rules of torch's conv, with a message that says what to fix."""
    validate_shapes(inp.shape, weight.shape, None if bias is None else bias.shape, g)


def validate_shapes(
    input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
    bias_shape: tuple[int, ...] | None, g: Geometry,
) -> None:
    """``validate`` on shapes alone (checked before any tensor is made)."""
    rank = len(weight_shape)
    if rank not in (3, 4, 5):
        raise CaseError(
            f"weight has rank {rank}: expected 3 (conv1d), 4 (conv2d) or 5 (conv3d)"
        )
    dims = rank - 2
    if len(input_shape) != rank:
        raise CaseError(
            f"input has rank {len(input_shape)} but the {OPS[dims]} weight needs rank {rank} "
            f"(N, C, {'spatial, ' * dims}...): add the batch dimension with input[None]"
        )
    if weight_shape[0] % g.groups:
        raise CaseError(
            f"weight has {weight_shape[0]} output channels, not divisible by groups={g.groups}"
        )
    if input_shape[1] != weight_shape[1] * g.groups:
        raise CaseError(
            f"channel mismatch: input has C={input_shape[1]} but weight C_in * groups = "
            f"{weight_shape[1]} * {g.groups} = {weight_shape[1] * g.groups}"
        )
    for i in range(dims):
        padded = input_shape[2 + i] + 2 * g.padding[i]
        eff = g.dilation[i] * (weight_shape[2 + i] - 1) + 1
        if eff > padded:
            raise CaseError(
                f"kernel larger than the padded input in dimension {i}: effective kernel {eff} "
                f"> input {input_shape[2 + i]} + 2 * padding {g.padding[i]}"
            )
    if bias_shape is not None and (len(bias_shape) != 1 or bias_shape[0] != weight_shape[0]):
        raise CaseError(
            f"bias has shape {tuple(bias_shape)} but the weight has {weight_shape[0]} output "
            f"channels: give a 1-D bias of length {weight_shape[0]}"
        )
    n_out = math.prod(output_shape(input_shape, weight_shape, g))
    if n_out <= 0:
        raise CaseError("the convolution has an empty output: check the geometry")


def check_float32_range(inp: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                        name: str = "input") -> None:
    """Refuse values for which float32 overflows: the input's range (observers compute
    max(x, 0) - min(x, 0)), or the conv's output, bounded by |input| max times the largest sum
    of |weights| of an output channel plus |bias|, whose range may be twice that."""
    hi, lo = max(float(inp.max()), 0.0), min(float(inp.min()), 0.0)
    if hi - lo > F32_MAX:
        raise CaseError(
            f"'{name}' spans {lo:.3g}..{hi:.3g}, a range float32 cannot hold (max 3.4e38): "
            "observers and scale formulas would overflow; scale the tensor down"
        )
    x_max = max(hi, -lo)
    b_max = 0.0 if bias is None else float(np.abs(bias).max())
    fan_in = math.prod(weight.shape[1:])
    w_max = max(float(weight.max()), -float(weight.min()))
    if 2 * (x_max * w_max * fan_in + b_max) <= F32_MAX:
        return  # a looser bound already holds: no need to sum the weights
    w_sum = float(np.abs(weight.reshape(weight.shape[0], -1)).sum(axis=1, dtype=np.float64).max())
    bound = x_max * w_sum + b_max
    if 2 * bound > F32_MAX:
        raise CaseError(
            f"the conv's output may overflow float32: |{name}| up to {x_max:.3g} times weights "
            f"summing to {w_sum:.3g} in an output channel reach {bound:.3g}, and the output's "
            "range must stay below 3.4e38; scale the tensors down"
        )


def build_case(
    inp: object,
    weight: object,
    bias: object | None = None,
    *,
    stride: object = 1,
    padding: object = 0,
    dilation: object = 1,
    groups: object = 1,
    setup: QuantSetup | None = None,
    source: str = "",
    notes: tuple[str, ...] = (),
    activation: str | None = None,
    flow: str = "eager",
    engine: str | None = None,
) -> ConvCase:
    """Validate and build a ConvCase (raises CaseError with a fix on any problem)."""
    if flow not in FLOWS:
        raise CaseError(f"flow {flow!r}: use one of {', '.join(FLOWS)}")
    if activation not in ACTIVATIONS:
        raise CaseError(f"activation {activation!r}: qconvdiag knows the fused "
                        f"{', '.join(a for a in ACTIVATIONS if a)} (or none)")
    note_list = list(notes)
    inp_a = as_float_tensor(inp, "input", note_list)
    w_a = as_float_tensor(weight, "weight", note_list)
    b_a = None if bias is None else as_float_tensor(bias, "bias", note_list)
    if w_a.ndim not in (3, 4, 5):
        raise CaseError(
            f"weight has rank {w_a.ndim}: expected 3 (conv1d), 4 (conv2d) or 5 (conv3d)"
        )
    g = make_geometry(w_a.ndim - 2, stride, padding, dilation, groups)
    validate(inp_a, w_a, b_a, g)
    check_float32_range(inp_a, w_a, b_a)
    if setup is not None:
        _validate_setup(setup, inp_a, w_a)
        setup = _narrowed_weights(setup, w_a)
    return ConvCase(inp_a, w_a, b_a, g, setup, source, tuple(note_list), activation,
                    flow=flow, engine=engine)


def _narrowed_weights(setup: QuantSetup, weight: np.ndarray) -> QuantSetup:
    """``setup`` with the narrowed code range its weights show (4-bit weights of a weight
    observer with quant_min=-8, quant_max=7: ``qparams.narrowed_weight_range``) in their
    qparams, so that quantizing the float weight as the module did clamps where it clamped."""
    m = setup.module
    if m is not None:
        qp = narrowed_weight_range(weight, m.stored_codes, m.weight_qparams)
        if qp is not m.weight_qparams:
            setup = dataclasses.replace(setup, module=dataclasses.replace(m, weight_qparams=qp))
    if setup.weight_qparams is not None and setup.weight_codes is not None:
        qp = narrowed_weight_range(weight, setup.weight_codes, setup.weight_qparams)
        if qp is not setup.weight_qparams:
            setup = dataclasses.replace(setup, weight_qparams=qp)
    return setup


def _validate_setup(setup: QuantSetup, inp: np.ndarray, weight: np.ndarray) -> None:
    for name, qp, shape in (
        ("input_qparams", setup.input_qparams, inp.shape),
        ("weight_qparams", setup.weight_qparams, weight.shape),
    ):
        if qp is not None and qp.per_channel:
            axis = qp.axis if qp.axis is not None else 0
            if not -len(shape) <= axis < len(shape):
                raise CaseError(f"{name}.axis={axis} is out of range for shape {tuple(shape)}")
            if shape[axis] != len(qp.scale):
                raise CaseError(
                    f"{name} has {len(qp.scale)} per-channel scales but the tensor has "
                    f"{shape[axis]} channels along axis {axis}"
                )
    if setup.input_codes is not None and setup.input_codes.shape != inp.shape:
        raise CaseError(f"qinput shape {setup.input_codes.shape} != input shape {inp.shape}")
    if setup.weight_codes is not None and setup.weight_codes.shape != weight.shape:
        raise CaseError(f"qweight shape {setup.weight_codes.shape} != weight shape {weight.shape}")
    if setup.module is not None:
        m = setup.module
        if m.stored_codes.shape != weight.shape:
            raise CaseError(
                f"qconv.weight has shape {tuple(m.stored_codes.shape)} but the float weight has "
                f"{tuple(weight.shape)}: the module is not this layer's quantized twin"
            )
        if m.bias is not None and m.bias.shape != (weight.shape[0],):
            raise CaseError(
                f"qconv.bias has shape {tuple(m.bias.shape)}, expected ({weight.shape[0]},)"
            )
