"""A ResNet-18 shape for the benchmarks, defined here (torchvision's PyPI wheel is a CUDA build
that does not import next to the CPU torch): 20 convs with BatchNorm, residual adds, fused ReLUs,
BatchNorm statistics drawn at random, quantized with torch.ao's eager flow."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QuantStub


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))
        self.add = nn.quantized.FloatFunctional()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.down is None else self.down(x)
        return self.relu2(self.add.add(y, shortcut))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), classes: int = 10) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.dequant = DeQuantStub()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(3, 2, 1)
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            layers += [Block(cin, w, 1 if i == 0 else 2), Block(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.avg = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(self.quant(x)))))
        x = torch.flatten(self.avg(self.layers(x)), 1)
        return self.dequant(self.fc(x))


def fuse_list(model: ResNet) -> list[list[str]]:
    out = [["conv1", "bn1", "relu"]]
    for i, block in enumerate(model.layers):
        p = f"layers.{i}."
        out += [[p + "conv1", p + "bn1", p + "relu1"], [p + "conv2", p + "bn2"]]
        if block.down is not None:
            out.append([p + "down.0", p + "down.1"])
    return out


def build(engine: str = "x86", size: int = 64, batch: int = 4, seed: int = 0,
          calib: int = 4) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """The float model (eval), its quantized twin (engine's default qconfig, calibrated on
    ``calib`` random batches) and one input batch."""
    from torch.ao.quantization import convert, fuse_modules, get_default_qconfig, prepare

    torch.manual_seed(seed)
    torch.backends.quantized.engine = engine
    model = ResNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    q = fuse_modules(copy.deepcopy(model), fuse_list(model))
    q.qconfig = get_default_qconfig(engine)
    prepare(q, inplace=True)
    with torch.no_grad():
        for _ in range(calib):
            q(torch.randn(batch, 3, size, size))
    convert(q, inplace=True)
    return model, q, torch.randn(batch, 3, size, size)
