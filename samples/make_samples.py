"""Writes the bundled samples (deterministic: running it again gives the same bytes).

    .venv/bin/python samples/make_samples.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qconvdiag.case import QuantSetup, build_case
from qconvdiag.casefile.generate import forum_case
from qconvdiag.io import save_case
from qconvdiag.quantization.qparams import make_qparams

HERE = Path(__file__).resolve().parent


def relu_per_channel() -> object:
    """3x3 conv on post-ReLU activations; per-channel symmetric weights, observer-like input and
    output qparams the user computed with min/max: a healthy setup (error at the floor)."""
    rng = np.random.default_rng(11)
    x = np.maximum(rng.standard_normal((1, 16, 14, 14)), 0).astype(np.float32)
    w = (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32)
    w *= (10.0 ** rng.uniform(-1, 0.5, 32)).astype(np.float32).reshape(-1, 1, 1, 1)
    b = (rng.standard_normal(32) * 0.1).astype(np.float32)
    y = _conv(x, w, b, padding=1)
    in_scale = float(x.max()) / 255
    w_scales = np.abs(w.reshape(32, -1)).max(axis=1) / 127.5
    out_lo, out_hi = min(float(y.min()), 0.0), max(float(y.max()), 0.0)
    out_scale = (out_hi - out_lo) / 255
    setup = QuantSetup(
        input_qparams=make_qparams([in_scale], [0], "quint8", None, "input_qparams", "user"),
        weight_qparams=make_qparams(w_scales.tolist(), [0] * 32, "qint8", 0, "weight_qparams",
                                    "user"),
        output_qparams=make_qparams([out_scale], [round(-out_lo / out_scale)], "quint8", None,
                                    "output_qparams", "user"),
    )
    return build_case(x, w, b, padding=1, setup=setup, source="samples/relu_per_channel.npz")


def depthwise_outlier() -> object:
    """Depthwise 3x3 (groups = channels), one channel with 40x larger weights, per-tensor
    weight qparams: the outlier channel sets the scale and the others lose their precision."""
    rng = np.random.default_rng(12)
    c = 24
    x = rng.standard_normal((1, c, 20, 20)).astype(np.float32)
    w = (rng.standard_normal((c, 1, 3, 3)) * 0.2).astype(np.float32)
    w[5] *= 40
    b = (rng.standard_normal(c) * 0.05).astype(np.float32)
    y = _conv(x, w, b, padding=1, groups=c)
    in_lo, in_hi = float(x.min()), float(x.max())
    in_scale = (in_hi - in_lo) / 255
    w_scale = float(np.abs(w).max()) / 127.5
    out_lo, out_hi = float(y.min()), float(y.max())
    out_scale = (out_hi - out_lo) / 255
    setup = QuantSetup(
        input_qparams=make_qparams([in_scale], [round(-in_lo / in_scale)], "quint8", None,
                                   "input_qparams", "user"),
        weight_qparams=make_qparams([w_scale], [0], "qint8", None, "weight_qparams", "user"),
        output_qparams=make_qparams([out_scale], [round(-out_lo / out_scale)], "quint8", None,
                                    "output_qparams", "user"),
    )
    return build_case(x, w, b, padding=1, groups=c, setup=setup,
                      source="samples/depthwise_outlier.safetensors")


def conv1d_handmade() -> object:
    """A conv1d over a signal with the forum's hand-made formulas (scale = range / 254,
    zero_point = -min / scale, qint8 weights) and output qparams never set."""
    rng = np.random.default_rng(13)
    x = (np.sin(np.linspace(0, 12, 64))[None, None] * 3 + rng.standard_normal((1, 4, 64))
         ).astype(np.float32)
    w = (rng.standard_normal((8, 4, 5)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(8) * 0.1).astype(np.float32)

    def handmade(t: np.ndarray, dtype: str, what: str):  # type: ignore[no-untyped-def]
        lo, hi = np.float32(t.min()), np.float32(t.max())
        scale = np.float32((hi - lo) / np.float32(254))
        return make_qparams([float(scale)], [float(-(lo / scale))], dtype, None, what, "user")

    setup = QuantSetup(input_qparams=handmade(x, "quint8", "input_qparams"),
                       weight_qparams=handmade(w, "qint8", "weight_qparams"))
    return build_case(x, w, b, stride=2, padding=2, setup=setup,
                      source="samples/conv1d_handmade.pt")


def _conv(x, w, b, padding=0, groups=1):  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F

    dims = w.ndim - 2
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[dims]
    out = conv(torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b), 1, padding, 1,
               groups)
    return out.numpy()


SAMPLES = {
    "forum_conv.pt": forum_case,
    "relu_per_channel.npz": relu_per_channel,
    "depthwise_outlier.safetensors": depthwise_outlier,
    "conv1d_handmade.pt": conv1d_handmade,
}


def main() -> None:
    for name, make in SAMPLES.items():
        case = make()
        save_case(case, HERE / name)  # type: ignore[arg-type]
        print(f"wrote samples/{name}")


if __name__ == "__main__":
    main()
