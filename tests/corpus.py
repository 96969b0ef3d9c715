"""Layers for calibrating the verdicts: healthy layers quantized the way torch's eager flow does
it (prepare, calibrate on the layer's own data, convert), captured with ``qconvdiag.capture``.
Activations keep 7 bits where this CPU's kernels sum int16 pairs (tests/cpu.py): 8 bits
saturate there, which is a fault (QCD040), not a healthy layer.

Every healthy layer must get no warning and no error on any path (tests/findings/test_corpus.py);
``python -m tests.corpus`` prints precision and recall per finding code over the whole corpus
(healthy layers, triggering cases and near misses, see tests/corpus_faults.py).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from qconvdiag.case import ConvCase

ENGINES = ("x86", "fbgemm", "onednn", "qnnpack")
#: The engine's default qconfig, or per-channel minmax weights with minmax activations.
QCONFIGS = ("default", "minmax_per_channel")
INPUTS = ("normal", "relu", "uniform", "image")
#: name -> (input shape, weight shape, groups, stride, padding)
GEOMETRIES: dict[str, tuple[tuple[int, ...], tuple[int, ...], int, int, int]] = {
    "conv2d": ((2, 8, 12, 12), (16, 8, 3, 3), 1, 1, 1),
    "conv2d_stride2": ((1, 16, 14, 14), (24, 16, 3, 3), 1, 2, 1),
    "pointwise": ((2, 16, 8, 8), (32, 16, 1, 1), 1, 1, 0),
    "depthwise": ((2, 16, 12, 12), (16, 1, 3, 3), 16, 1, 1),
    "grouped": ((1, 16, 10, 10), (16, 4, 3, 3), 4, 1, 1),
    "conv1d": ((2, 12, 40), (16, 12, 5), 1, 1, 2),
    "conv3d": ((1, 4, 6, 8, 8), (8, 4, 3, 3, 3), 1, 1, 1),
}


#: qnnpack's conv1d/conv3d modules cannot be saved: torch's unpack is conv2d-only there.
QNNPACK_2D_ONLY = ("conv1d", "conv3d")


@dataclass(frozen=True)
class Layer:
    label: str
    case: ConvCase
    engine: str


def _input(rng: np.random.Generator, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "relu":
        x = np.maximum(rng.standard_normal(shape) * 1.5 + 0.2, 0)
    elif kind == "uniform":
        x = rng.uniform(-1, 3, shape)
    else:  # image-like: smooth fields, normalised per channel as torchvision's transforms do
        x = rng.uniform(0, 1, shape)
        for axis in range(2, len(shape)):  # a few passes of neighbour averaging
            for _ in range(3):
                x = (x + np.roll(x, 1, axis) + np.roll(x, -1, axis)) / 3
        x = (x - 0.45) / 0.22
    return x.astype(np.float32)


def _weight(rng: np.random.Generator, shape: tuple[int, ...], bn_folded: bool) -> np.ndarray:
    fan_in = math.prod(shape[1:])
    w = rng.standard_normal(shape) * math.sqrt(2.0 / fan_in)
    if bn_folded:  # BatchNorm folded in: each output channel scaled by gamma / sqrt(var)
        w *= rng.uniform(0.5, 2.0, (shape[0],) + (1,) * (len(shape) - 1))
    return w.astype(np.float32)


def _qconfig(engine: str, which: str):  # type: ignore[no-untyped-def]
    import torch
    from torch.ao.quantization import QConfig
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    from tests.cpu import healthy_qconfig, pairs_here

    if which == "default":
        return healthy_qconfig(engine)
    # 7-bit activations where the kernels sum int16 pairs (tests/cpu.py)
    reduce_range = engine in ("x86", "fbgemm") or pairs_here(engine)
    return QConfig(
        activation=MinMaxObserver.with_args(dtype=torch.quint8, reduce_range=reduce_range),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                  qscheme=torch.per_channel_symmetric),
    )


def eager_quantize(conv, x, engine: str, qconfig_name: str = "default",  # type: ignore[no-untyped-def]
                   calibration=None, relu: bool = False):
    """torch's eager flow on one conv: QuantStub -> conv (-> ReLU, fused) -> DeQuantStub,
    prepare, calibrate, convert. Returns the quantized conv module and the quantized input it
    receives."""
    import torch
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, fuse_modules, prepare

    if relu:
        model = torch.nn.Sequential(QuantStub(), conv, torch.nn.ReLU(), DeQuantStub()).eval()
        model = fuse_modules(model, [["1", "2"]])
    else:
        model = torch.nn.Sequential(QuantStub(), conv, DeQuantStub()).eval()
    model.qconfig = _qconfig(engine, qconfig_name)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare(model)
            with torch.no_grad():
                for batch in (calibration if calibration is not None else [x]):
                    prepared(batch)
            quantized = convert(prepared)
            qx = quantized[0](x)
    finally:
        torch.backends.quantized.engine = previous
    return quantized[1], qx


def _conv_module(w_shape: tuple[int, ...], groups: int, stride: int, padding: int):  # type: ignore[no-untyped-def]
    import torch

    cls = {3: torch.nn.Conv1d, 4: torch.nn.Conv2d, 5: torch.nn.Conv3d}[len(w_shape)]
    return cls(w_shape[1] * groups, w_shape[0], w_shape[2:], stride=stride, padding=padding,
               groups=groups).eval()


def healthy_layer(seed: int, engine: str, qconfig: str, inputs: str, geometry: str,
                  bn_folded: bool = False, relu: bool = False) -> Layer:
    """One layer quantized by torch's eager flow with ``engine``'s qconfig, calibrated on its
    own input."""
    import torch

    import qconvdiag

    rng = np.random.default_rng(seed)
    x_shape, w_shape, groups, stride, padding = GEOMETRIES[geometry]
    conv = _conv_module(w_shape, groups, stride, padding)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(_weight(rng, w_shape, bn_folded)))
        assert conv.bias is not None
        conv.bias.copy_(torch.from_numpy((rng.standard_normal(w_shape[0]) * 0.1)
                                         .astype(np.float32)))
    x = torch.from_numpy(_input(rng, x_shape, inputs))
    qm, qx = eager_quantize(conv, x, engine, qconfig, relu=relu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    label = (f"{engine}/{qconfig}/{inputs}/{geometry}" + ("/bn" if bn_folded else "")
             + ("/relu" if relu else ""))
    return Layer(label, case, engine)


def healthy_specs() -> list[tuple[int, str, str, str, str, bool, bool]]:
    """Every engine x qconfig x input kind x geometry (208 layers: qnnpack's conv1d/conv3d
    modules cannot be saved), each seeded by its position; BatchNorm-folded weights on every
    other one, a fused ReLU (ConvReLU) on every third. Arguments of ``healthy_layer``."""
    out = []
    combos = itertools.product(ENGINES, QCONFIGS, INPUTS, GEOMETRIES)
    for i, (engine, qconfig, inputs, geometry) in enumerate(combos):
        if engine == "qnnpack" and geometry in QNNPACK_2D_ONLY:
            continue  # torch cannot unpack (save) qnnpack's conv1d/conv3d modules
        out.append((i, engine, qconfig, inputs, geometry, i % 2 == 1, i % 3 == 0))
    return out


def healthy_layers() -> Iterator[Layer]:
    for spec in healthy_specs():
        yield healthy_layer(*spec)


def evaluate(case: ConvCase, engine: str) -> tuple[dict[str, str], dict[str, str]]:
    """(code -> severity on the judged path, code -> severity on any path); the most severe
    when a code fires more than once."""
    from qconvdiag import Options, diagnose
    from qconvdiag.report import SEVERITIES

    report = diagnose(case, Options(engine=engine))
    judged = report.verdict.path if report.verdict else None
    on_judged: dict[str, str] = {}
    anywhere: dict[str, str] = {}
    for f in report.findings:
        for table in (anywhere, on_judged) if f.path in (None, judged) else (anywhere,):
            old = table.get(f.code)
            if old is None or SEVERITIES.index(f.severity) < SEVERITIES.index(old):
                table[f.code] = f.severity
    return on_judged, anywhere


@dataclass(frozen=True)
class Result:
    label: str
    healthy: bool
    expect: frozenset[str]
    forbid: frozenset[str]
    severity: str | None
    on_judged: dict[str, str]
    anywhere: dict[str, str]
    said: bool = False
    """The forbidden codes may be said as info (corpus_faults.Labeled.said)."""

    def forbidden_fired(self) -> list[str]:
        """The forbidden codes that fired on the judged path (as info too, unless ``said``)."""
        return [c for c in self.forbid if c in self.on_judged
                and not (self.said and self.on_judged[c] == "info")]


def run_corpus() -> list[Result]:
    """Every healthy layer and every planted fault, diagnosed (about a minute)."""
    from tests.corpus_faults import faults

    out = []
    for spec in healthy_specs():
        lay = healthy_layer(*spec)
        out.append(Result(lay.label, True, frozenset(), frozenset(), None,
                          *evaluate(lay.case, lay.engine)))
    for f in faults():
        out.append(Result(f.label, False, f.expect, f.forbid, f.severity,
                          *evaluate(f.build(), f.engine), said=f.said))
    return out


def precision_recall(results: list[Result]) -> dict[str, dict[str, float]]:
    """Per code over the whole corpus: a firing on the judged path counts as true where the case
    expects the code, as false where it forbids it; a warning or an error on any path of a
    healthy layer counts as false. A whole model's findings (MODEL_CODES) have their own tests:
    no single conv gives them."""
    from qconvdiag.findings import CODES, MODEL_CODES

    table = {c: {"cases": 0, "tp": 0, "fp": 0, "fn": 0} for c in CODES if c not in MODEL_CODES}
    for r in results:
        if r.healthy:
            for code, sev in r.anywhere.items():
                if sev != "info":
                    table[code]["fp"] += 1
            continue
        for code in r.expect:
            table[code]["cases"] += 1
            table[code]["tp" if code in r.on_judged else "fn"] += 1
        for code in r.forbidden_fired():
            table[code]["fp"] += 1
    out = {}
    for code, t in table.items():
        fired = t["tp"] + t["fp"]
        out[code] = {**t, "precision": t["tp"] / fired if fired else float("nan"),
                     "recall": t["tp"] / t["cases"] if t["cases"] else float("nan")}
    return out


def markdown(results: list[Result]) -> str:
    """The table docs/findings.md shows."""
    healthy = sum(r.healthy for r in results)
    faults_n = len(results) - healthy
    lines = [f"Measured on {healthy} healthy layers and {faults_n} planted cases "
             "(`python -m tests.corpus`):", "",
             "| code | planted | fired | false alarms | precision | recall |",
             "|---|---|---|---|---|---|"]
    for code, r in precision_recall(results).items():
        p = "-" if r["precision"] != r["precision"] else f"{r['precision']:.2f}"
        rc = "-" if r["recall"] != r["recall"] else f"{r['recall']:.2f}"
        lines.append(f"| {code} | {r['cases']} | {r['tp']} | {r['fp']} | {p} | {rc} |")
    return "\n".join(lines)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    print(markdown(run_corpus()))
