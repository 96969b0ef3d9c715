"""Requantization checked where it is fragile: outputs placed within a float32 ulp or two of a
.5 tie, where the order of the float32 operations decides the code.

Each case is one input pixel (codes 255 and 1, per group) through a conv with many output
channels; channel o's two weights (w0, w1) make the accumulator 255 * w0 + w1 the value whose
requantized result lies closest to a tie, for random input/weight/output scales, zero points
and bias. Layouts: ``dense`` and ``grouped8`` (1x1 convs: fbgemm's GEMM), ``groupwise`` (256
groups of 2 channels, 3x3 with padding 1, only the centre tap set: fbgemm's groupwise kernel)
and ``depthwise`` (512 channels, 3x3 with padding 1 over a 1x2 input, the centre and right
taps set: fbgemm's depthwise kernel); each runs its own requantization code. A random layer
almost never lands on such values (about 1 output in 100,000 of a large layer).
Prints one JSON line: mismatched outputs per engine, of how many.

    python -m tests.near_ties [--layouts dense,grouped8,...] [--engines x86,...] SEED [SEED ...]
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np

from qconvdiag.arithmetic.emulate import emulate
from qconvdiag.arithmetic.engines import LayerAttrs, probe, probe_pt2e, select_kernel
from qconvdiag.arithmetic.torch_ref import run_conv
from qconvdiag.case import Geometry
from qconvdiag.quantization.qparams import QParams, make_qparams

CHANNELS = 512
ENGINES = ("x86", "onednn", "fbgemm", "qnnpack", "x86_inductor")


LAYOUTS = ("dense", "grouped8", "groupwise", "depthwise")


def _case(rng: np.random.Generator, per_channel: bool, bias: bool, layout: str
          ) -> tuple[np.ndarray, QParams, np.ndarray, QParams, np.ndarray | None, QParams,
                     Geometry]:
    in_s = float(rng.uniform(0.005, 0.05))
    out_s = float(rng.uniform(0.01, 0.1))
    zp = int(rng.integers(0, 256))
    w_s = (rng.uniform(0.001, 0.02, CHANNELS) if per_channel
           else np.full(CHANNELS, float(rng.uniform(0.001, 0.02))))
    b = (rng.standard_normal(CHANNELS) * 0.2).astype(np.float32) if bias else None
    pairs = np.zeros((CHANNELS, 2), dtype=np.int64)
    for o in range(CHANNELS):
        step = in_s * w_s[o] / out_s
        shift = 0.0 if b is None else float(b[o]) / out_s
        accs = np.arange(-32000, 32001)
        y = accs * step + shift
        inside = (y + zp >= 0) & (y + zp <= 255)
        dist = np.where(inside, np.abs(y - np.floor(y) - 0.5), np.inf)
        acc = int(accs[int(np.argmin(dist))])
        w0 = int(np.clip(round(acc / 255), -128, 127))
        pairs[o] = w0, int(np.clip(acc - 255 * w0, -128, 127))
    x, w, g = _layout(pairs, layout)
    xq = make_qparams([in_s], [0], "quint8", None, "i", "test")
    wq = (make_qparams(list(w_s), [0] * CHANNELS, "qint8", 0, "w", "test") if per_channel
          else make_qparams([float(w_s[0])], [0], "qint8", None, "w", "test"))
    oq = make_qparams([out_s], [zp], "quint8", None, "o", "test")
    return x, xq, w, wq, b, oq, g


def _layout(pairs: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Input codes, weight codes and geometry that make output channel o's accumulator
    255 * pairs[o, 0] + pairs[o, 1] (at the first output position)."""
    if layout in ("dense", "grouped8"):
        groups = 1 if layout == "dense" else 8
        x = np.tile(np.array([255, 1], dtype=np.int64), groups).reshape(1, 2 * groups, 1, 1)
        return x, pairs.reshape(CHANNELS, 2, 1, 1), Geometry((1, 1), (0, 0), (1, 1), groups)
    if layout == "groupwise":  # 2 channels per group in and out; padding holds code 0
        groups = CHANNELS // 2
        x = np.tile(np.array([255, 1], dtype=np.int64), groups).reshape(1, CHANNELS, 1, 1)
        w = np.zeros((CHANNELS, 2, 3, 3), dtype=np.int64)
        w[:, :, 1, 1] = pairs
        return x, w, Geometry((1, 1), (1, 1), (1, 1), groups)
    # depthwise: input row (255, 1); output 0 reads them through taps (1, 1) and (1, 2)
    x = np.tile(np.array([255, 1], dtype=np.int64), CHANNELS).reshape(1, CHANNELS, 1, 2)
    w = np.zeros((CHANNELS, 1, 3, 3), dtype=np.int64)
    w[:, 0, 1, 1], w[:, 0, 1, 2] = pairs[:, 0], pairs[:, 1]
    return x, w, Geometry((1, 1), (1, 1), (1, 1), CHANNELS)


def check(seeds: list[int], layouts: tuple[str, ...] = LAYOUTS,
          engines: tuple[str, ...] = ENGINES) -> dict[str, list[int]]:
    profiles = {**probe(), **probe_pt2e()}
    result = {e: [0, 0] for e in engines if profiles[e].available}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for per_channel, bias, layout in itertools.product((False, True), (False, True),
                                                           layouts):
            x, xq, w, wq, b, oq, g = _case(rng, per_channel, bias, layout)
            cin_g, out_g = w.shape[1], CHANNELS // g.groups
            for engine in result:
                r = run_conv(engine, x, xq, w, wq, b, oq.scale[0], oq.zero_point[0], g)
                if not r.ran or r.output_codes is None:
                    continue
                attrs = LayerAttrs(bool(xq.zero_point[0]), bool(oq.zero_point[0]),
                                   per_channel=wq.per_channel)
                kernel = select_kernel(engine, wq, g.groups, cin_g, out_g, g, w.shape[2:],
                                       x.shape, attrs)
                em = emulate(kernel, x, xq, w, wq, b, oq, g)
                result[engine][0] += int(np.count_nonzero(em.output_codes != r.output_codes))
                result[engine][1] += int(r.output_codes.size)
    return result


def _option(args: list[str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if name not in args:
        return default
    i = args.index(name)
    value = tuple(args[i + 1].split(","))
    del args[i:i + 2]
    return value


if __name__ == "__main__":
    args = sys.argv[1:]
    layouts = _option(args, "--layouts", LAYOUTS)
    engines = _option(args, "--engines", ENGINES)
    print(json.dumps(check([int(s) for s in args] or [0], layouts, engines)))
