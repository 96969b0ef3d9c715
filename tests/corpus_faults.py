"""Faults planted the way users plant them, one group per finding code: at least three cases
that must trigger the code and one near miss that must not.

Each case carries what must fire (``expect``) and what must not (``forbid``); other codes may
fire (a hand-made setup usually has several faults). ``python -m tests.corpus`` turns the whole
corpus (these and the healthy layers of tests/corpus.py) into precision and recall per code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from qconvdiag.arithmetic.float_conv import conv64
from qconvdiag.case import ConvCase, ModuleState, QuantSetup, build_case
from qconvdiag.quantization.qparams import QParams, make_qparams, per_tensor, quantize
from tests.corpus import _input, _weight


@dataclass(frozen=True)
class Labeled:
    label: str
    build: Callable[[], ConvCase]
    """Builds the case (lazily: collecting the tests builds nothing)."""
    engine: str
    expect: frozenset[str] = frozenset()
    """Codes that must fire."""
    forbid: frozenset[str] = frozenset()
    """Codes that must not fire (at any severity, or above info when ``said`` is set)."""
    said: bool = False
    """The forbidden codes may be said as info: an effect worth naming that is no fault."""
    severity: str | None = None
    """When set: the expected codes must fire at least this severe."""


def qp(scale, zp, dtype="quint8", axis=None) -> QParams:  # type: ignore[no-untyped-def]
    if isinstance(scale, (list, tuple, np.ndarray)):
        zps = list(zp) if isinstance(zp, (list, tuple, np.ndarray)) else [zp] * len(scale)
        return make_qparams([float(s) for s in scale], [float(z) for z in zps], dtype,
                            0 if axis is None else axis, "t", "user")
    return make_qparams([float(scale)], [float(zp)], dtype, None, "t", "user")


@dataclass(frozen=True)
class Layer:
    """Float tensors of one layer and the good qparams for them."""

    x: np.ndarray
    w: np.ndarray
    b: np.ndarray | None
    geometry: dict[str, object]

    def case(self, setup: QuantSetup | None = None, **geo: object) -> ConvCase:
        return build_case(self.x, self.w, self.b, setup=setup, **{**self.geometry, **geo})

    def y(self) -> np.ndarray:
        c = self.case()
        return conv64(c.input, c.weight, c.bias, c.geometry)

    def input_qp(self, factor: float = 1.0, zp_shift: float = 0.0) -> QParams:
        lo, hi = min(float(self.x.min()), 0.0), max(float(self.x.max()), 0.0)
        s = (hi - lo) / 255 * factor
        return qp(s, round(-lo / s) + zp_shift)

    def weight_qp(self, factor: float = 1.0, per_channel: bool = False) -> QParams:
        if per_channel:
            m = np.abs(self.w.reshape(self.w.shape[0], -1)).max(axis=1) / 127.5 * factor
            return qp(np.where(m > 0, m, 1.0).tolist(), 0, "qint8", 0)  # torch's 1.0 for 0
        return qp(float(np.abs(self.w).max()) / 127.5 * factor, 0, "qint8")

    def output_qp(self, factor: float = 1.0) -> QParams:
        y = self.y()
        lo, hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
        s = (hi - lo) / 255 * factor
        return qp(s, min(255, round(-lo / s)))

    def setup(self, **over: object) -> QuantSetup:
        fields: dict[str, object] = dict(input_qparams=self.input_qp(),
                                         weight_qparams=self.weight_qp(),
                                         output_qparams=self.output_qp())
        fields.update(over)
        return QuantSetup(**fields)  # type: ignore[arg-type]


def layer(seed: int, kind: str = "conv2d", inputs: str = "relu", bn: bool = False,
          spread: float | None = None) -> Layer:
    rng = np.random.default_rng(1000 + seed)
    shapes = {
        "conv2d": ((2, 8, 10, 10), (12, 8, 3, 3), dict(padding=1)),
        "depthwise": ((1, 16, 12, 12), (16, 1, 3, 3), dict(padding=1, groups=16)),
        "conv1d": ((2, 6, 32), (8, 6, 5), dict(padding=2)),
        "pointwise": ((2, 16, 8, 8), (24, 16, 1, 1), dict()),
    }
    x_shape, w_shape, geo = shapes[kind]
    x = _input(rng, x_shape, inputs)
    w = _weight(rng, w_shape, bn)
    if spread is not None:  # output channels' ranges differ by up to ``spread``
        factors = spread ** rng.uniform(0, 1, w_shape[0])
        factors[0] = spread
        w = (w * factors.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
    b = (rng.standard_normal(w_shape[0]) * 0.1).astype(np.float32)
    return Layer(x, w, b, geo)


def module(weight_codes: np.ndarray, weight_qp: QParams, bias: np.ndarray | None,
           out: QParams | None = None) -> ModuleState:
    out = out or per_tensor(1.0, 0, "quint8", "module")
    return ModuleState(np.asarray(weight_codes, dtype=np.int64), weight_qp.with_source("module"),
                       bias, out.with_source("module"))


def _group(code: str, triggers: list[tuple[str, Callable[[], ConvCase], str]],
           misses: list[tuple[str, Callable[[], ConvCase], str]],
           severity: str | None = None,
           said: tuple[tuple[str, Callable[[], ConvCase], str], ...] = ()) -> Iterator[Labeled]:
    for label, build, engine in triggers:
        yield Labeled(f"{code} {label}", build, engine, frozenset({code}), severity=severity)
    for label, build, engine in misses:
        yield Labeled(f"{code} near miss: {label}", build, engine, forbid=frozenset({code}))
    for label, build, engine in said:  # near misses the code may name as info
        yield Labeled(f"{code} near miss (info at most): {label}", build, engine,
                      forbid=frozenset({code}), said=True)


def asymmetric_quint8(w: np.ndarray) -> QParams:
    """quint8 weight qparams by the activations' minmax formula (pytorch#31868)."""
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    s = (hi - lo) / 255
    return qp(s, round(-lo / s), "quint8")


def faults() -> Iterator[Labeled]:  # noqa: C901 - one table of cases
    from qconvdiag.casefile.generate import forum_case

    L1, L2, L3 = layer(1), layer(2, inputs="normal"), layer(3, "conv1d", "uniform")

    yield from _group("QCD001", [
        ("float input zero point", lambda: L1.case(L1.setup(input_qparams=L1.input_qp(
            zp_shift=2.7))), "x86"),
        ("float weight zero point", lambda: L2.case(L2.setup(weight_qparams=qp(
            float(np.abs(L2.w).max()) / 120, -3.4, "qint8"))), "x86"),
        ("float output zero point", lambda: L3.case(L3.setup(output_qparams=qp(
            L3.output_qp().scale[0], L3.output_qp().zero_point[0] + 0.5))), "fbgemm"),
    ], [("integral float zero point", lambda: L1.case(L1.setup(input_qparams=L1.input_qp(
        zp_shift=3.0))), "x86")])

    yield from _group("QCD002", [
        ("input zero point 300", lambda: L1.case(L1.setup(input_qparams=qp(
            L1.input_qp().scale[0], 300))), "x86"),
        ("weight zero point -200", lambda: L2.case(L2.setup(weight_qparams=qp(
            float(np.abs(L2.w).max()) / 127.5, -200, "qint8"))), "x86"),
        ("input zero point -5", lambda: L2.case(L2.setup(input_qparams=qp(
            L2.input_qp().scale[0], -5))), "fbgemm"),
    ], [("input zero point 255", lambda: L2.case(L2.setup(input_qparams=qp(
        float(-L2.x.min()) / 255 * 1.01, 255))), "x86")])

    def div254(t: np.ndarray, dtype: str) -> QParams:
        s = float(t.max() - t.min()) / 254
        lo = -128 if dtype == "qint8" else 0
        return qp(s, lo - round(float(t.min()) / s), dtype)

    yield from _group("QCD003", [
        ("input scale / 254", lambda: L1.case(L1.setup(input_qparams=div254(L1.x, "quint8"))),
         "x86"),
        ("weight scale / 254", lambda: L2.case(L2.setup(weight_qparams=div254(L2.w, "qint8"))),
         "x86"),
        ("conv1d input / 254", lambda: L3.case(L3.setup(input_qparams=div254(L3.x, "quint8"))),
         "qnnpack"),
    ], [("input scale / 255", lambda: L1.case(L1.setup()), "x86")])

    def central(lay: Layer, keep: float) -> QParams:
        lo, hi = np.quantile(lay.x, [(1 - keep) / 2, (1 + keep) / 2])
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        s = (hi - lo) / 255
        return qp(s, round(-lo / s))

    yield from _group("QCD010", [
        ("input range a third of the data's", lambda: L1.case(L1.setup(
            input_qparams=L1.input_qp(1 / 3))), "x86"),
        ("input range over the central 60%", lambda: L2.case(L2.setup(
            input_qparams=central(L2, 0.6))), "x86"),
        ("conv1d input range over the central 50%", lambda: L3.case(L3.setup(
            input_qparams=central(L3, 0.5))), "onednn"),
    ], [("input range 0.98x the data's", lambda: L2.case(L2.setup(
        input_qparams=L2.input_qp(0.98))), "x86")])

    yield from _group("QCD011", [
        ("qint8 input", lambda: L1.case(L1.setup(input_qparams=qp(
            float(L1.x.max()) / 127, 0, "qint8"))), "x86"),
        ("qint8 input on qnnpack", lambda: L2.case(L2.setup(input_qparams=qp(
            float(np.abs(L2.x).max()) / 127, 0, "qint8"))), "qnnpack"),
        ("qint32 input", lambda: L1.case(L1.setup(input_qparams=qp(
            float(L1.x.max()) / 1e6, 0, "qint32"))), "fbgemm"),
        ("per-channel input (pytorch#84052)", lambda: L2.case(L2.setup(input_qparams=qp(
            (np.abs(L2.x).max(axis=(0, 2, 3)) / 127).tolist(), 0, "quint8", 1))), "x86"),
    ], [("quint8 input", lambda: L1.case(L1.setup()), "x86")], severity="error")

    yield from _group("QCD012", [
        ("input step 8x", lambda: L1.case(L1.setup(input_qparams=L1.input_qp(8))), "x86"),
        ("input step 16x", lambda: L2.case(L2.setup(input_qparams=L2.input_qp(16))), "onednn"),
        ("conv1d input step 6x", lambda: L3.case(L3.setup(input_qparams=L3.input_qp(6))),
         "qnnpack"),
    ], [("input step 1.2x", lambda: L1.case(L1.setup(input_qparams=L1.input_qp(1.2))), "x86")],
        severity="warning")

    def uncalibrated(lay: Layer) -> ConvCase:
        """convert() without calibration: every observer returns scale 1.0, zero point 0."""
        w_qp = lay.weight_qp(per_channel=True)
        return lay.case(QuantSetup(
            input_qparams=per_tensor(1.0, 0, "quint8", "user"),
            module=module(quantize(lay.w, w_qp), w_qp, lay.b)))

    pixels = Layer((np.random.default_rng(7).integers(0, 256, (1, 3, 12, 12))
                    .astype(np.float32)), L1.w[:, :3] / 100, L1.b, dict(padding=1))
    yield from _group("QCD013", [
        ("normal input", lambda: uncalibrated(L2), "x86"),
        ("relu input", lambda: uncalibrated(L1), "fbgemm"),
        ("conv1d uniform input", lambda: uncalibrated(L3), "onednn"),
    ], [("pixel values 0..255 at scale 1.0", lambda: pixels.case(pixels.setup(
        input_qparams=per_tensor(1.0, 0, "quint8", "user"))), "x86")], severity="warning")

    yield from _group("QCD020", [
        ("weight scale a quarter", lambda: L1.case(L1.setup(weight_qparams=L1.weight_qp(0.25))),
         "x86"),
        ("per-channel scales a third", lambda: L2.case(L2.setup(
            weight_qparams=L2.weight_qp(1 / 3, per_channel=True))), "onednn"),
        ("conv1d weight scale a half", lambda: L3.case(L3.setup(
            weight_qparams=L3.weight_qp(0.5))), "qnnpack"),
    ], [("weight scale 0.995x", lambda: L1.case(L1.setup(weight_qparams=L1.weight_qp(0.995))),
         "x86")])

    def unsigned_formula(lay: Layer) -> QParams:
        s = float(lay.w.max() - lay.w.min()) / 254
        return qp(s, -(float(lay.w.min()) / s), "qint8")

    positive = Layer(L1.x, np.abs(L1.w) * 10, L1.b, L1.geometry)
    yield from _group("QCD021", [
        ("the forum's formula", lambda: forum_case(), "x86"),
        ("normal weights", lambda: L2.case(L2.setup(weight_qparams=unsigned_formula(L2))),
         "x86"),
        ("positive weights", lambda: positive.case(positive.setup(
            weight_qparams=unsigned_formula(positive))), "fbgemm"),
    ], [("qint8's own formula", lambda: L2.case(L2.setup(weight_qparams=qp(
        float(L2.w.max() - L2.w.min()) / 255,
        -128 - round(float(L2.w.min()) / (float(L2.w.max() - L2.w.min()) / 255)), "qint8"))),
        "x86")])

    yield from _group("QCD022", [
        ("weight zero point 3", lambda: L1.case(L1.setup(weight_qparams=qp(
            float(np.abs(L1.w).max()) / 125, 3, "qint8"))), "onednn"),
        ("the forum on onednn", lambda: forum_case(), "onednn"),
        ("per-channel zero points", lambda: L2.case(L2.setup(weight_qparams=qp(
            (np.abs(L2.w.reshape(12, -1)).max(axis=1) / 120).tolist(), [2] * 12, "qint8", 0))),
         "onednn"),
    ], [("weight zero point 3 on x86", lambda: L1.case(L1.setup(weight_qparams=qp(
        float(np.abs(L1.w).max()) / 125, 3, "qint8"))), "x86")], severity="error")

    yield from _group("QCD023", [
        ("depthwise, channels 100x apart", lambda: (lambda d: d.case(d.setup()))(
            layer(5, "depthwise", "normal", spread=100.0)), "x86"),
        ("dense, channels 50x apart", lambda: (lambda d: d.case(d.setup()))(
            layer(6, "conv2d", "relu", spread=50.0)), "x86"),
        ("pointwise on qnnpack, channels 200x apart", lambda: (lambda d: d.case(d.setup()))(
            layer(7, "pointwise", "normal", spread=200.0)), "qnnpack"),
    ], [("channels 1.2x apart", lambda: (lambda d: d.case(d.setup()))(
        layer(8, "conv2d", "relu", spread=1.2)), "x86")])

    def holding(lay: Layer, codes: np.ndarray, w_qp: QParams) -> ConvCase:
        s = lay.setup()
        return lay.case(replace(s, module=module(codes, w_qp, lay.b, s.output_qparams)))

    def steps(w_qp: QParams) -> np.ndarray:  # the weight step of each output channel
        return np.asarray(w_qp.scales()).reshape(-1, 1, 1, 1)

    other = layer(9).w
    # the float weight (max 0.77) packed with set_weight_bias at scale 1.0: the qparams a fresh
    # module has, but codes of the float weight (some +-1) and the float bias beside them
    hand = Layer(L1.x, (L1.w * 0.77 / float(np.abs(L1.w).max())).astype(np.float32),
                 np.linspace(-0.3, 0.3, 12).astype(np.float32), L1.geometry)

    def packed_at_one() -> ConvCase:  # the module alone says what the weight is
        one = qp(1.0, 0, "qint8")
        s = hand.setup(weight_qparams=None)
        return hand.case(replace(s, module=module(quantize(hand.w, one), one, hand.b,
                                                  s.output_qparams)))

    yield from _group("QCD024", [
        ("the forum's never-set weight", lambda: forum_case(), "x86"),
        ("a different weight in the module", lambda: holding(
            L1, quantize(other, L1.weight_qp()), L1.weight_qp()), "x86"),
        ("a fresh module captured alone", lambda: L2.case(QuantSetup(
            input_qparams=L2.input_qp(), module=module(
                np.zeros(L2.w.shape, np.int64), per_tensor(1.0, 0, "qint8", "m"), None,
                L2.output_qp()))), "fbgemm"),
        ("the weight's codes at 10x their scale (written after convert)", lambda: holding(
            L1, quantize(L1.w, L1.weight_qp()), L1.weight_qp(10)), "x86"),
        ("the float weight moved 0.45 steps after convert (codes one step off)", lambda: holding(
            L1, quantize(L1.w - 0.45 * steps(L1.weight_qp()), L1.weight_qp()),
            L1.weight_qp()), "x86"),
    ], [("the module holds the quantized weight", lambda: holding(
        L1, quantize(L1.w, L1.weight_qp()), L1.weight_qp()), "x86"),
        ("the float weight packed by hand at scale 1.0 (a coarse step: QCD026)",
         lambda: packed_at_one(), "x86")], severity="warning")

    yield from _group("QCD027", [
        ("conv2d, BatchNorm folded into the module only", lambda: bn_folded(L1, 21), "x86"),
        ("conv1d on fbgemm", lambda: bn_folded(L3, 22), "fbgemm"),
        ("a PT2E conv (prepare_pt2e folds BatchNorm)", lambda: bn_folded(L2, 23, pt2e=True),
         "x86_inductor"),
        ("a pruned (all-zero) output channel", lambda: bn_folded(L1, 25, pruned=True), "x86"),
    ], [("the float reference folded too", lambda: bn_folded(L1, 21, reference_folded=True),
         "x86"),
        ("the module holds the scaled weight plus 2 steps of noise", lambda: bn_folded(
            L1, 24, noise_steps=2.0), "x86"),
        ("one factor for every channel: the weight's codes at 10x their scale", lambda: holding(
            L1, quantize(L1.w, L1.weight_qp()), L1.weight_qp(10)), "x86")])

    square = Layer(_input(np.random.default_rng(11), (1, 6, 8, 8), "relu"),
                   _weight(np.random.default_rng(12), (6, 6, 3, 3), True), None,
                   dict(padding=1))
    yield from _group("QCD025", [
        ("scales along axis 1", lambda: square.case(square.setup(weight_qparams=qp(
            (np.abs(square.w).max(axis=(0, 2, 3)) / 127.5).tolist(), 0, "qint8", 1))), "x86"),
        ("scales along axis 1 on fbgemm", lambda: square.case(square.setup(weight_qparams=qp(
            (np.abs(square.w).max(axis=(0, 2, 3)) / 127.5).tolist(), 0, "qint8", 1))),
         "fbgemm"),
        ("scales along axis 1 on qnnpack", lambda: square.case(square.setup(weight_qparams=qp(
            (np.abs(square.w).max(axis=(0, 2, 3)) / 127.5).tolist(), 0, "qint8", 1))),
         "qnnpack"),
    ], [("scales along axis 0", lambda: square.case(square.setup(
        weight_qparams=square.weight_qp(per_channel=True))), "x86")])

    yield from _group("QCD026", [
        ("weight scale 100x", lambda: L1.case(L1.setup(weight_qparams=L1.weight_qp(100))),
         "x86"),
        ("per-channel scales 20x", lambda: L2.case(L2.setup(
            weight_qparams=L2.weight_qp(20, per_channel=True))), "onednn"),
        ("conv1d weight scale 30x", lambda: L3.case(L3.setup(weight_qparams=L3.weight_qp(30))),
         "qnnpack"),
        ("the float weight packed by hand at scale 1.0", lambda: packed_at_one(), "x86"),
    ], [("weight scale 1.3x", lambda: L1.case(L1.setup(weight_qparams=L1.weight_qp(1.3))),
         "x86")], severity="warning")

    yield from _group("QCD028", [
        ("quint8 weights (the activations' formula) on x86", lambda: L1.case(L1.setup(
            weight_qparams=asymmetric_quint8(L1.w))), "x86"),
        ("quint8 weights on qnnpack", lambda: L2.case(L2.setup(
            weight_qparams=asymmetric_quint8(L2.w))), "qnnpack"),
        ("quint8 weights, zero point 0, on onednn: codes above 127 read as negative",
         lambda: L1.case(L1.setup(weight_qparams=qp(float(np.abs(L1.w).max()) / 255, 0,
                                                    "quint8"))), "onednn"),
    ], [("qint8 weights", lambda: L1.case(L1.setup()), "x86")], severity="error",
        said=(("quint8 weights, zero point 0, all codes below 128, on onednn (read the same)",
               lambda: L1.case(L1.setup(weight_qparams=qp(float(np.abs(L1.w).max()) / 127, 0,
                                                          "quint8"))), "onednn"),))

    def module_bias(lay: Layer, bias: np.ndarray | None) -> ConvCase:
        s = lay.setup()
        return lay.case(replace(s, module=module(
            quantize(lay.w, s.weight_qparams), s.weight_qparams, bias, s.output_qparams)))

    big_bias = Layer(L1.x, L1.w, np.full(12, 0.8, np.float32), L1.geometry)
    yield from _group("QCD030", [
        ("zero bias in the module", lambda: module_bias(big_bias, np.zeros(12, np.float32)),
         "x86"),
        ("no bias in the module", lambda: module_bias(big_bias, None), "fbgemm"),
        ("another bias in the module", lambda: module_bias(
            big_bias, np.full(12, -0.8, np.float32)), "onednn"),
    ], [("the float bias in the module", lambda: module_bias(big_bias, big_bias.b), "x86")])

    def coarse_bias_grid(lay: Layer) -> ConvCase:
        """Hand-made coarse input and weight steps (bias grid input_scale * weight_scale = 0.5)
        against a fine output step."""
        bias = np.full(lay.w.shape[0], 0.2, np.float32)
        lay2 = Layer(lay.x, lay.w, bias, lay.geometry)
        return lay2.case(lay2.setup(input_qparams=qp(1.0, 0), weight_qparams=qp(0.5, 0, "qint8"),
                                    output_qparams=qp(0.01, 128)))

    yield from _group("QCD031", [
        ("relu input", lambda: coarse_bias_grid(L1), "qnnpack"),
        ("normal input", lambda: coarse_bias_grid(L2), "qnnpack"),
        ("pointwise", lambda: coarse_bias_grid(layer(13, "pointwise")), "qnnpack"),
    ], [("the same on x86 (float bias)", lambda: coarse_bias_grid(L1), "x86")])

    def saturating(lay: Layer) -> ConvCase:
        """8-bit activations near the top code and weights near +-127: pairs pass int16."""
        x = np.abs(lay.x) + float(np.abs(lay.x).max())
        lay2 = Layer(x.astype(np.float32), lay.w, lay.b, lay.geometry)
        return lay2.case(lay2.setup())

    yield from _group("QCD040", [
        ("the forum on x86", lambda: forum_case(), "x86"),
        ("codes near 255", lambda: saturating(L1), "fbgemm"),
        ("conv1d codes near 255", lambda: saturating(L3), "x86"),
    ], [("7-bit activations", lambda: (lambda c: replace(c, setup=replace(
        c.setup, input_qparams=qp(c.setup.input_qparams.scale[0] * 2,
                                  c.setup.input_qparams.zero_point[0] // 2))))(
        saturating(L1)), "fbgemm")])

    def wide(k: int, w_zp: int) -> ConvCase:
        x = np.full((1, k, 3, 3), 10.0, np.float32)
        w = np.full((1, k, 3, 3), 1.0, np.float32)
        return build_case(x, w, None, setup=QuantSetup(
            input_qparams=qp(10.0 / 255, 0), weight_qparams=qp(1.0 / 255, w_zp, "qint8"),
            output_qparams=qp(1000.0, 0)))

    yield from _group("QCD041", [
        ("K = 36000, weight zero point -128", lambda: wide(4000, -128), "x86"),
        ("K = 45000", lambda: wide(5000, -128), "fbgemm"),
        ("K = 36000 on qnnpack", lambda: wide(4000, -128), "qnnpack"),
    ], [("K = 288", lambda: wide(32, -128), "x86")])

    from tests.corpus import healthy_layer

    yield from _group("QCD042", [
        ("x86 default", lambda: healthy_layer(1, "x86", "default", "relu", "conv2d").case,
         "x86"),
        ("fbgemm default", lambda: healthy_layer(2, "fbgemm", "default", "normal",
                                                 "depthwise").case, "fbgemm"),
        ("x86 minmax", lambda: healthy_layer(3, "x86", "minmax_per_channel", "image",
                                             "conv1d").case, "x86"),
    # qnnpack keeps 8 bits on every CPU (it accumulates exactly); onednn's default does only
    # where VNNI sums exactly (tests/cpu.py)
    ], [("qnnpack default (8-bit)", lambda: healthy_layer(4, "qnnpack", "default", "relu",
                                                          "conv2d").case, "qnnpack")])

    def output_defaults(lay: Layer, uncalibrated_input: bool = False) -> ConvCase:
        s = lay.setup()
        return lay.case(QuantSetup(
            input_qparams=per_tensor(1.0, 0, "quint8", "user") if uncalibrated_input
            else s.input_qparams,
            module=module(quantize(lay.w, s.weight_qparams), s.weight_qparams, lay.b)))

    big_out = Layer(L1.x * 40, L1.w, L1.b, L1.geometry)
    yield from _group("QCD050", [
        ("the forum", lambda: forum_case(), "x86"),
        ("normal outputs", lambda: output_defaults(L2), "x86"),
        ("convert without calibration", lambda: output_defaults(L3, True), "qnnpack"),
    ], [("outputs spanning 0..255", lambda: (lambda lay: lay.case(lay.setup(
        output_qparams=per_tensor(1.0, 0, "quint8", "user"))))(big_out), "x86")],
        severity="warning")

    def trimmed_output(lay: Layer, keep: float) -> QParams:
        y = lay.y()
        lo, hi = np.quantile(y, [(1 - keep) / 2, (1 + keep) / 2])
        lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
        s = (hi - lo) / 255
        return qp(s, round(-lo / s))

    def reach_output(lay: Layer, keep: float) -> QParams:
        y = lay.y()
        lo, hi = keep * min(float(y.min()), 0.0), keep * max(float(y.max()), 0.0)
        s = (hi - lo) / 255
        return qp(s, round(-lo / s))

    yield from _group("QCD051", [
        ("output range a quarter", lambda: L1.case(L1.setup(output_qparams=L1.output_qp(0.25))),
         "x86"),
        ("zero point 0 for signed outputs", lambda: L2.case(L2.setup(output_qparams=qp(
            float(L2.y().max()) / 255, 0))), "fbgemm"),
        ("conv1d output range over the central 50%", lambda: L3.case(L3.setup(
            output_qparams=trimmed_output(L3, 0.5))), "onednn"),
        ("a hand-written range over 80% of the reach (0.4% of outputs saturate)",
         lambda: L2.case(L2.setup(output_qparams=reach_output(L2, 0.8))), "x86"),
    ], [("0.1% of outputs trimmed", lambda: L2.case(L2.setup(
        output_qparams=trimmed_output(L2, 0.999))), "x86")],
        said=(("a histogram observer's trim: the outliers past 80% of the reach",
               lambda: L2.case(L2.setup(
                   output_qparams=reach_output(L2, 0.8).with_source("module"))), "x86"),))

    yield from _group("QCD052", [
        ("output step 8x", lambda: L1.case(L1.setup(output_qparams=L1.output_qp(8))), "x86"),
        ("output step 5x", lambda: L2.case(L2.setup(output_qparams=L2.output_qp(5))), "qnnpack"),
        ("conv1d output step 16x", lambda: L3.case(L3.setup(output_qparams=L3.output_qp(16))),
         "onednn"),
    ], [("x86 default (7-bit, 2x)", lambda: healthy_layer(5, "x86", "default", "normal",
                                                          "conv2d").case, "x86")],
        severity="warning")

    yield from _group("QCD053", [
        ("output zero point 300", lambda: L1.case(L1.setup(output_qparams=qp(
            L1.output_qp().scale[0], 300))), "x86"),
        ("output zero point -10", lambda: L2.case(L2.setup(output_qparams=qp(
            L2.output_qp().scale[0], -10))), "fbgemm"),
        ("output zero point 1000", lambda: L3.case(L3.setup(output_qparams=qp(
            L3.output_qp().scale[0], 1000))), "qnnpack"),
    ], [("output zero point 255", lambda: L2.case(L2.setup(output_qparams=qp(
        float(-L2.y().min()) / 255 * 1.01, 255))), "x86")])

    def signed_output(lay: Layer, zp: int) -> ConvCase:
        """Output qparams written for qint8 (signed outputs around zero point 0)."""
        y = lay.y()
        scale = float(np.abs(y).max()) / 127.5
        return lay.case(lay.setup(output_qparams=qp(scale, zp, "qint8")))

    yield from _group("QCD054", [
        ("qint8 output qparams, zero point 0", lambda: signed_output(L2, 0), "x86"),
        ("qint8 output qparams on qnnpack", lambda: signed_output(L3, 0), "qnnpack"),
        ("qint8 output qparams, zero point -10", lambda: signed_output(L2, -10), "fbgemm"),
    ], [("quint8 output qparams", lambda: L2.case(L2.setup()), "x86")])

    def groupwise(groups: int) -> ConvCase:
        """fbgemm's groupwise kernel (3x3, padding 1, 4 channels per group in and out)."""
        rng = np.random.default_rng(groups)
        lay = Layer(_input(rng, (1, 4 * groups, 8, 8), "relu"),
                    _weight(rng, (4 * groups, 4, 3, 3), False),
                    (rng.standard_normal(4 * groups) * 0.1).astype(np.float32),
                    dict(padding=1, groups=groups))
        return lay.case(lay.setup())

    yield from _group("QCD062", [
        ("5 groups of 4 channels on fbgemm", lambda: groupwise(5), "fbgemm"),
        ("7 groups of 4 channels on fbgemm", lambda: groupwise(7), "fbgemm"),
        ("9 groups of 4 channels on fbgemm", lambda: groupwise(9), "fbgemm"),
    ], [("8 groups of 4 channels on fbgemm", lambda: groupwise(8), "fbgemm")],
        severity="error")

    yield from _group("QCD060", [
        ("the forum", lambda: forum_case(), "x86"),
        ("eager flow on x86", lambda: healthy_layer(6, "x86", "default", "relu",
                                                    "conv2d").case, "x86"),
        ("eager flow on qnnpack", lambda: healthy_layer(7, "qnnpack", "default", "image",
                                                        "pointwise").case, "qnnpack"),
    ], [("a float-only case", lambda: L1.case(), "x86")])

    yield from _group("QCD070", [
        ("hand-made minmax qparams", lambda: L1.case(L1.setup()), "x86"),
        # qnnpack: exact on every CPU (8-bit inputs saturate int16 pairs elsewhere without VNNI)
        ("per-channel minmax on qnnpack", lambda: L2.case(L2.setup(
            weight_qparams=L2.weight_qp(per_channel=True))), "qnnpack"),
        ("a float-only conv1d (production)", lambda: L3.case(), "qnnpack"),
    ], [("input step 8x", lambda: L1.case(L1.setup(input_qparams=L1.input_qp(8))), "x86")])



#: Codes the corpus cannot plant: torch and the emulation always agree here, so QCD061 is
#: tested by forcing a disagreement (tests/findings/test_findings.py).
NOT_PLANTED = ("QCD061",)


def bn_folded(lay: Layer, seed: int, pt2e: bool = False, reference_folded: bool = False,
              noise_steps: float = 0.0, pruned: bool = False) -> ConvCase:
    """A conv whose quantized module has a BatchNorm folded in (w * gamma / sqrt(var + eps),
    (b - mean) * gamma / sqrt(var + eps) + beta; per-channel symmetric weights, output qparams
    for the folded output), compared with the float conv before the BatchNorm (or, with
    ``reference_folded``, with the folded one: the right comparison). ``pruned``: the first
    output channel's float weight is all zero, as pruning leaves it (and folding keeps it)."""
    if pruned:
        w0 = lay.w.copy()
        w0[0] = 0
        lay = Layer(lay.x, w0, lay.b, lay.geometry)
    rng = np.random.default_rng(seed)
    out = lay.w.shape[0]
    factor = rng.uniform(0.4, 2.5, out)
    mean, beta = rng.normal(0, 0.3, out), rng.normal(0, 0.2, out)
    shape = (-1,) + (1,) * (lay.w.ndim - 1)
    w = (lay.w * factor.reshape(shape)).astype(np.float32)
    b = (((lay.b if lay.b is not None else 0) - mean) * factor + beta).astype(np.float32)
    folded = Layer(lay.x, w, b, lay.geometry)
    w_qp = folded.weight_qp(per_channel=True)
    if noise_steps:
        steps = np.asarray(w_qp.scale).reshape(shape)
        w = (w + rng.normal(0, noise_steps, w.shape) * steps).astype(np.float32)
    codes = quantize(w, w_qp)
    x_qp = folded.input_qp()
    setup = QuantSetup(input_qparams=x_qp, module=module(codes, w_qp, b, folded.output_qp()),
                       **({"input_codes": quantize(lay.x, x_qp)} if pt2e else {}))
    reference = folded if reference_folded else lay
    return build_case(lay.x, reference.w, reference.b, setup=setup,
                      flow="pt2e" if pt2e else "eager", **lay.geometry)
