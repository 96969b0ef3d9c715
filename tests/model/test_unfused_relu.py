"""QCD075 (model/relu.py): an eager model whose conv is followed by a ReLU module it was not
fused with quantizes the conv's output over its signed range, and the ReLU drops the codes
below the zero point: the values that pass keep a coarser step than a fused conv's
(pytorch#95287: 0.8388 unfused, 0.8715 fused; helper-70's repro). Named with what a fused
conv gives, and its fix (fuse_modules) runs; a conv whose output is mostly positive, and a
ReLU whose conv's output another op reads too (fusing would change the model), are quiet."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qconvdiag
from qconvdiag.model.walk import WalkOptions, walk_model


class _Net(torch.nn.Module):
    """conv1 -> relu1 -> conv2 -> relu2 -> pool -> head, unfused; ``shift`` added to conv2's
    bias moves its output's range to the positive side."""

    def __init__(self, shift: float = 0.0, shortcut: bool = False, bn: bool = False) -> None:
        super().__init__()
        from torch.ao.nn.quantized import FloatFunctional
        from torch.ao.quantization import DeQuantStub, QuantStub

        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.conv1, self.relu1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()
        self.conv2, self.relu2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()
        self.pool, self.head = torch.nn.AvgPool2d(2), torch.nn.Conv2d(16, 4, 1)
        self.add, self.shortcut = FloatFunctional(), shortcut
        self.bn2 = torch.nn.BatchNorm2d(16) if bn else torch.nn.Identity()
        with torch.no_grad():
            self.conv2.bias += shift
            if bn:
                self.bn2.running_mean.uniform_(-0.2, 0.2)
                self.bn2.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.conv1(self.quant(x)))))
        z = self.relu2(y)
        if self.shortcut:  # conv2's raw output read again
            z = self.add.add(z, y)
        return self.dequant(self.head(self.pool(z)))


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(3)]


def _prepared(model: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization import default_qconfig

    torch.backends.quantized.engine = "x86"
    m = copy.deepcopy(model).eval()
    m.qconfig = default_qconfig  # the report's: MinMax, per-tensor weights
    return m


def _quantize(model: torch.nn.Module, batches: list[torch.Tensor], fix: str | None = None
              ) -> torch.nn.Module:
    from torch.ao.quantization import convert, prepare

    m = _prepared(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fix is not None:
            scope = {"torch": torch, "model": m, "calibration_batches": batches}
            exec(compile(fix, "QCD075 fix", "exec"), scope)  # noqa: S102
            return scope["quantized"]
        prepare(m, inplace=True)
        with torch.no_grad():
            for b in batches:
                m(b)
        return convert(m)


def _walk(model: torch.nn.Module, q: torch.nn.Module, batches: list[torch.Tensor], path=None):  # noqa: ANN001, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, q, batches[:1], path, calibration=batches)
    if path is not None:
        bundle = qconvdiag.load_bundle(path)
    return bundle, walk_model(bundle, WalkOptions(top=0)).report.findings


def _sqnr(model: torch.nn.Module, q: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        y, yq = model(x), q(x)
    return float(10 * torch.log10(y.pow(2).sum() / (y - yq).pow(2).sum()))


def _qcd075(findings):  # noqa: ANN001, ANN202
    return [f for f in findings if f.code == "QCD075"]


def test_a_relu_left_unfused_is_named_and_its_fusion_runs(tmp_path) -> None:  # noqa: ANN001
    model, batches = _Net().eval(), _batches()
    q = _quantize(model, batches)
    bundle, findings = _walk(model, q, batches, tmp_path / "b.pt")
    assert bundle.layer("conv2").unfused_relu == "relu2"  # read back from the file
    (found,) = _qcd075(findings)
    assert found.severity == "warning"
    costs = {r["conv"]: r for r in found.evidence["relus"]}
    assert "conv2" in costs and costs["conv2"]["step_ratio"] > 1.5
    assert costs["conv2"]["fused_sqnr_db"] - costs["conv2"]["sqnr_db"] >= 3
    assert "['conv2', 'relu2']" in found.fix and "['conv1', 'relu1']" in found.fix
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    fixed = _quantize(model, batches, found.fix)
    assert _sqnr(model, fixed, batches[1]) > _sqnr(model, q, batches[1]) + 3
    assert not _qcd075(_walk(model, fixed, batches)[1])


def test_a_conv_whose_output_is_mostly_positive_is_quiet() -> None:
    """Near miss: the step a fused conv gives is about the same."""
    model, batches = _Net(shift=5.0).eval(), _batches()
    bundle, findings = _walk(model, _quantize(model, batches), batches)
    assert bundle.layer("conv2").unfused_relu == "relu2"
    assert not [f for f in _qcd075(findings)
                if "conv2" in [r["conv"] for r in f.evidence["relus"]]]


def test_a_relu_whose_conv_output_a_shortcut_reads_too_is_not_fused() -> None:
    """Fusing relu2 into conv2 would give the add conv2's ReLU'd output: another model."""
    model, batches = _Net(shortcut=True).eval(), _batches()
    bundle, findings = _walk(model, _quantize(model, batches), batches)
    assert bundle.layer("conv2").unfused_relu is None
    assert bundle.layer("conv1").unfused_relu == "relu1"  # an in-place-free ReLU, read once
    assert all("conv2" not in f.fix for f in _qcd075(findings))


def test_an_in_place_relu_reads_its_conv_s_output_alone() -> None:
    """An in-place ReLU returns the conv's output itself: the ops after it read the ReLU's
    output, not the conv's."""
    model = _Net().eval()
    model.relu2 = torch.nn.ReLU(inplace=True)
    batches = _batches()
    bundle, _f = _walk(model, _quantize(model, batches), batches)
    assert bundle.layer("conv2").unfused_relu == "relu2"


def test_a_fused_model_records_none() -> None:
    from torch.ao.quantization import convert, fuse_modules, prepare

    model, batches = _Net().eval(), _batches()
    m = fuse_modules(_prepared(model), [["conv1", "relu1"], ["conv2", "relu2"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(m, inplace=True)
        with torch.no_grad():
            for b in batches:
                m(b)
        q = convert(m)
    bundle, findings = _walk(model, q, batches)
    assert all(lay.unfused_relu is None for lay in bundle.layers)
    assert not _qcd075(findings)


def test_a_bundle_s_unfused_relu_is_a_module_path_or_refused() -> None:
    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.bundle import _module_path

    assert _module_path("blocks.0.relu", "b.pt", "unfused_relu") == "blocks.0.relu"
    assert _module_path(None, "b.pt", "unfused_relu") is None
    for bad in ("", "a b", 3, ["relu"], "x);import os"):
        with pytest.raises(CaseFileError, match="'unfused_relu'"):
            _module_path(bad, "b.pt", "unfused_relu")


def test_its_code_is_a_model_code_the_cli_takes() -> None:
    from qconvdiag.findings import CODES, MODEL_CODES

    assert "QCD075" in MODEL_CODES and "QCD075" in CODES


def test_a_relu_left_out_of_a_conv_and_batchnorm_fusion_is_named():
    """helper-73: fuse_modules([["conv2", "bn2"]]) without the ReLU: the ReLU reads the
    BatchNorm's output in the float model, which the quantized conv folded; QCD075 said
    nothing (relu1 and relu2 of its model cost 6.8 and 4.2 dB)."""
    from torch.ao.quantization import convert, fuse_modules, prepare

    model, batches = _Net(bn=True).eval(), _batches()
    m = fuse_modules(_prepared(model), [["conv2", "bn2"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(m, inplace=True)
        with torch.no_grad():
            for b in batches:
                m(b)
        q = convert(m)
    bundle, findings = _walk(model, q, batches)
    assert bundle.layer("conv2").unfused_relu == "relu2"
    (found,) = _qcd075(findings)
    assert "relu2 reads conv2's output (through bn2, folded into it)" in found.message \
        or "relu2 after conv2" in found.message
    assert "['conv2', 'relu2']" in found.fix
    fixed = fuse_modules(_prepared(model), [["conv2", "bn2"]])  # fused as before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scope = {"torch": torch, "model": fixed, "calibration_batches": batches}
        exec(compile(found.fix, "QCD075 fix", "exec"), scope)  # noqa: S102
    assert _sqnr(model, scope["quantized"], batches[1]) > _sqnr(model, q, batches[1])
    assert not _qcd075(_walk(model, scope["quantized"], batches)[1])


def test_a_qat_model_s_fusion_is_said_in_its_own_flow():
    """helper-73: on a QAT model the fix ran PTQ's prepare and convert, which refuse its fused
    QAT modules and would drop the training (0.9194 QAT, 0.8917 PTQ, 0.9370 QAT fused)."""
    from torch.ao.quantization import convert, get_default_qat_qconfig, prepare_qat

    torch.backends.quantized.engine = "x86"
    model, batches = _Net().eval(), _batches()
    m = copy.deepcopy(model).train()
    m.qconfig = get_default_qat_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare_qat(m, inplace=True)
        with torch.no_grad():
            for b in batches:
                m(b)
        q = convert(copy.deepcopy(m).eval())
    _b, findings = _walk(m.eval(), q, batches)  # the QAT model itself as the float one
    (found,) = _qcd075(findings)
    # words, as comment lines whole at 80 columns
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    words = " ".join(line.removeprefix("# ") for line in found.fix.splitlines())
    assert words.startswith("A QAT model: put each ReLU in the fuse_modules_qat list")
    assert "['conv2', 'relu2']" in words and "prepare_qat, train again" in words
