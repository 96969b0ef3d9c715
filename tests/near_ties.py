"""Requantization checked where it is fragile: outputs placed within a float32 ulp or two of a
.5 tie, where the order of the float32 operations decides the code.

Each case is one input pixel (codes 255 and 1, per group) through a 1x1 conv with many output
channels, dense or in 8 groups;
channel o's weights (w0, w1) make the accumulator 255 * w0 + w1 the value whose requantized
result lies closest to a tie, for random input/weight/output scales, zero points and bias. A
random layer almost never lands on such values (about 1 output in 100,000 of a large layer).
Prints one JSON line: mismatched outputs per engine, of how many.

    python -m tests.near_ties [--dense] SEED [SEED ...]
"""

from __future__ import annotations

import itertools
import json
import sys

import numpy as np

from qconvdiag.case import Geometry
from qconvdiag.emulate import emulate
from qconvdiag.engines import probe, select_kernel
from qconvdiag.qparams import QParams, make_qparams
from qconvdiag.torch_ref import run_conv

CHANNELS = 512
ENGINES = ("x86", "onednn", "fbgemm", "qnnpack")


def _case(rng: np.random.Generator, per_channel: bool, bias: bool, groups: int
          ) -> tuple[np.ndarray, QParams, np.ndarray, QParams, np.ndarray | None, QParams]:
    in_s = float(rng.uniform(0.005, 0.05))
    out_s = float(rng.uniform(0.01, 0.1))
    zp = int(rng.integers(0, 256))
    w_s = (rng.uniform(0.001, 0.02, CHANNELS) if per_channel
           else np.full(CHANNELS, float(rng.uniform(0.001, 0.02))))
    b = (rng.standard_normal(CHANNELS) * 0.2).astype(np.float32) if bias else None
    w = np.zeros((CHANNELS, 2, 1, 1), dtype=np.int64)
    for o in range(CHANNELS):
        step = in_s * w_s[o] / out_s
        shift = 0.0 if b is None else float(b[o]) / out_s
        accs = np.arange(-32000, 32001)
        y = accs * step + shift
        inside = (y + zp >= 0) & (y + zp <= 255)
        dist = np.where(inside, np.abs(y - np.floor(y) - 0.5), np.inf)
        acc = int(accs[int(np.argmin(dist))])
        w0 = int(np.clip(round(acc / 255), -128, 127))
        w[o, 0, 0, 0], w[o, 1, 0, 0] = w0, int(np.clip(acc - 255 * w0, -128, 127))
    x = np.tile(np.array([255, 1], dtype=np.int64), groups).reshape(1, 2 * groups, 1, 1)
    xq = make_qparams([in_s], [0], "quint8", None, "i", "test")
    wq = (make_qparams(list(w_s), [0] * CHANNELS, "qint8", 0, "w", "test") if per_channel
          else make_qparams([float(w_s[0])], [0], "qint8", None, "w", "test"))
    oq = make_qparams([out_s], [zp], "quint8", None, "o", "test")
    return x, xq, w, wq, b, oq


def check(seeds: list[int], groups_list: tuple[int, ...] = (1, 8)) -> dict[str, list[int]]:
    profiles = probe()
    result = {e: [0, 0] for e in ENGINES if profiles[e].available}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for per_channel, bias, groups in itertools.product((False, True), (False, True),
                                                           groups_list):
            x, xq, w, wq, b, oq = _case(rng, per_channel, bias, groups)
            g = Geometry((1, 1), (0, 0), (1, 1), groups)
            for engine in result:
                r = run_conv(engine, x, xq, w, wq, b, oq.scale[0], oq.zero_point[0], g)
                if not r.ran or r.output_codes is None:
                    continue
                kernel = select_kernel(engine, wq, groups, 2, CHANNELS // groups, g, (1, 1))
                em = emulate(kernel, x, xq, w, wq, b, oq, g)
                result[engine][0] += int(np.count_nonzero(em.output_codes != r.output_codes))
                result[engine][1] += int(r.output_codes.size)
    return result


if __name__ == "__main__":
    dense_only = "--dense" in sys.argv
    seeds = [int(s) for s in sys.argv[1:] if s != "--dense"] or [0]
    print(json.dumps(check(seeds, (1,) if dense_only else (1, 8))))
