"""Stage-ladder cost for one realistic layer, as a ratio to one float32 conv forward.

(1, 256, 56, 56) x (256, 256, 3, 3), padding 1, one engine: the time of the whole stage ladder
(emulation, ladder states, metrics) and of the full diagnosis (both paths, torch check,
findings), each divided by one float32 conv forward of the same layer measured in the same
process. Median of several runs. Targets: ladder <= 8x (issue 3), diagnosis <= 5x (issue 7).

    .venv/bin/python benchmarks/bench_layer.py [--repeats N] [--engine x86]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import torch
    import torch.nn.functional as F

    from qconvdiag import Options, diagnose
    from qconvdiag.arithmetic.float_conv import conv64
    from qconvdiag.case import build_case
    from qconvdiag.diagnosis import run_path  # one path's ladder alone: internal
    from qconvdiag.quantization.paths import ProductionOptions, build_production

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engine", default="x86")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((1, 256, 56, 56)), 0).astype(np.float32)
    w = (rng.standard_normal((256, 256, 3, 3)) / 48).astype(np.float32)
    b = (rng.standard_normal(256) * 0.1).astype(np.float32)
    case = build_case(x, w, b, padding=1, source="bench")
    xt, wt, bt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b)
    with torch.no_grad():
        F.conv2d(xt, wt, bt, padding=1)  # warm-up
        t_conv = median_time(lambda: F.conv2d(xt, wt, bt, padding=1), max(args.repeats, 5))

    spec = build_production(case, args.engine, ProductionOptions())
    run_path(case, spec, args.engine)  # warm-up (probe, first-call costs)
    y0 = conv64(x, w, b, case.geometry)  # shared by every path; measured in the diagnosis
    t_ladder = median_time(lambda: run_path(case, spec, args.engine, y0), args.repeats)
    t_diag = median_time(lambda: diagnose(case, Options(engine=args.engine)), args.repeats)

    print(f"float32 conv forward: {t_conv * 1e3:.1f} ms (torch threads: {torch.get_num_threads()})")
    print(f"stage ladder, one path (float reference excluded), engine {args.engine}: "
          f"{t_ladder * 1e3:.0f} ms = "
          f"{t_ladder / t_conv:.1f}x float conv (target <= 8x)")
    print(f"full diagnosis (production path, observers, torch check, findings): "
          f"{t_diag * 1e3:.0f} ms = {t_diag / t_conv:.1f}x float conv (target <= 5x)")


if __name__ == "__main__":
    main()
