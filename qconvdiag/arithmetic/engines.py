"""What each quantized engine accepts, and what it really does on this CPU (probed).

The probe runs a few tiny convs per engine whose outputs differ by accumulation behaviour
(every activation code 255, every weight code 127, so each raw pair sum is 64770 and leaves
int16): exact arithmetic gives 200, int16 pairs along K give 105, pairs of adjacent channels
give 134 (dense, 3 channels, 3x3). It is cheap (milliseconds) and cached per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..case import Geometry
from ..quantization.qparams import QParams, per_tensor
from .accumulate import EXACT, PAIRS_CHANNELS, PAIRS_K
from .emulate import Kernel

ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")
#: Engines of torch's PT2E flow, outside ``torch.backends.quantized``: ``x86_inductor`` is the
#: oneDNN kernel pair inductor lowers a ``convert_pt2e`` conv to when freezing is on
#: (``torch.ops.onednn.qconv_prepack`` + ``qconv_pointwise``; torch_ref.run_inductor_conv).
PT2E_ENGINES = ("x86_inductor",)


def torch_engines() -> tuple[str, ...]:
    """The engines of ENGINES this torch build has (``torch.backends.quantized``), in order."""
    import torch

    supported = torch.backends.quantized.supported_engines
    return tuple(e for e in ENGINES if e in supported)

#: Layer classes whose accumulation may differ within one engine. grouped4: channels per group,
#: in and out, both multiples of 4 (oneDNN's blocked grouped kernel, which pairs channels in
#: int16 on AVX2; other grouped convs accumulate exactly).
DENSE, GROUPED, GROUPED4, DEPTHWISE = "dense", "grouped", "grouped4", "depthwise"
DEPTHWISE_FAST = "depthwise_fast"
"""Layers fbgemm runs with its depthwise kernel (``fbgemm_conv_path``), measured to sum int16
pairs of taps even on AVX512-VNNI CPUs (its code is AVX2 intrinsics)."""
GROUPWISE_FAST = "groupwise_fast"
"""Layers fbgemm runs with its groupwise kernel (``fbgemm_conv_path``). The kernel is
generated for the ISA cpuinfo reports, which ``FBGEMM_ENABLE_INSTRUCTIONS`` does not change
(FBGEMM src/GroupwiseConv.cc, ``getOrCreateConvKernel``): exact on AVX512-VNNI CPUs even when
the GEMM kernels are forced down to AVX2; elsewhere ``vpmaddubsw`` pairs adjacent channels of
one tap, which are the pairs along K since it only takes an even number of channels. Only the
fbgemm family has this class."""

#: Kernels fbgemm chooses between (FBGEMM src/FbgemmConv.cc, ``ConvFastPath``).
FBGEMM_DEPTHWISE, FBGEMM_GROUPWISE, FBGEMM_GEMM = "depthwise", "groupwise", "gemm"


@dataclass(frozen=True)
class Refusal:
    """One row of the acceptance table: a setup an engine refuses (measured on torch 2.13)."""

    engines: tuple[str, ...]
    """Kernels (fbgemm, onednn, qnnpack) that refuse it."""
    rule: str
    """Stable id of the rule."""
    test: Callable[[QParams, QParams, int], bool]
    """``test(input_qparams, weight_qparams, out_channels)`` is True when refused."""
    message: str
    """Plain-words reason and fix."""


ALL = ("fbgemm", "onednn", "qnnpack")
ACCEPTANCE: tuple[Refusal, ...] = (
    Refusal(ALL, "input_dtype", lambda i, w, o: i.dtype != "quint8",
            "activations must be quint8 on every engine (got {input_dtype}): quantize the input "
            "with dtype=torch.quint8"),
    # every engine's kernel reads one input scale and zero point (the emulation cannot run
    # per-channel activations either: no kernel defines their arithmetic)
    Refusal(ALL, "input_per_channel", lambda i, w, o: i.per_channel,
            "activations must be quantized per tensor: quantize the input with "
            "torch.quantize_per_tensor"),
    Refusal(("fbgemm", "qnnpack"), "weight_dtype", lambda i, w, o: w.dtype != "qint8",
            "weights must be qint8 (got {weight_dtype}): quantize the weight with "
            "dtype=torch.qint8"),
    # onednn accepts quint8 weights with zero point 0 and reads their bytes as int8 (codes
    # above 127 turn negative): not a refusal, a silent reinterpretation the emulator models.
    Refusal(ALL, "per_channel_count",
            lambda i, w, o: w.per_channel and len(w.scale) != o,
            "per-channel weight qparams must have one scale per output channel ({n_scales} given "
            "for {out_channels}): quantize the weight with axis=0"),
    Refusal(("onednn",), "weight_symmetric", lambda i, w, o: any(z != 0 for z in w.zero_point),
            "onednn only accepts symmetric weights (zero point 0), got {weight_zero_point}: use "
            "torch.per_tensor_symmetric / per_channel_symmetric weight observers"),
)

#: The rules about the activations (every other rule is about the weight).
INPUT_REFUSALS = ("input_dtype", "input_per_channel")


def refusals(
    kernel: str, input_qp: QParams, weight_qp: QParams, out_channels: int | None = None
) -> list[Refusal]:
    """Rows of ACCEPTANCE that stop ``kernel`` from running this setup."""
    o = out_channels if out_channels is not None else len(weight_qp.scale)
    return [r for r in ACCEPTANCE if kernel in r.engines and r.test(input_qp, weight_qp, o)]


def refusal_message(r: Refusal, input_qp: QParams, weight_qp: QParams, out_channels: int) -> str:
    return r.message.format(
        input_dtype=input_qp.dtype, weight_dtype=weight_qp.dtype,
        weight_zero_point=list(weight_qp.zero_point)[:4], n_scales=len(weight_qp.scale),
        out_channels=out_channels,
    )


@dataclass(frozen=True)
class EngineProfile:
    """What one engine does on this CPU."""

    engine: str
    available: bool
    accumulation: dict[str, str] = field(default_factory=dict)
    """Layer class (dense, grouped, grouped4, depthwise) -> EXACT / PAIRS_K / PAIRS_CHANNELS /
    unknown."""
    x86_uses_onednn: bool = False
    """For ``x86``: symmetric-weight convs (groups <= 100) are handed to oneDNN (VNNI CPUs)."""
    matches: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Layer class -> every accumulation that reproduced the probe (when several agree, the
    kernel family decides: see ``prefer``)."""

    def to_dict(self) -> dict[str, object]:
        return {
            "available": self.available,
            "accumulation": dict(self.accumulation),
            **({"dispatches_to_onednn": self.x86_uses_onednn} if self.engine == "x86" else {}),
        }


_PROBE_LAYERS = {
    # class: (groups, channels per group, output channels)
    DENSE: (1, 3, 1),
    GROUPED: (2, 3, 2),
    GROUPED4: (2, 4, 8),
    DEPTHWISE: (2, 1, 2),
    DEPTHWISE_FAST: (8, 1, 8),
    GROUPWISE_FAST: (1, 8, 8),
}
#: Probe layers that take padding 1 (the fast kernels' shape).
_PADDED_PROBES = (DEPTHWISE_FAST, GROUPWISE_FAST)
CANDIDATES = (EXACT, PAIRS_K, PAIRS_CHANNELS)
PROBE_ZERO_POINT = 128


def _probe_accumulation(engine: str, layer: str, zp: int = PROBE_ZERO_POINT) -> tuple[str, ...]:
    """Run one tiny conv whose int16 pair sums all saturate, and name every accumulation whose
    emulation gives torch's output (every activation code 255, every weight code 127)."""
    from .emulate import emulate
    from .torch_ref import run_conv

    groups, cin_g, out_c = _PROBE_LAYERS[layer]
    x = np.full((1, groups * cin_g, 3, 3), 255, dtype=np.int64)
    w = np.full((out_c, cin_g, 3, 3), 127, dtype=np.int64)
    k = cin_g * 9
    out_scale = (255 - zp) * 127 * k / 200.0  # exact arithmetic gives code 200
    pad = 1 if layer in _PADDED_PROBES else 0
    g = Geometry((1, 1), (pad, pad), (1, 1), groups)
    xq = per_tensor(1.0, zp, "quint8", "probe")
    wq = per_tensor(1.0, 0, "qint8", "probe")
    oq = per_tensor(out_scale, 0, "quint8", "probe")
    r = run_conv(engine, x, xq, w, wq, None, out_scale, 0, g)
    if not r.ran or r.output_codes is None:
        return ()
    family = ("qnnpack" if engine == "qnnpack"
              else "onednn" if engine in ("onednn", *PT2E_ENGINES) else "fbgemm")
    direct = engine in PT2E_ENGINES
    return tuple(
        acc for acc in CANDIDATES
        if np.array_equal(
            emulate(Kernel(engine, family, acc, direct_scales=direct), x, xq, w, wq, None, oq,
                    g).output_codes,
            r.output_codes)
    )


def prefer(matches: tuple[str, ...], family: str) -> str:
    """The accumulation to emulate among those the probe could not tell apart (with 4 channels
    per group, pairs along K and pairs of channels are the same pairs): the family's own."""
    order = (EXACT, PAIRS_CHANNELS, PAIRS_K) if family == "onednn" else CANDIDATES
    return next((acc for acc in order if acc in matches), "unknown")


def _probe_x86_dispatch(accumulation: dict[str, str]) -> bool:
    """Does x86 hand symmetric-weight convs to oneDNN?

    Where accumulation saturates, the pairing tells (oneDNN pairs channels, fbgemm pairs K).
    Where it is exact, both kernels give the same numbers (their requantizations agreed on
    every one of 200,000 random scale sets we tried), so torch's own dispatch signal decides:
    cpuinfo's AVX512-VNNI flag, which ``torch.cpu._is_vnni_supported`` exposes.
    """
    import torch

    dense = accumulation.get(DENSE)
    if dense == PAIRS_CHANNELS:
        return True
    if dense == PAIRS_K:
        return False
    check = getattr(torch.cpu, "_is_vnni_supported", None)
    return bool(check()) if check is not None else False


@functools.lru_cache(maxsize=1)
def probe() -> dict[str, EngineProfile]:
    """Probe every engine torch offers here (cached for the process)."""

    supported = torch_engines()
    profiles: dict[str, EngineProfile] = {}
    for engine in ENGINES:
        if engine not in supported:
            profiles[engine] = EngineProfile(engine, False)
            continue
        matches = {layer: _probe_accumulation(engine, layer) for layer in _PROBE_LAYERS}
        family = "onednn" if engine == "onednn" else "fbgemm"
        acc = {layer: prefer(m, family) for layer, m in matches.items()}
        profiles[engine] = EngineProfile(engine, True, acc, matches=matches)
    if profiles["x86"].available:
        x86 = profiles["x86"]
        uses = _probe_x86_dispatch(x86.accumulation)
        acc = {layer: prefer(m, "onednn" if uses else "fbgemm") for layer, m in x86.matches.items()}
        profiles["x86"] = EngineProfile("x86", True, acc, uses, x86.matches)
    return profiles


@functools.lru_cache(maxsize=1)
def probe_pt2e() -> dict[str, EngineProfile]:
    """Probe the PT2E engines (cached for the process): the same tiny convs as ``probe``."""
    profiles: dict[str, EngineProfile] = {}
    for engine in PT2E_ENGINES:
        matches = {layer: _probe_accumulation(engine, layer) for layer in _PROBE_LAYERS}
        if not any(matches.values()):  # torch without oneDNN: the kernel refused everything
            profiles[engine] = EngineProfile(engine, False)
            continue
        acc = {layer: prefer(m, "onednn") for layer, m in matches.items()}
        profiles[engine] = EngineProfile(engine, True, acc, matches=matches)
    return profiles


def layer_class(groups: int, cin_g: int, out_g: int = 1, geometry: Geometry | None = None,
                kernel_size: tuple[int, ...] = (), family: str = "fbgemm") -> str:
    """dense, depthwise_fast, depthwise (one input channel per group), grouped4 or grouped;
    groupwise_fast for the layers fbgemm runs with its groupwise kernel (family fbgemm)."""
    path = (fbgemm_conv_path(groups, cin_g, out_g, geometry, kernel_size)
            if geometry is not None else FBGEMM_GEMM)
    if path == FBGEMM_GROUPWISE and family == "fbgemm":
        return GROUPWISE_FAST
    if groups == 1:
        return DENSE
    if cin_g == 1:
        return DEPTHWISE_FAST if path == FBGEMM_DEPTHWISE else DEPTHWISE
    return GROUPED4 if cin_g % 4 == 0 and out_g % 4 == 0 else GROUPED


def fbgemm_conv_path(groups: int, cin_g: int, out_g: int, g: Geometry, k: tuple[int, ...]
                     ) -> str:
    """The kernel fbgemm runs a (non-transposed) conv with: FBGEMM's ``ConvFastPath`` (src/
    FbgemmConv.cc) tries its depthwise kernel, then its groupwise kernel, then a GEMM (on the
    input itself for 1x1 convs, else on im2col; both the same arithmetic). torch runs conv1d
    as a 2D conv with a (1, k) kernel, which neither specialised kernel takes.

    * depthwise (``takeDepthWiseFastPath``): one input channel per group, 1 or 2 outputs per
      channel, groups a multiple of 8, 2D or 3D, every side of the kernel 3, 5 or 7 with the
      last two equal, padding (k - 1) / 2 per side, strides 1 or 2, dilation 1; e.g. 32
      channels, 5x3x3 kernel, padding (2, 1, 1), stride (2, 1, 1).
    * groupwise (``fbgemmOptimizedGConv``, src/Fbgemm.cc): as many output as input channels per
      group, 2, 4, 8 or 16 of them, at least ``fbgemm_groups_together`` groups, 3x3 or 3x3x3,
      padding 1, dilation 1, height and width strides both 1 or both 2 (3D: any depth
      stride); groups=1 counts: a dense 8 -> 8 3x3 conv with padding 1 takes it.
    """
    dims = len(k)
    if dims < 2 or len(g.padding) != dims:
        return FBGEMM_GEMM
    if (cin_g == 1 and out_g in (1, 2) and groups % 8 == 0 and k[-2] == k[-1]
            and all(s in (3, 5, 7) for s in k) and all(d == 1 for d in g.dilation)
            and all(p == (s - 1) // 2 for p, s in zip(g.padding, k))
            and all(st in (1, 2) for st in g.stride)):
        return FBGEMM_DEPTHWISE
    hw_strides = set(g.stride[-2:])
    if (cin_g == out_g and cin_g in (2, 4, 8, 16)
            and groups >= fbgemm_groups_together(cin_g, out_g)
            and all(s == 3 for s in k) and all(p == 1 for p in g.padding)
            and all(d == 1 for d in g.dilation) and hw_strides in ({1}, {2})):
        return FBGEMM_GROUPWISE
    return FBGEMM_GEMM


#: How a path torch could run, but qconvdiag does not let it (``fbgemm_groupwise_overrun``),
#: says so: not a refusal of torch's.
NOT_RUN = "not run: "


def fbgemm_groupwise_overrun(engine: str, weight_qp: QParams, groups: int, cin_g: int,
                             out_g: int, g: Geometry, k: tuple[int, ...]) -> str | None:
    """Why torch must not run this layer, or None: fbgemm's groupwise kernel works on
    ``fbgemm_groups_together`` groups at a time and does not check that they divide the groups
    (src/GroupwiseConv.cc, ``for (g = 0; g < G; g += G_together)``), so the last block reads and
    writes past the tensors: measured on an AVX512 CPU with 4 channels per group, 5 groups abort
    the process (heap corruption), 6 or 7 give wrong outputs for the groups past 4."""
    if fbgemm_conv_path(groups, cin_g, out_g, g, k) != FBGEMM_GROUPWISE:
        return None
    together = fbgemm_groups_together(cin_g, out_g)
    if groups % together == 0 or kernel_family(engine, weight_qp, groups) != "fbgemm":
        return None
    return (f"{NOT_RUN}on this CPU torch's fbgemm groupwise kernel takes {together} groups at a "
            f"time and overruns its buffers on the last {groups % together} of {groups} groups "
            "(wrong outputs there, or the process aborts)")


def fbgemm_groups_together(cin_g: int, out_g: int) -> int:
    """How many groups fbgemm's groupwise kernel handles at once (``numOfGroupsTogether``, src/
    PackWeightMatrixForGConv.cc): a 64-byte register's worth on CPUs with AVX512 (cpuinfo's
    f/bw/dq/vl, not what ``FBGEMM_ENABLE_INSTRUCTIONS`` forces), else 32 bytes, over
    ``out_g * max(cin_g, 4)``; at least 1. E.g. 4 channels per group: 4 groups (2 on AVX2),
    so a 2-group layer takes the GEMM there."""
    width = 64 if _cpu_has("avx512_f", "avx512_bw", "avx512_dq", "avx512_vl") or _cpu_has(
        "avx512_vnni") else 32
    return max(width // out_g // max(cin_g, 4), 1)


@functools.cache
def _cpu_has(*features: str) -> bool:
    """cpuinfo's flags, as fbgemm reads them (``torch.cpu.get_capabilities``)."""
    import torch

    get = getattr(torch.cpu, "get_capabilities", None)
    caps = get() if get is not None else {}
    return all(bool(caps.get(f, False)) for f in features)


def kernel_family(engine: str, weight_qp: QParams, groups: int) -> str:
    """Which arithmetic runs: x86 picks oneDNN for symmetric weights on VNNI CPUs."""
    if engine == "qnnpack":
        return "qnnpack"
    if engine in ("onednn", *PT2E_ENGINES):
        return "onednn"
    if engine == "x86":
        prof = probe()["x86"]
        symmetric = all(z == 0 for z in weight_qp.zero_point)
        if prof.x86_uses_onednn and symmetric and groups <= 100:
            return "onednn"
    return "fbgemm"


def select_kernel(engine: str, weight_qp: QParams, groups: int, cin_g: int,
                  out_g: int = 1, geometry: Geometry | None = None,
                  kernel_size: tuple[int, ...] = (),
                  input_shape: tuple[int, ...] | None = None,
                  attrs: LayerAttrs | None = None) -> Kernel:
    """The Kernel (arithmetic family + accumulation) that runs this layer on this CPU.
    ``input_shape`` and ``attrs`` (x86_inductor): the layer's input shape and setup, for
    ``onednn_arithmetic`` (without them: the accumulation's usual order)."""
    if engine in PT2E_ENGINES:
        layer = layer_class(groups, cin_g, out_g, geometry, kernel_size, "onednn")
        accumulation = prefer(probe_pt2e()[engine].matches.get(layer, ()), "onednn")
        combined = accumulation == PAIRS_CHANNELS
        divides = False
        if input_shape is not None and geometry is not None:
            measured = onednn_arithmetic(
                engine, tuple(input_shape), (out_g * groups, cin_g, *kernel_size), geometry,
                accumulation, attrs or LayerAttrs(True, True, per_channel=weight_qp.per_channel))
            combined, divides = (combined, divides) if measured is None else measured
        return Kernel(engine, "onednn", accumulation, combined, direct_scales=True,
                      divides_dst_scale=divides)
    family = kernel_family(engine, weight_qp, groups)
    if family == "qnnpack":
        return Kernel(engine, family, EXACT)
    profiles = probe()
    if engine == "x86" and family == "onednn":
        prof = profiles["x86"]  # the x86 probe runs symmetric weights, i.e. this very path
    elif family == "onednn":
        prof = profiles["onednn"]
    else:
        prof = profiles["fbgemm"] if profiles["fbgemm"].available else profiles["x86"]
    layer = layer_class(groups, cin_g, out_g, geometry, kernel_size, family)
    accumulation = prefer(prof.matches.get(layer, ()), family)
    # oneDNN's kernels that pair channels in int16 (no VNNI) apply one precomputed
    # source x weight scale
    combined = family == "onednn" and accumulation == PAIRS_CHANNELS
    # fbgemm's depthwise kernel sums each window's input codes in saturating int16
    row_sums_int16 = family == "fbgemm" and layer == DEPTHWISE_FAST
    return Kernel(engine, family, accumulation, combined, row_sums_int16)



#: Attempts of ``onednn_arithmetic`` before it gives up telling the candidates apart.
ARITHMETIC_PROBE_TRIES = 6
#: oneDNN's candidate arithmetics: (source x weight scale as one product, divides by the
#: output scale).
ONEDNN_ARITHMETICS = ((False, False), (True, False), (False, True), (True, True))


@dataclass(frozen=True)
class LayerAttrs:
    """What of a layer's setup may change which implementation oneDNN picks for it (the
    primitive's attributes: zero points present, the output's data type, post-ops)."""

    input_zero_point: bool
    """The input zero point is not 0."""
    output_zero_point: bool
    """The output zero point is not 0 (uint8 outputs)."""
    float_output: bool = False
    relu: bool = False
    per_channel: bool = True


@functools.lru_cache(maxsize=256)
def onednn_arithmetic(engine: str, input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                      geometry: Geometry, accumulation: str, attrs: LayerAttrs
                      ) -> tuple[bool, bool] | None:
    """(combined scales, divides by the output scale) of the implementation oneDNN runs for
    this very layer on this CPU; None when the probe cannot tell.

    oneDNN picks an implementation per layer and they differ here (measured with
    ``ONEDNN_VERBOSE=1``): on an AVX512-VNNI CPU its brgemm, jit int8 and depthwise kernels
    multiply by the source scale, then the weight scale, then the output scale's reciprocal,
    while its GEMM-based convolution (``x64:gemm_s8u8s32:jit``, e.g. 3D depthwise convs with a
    dilation) multiplies by the product of the first two; without VNNI (ISA forced to AVX2)
    dense convs take the product, grouped ones either, and the reference convolution
    (``ref:any``, e.g. grouped 1x1 convs) divides by the output scale. So the layer's own shape
    is run with codes that make the candidates disagree: every input one step above its zero
    point, one weight tap per output channel, and per channel a weight scale nudged (by float32
    ulps) until two candidates give different outputs, alternately the scale product against
    the scales in turn, and the reciprocal against the division. About one conv per try.
    """
    from ..fp32 import f32

    rng = np.random.default_rng(0)
    candidates = list(ONEDNN_ARITHMETICS[:2] if attrs.float_output else ONEDNN_ARITHMETICS)
    x_zp = 3 if attrs.input_zero_point else 0
    out_zp = 128 if attrs.output_zero_point else 0
    x = np.full(input_shape, x_zp + 1, dtype=np.int64)
    w = np.zeros(weight_shape, dtype=np.int64)
    for attempt in range(ARITHMETIC_PROBE_TRIES):
        in_s = float(f32(rng.uniform(0.001, 0.1)))
        out_s = float(f32(rng.uniform(0.01, 0.1)))
        w0, scales = _telling_weight_scales(rng, weight_shape[0], in_s, out_s, out_zp, attrs,
                                            against_division=attempt % 2 == 0)
        # one tap per output channel, the kernel's centre: inside the input wherever the
        # padding is at most half the kernel (a 3x3 conv on a 1x1 input sees only it)
        centre: tuple[Any, ...] = (slice(None), 0, *(k // 2 for k in weight_shape[2:]))
        w[centre] = w0
        wq = QParams(tuple(float(v) for v in scales), (0,) * scales.size, "qint8",
                     0 if attrs.per_channel else None, "probe")
        xq = per_tensor(in_s, x_zp, "quint8", "probe")
        oq = per_tensor(1.0 if attrs.float_output else out_s,
                        0 if attrs.float_output else out_zp, "quint8", "probe")
        kept = _candidates_torch_agrees_with(candidates, engine, accumulation, geometry, attrs,
                                             (x, xq, w, wq, oq))
        if kept is None:
            return None
        candidates = kept
        if len(candidates) <= 1:
            break
    if not candidates:
        return None
    return candidates[0]


def _telling_weight_scales(rng: np.random.Generator, channels: int, in_s: float, out_s: float,
                           out_zp: int, attrs: LayerAttrs, against_division: bool
                           ) -> tuple[np.ndarray, np.ndarray]:
    """(weight code of each channel's one tap, weight scales) that make two of oneDNN's
    arithmetics give different outputs: the separate scales against the division by the output
    scale (``against_division``) or against the scales' product."""
    from ..fp32 import add32, div32, f32, mul32, recip32

    w0 = rng.integers(1, 128, channels)
    # the value before the zero point is added: halfway between zp + t + 0.5 (t + zp even:
    # rint takes it down) and the next float32 above, so that an ulp decides the code
    t = 2 * rng.integers(1, 50, channels)
    tie = (out_zp + t + 0.5).astype(np.float32)
    target = t + 0.5 + (np.spacing(tie).astype(np.float64) / 2 if out_zp else 0.0)
    base = f32(target * out_s / (w0 * in_s))
    nudges = np.arange(-200, 201)
    cand_sw = np.array([_nudge(base, int(k)) for k in nudges])  # (K, O)
    value = f32(w0)  # the accumulator at a position that sees the tap
    sep = mul32(mul32(value, f32(in_s)), cand_sw)
    comb = mul32(value, mul32(f32(in_s), cand_sw))
    rd = recip32(f32(out_s))
    if attrs.float_output:
        differs = sep != comb
    else:
        zp = f32(out_zp)

        def code(v: np.ndarray, divide: bool = False) -> np.ndarray:
            return np.rint(add32(div32(v, f32(out_s)) if divide else mul32(v, rd), zp))

        differs = (code(sep) != code(sep, divide=True) if against_division
                   else code(sep) != code(comb))
    pick = np.where(differs.any(axis=0), differs.argmax(axis=0), len(nudges) // 2)
    scales = cand_sw[pick, np.arange(channels)]
    if not attrs.per_channel:  # one scale: every channel as the first that disagrees
        j = int(differs.any(axis=0).argmax())
        w0[:], scales = w0[j], scales[j:j + 1]
    return w0, scales


def _candidates_torch_agrees_with(
    candidates: list[tuple[bool, bool]], engine: str, accumulation: str, geometry: Geometry,
    attrs: LayerAttrs, probe: tuple[np.ndarray, QParams, np.ndarray, QParams, QParams],
) -> list[tuple[bool, bool]] | None:
    """The candidate arithmetics whose emulation gives torch's output on the probe (input
    codes, input qparams, weight codes, weight qparams, output qparams); None when torch's
    conv did not run."""
    from .emulate import emulate
    from .torch_ref import run_inductor_conv

    x, xq, w, wq, oq = probe
    r = run_inductor_conv(x, xq, w, wq, None, oq.scale[0], oq.zero_point[0], geometry,
                          attrs.relu, attrs.float_output)
    if not r.ran:
        return None
    got = r.output_float if attrs.float_output else r.output_codes
    kept = []
    for combined, divides in candidates:
        em = emulate(Kernel(engine, "onednn", accumulation, combined, direct_scales=True,
                            divides_dst_scale=divides),
                     x, xq, w, wq, None, oq, geometry, attrs.relu, attrs.float_output)
        mine = em.output_float32 if attrs.float_output else em.output_codes
        if mine is not None and got is not None and np.array_equal(mine, got):
            kept.append((combined, divides))
    return kept


def _nudge(values: np.ndarray, ulps: int) -> np.ndarray:
    """float32 ``values`` moved by ``ulps`` units in the last place (toward +inf if > 0)."""
    out = np.asarray(values, dtype=np.float32).copy()
    toward = np.float32(np.inf if ulps > 0 else -np.inf)
    for _ in range(abs(ulps)):
        out = np.nextafter(out, toward)
    return out
