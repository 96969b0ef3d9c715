"""QCD066: a conv's input channels span too wide a range for one scale per tensor.

A tensor quantized with one scale gives each channel the same step. When one channel reaches
far beyond the others (a BatchNorm's gamma, a conv's channel that training made large), the
others get a few steps and arrive near-noise, while the tensor as a whole looks fine: its SQNR
is the large channel's. A conv that draws on the small channels then gives an output far worse
than its input's SQNR and its own error explain, and every conv is at its floor on what it
received (measured: a ResNet-shaped block with one channel 100x the others, every conv at its
floor, 1 dB at the conv after it, 0.12 accuracy). The remedy is cross-layer equalization
before quantization (torch.ao.quantization's ``equalize``; Nagel et al. 2019), which moves the
channels' scale into the next conv's weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..report import Finding
from .bundle import LayerCapture
from .lost import LOST_DB
from .screen import Screen

CODE = "QCD066"
#: A conv's input's median channel is this many dB worse than the tensor as a whole.
DROP_DB = 10.0
#: And its output this many dB worse than its input's error and its own error added (errors
#: that merely add cost at most 3 dB over the worse of the two: twice that is the conv
#: drawing on the small channels).
OUTPUT_DROP_DB = 6.0


def added_db(a: float, b: float) -> float:
    """The SQNR of two independent errors of SQNR ``a`` and ``b`` dB, added."""
    return -10 * math.log10(10 ** (-a / 10) + 10 ** (-b / 10))


@dataclass(frozen=True)
class ChannelSpread:
    """How a conv's received input compares with the float model's, channel by channel."""

    median_db: float
    """The median channel's SQNR (channels the float model gives 0 left out)."""
    reach_ratio: float
    """The largest channel's max |x| over the median channel's."""
    largest: float
    median: float


def channel_spread(lay: LayerCapture) -> ChannelSpread | None:
    """Per channel: the received input's SQNR against the float model's, and its reach."""
    xf = lay.float_input.reshape(lay.float_input.shape[0], lay.float_input.shape[1], -1)
    xr = lay.case.input.reshape(xf.shape)
    signal = np.einsum("ncs,ncs->c", xf, xf, dtype=np.float64)
    diff = (xr - xf).astype(np.float64)
    noise = np.einsum("ncs,ncs->c", diff, diff)
    reach = np.abs(xf).max(axis=(0, 2)).astype(np.float64)
    live = signal > 0
    if np.count_nonzero(live) < 2:
        return None
    with np.errstate(divide="ignore"):
        db = 10 * np.log10(signal[live] / noise[live])  # inf where a channel is exact
    median = float(np.median(reach[live]))
    return ChannelSpread(float(np.median(db)), float(reach[live].max()) / median
                         if median > 0 else math.inf, float(reach[live].max()), median)


def qcd066(layers: tuple[LayerCapture, ...], screens: dict[str, Screen], skip: set[str],
           pt2e: bool) -> list[Finding]:
    """QCD066 at each conv whose output is OUTPUT_DROP_DB worse than its input's and its own
    error added, where its input's median channel is DROP_DB worse than the tensor (``skip``:
    convs whose input QCD065 names as lost already)."""
    found = []
    for i, lay in enumerate(layers):
        s = screens[lay.name]
        prop, got = s.propagated.sqnr_db, s.input.sqnr_db
        own = math.inf if s.own.sqnr_db is None else s.own.sqnr_db
        if (lay.name in skip or prop is None or got is None
                or prop > added_db(got, own) - OUTPUT_DROP_DB):
            continue
        spread = channel_spread(lay)
        if spread is None or spread.median_db > got - DROP_DB:
            continue
        before = producer(layers, i)
        level = "error" if prop < LOST_DB else "warning"
        message = (
            f"{lay.name}'s input channels span {spread.reach_ratio:.0f}x in reach (the largest "
            f"{spread.largest:.4g}, the median {spread.median:.4g}): with one scale for the "
            f"whole tensor its median channel arrives {spread.median_db:.1f} dB from the float "
            f"model's while the tensor as a whole is {got:.1f} dB. {lay.name} draws on the "
            f"small channels: its output is {prop:.1f} dB from the float model's, though its "
            f"own error is {_db(s.own.sqnr_db)} dB. Every conv may be at its floor on what it "
            "received; the loss is in the scale the channels share.")
        evidence = {"layer": lay.name, "input_sqnr_db": got, "median_channel_sqnr_db":
                    spread.median_db, "reach_ratio": spread.reach_ratio,
                    "propagated_sqnr_db": prop, "own_sqnr_db": s.own.sqnr_db,
                    "conv_before": before}
        found.append(Finding(CODE, level, f"{lay.name}'s input channels span too wide a "
                             "range for one scale", message, evidence,
                             _fix(before, lay.name, pt2e, model_input=i == 0)))
    return found


#: Max pools tried between two convs (kernel, stride, padding): ResNet's stem (3, 2, 1) and
#: the common halving (2, 2, 0).
MAX_POOLS = ((3, 2, 1), (2, 2, 0))


def producer(layers: tuple[LayerCapture, ...], i: int) -> str | None:
    """The conv whose float output (after a ReLU, and a 2-d max pool of MAX_POOLS) is conv
    ``i``'s float input, element for element: the conv that writes its input (cross-layer
    equalization's pair: a positive per-channel scale passes a ReLU and a max pool). None when
    no conv's is: an add or another op lies between, or the input is the model's."""
    x = layers[i].float_input
    for lay in reversed(layers[:i]):
        y = lay.float_output
        if y.shape[:2] != x.shape[:2]:
            continue
        for z in (y, np.maximum(y, 0)):
            if any(p.shape == x.shape and np.array_equal(p, x) for p in _pooled(z, x.shape)):
                return lay.name
    return None


def _pooled(y: np.ndarray, shape: tuple[int, ...]) -> list[np.ndarray]:
    """``y`` itself, and its 2-d max pools (MAX_POOLS) that give ``shape``."""
    if y.shape == shape:
        return [y]
    if y.ndim != 4:
        return []
    import torch

    out = []
    for k, s, p in MAX_POOLS:
        size = [(n + 2 * p - k) // s + 1 for n in y.shape[2:]]
        if tuple(size) == tuple(shape[2:]):
            with torch.no_grad():
                out.append(torch.nn.functional.max_pool2d(torch.from_numpy(y), k, s, p).numpy())
    return out


def _db(sqnr: float | None) -> str:
    return "exactly 0" if sqnr is None else f"{sqnr:.1f}"


def _fix(before: str | None, name: str, pt2e: bool, model_input: bool = False) -> str:
    if model_input:
        return ("# the model's input: its channels differ in scale; normalize each channel\n"
                "# (x - mean) / std over the training data, before the QuantStub")
    if before is None:  # no pair to equalize: the channels meet another op first
        return (f"# {name}'s input is not one conv's output: an add, a pool or\n"
                "# another op lies between, so no pair of convs can be equalized across\n"
                "# it. Find the conv upstream whose channel is large (its BatchNorm's\n"
                "# gamma) and equalize it with the conv it feeds directly, or keep the\n"
                "# op's inputs within a range one scale serves (weight decay on that\n"
                "# BatchNorm)")
    fold = ("# the float model, its conv-BatchNorm(-ReLU) modules fused first (BatchNorm\n"
            "# folded; prepare_pt2e would fold it after), before torch.export\n"
            if pt2e else
            "# the float model after fuse_modules (BatchNorm folded), before prepare\n")
    return ("# cross-layer equalization between the conv that writes the input\n"
            f"# ({before}, at most a ReLU between them) and {name}\n"
            + fold
            + "from torch.ao.quantization._equalize import equalize\n"
            f"equalize(model, [[\"{before}\", \"{name}\"]], threshold=1e-4)\n"
            "# then quantize it again as before")
