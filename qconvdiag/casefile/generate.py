"""Reproducible cases: ``qconvdiag random --seed N`` and the recipes.

Random tensors come from numpy's PCG64 (same bytes on every platform); the ``forum`` recipe
re-enacts the seed thread with torch's own RNG, exactly as the user's code ran.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..case import (
    ConvCase,
    ModuleState,
    QuantSetup,
    build_case,
    make_geometry,
    output_shape,
    validate_shapes,
)
from ..errors import CaseError, UsageError
from ..quantization.qparams import make_qparams, per_tensor, quantize

DISTRIBUTIONS = ("normal", "uniform", "relu", "int", "heavy")
RECIPES = ("forum", "handmade")


@dataclass(frozen=True)
class RandomSpec:
    """What ``random`` was asked for; ``None`` fields are drawn from the seed."""

    seed: int = 0
    input_shape: tuple[int, ...] | None = None
    weight_shape: tuple[int, ...] | None = None
    stride: tuple[int, ...] | int | None = None
    padding: tuple[int, ...] | int | None = None
    dilation: tuple[int, ...] | int | None = None
    groups: int | None = None
    distribution: str = "normal"
    per_channel_varied: bool = False
    bias: bool | None = None
    recipe: str | None = None


def check_spec(spec: RandomSpec) -> None:
    """What can be checked of ``spec`` before anything is drawn (UsageError with a fix)."""
    if spec.recipe is not None and spec.recipe not in RECIPES:
        raise UsageError(f"unknown recipe '{spec.recipe}': use one of {', '.join(RECIPES)}")
    if spec.distribution not in DISTRIBUTIONS:
        raise UsageError(
            f"unknown distribution '{spec.distribution}': use one of {', '.join(DISTRIBUTIONS)}"
        )
    if spec.seed < 0:
        raise UsageError(f"--seed must be >= 0 (numpy's generators take non-negative seeds), "
                         f"got {spec.seed}")
    for name, shape in (("--shape", spec.input_shape), ("--weight-shape", spec.weight_shape)):
        if shape is None:
            continue
        if not 3 <= len(shape) <= 5:
            raise UsageError(f"{name} needs 3 to 5 entries (N, C, spatial...), got "
                             f"{len(shape)}")
        if min(shape) < 1:
            raise UsageError(f"{name} entries must be >= 1, got {','.join(map(str, shape))}")
    for name, value, least in (("--stride", spec.stride, 1), ("--padding", spec.padding, 0),
                               ("--dilation", spec.dilation, 1), ("--groups", spec.groups, 1)):
        values = () if value is None else (value,) if isinstance(value, int) else value
        if any(v < least for v in values):
            raise UsageError(f"{name} must be >= {least}, got {','.join(map(str, values))}")


def generate(spec: RandomSpec, max_elements: int | None = None) -> ConvCase:
    """The case ``spec`` asks for. No tensor (input, weight, output) may exceed
    ``max_elements`` (default: the ``--max-elements`` default): shapes are checked before any
    tensor is made."""
    check_spec(spec)
    if spec.recipe is not None:
        if spec.recipe == "forum":
            return forum_case()
        if spec.recipe == "handmade":
            return handmade_case(random_case(spec, max_elements), spec.seed)
        raise UsageError(f"unknown recipe '{spec.recipe}': use one of {', '.join(RECIPES)}")
    return random_case(spec, max_elements)


def _draw_geometry(rng: np.random.Generator, spec: RandomSpec) -> dict[str, object]:
    if spec.weight_shape is not None:
        dims = len(spec.weight_shape) - 2
    elif spec.input_shape is not None:
        dims = len(spec.input_shape) - 2
    else:
        dims = int(rng.choice([1, 2, 2, 2, 3]))
    if dims not in (1, 2, 3):
        raise UsageError("shapes need 3 to 5 dimensions (N, C, spatial...)")
    groups = spec.groups
    if spec.weight_shape is not None:
        out_c, cin_g = spec.weight_shape[0], spec.weight_shape[1]
        kernel = tuple(spec.weight_shape[2:])
        if groups is None:
            groups = (spec.input_shape[1] // cin_g) if spec.input_shape else 1
    else:
        in_c = spec.input_shape[1] if spec.input_shape else int(rng.choice([1, 2, 3, 4, 8, 16]))
        if groups is None:
            choice = rng.random()
            groups = in_c if choice < 0.15 else (2 if choice < 0.3 and in_c % 2 == 0 else 1)
        if in_c % groups:
            raise UsageError(f"groups={groups} does not divide the {in_c} input channels")
        cin_g = in_c // groups
        if groups > 1:
            out_c = groups * int(rng.choice([1, 2, 4]))
        else:
            out_c = int(rng.choice([1, 3, 8, 16]))
        kmax = 3 if dims == 3 else 5
        kernel = tuple(int(rng.integers(1, kmax + 1)) for _ in range(dims))
    stride = spec.stride if spec.stride is not None else int(rng.choice([1, 1, 2]))
    dilation = spec.dilation if spec.dilation is not None else int(rng.choice([1, 1, 1, 2]))
    dil_t = (dilation,) * dims if isinstance(dilation, int) else tuple(dilation)
    if spec.padding is not None:
        padding = spec.padding
    else:
        padding = tuple(int(rng.integers(0, (d * (k - 1)) // 2 + 1)) for k, d in zip(kernel, dil_t))
    if spec.input_shape is not None:
        input_shape = tuple(spec.input_shape)
    else:
        n = int(rng.choice([1, 1, 2]))
        lo, hi = (4, 8) if dims == 3 else (6, 16)
        pad_t = (padding,) * dims if isinstance(padding, int) else tuple(padding)
        spatial = []
        for k, d, p in zip(kernel, dil_t, pad_t):
            eff = d * (k - 1) + 1
            spatial.append(max(int(rng.integers(lo, hi + 1)), eff - 2 * p))
        input_shape = (n, cin_g * groups, *spatial)
    weight_shape = (out_c, cin_g, *kernel)
    return {
        "input_shape": input_shape, "weight_shape": weight_shape, "stride": stride,
        "padding": padding, "dilation": dilation, "groups": groups,
    }


def _draw_tensor(rng: np.random.Generator, shape: tuple[int, ...], dist: str) -> np.ndarray:
    if dist == "normal":
        x = rng.standard_normal(shape)
    elif dist == "uniform":
        x = rng.uniform(-1.0, 1.0, shape)
    elif dist == "relu":
        x = np.maximum(rng.standard_normal(shape), 0.0)
    elif dist == "int":
        x = rng.integers(0, 20, shape).astype(np.float64)
    elif dist == "heavy":
        x = rng.standard_t(2.0, shape)
        flat = x.reshape(-1)
        k = max(1, flat.size // 200)
        idx = rng.choice(flat.size, size=k, replace=False)
        flat[idx] *= 20.0
    else:
        raise UsageError(f"unknown distribution '{dist}': use one of {', '.join(DISTRIBUTIONS)}")
    return x.astype(np.float32)


def _check_shapes(geo: dict[str, object], source: str, max_elements: int) -> None:
    """The drawn shapes against the conv's rules and the element guard, before any tensor."""
    from ..io import guard_message

    in_shape: tuple[int, ...] = geo["input_shape"]  # type: ignore[assignment]
    w_shape: tuple[int, ...] = geo["weight_shape"]  # type: ignore[assignment]
    g = make_geometry(len(w_shape) - 2, geo["stride"], geo["padding"], geo["dilation"],
                      geo["groups"])
    validate_shapes(in_shape, w_shape, None, g)
    for name, shape in (("input", in_shape), ("weight", w_shape),
                        ("output", output_shape(in_shape, w_shape, g))):
        count = math.prod(shape)
        if count > max_elements:
            raise CaseError(guard_message(source, name, count, max_elements))


def random_case(spec: RandomSpec, max_elements: int | None = None) -> ConvCase:
    """A random float case (no user setup): tensors and geometry drawn from ``spec.seed``."""
    from ..io import MAX_ELEMENTS

    if spec.distribution not in DISTRIBUTIONS:
        raise UsageError(
            f"unknown distribution '{spec.distribution}': use one of {', '.join(DISTRIBUTIONS)}"
        )
    rng = np.random.default_rng(spec.seed)
    geo = _draw_geometry(rng, spec)
    _check_shapes(geo, f"random --seed {spec.seed}",
                  MAX_ELEMENTS if max_elements is None else max_elements)
    inp = _draw_tensor(rng, geo["input_shape"], spec.distribution)  # type: ignore[arg-type]
    w_shape: tuple[int, ...] = geo["weight_shape"]  # type: ignore[assignment]
    fan_in = math.prod(w_shape[1:])
    if spec.distribution == "int":
        weight = rng.integers(0, 20, w_shape).astype(np.float32)
    else:
        weight = (_draw_tensor(rng, w_shape, "heavy" if spec.distribution == "heavy" else "normal")
                  / np.float32(math.sqrt(fan_in))).astype(np.float32)
    if spec.per_channel_varied:
        factors = (10.0 ** rng.uniform(-1.5, 1.0, w_shape[0])).astype(np.float32)
        weight = (weight * factors.reshape((-1,) + (1,) * (len(w_shape) - 1))).astype(np.float32)
    has_bias = spec.bias if spec.bias is not None else bool(rng.random() < 0.8)
    bias = None
    if has_bias:
        bias = (rng.uniform(-1, 1, w_shape[0]) / math.sqrt(fan_in)).astype(np.float32)
    source = f"random --seed {spec.seed}"
    return build_case(
        inp, weight, bias,
        stride=geo["stride"], padding=geo["padding"], dilation=geo["dilation"],
        groups=geo["groups"], source=source,
    )


def _handmade_qparams(t: np.ndarray, dtype: str, what: str):  # type: ignore[no-untyped-def]
    """The thread's formula: scale = (max - min) / (2^8 - 2), zero_point = -(min / scale)."""
    lo = np.float32(t.min())
    hi = np.float32(t.max())
    scale = np.float32((hi - lo) / np.float32(254.0))
    if scale == 0:
        scale = np.float32(1.0)
    zp = -(lo / scale)
    return make_qparams([float(scale)], [float(zp)], dtype, None, what, "user")


def handmade_case(base: ConvCase, seed: int) -> ConvCase:
    """A random case quantized with the thread's hand-made formulas and no output qparams."""
    in_qp = _handmade_qparams(base.input, "quint8", "input_qparams")
    w_qp = _handmade_qparams(base.weight, "qint8", "weight_qparams")
    setup = QuantSetup(input_qparams=in_qp, weight_qparams=w_qp, apis=())
    return build_case(
        base.input, base.weight, base.bias,
        stride=base.geometry.stride, padding=base.geometry.padding,
        dilation=base.geometry.dilation, groups=base.geometry.groups,
        setup=setup, source=f"random --seed {seed} --recipe handmade",
    )


def forum_case() -> ConvCase:
    """The seed thread, re-enacted: same tensors, same hand-made qparams, same module state.

    ``torch.manual_seed(0)``, two ``randint(0, 20, (1, 1, 3, 3))`` draws, then ``nn.Conv2d``'s
    default init gives the bias -0.3092 and the float output 803.6908. The user's
    ``qm.weight().data = quantized_weight`` assigns to a copy, so the module keeps the weight
    ``nnq.Conv2d`` starts with (all zeros in a fresh process), bias 0, and output scale 1.0 /
    zero point 0: its output is 0.0.
    """
    import random

    import torch

    from ..torch_calls import capture_warnings

    state = torch.random.get_rng_state()
    try:
        random.seed(0)
        torch.manual_seed(0)
        inp = torch.randint(0, 20, (1, 1, 3, 3), dtype=torch.float32)
        weight = torch.randint(0, 20, (1, 1, 3, 3), dtype=torch.float32)
        with capture_warnings():
            m = torch.nn.Conv2d(1, 1, 3, stride=1)
        assert m.bias is not None
        bias = m.bias.detach().clone()
    finally:
        torch.random.set_rng_state(state)
    # The user's formulas, in float32 tensors as they wrote them.
    w_scale = (weight.max() - weight.min()) / (2**8 - 1 - 1)
    w_zp = -(weight.min() / w_scale - 0)
    in_scale = (inp.max() - inp.min()) / (2**8 - 1 - 1)
    in_zp = -(inp.min() / in_scale - 0)
    in_qp = make_qparams([float(in_scale)], [float(in_zp)], "quint8", None, "input_qparams", "user")
    w_qp = make_qparams([float(w_scale)], [float(w_zp)], "qint8", None, "weight_qparams", "user")
    inp_np = inp.numpy()
    weight_np = weight.numpy()
    module = ModuleState(
        stored_codes=np.zeros(weight_np.shape, dtype=np.int64),
        weight_qparams=per_tensor(1.0, 0, "qint8", "module"),
        bias=np.zeros(1, dtype=np.float32),
        output_qparams=per_tensor(1.0, 0, "quint8", "module"),
    )
    setup = QuantSetup(
        input_qparams=in_qp,
        weight_qparams=w_qp,
        output_qparams=None,
        input_codes=quantize(inp_np, in_qp),
        weight_codes=quantize(weight_np, w_qp),
        module=module,
        used_quantized_dtypes=True,
        apis=("torch.nn.quantized.Conv2d", "torch.quantize_per_tensor"),
    )
    return build_case(
        inp_np, weight_np, bias.numpy(), stride=1, padding=0, dilation=1, groups=1,
        setup=setup, source="recipe forum",
        notes=("re-enacts the PyTorch forum thread (torch.manual_seed(0)); see README",),
    )
