"""The model walk's cost next to Numeric Suite's, measured side by side in one process.

A ResNet-18-shaped model (benchmarks/resnet_shape.py: 20 convs, BatchNorm folded, fused ReLUs),
quantized with torch.ao's eager flow and the engine's default qconfig, one batch of images:

* Numeric Suite's ``compare_model_outputs`` (one float and one quantized forward, logging);
* qconvdiag's screening of every conv (``top=0``): ``capture_model`` (both forwards with hooks,
  the float model's output recomputed at each conv with BatchNorm folded) and ``walk_model``
  (per conv: one float64 conv, one integer emulation checked against the model's codes, the
  floor; a diagnosis only for convs above their floor);
* each layer explained in full (``top=1``) against the single-conv diagnosis of that layer.

Medians of several runs; ratios are what the targets speak of (issue 14: screening <= 2x
Numeric Suite; a deep-explained layer adds at most its single-conv diagnosis time).

    .venv/bin/python benchmarks/bench_model.py [--size 64] [--batch 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path


def median_time(fn, repeats: int) -> float:  # noqa: ANN001
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    import torch
    from torch.ao.ns._numeric_suite import compare_model_outputs

    import qconvdiag
    from qconvdiag.model.walk import WalkOptions, walk_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet_shape import build

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engine", default="x86")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # torch.ao's deprecation notices, on every call

    float_model, quantized, x = build(args.engine, args.size, args.batch)

    def numeric_suite() -> None:
        compare_model_outputs(float_model, quantized, x)

    def screen() -> None:
        bundle = qconvdiag.capture_model(float_model, quantized, x)
        walk_model(bundle, WalkOptions(top=0))

    bundle = qconvdiag.capture_model(float_model, quantized, x)
    walk_model(bundle, WalkOptions(top=0))  # warm-up: engine probes, first-call costs
    numeric_suite()
    t_ns = median_time(numeric_suite, args.repeats)
    t_screen = median_time(screen, args.repeats)
    t_capture = median_time(lambda: qconvdiag.capture_model(float_model, quantized, x),
                            args.repeats)
    worst = walk_model(bundle, WalkOptions(top=0)).report.ranking[0]
    t_top0 = median_time(lambda: walk_model(bundle, WalkOptions(top=0)), args.repeats)
    t_top1 = median_time(lambda: walk_model(bundle, WalkOptions(top=1)), args.repeats)
    case = bundle.layer(worst).case
    t_single = median_time(lambda: qconvdiag.diagnose(case, qconvdiag.Options(
        engine=bundle.engine)), args.repeats)

    print(f"model: ResNet-18 shape, {len(bundle.layers)} convs, input ({args.batch}, 3, "
          f"{args.size}, {args.size}), engine {bundle.engine}, torch threads "
          f"{torch.get_num_threads()}")
    print(f"Numeric Suite compare_model_outputs: {t_ns * 1e3:.0f} ms")
    print(f"qconvdiag screening (top=0):         {t_screen * 1e3:.0f} ms "
          f"(capture {t_capture * 1e3:.0f} ms, walk {t_top0 * 1e3:.0f} ms)")
    print(f"  ratio to Numeric Suite: {t_screen / t_ns:.2f}x (target <= 2x)")
    extra = t_top1 - t_top0
    print(f"explaining the worst conv ({worst}) in full: +{extra * 1e3:.0f} ms; its single-conv "
          f"diagnosis: {t_single * 1e3:.0f} ms; ratio {extra / t_single:.2f}x (target <= 1x)")


if __name__ == "__main__":
    main()
