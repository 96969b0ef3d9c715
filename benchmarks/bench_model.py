"""The model walk's cost next to Numeric Suite's, measured side by side in one process.

A ResNet-18-shaped model (benchmarks/resnet_shape.py: 20 convs, BatchNorm folded, fused ReLUs),
quantized with torch.ao's eager flow and the engine's default qconfig, one batch of images
(ImageNet's size, 8 of them, by default):

* Numeric Suite's ``compare_model_outputs`` (one float and one quantized forward, logging),
  on fresh copies of the models: it attaches its loggers to the models in place;
* qconvdiag's screening of every conv (``top=0``): ``capture_model`` (both forwards with hooks:
  each conv's input and output codes, the float model's input and output there, the float
  weight with BatchNorm folded) and ``walk_model`` (per conv: the float conv on the quantized
  input it received, three comparisons, the floor; the torch check and a diagnosis only for
  convs above their floor);
* the part of the screen no implementation avoids: the two forwards (no logging) and, per conv,
  the float conv the own error needs (Numeric Suite compares propagated errors only);
* each layer explained in full (``top=1``) against the single-conv diagnosis of that layer.

The page faults each side paid are printed too: on a machine where a fault is costly, they
move Numeric Suite's time, and so the ratio, with what ran before it. ``--keep-freed-memory``
measures both sides as the command-line tool's process runs (``runtime.keep_freed_memory``:
glibc keeps freed memory, so neither side pays faults, and the ratio is compute alone).
Medians of 7 interleaved runs by default (the explained layer's cost is a difference of two
walks, so fewer runs leave it to the machine's noise); ratios are what the targets speak of
(issue 14: screening <= 2x Numeric Suite; a deep-explained layer adds at most its single-conv
diagnosis time).

    .venv/bin/python benchmarks/bench_model.py [--size 224] [--batch 8] [--repeats 7]
        [--keep-freed-memory]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path


def timed(fn) -> float:  # noqa: ANN001
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def faults() -> int:
    """The process's minor page faults so far: fresh memory, which a side pays for when the
    memory freed before it was given back to the kernel (what ran before decides)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main() -> None:
    import torch
    from torch.ao.ns._numeric_suite import compare_model_outputs

    import qconvdiag
    from qconvdiag.model.walk import WalkOptions, walk_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet_shape import build

    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--engine", default="x86")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="glibc keeps freed memory, as in the CLI's process")
    args = parser.parse_args()
    if args.keep_freed_memory:
        from qconvdiag.runtime import keep_freed_memory

        keep_freed_memory()
    warnings.simplefilter("ignore")  # torch.ao's deprecation notices, on every call

    float_model, quantized, x = build(args.engine, args.size, args.batch)

    def numeric_suite() -> float:
        # compare_model_outputs attaches its loggers to the models it is given, in place, and
        # they log every later forward: it gets fresh copies (not timed), so neither side runs
        # with the other's loggers
        f, q = copy.deepcopy(float_model), copy.deepcopy(quantized)
        before = faults()
        t = timed(lambda: compare_model_outputs(f, q, x))
        paged[0] += faults() - before
        return t

    paged = [0, 0]  # page faults: Numeric Suite's, the screening's

    bundle = qconvdiag.capture_model(float_model, quantized, x)
    walk_model(bundle, WalkOptions(top=0))  # warm-up: engine probes, first-call costs
    numeric_suite()
    worst = walk_model(bundle, WalkOptions(top=0)).report.ranking[0]
    case = bundle.layer(worst).case
    # interleaved, so a busy machine slows both sides of each ratio alike
    rows = []
    paged[:] = [0, 0]  # the warm-up's not counted
    for _ in range(args.repeats):
        t_ns = numeric_suite()
        before = faults()
        t_capture = timed(lambda: qconvdiag.capture_model(float_model, quantized, x))
        t_top0 = timed(lambda: walk_model(bundle, WalkOptions(top=0)))
        paged[1] += faults() - before
        t_top1 = timed(lambda: walk_model(bundle, WalkOptions(top=1)))
        t_single = timed(lambda: qconvdiag.diagnose(case, qconvdiag.Options(
            engine=bundle.engine)))
        t_least = timed(lambda: least(float_model, quantized, x, bundle))
        rows.append((t_ns, t_capture, t_top0, t_top1, t_single, t_least))
    t_ns, t_capture, t_top0, t_top1, t_single, t_least = (statistics.median(c)
                                                          for c in zip(*rows))
    screen = statistics.median((r[1] + r[2]) / r[0] for r in rows)
    deep = statistics.median((r[3] - r[2]) / r[4] for r in rows)
    floor = statistics.median(r[5] / r[0] for r in rows)

    print(f"model: ResNet-18 shape, {len(bundle.layers)} convs, input ({args.batch}, 3, "
          f"{args.size}, {args.size}), engine {bundle.engine}, torch threads "
          f"{torch.get_num_threads()}; medians of {args.repeats} interleaved runs"
          + ("; freed memory kept (as in the CLI)" if args.keep_freed_memory else ""))
    print(f"Numeric Suite compare_model_outputs: {t_ns * 1e3:.0f} ms")
    print(f"qconvdiag screening (top=0): capture {t_capture * 1e3:.0f} ms + walk "
          f"{t_top0 * 1e3:.0f} ms")
    print(f"  ratio to Numeric Suite: {screen:.2f}x (target <= 2x)")
    print(f"  page faults per run (fresh memory): Numeric Suite {paged[0] // args.repeats}, "
          f"screening {paged[1] // args.repeats}")
    print(f"  of which no implementation avoids: two forwards + one float conv per conv, "
          f"{t_least * 1e3:.0f} ms, {floor:.2f}x")
    print(f"explaining the worst conv ({worst}) in full: +{(t_top1 - t_top0) * 1e3:.0f} ms; its "
          f"single-conv diagnosis: {t_single * 1e3:.0f} ms; ratio {deep:.2f}x (target <= 1x)")


def least(float_model, quantized, x, bundle) -> None:  # noqa: ANN001
    """The two forwards, no hooks, and the float conv of every captured conv on its input."""
    import torch

    from qconvdiag.model.screen import float_conv

    with torch.no_grad():
        float_model(x)
        quantized(x)
    for lay in bundle.layers:
        float_conv(lay.case)


if __name__ == "__main__":
    main()
