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
* each layer explained in full (``top=1``) against the single-conv diagnosis of that layer;
* a sketch of the other design, a screen while the models run (``streamed``): the own error
  in the quantized convs' hooks (the float conv on the dequantized input), the propagated and
  input errors in the float model's, nothing kept but the 8-bit codes, float32 sums, no floor,
  no verdict: a lower bound for that design, not a screen qconvdiag has.

The page faults each side paid are printed too: on a machine where a fault is costly, they
move Numeric Suite's time, and so the ratio, with what ran before it. ``--keep-freed-memory``
measures both sides in a process whose allocator keeps freed memory (``runtime.keep_freed_memory``,
which the command-line tool sets for one conv's explain; jemalloc and tcmalloc do the same):
neither side pays faults, and the ratio is compute alone. ``capture_model`` and
``diagnose_model`` run in the user's process as it is, which the default run measures.
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
                        help="glibc keeps freed memory (as jemalloc and tcmalloc do)")
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
    # the sketch in its own interleaved runs: its memory would change what is fresh for the
    # screen's runs above
    sketched = [(numeric_suite(), timed(lambda: streamed(float_model, quantized, x, bundle)))
                for _ in range(args.repeats)]
    t_streamed = statistics.median(s for _, s in sketched)
    screens = [(r[1] + r[2]) / r[0] for r in rows]
    # a difference of two walks: the machine's noise moves each run's ratio both ways
    deeps = [(r[3] - r[2]) / r[4] for r in rows]
    screen, deep = statistics.median(screens), statistics.median(deeps)
    floor = statistics.median(r[5] / r[0] for r in rows)
    sketch = statistics.median(s / n for n, s in sketched)

    print(f"model: ResNet-18 shape, {len(bundle.layers)} convs, input ({args.batch}, 3, "
          f"{args.size}, {args.size}), engine {bundle.engine}, torch threads "
          f"{torch.get_num_threads()}; medians of {args.repeats} interleaved runs"
          + ("; freed memory kept" if args.keep_freed_memory else ""))
    print(f"Numeric Suite compare_model_outputs: {t_ns * 1e3:.0f} ms")
    print(f"qconvdiag screening (top=0): capture {t_capture * 1e3:.0f} ms + walk "
          f"{t_top0 * 1e3:.0f} ms")
    print(f"  ratio to Numeric Suite: {screen:.2f}x (target <= 2x; runs {spread(screens)})")
    print(f"  page faults per run (fresh memory): Numeric Suite {paged[0] // args.repeats}, "
          f"screening {paged[1] // args.repeats}")
    print(f"  of which no implementation avoids: two forwards + one float conv per conv, "
          f"{t_least * 1e3:.0f} ms, {floor:.2f}x")
    print(f"  a screen while the models run (sketch: three comparisons in the hooks, float32 "
          f"sums, no floor): {t_streamed * 1e3:.0f} ms, {sketch:.2f}x")
    print(f"explaining the worst conv ({worst}) in full: +{(t_top1 - t_top0) * 1e3:.0f} ms; its "
          f"single-conv diagnosis: {t_single * 1e3:.0f} ms; ratio {deep:.2f}x (target <= 1x; "
          f"runs {spread(deeps)})")


def spread(ratios: list[float]) -> str:
    """The smallest and largest of the runs' ratios."""
    return f"{min(ratios):.2f}-{max(ratios):.2f}x"


def least(float_model, quantized, x, bundle) -> None:  # noqa: ANN001
    """The two forwards, no hooks, and the float conv of every captured conv on its input."""
    import torch

    from qconvdiag.model.screen import float_conv

    with torch.no_grad():
        float_model(x)
        quantized(x)
    for lay in bundle.layers:
        float_conv(lay.case)


def streamed(float_model, quantized, x, bundle) -> dict:  # noqa: ANN001
    """The sketch of a screen while the models run (see the module's docstring): per captured
    conv, (error energy, reference energy, max |error|) of its own, input and propagated
    error. The float weights (BatchNorm folded) are the bundle's; the float model's output at
    a conv is its folded BatchNorm's, or its own."""
    import torch
    import torch.nn.functional as F

    def difference(a, r):  # noqa: ANN001, ANN202 - a: a fresh temporary, overwritten
        e, r = a.sub_(r).reshape(-1), r.reshape(-1)
        lo, hi = torch.aminmax(e)
        return float(torch.dot(e, e)), float(torch.dot(r, r)), max(float(hi), -float(lo))

    layers = {lay.name: lay for lay in bundle.layers}
    q_modules, f_modules = dict(quantized.named_modules()), dict(float_model.named_modules())
    found: dict = {name: {} for name in layers}
    codes: dict = {}

    def on_quantized(name):  # noqa: ANN001, ANN202
        case = layers[name].case
        g = case.geometry
        w = torch.from_numpy(case.weight)
        b = None if case.bias is None else torch.from_numpy(case.bias)

        def hook(_m, args, out):  # noqa: ANN001, ANN202
            y = F.conv2d(args[0].dequantize(), w, b, g.stride, g.padding, g.dilation, g.groups)
            if case.activation == "relu":
                torch.relu_(y)
            found[name]["own"] = difference(out.dequantize(), y)
            codes[name] = tuple((t.int_repr(), t.q_scale(), t.q_zero_point())
                                for t in (args[0], out))
        return hook

    def on_float_input(name):  # noqa: ANN001, ANN202
        def hook(_m, args):  # noqa: ANN001, ANN202
            c, s, z = codes[name][0]
            found[name]["input"] = difference(c.float().sub_(z).mul_(s), args[0])
        return hook

    def on_float_output(name):  # noqa: ANN001, ANN202
        relu = layers[name].case.activation == "relu"

        def hook(_m, _args, out):  # noqa: ANN001, ANN202
            c, s, z = codes[name][1]
            found[name]["propagated"] = difference(c.float().sub_(z).mul_(s),
                                                   torch.relu(out) if relu else out)
        return hook

    handles = [q_modules[name].register_forward_hook(on_quantized(name)) for name in layers]
    try:
        with torch.no_grad():
            quantized(x)
    finally:
        for h in handles:
            h.remove()
    handles = []
    for name, lay in layers.items():
        handles.append(f_modules[name].register_forward_pre_hook(on_float_input(name)))
        handles.append(f_modules[lay.bn_folded or name].register_forward_hook(
            on_float_output(name)))
    try:
        with torch.no_grad():
            float_model(x)
    finally:
        for h in handles:
            h.remove()
    return found


if __name__ == "__main__":
    main()
