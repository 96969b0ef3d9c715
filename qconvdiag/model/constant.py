"""QCD074: constant input channels lost to 8-bit rounding, which a conv amplifies.

A structurally pruned model keeps the channels it pruned: the conv before writes a constant
there (its weights are zero, its BatchNorm shift and activation remain), and the next conv's
response to it varies only at the zero-padded border. After fine-tuning, that conv's folded
weights on those channels can be very large (their BatchNorm's running variance collapsed on a
constant input), and the border response is what those channels carry. 8-bit activations round
the constant by up to half a step, and a constant below half a step reads 0, like the padding:
the response is gone, and each conv is at its floor on what it received (helper-64's pruned
MobileNetV2: 98.5% float, 10.3% quantized, no finding; at blocks.0.dw the constants 0.020 to
0.076 on a step of 0.079, weights up to 79 against a median of 1.2, the propagated SQNR from
its input's 27.3 dB to -5.8 dB). Each block's chain from the writing conv through this conv
kept in float, no quantization inside, gave the float model's 98.5%.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..arithmetic.float_conv import conv64
from ..findings.fixes import CALIBRATE_EAGER, CALIBRATE_FX
from ..report import Finding
from .bundle import LayerCapture
from .screen import Screen

CODE = "QCD074"
#: A channel is constant where its values span at most this share of its magnitude.
FLAT = 1e-6
#: Rounding moves a constant by this share of its value or more.
MOVED = 0.25
#: Below this SQNR the signal is gone (QCD065's LOST_DB): a conv is named where the rounding
#: of its constant input channels alone, through it, leaves its output below it, and its
#: output in the quantized model is below it too (the loss shows).
LOST_DB = 10.0


def qcd074(layers: Sequence[LayerCapture], screens: dict[str, Screen], flow: str
           ) -> Finding | None:
    """QCD074 for the convs (an eager or FX model's) where the rounding of their input's
    constant channels alone, through them, leaves their output below LOST_DB, and their
    output in the quantized model is below it too; each named with the conv before it in model
    order, which writes those channels. An error: the signal is gone."""
    if flow not in ("eager", "fx"):
        return None
    found = []
    for i, lay in enumerate(layers):
        s = screens.get(lay.name)
        if i == 0 or s is None or lay.output_float32:
            continue
        out = s.propagated.sqnr_db
        if out is None or out >= LOST_DB:
            continue
        hit = _constants(lay)
        if hit is not None:
            found.append((layers[i - 1], lay, out, *hit))
    if not found:
        return None
    worst = min(found, key=lambda f: f[6])
    writer, lay, out, channels, values, read, alone, top = worst
    shown = ", ".join(str(c) for c in channels[:6]) + (", ..." if len(channels) > 6 else "")
    names = ", ".join(f[1].name for f in found)
    w = writer.case.weight
    pruned = (w.shape[0] == lay.case.input.shape[1]
              and not np.any(w.reshape(w.shape[0], -1)[channels]))
    source = (f"channels pruned in {writer.name}, its weights zero there, write one value"
              if pruned else f"{writer.name} writes one value there")
    zero = (", a constant below half the step reading 0 like the zero padding"
            if read[0] == 0 or read[1] == 0 else "")
    return Finding(
        CODE, "error", f"constant input channels lost to 8-bit rounding, amplified ({names})",
        f"{lay.name}'s input channels {shown} ({len(channels)} of "
        f"{lay.case.input.shape[1]}) are constant in the float model ({values[0]:.3g} to "
        f"{values[1]:.3g}: {source}), and 8-bit rounding reads them as {read[0]:.3g} to "
        f"{read[1]:.3g}{zero}. Its weights on them "
        f"reach {top[0]:.3g} (the median {top[1]:.3g}): their response, which varies only "
        "at the padded border, is what those channels carry. That rounding alone, through "
        f"it, leaves its output {alone:.1f} dB from the float model's; in the quantized model "
        f"it is {out:.1f} dB, while it is at its floor on what it received"
        + (f" (so are {', '.join(f[1].name for f in found if f[1] is not lay)})"
           if len(found) > 1 else "") + ".",
        {"convs": [f[1].name for f in found], "writers": [f[0].name for f in found],
         "channels": [int(c) for c in channels], "propagated_sqnr_db": out,
         "rounding_alone_sqnr_db": alone},
        _fix([(f[0], f[1]) for f in found], flow))


def _constants(lay: LayerCapture) -> tuple[list[int], tuple[float, float],
                                           tuple[float, float], float,
                                           tuple[float, float]] | None:
    """Its input's constant channels that rounding moves (MOVED), where their rounding alone,
    through the conv, leaves its output below LOST_DB: the channels, their float values'
    range, the values they read, that SQNR, and the largest |weight| on them and the median
    of the channels' largest; None where not."""
    x, q = lay.float_input.astype(np.float64), lay.case.input.astype(np.float64)
    if x.ndim < 3 or x.shape != q.shape:
        return None
    axes = (0, *range(2, x.ndim))
    low, high = x.min(axis=axes), x.max(axis=axes)
    size = np.maximum(np.abs(low), np.abs(high))
    flat = (high - low <= FLAT * size) & (size > 0)
    k = np.median(x, axis=axes)
    kq = np.median(q, axis=axes)
    moved = flat & (np.abs(kq - k) >= MOVED * np.abs(k))
    channels = [int(c) for c in np.flatnonzero(moved)]
    if not channels:
        return None
    delta = np.zeros_like(x)
    delta[:, channels] = q[:, channels] - x[:, channels]
    error = float(np.sum(conv64(delta, lay.case.weight.astype(np.float64), None,
                                lay.case.geometry) ** 2))
    signal = float(np.sum(lay.float_output.astype(np.float64) ** 2))
    alone = 10 * np.log10(signal / error) if error > 0 and signal > 0 else np.inf
    if alone >= LOST_DB:
        return None
    w = np.abs(lay.case.weight.astype(np.float64))
    per_channel = w.reshape(w.shape[0], -1).max(axis=1)
    if lay.case.geometry.groups == 1:
        on = float(w[:, channels].max())
    else:  # grouped: input channel c feeds the output channels of its group
        size_in = w.shape[1]
        on = float(max(w[c // size_in * (w.shape[0] // lay.case.geometry.groups):
                         (c // size_in + 1) * (w.shape[0] // lay.case.geometry.groups)].max()
                       for c in channels))
    return (channels, (float(k[channels].min()), float(k[channels].max())),
            (float(kq[channels].min()), float(kq[channels].max())), float(alone),
            (on, float(np.median(per_channel))))


def _fix(chains: list[tuple[LayerCapture, LayerCapture]], flow: str) -> str:
    """Each chain from the writing conv through the amplifying one kept in float, with no
    quantization inside (its activation modules and an unfused BatchNorm included), in the
    model's flow."""
    rows = []
    for writer, lay in chains:
        inside = [*(() if writer.bn_kept is None else (writer.bn_kept.name,)),
                  *writer.activations_after]
        rows.append((writer.name, inside, lay.name))
    head = ("# keep each chain from the conv that writes the constant channels through\n"
            "# the conv that amplifies them in float, with no quantization inside\n")
    if flow == "fx":
        listed = "".join(f"        {[w, *inside, last]!r},\n" for w, inside, last in rows)
        return (head + "# (qconfig_mapping: the one the model was prepared with)\n"
                "for names in [\n" + listed + "]:\n"
                "    for name in names:\n"
                "        qconfig_mapping.set_module_name(name, None)\n" + CALIBRATE_FX)
    listed = "".join(f"        ({w!r}, {inside!r}, {last!r}),\n" for w, inside, last in rows)
    return (head + "# (model: the float model, fused and its qconfig set as before)\n"
            "import torch\n"
            "from torch.ao.quantization import DeQuantStub, QuantStub\n"
            "def wrap(name, *parts):\n"
            "    owner, _, attr = name.rpartition('.')\n"
            "    owner = model.get_submodule(owner) if owner else model\n"
            "    seq = [p if p is not None else getattr(owner, attr) for p in parts]\n"
            "    setattr(owner, attr, torch.nn.Sequential(*seq))\n"
            "for first, inside, last in [\n" + listed + "]:\n"
            "    for name in [first, *inside, last]:\n"
            "        model.get_submodule(name).qconfig = None\n"
            "    wrap(first, DeQuantStub(), None)\n"
            "    wrap(last, None, QuantStub())\n" + CALIBRATE_EAGER)
