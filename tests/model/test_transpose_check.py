"""A quantized ConvTranspose checked against its own quantized weight and bias in float
(model/activations.py): torch 2.13's x86, fbgemm and onednn kernels write codes far from that
on a UNet's 2x upsampling (16 to 8 channels, kernel 2, stride 2), qnnpack's do not. The walk
does not diagnose transposed convs, and QCD065 blamed "an op between" (helper-64's FX UNet:
99.0% float, 10.6% quantized). It names the module and its kernel, and its fix, which runs the
module in float, gives the float model's output back."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qconvdiag


class _UNetish(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.enc = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.relu = torch.nn.ReLU()
        self.up = torch.nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.head(self.up(self.relu(self.enc(self.quant(x))))))


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _quantized(engine: str) -> tuple[torch.nn.Module, torch.nn.Module, list[torch.Tensor]]:
    """The float model, its eager quantization on ``engine`` (per-tensor weights for the
    ConvTranspose, which torch requires), and three batches (calibration)."""
    from torch.ao.quantization import (
        QConfig,
        convert,
        default_weight_observer,
        get_default_qconfig,
        prepare,
    )

    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    model = _UNetish().eval()
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(3)]
    q = copy.deepcopy(model)
    q.qconfig = get_default_qconfig(engine)
    q.up.qconfig = QConfig(activation=q.qconfig.activation, weight=default_weight_observer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        with torch.no_grad():
            for b in batches:
                q(b)
        convert(q, inplace=True)
    return model, q, batches


def _report(model: torch.nn.Module, q: torch.nn.Module, batches: list[torch.Tensor]):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qconvdiag.diagnose_model(model, q, batches[:1], top=0, calibration=batches)


def _sqnr(model: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y, yq = model(x), q(x)
    return float(10 * torch.log10(y.pow(2).sum() / (y - yq).pow(2).sum()))


@pytest.mark.parametrize("engine", ["x86", "fbgemm"])
def test_a_convtranspose_kernel_that_computes_wrong_values_is_named_and_run_in_float(
        engine: str) -> None:
    model, q, batches = _quantized(engine)
    assert _sqnr(model, q, batches[1]) < 10  # the kernel's fault, torch's own
    (lost,) = [f for f in _report(model, q, batches).findings if f.code == "QCD065"]
    assert lost.severity == "error"
    assert lost.title.endswith("by up, whose quantized kernel computes wrong values")
    assert "torch's quantized ConvTranspose2d computes wrong values" in lost.message
    assert "with its own quantized weight and bias" in lost.message
    assert max(len(line) for line in lost.fix.splitlines()) <= 80
    scope = {"torch": torch, "model": model, "quantized": q}
    exec(compile(lost.fix, "QCD065 fix", "exec"), scope)  # noqa: S102
    assert _sqnr(model, q, batches[1]) > 30
    assert _report(model, q, batches).findings == ()


def test_a_right_convtranspose_kernel_is_quiet() -> None:
    model, q, batches = _quantized("qnnpack")
    assert _sqnr(model, q, batches[1]) > 30
    assert _report(model, q, batches).findings == ()
