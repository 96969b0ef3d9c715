"""The model sample: a small CNN trained on scikit-learn's handwritten digits (real 8x8 scans that
ship inside scikit-learn), quantized with torch.ao's eager flow (fuse, prepare, calibrate,
convert), and one conv broken the way the forum thread broke its conv: output scale and zero
point written by hand after convert. Writes ``samples/model/digits.pt``, a model bundle::

    .venv/bin/python samples/model/make_digits.py      # needs the 'samples' extra (scikit-learn)
    .venv/bin/qconvdiag explain samples/model/digits.pt

Deterministic: the same bytes on every run (one thread, fixed seeds).
"""

from __future__ import annotations

import copy
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: The hand-made output qparams of conv2: "the activations are in [0, 1]", so scale 1/255 and
#: zero point 0, where the ReLU's outputs reach several units.
HANDMADE_SCALE = 1 / 255
HANDMADE_ZERO_POINT = 0


def digits() -> tuple[object, object, object, object]:
    """Train/test split of the digits, as float tensors (N, 1, 8, 8) scaled to [0, 1]."""
    import torch
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def model() -> object:
    import torch.nn as nn
    from torch.ao.quantization import DeQuantStub, QuantStub

    class DigitsNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = QuantStub()
            self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.relu1 = nn.ReLU()
            self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
            self.bn2 = nn.BatchNorm2d(32)
            self.relu2 = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
            self.relu3 = nn.ReLU()
            self.avg = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(32, 10)
            self.dequant = DeQuantStub()

        def forward(self, x):  # type: ignore[no-untyped-def]
            x = self.quant(x)
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.pool(self.relu2(self.bn2(self.conv2(x))))
            x = self.relu3(self.conv3(x))
            x = self.fc(self.avg(x).flatten(1))
            return self.dequant(x)

    return DigitsNet()


def train(net: object, x: object, y: object) -> object:
    import torch

    opt = torch.optim.Adam(net.parameters(), lr=0.01)  # type: ignore[attr-defined]
    net.train()  # type: ignore[attr-defined]
    for _epoch in range(40):
        for i in range(0, len(x), 100):  # type: ignore[arg-type]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(x[i:i + 100]), y[i:i + 100])  # type: ignore
            loss.backward()
            opt.step()
    return net.eval()  # type: ignore[attr-defined]


def quantize(net: object, calib: object) -> object:
    """torch.ao's eager flow, as its tutorial does it, with the engine's default qconfig."""
    import torch
    from torch.ao.quantization import convert, fuse_modules, get_default_qconfig, prepare

    q = copy.deepcopy(net)
    fuse_modules(q, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "relu3"]],
                 inplace=True)
    q.qconfig = get_default_qconfig(torch.backends.quantized.engine)  # type: ignore[attr-defined]
    prepare(q, inplace=True)
    with torch.no_grad():
        q(calib)  # type: ignore[operator]
    return convert(q)


def build() -> tuple[object, object, object, object, float, float]:
    """The float model, its quantized twin with conv2 broken, the training and test images,
    and the float and quantized test accuracies."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    x_train, y_train, x_test, y_test = digits()
    net = train(model(), x_train, y_train)
    quantized = quantize(net, x_train[:200])
    quantized.conv2.scale = HANDMADE_SCALE  # type: ignore[attr-defined]
    quantized.conv2.zero_point = HANDMADE_ZERO_POINT  # type: ignore[attr-defined]
    with torch.no_grad():
        acc_f = float((net(x_test).argmax(1) == y_test).float().mean())  # type: ignore
        acc_q = float((quantized(x_test).argmax(1) == y_test).float().mean())  # type: ignore
    return net, quantized, x_train, x_test, acc_f, acc_q


def main() -> object:
    """Write the sample; returns the trained float model (make_digits_pt2e.py quantizes it
    too)."""
    import warnings

    import qconvdiag

    with warnings.catch_warnings():  # torch.ao's deprecation notices, on every call
        warnings.simplefilter("ignore")
        net, quantized, x_train, x_test, acc_f, acc_q = build()
        path = HERE / "digits.pt"
        qconvdiag.capture_model(net, quantized, x_test[:64], path,  # type: ignore[index]
                                calibration=x_train[:200])  # type: ignore[index]
    print(f"wrote {path}: test accuracy {acc_f:.3f} float, {acc_q:.3f} quantized")
    return net


if __name__ == "__main__":
    main()
