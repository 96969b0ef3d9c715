"""QCD076 (model/calibration.py): calibration batches whose range is 3x to 8x the inputs' at
every conv (a few over-exposed images, which a MinMax observer follows to the last value)
leave every step that much coarser than the inputs need, while each conv is at its floor on
the batches' range (pytorch#45185: accuracy falls as the calibration set grows; helper-70's
repro: 3.65x to 6.2x at every conv, all "at the floor", nothing named). Named, and its fix
(calibrating on inputs like those at inference) runs; batches like the inputs, too few
samples, and batches unlike them by 8x or more (the walk's other path) are quiet."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qconvdiag
from qconvdiag.model.walk import WalkOptions, walk_model


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.relu1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()
        self.conv2, self.relu2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()
        self.head = torch.nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu2(self.conv2(self.relu1(self.conv1(self.quant(x)))))
        return self.dequant(self.head(x))


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _images(n: int, seed: int, gain: float = 1.0) -> torch.Tensor:
    return torch.rand(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed)) * gain


def _quantize(model: torch.nn.Module, batches: list[torch.Tensor], fix: str | None = None
              ) -> torch.nn.Module:
    from torch.ao.quantization import convert, default_qconfig, fuse_modules, prepare

    torch.backends.quantized.engine = "x86"
    m = fuse_modules(copy.deepcopy(model).eval(), [["conv1", "relu1"], ["conv2", "relu2"]])
    m.qconfig = default_qconfig  # MinMax: the last value sets the range
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fix is not None:
            scope = {"torch": torch, "model": m, "calibration_batches": batches}
            exec(compile(fix, "QCD076 fix", "exec"), scope)  # noqa: S102
            return scope["quantized"]
        prepare(m, inplace=True)
        with torch.no_grad():
            for b in batches:
                m(b)
        return convert(m)


def _findings(model: torch.nn.Module, q: torch.nn.Module, inputs: torch.Tensor,
              calibration: list[torch.Tensor]):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, q, inputs, calibration=calibration)
    return [f for f in walk_model(bundle, WalkOptions(top=0)).report.findings
            if f.code == "QCD076"]


def _sqnr(model: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y, yq = model(x), q(x)
    return float(10 * torch.log10(y.pow(2).sum() / (y - yq).pow(2).sum()))


def test_batches_with_over_exposed_images_are_named_and_calibrating_on_likes_runs() -> None:
    model = _Net().eval()
    calibration = [_images(8, seed) for seed in range(8)] + [_images(8, 99, gain=4.0)]
    q = _quantize(model, calibration)
    inputs = _images(16, 1000)
    (found,) = _findings(model, q, inputs, calibration)
    assert found.severity == "warning"
    assert 3 <= found.evidence["ratio_min"] < 8 and found.evidence["convs"] == 3
    assert found.evidence["samples"] == 16
    assert "inputs like those at inference" in found.fix
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    # the fix, run on the same batches, leaves the over-exposed ones out itself (helper-73:
    # one that only said so rebuilt the same model)
    fixed = _quantize(model, calibration, found.fix)
    assert _sqnr(model, fixed, inputs) > _sqnr(model, q, inputs) + 6
    assert not _findings(model, fixed, inputs, calibration[:8])


def test_batches_like_the_inputs_are_quiet() -> None:
    model = _Net().eval()
    calibration = [_images(8, seed) for seed in range(8)]
    assert not _findings(model, _quantize(model, calibration), _images(16, 1000), calibration)


def test_a_few_samples_do_not_stand_for_the_inputs() -> None:
    model = _Net().eval()
    calibration = [_images(8, seed) for seed in range(8)] + [_images(8, 99, gain=4.0)]
    q = _quantize(model, calibration)
    assert not _findings(model, q, _images(4, 1000), calibration)


def test_batches_unlike_by_8x_take_the_walk_s_other_path() -> None:
    """bundle.calibration_unlike: every conv judged on the samples' range instead."""
    model = _Net().eval()
    calibration = [_images(8, seed, gain=20.0) for seed in range(4)]
    q = _quantize(model, calibration)
    assert not _findings(model, q, _images(16, 1000), calibration)


def test_its_code_is_a_model_code_the_cli_takes() -> None:
    from qconvdiag.findings import CODES, MODEL_CODES

    assert "QCD076" in MODEL_CODES and "QCD076" in CODES
