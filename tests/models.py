"""Small float models and their torch.ao-quantized twins for the model walk's tests: BatchNorm to
fold, fused ReLUs, a depthwise conv, a 1x1 conv, a conv1d model; the eager flow with each
engine's default qconfig (the healthy way) or FX's ``convert_fx``."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QuantStub


class Net2d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu2 = nn.ReLU()
        self.pw = nn.Conv2d(8, 16, 1)
        self.bn3 = nn.BatchNorm2d(16)
        self.head = nn.Conv2d(16, 4, 3, stride=2)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.relu1(self.bn1(self.stem(x)))
        x = self.relu2(self.bn2(self.dw(x)))
        x = self.bn3(self.pw(x))
        return self.dequant(self.head(x))


FUSE_2D = [["stem", "bn1", "relu1"], ["dw", "bn2", "relu2"], ["pw", "bn3"]]


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.a = nn.Conv1d(4, 8, 5, padding=2)
        self.relu = nn.ReLU()
        self.b = nn.Conv1d(8, 8, 3, stride=2)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.b(self.relu(self.a(self.quant(x)))))


FUSE_1D = [["a", "relu"]]


class NetAdd(nn.Module):
    """Two convs whose outputs meet in a quantized add (its own output scale) before a third."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.add = nn.quantized.FloatFunctional()
        self.c = nn.Conv2d(8, 4, 1)
        self.dequant = DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.a(self.quant(x)))
        return self.dequant(self.c(self.add.add(y, self.b(y))))


FUSE_ADD = [["a", "relu"]]


def _randomize_bn(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) * 0.4 - 0.2)


def inputs(dims: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (n, 4, 32) if dims == 1 else (n, 3, 16, 16)
    return torch.randn(*shape, generator=g)


def eager(engine: str, dims: int = 2, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """The float model (eval) and its eager-quantized twin: fuse, prepare with the engine's
    default qconfig (7-bit activations where this CPU's kernels sum int16 pairs:
    tests/cpu.py), calibrate on 4 batches, convert. ``dims``: 2 (Net2d), 1 (Net1d) or 0
    (NetAdd, 2-d with a quantized add)."""
    from torch.ao.quantization import fuse_modules

    torch.manual_seed(seed)
    torch.backends.quantized.engine = engine
    model = {2: Net2d, 1: Net1d, 0: NetAdd}[dims]().eval()
    _randomize_bn(model, seed)
    q = copy.deepcopy(model)
    fuse_modules(q, {2: FUSE_2D, 1: FUSE_1D, 0: FUSE_ADD}[dims], inplace=True)
    return model, quantize_fused(q, engine, dims)


def quantize_fused(q: nn.Module, engine: str, dims: int = 2, qconfig: Any = None) -> nn.Module:
    """A fused float model quantized in place: prepare with the engine's default qconfig (or
    ``qconfig``), calibrate on 4 batches, convert."""
    from torch.ao.quantization import convert, prepare

    from tests.cpu import healthy_qconfig

    q.qconfig = healthy_qconfig(engine) if qconfig is None else qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        with torch.no_grad():
            for i in range(4):
                q(inputs(dims, 8, 100 + i))
        convert(q, inplace=True)
    return q


def with_outlier_channel(model: Net2d, channel: int = 3, factor: float = 100.0) -> Net2d:
    """The same function, one channel between ``pw`` and ``head`` ``factor`` times the others:
    bn3's gamma and beta of that channel times ``factor``, head's weights reading it divided by
    it (a trained model's BatchNorm can end up so)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.bn3.weight[channel] *= factor
        model.bn3.bias[channel] *= factor
        model.head.weight[:, channel] /= factor
    return model


def fx(engine: str, seed: int = 0) -> tuple[nn.Module, Any]:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from tests.cpu import healthy_qconfig

    torch.manual_seed(seed)
    torch.backends.quantized.engine = engine
    model = Net2d().eval()
    _randomize_bn(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = get_default_qconfig_mapping(engine).set_global(healthy_qconfig(engine))
        prepared = prepare_fx(copy.deepcopy(model), mapping, example_inputs=(inputs(2, 1, 0),))
        with torch.no_grad():
            for i in range(4):
                prepared(inputs(2, 8, 100 + i))
        return model, convert_fx(prepared)
