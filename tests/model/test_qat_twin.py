"""A QAT model captured with the model convert was called on (``prepare_qat``'s, trained): its
fused ConvBn modules hold the conv's weight before its BatchNorm, which the quantized conv
folded in. Compared as it was, every conv of a healthy QAT model read broken, QCD027 and
QCD024 errors (a helper's); its float twin (each QAT module's ``to_float()``, fake
quantization and observers off) is captured instead, and the model given is left as it was."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.c1, self.b1, self.r1 = (torch.nn.Conv2d(3, 16, 3, padding=1, bias=False),
                                     torch.nn.BatchNorm2d(16), torch.nn.ReLU())
        self.c2, self.b2 = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1), torch.nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.b2(self.c2(self.r1(self.b1(self.c1(self.quant(x)))))))


def _qat(settle: int, lr: float) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """_Net fused and prepared for QAT on x86, trained a few steps at ``lr`` (BatchNorm
    statistics settled first), its observers then run ``settle`` more passes; and converted."""
    from torch.ao.quantization import (
        convert,
        fuse_modules_qat,
        get_default_qat_qconfig,
        prepare_qat,
    )

    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    batches = [torch.randn(8, 3, 12, 12) for _ in range(6)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _Net().train()
        with torch.no_grad():
            for _ in range(5):  # a trained model's BatchNorm statistics: settled
                for x in batches:
                    model(x)
        fuse_modules_qat(model, [["c1", "b1", "r1"], ["c2", "b2"]], inplace=True)
        model.qconfig = get_default_qat_qconfig("x86")
        prepare_qat(model, inplace=True)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for x in batches:  # QAT: a few steps, BatchNorm statistics and observers updating
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        with torch.no_grad():  # and its end, where the observers' moving averages settle
            for _ in range(settle):
                for x in batches:
                    model(x)
        model.eval()
        return model, convert(copy.deepcopy(model)), batches


def test_a_qat_model_is_captured_as_its_float_twin() -> None:
    model, quantized, batches = _qat(50, 1e-4)
    state = copy.deepcopy(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qconvdiag.diagnose_model(model, quantized, batches[:2], top=2)
    codes = {(f.code, f.severity) for r in report.layers for f in r.findings}
    assert not {c for c, s in codes if c in ("QCD024", "QCD027", "QCD030")}, codes
    assert all(r.verdict == "at_floor" for r in report.layers), [
        (r.name, r.verdict) for r in report.layers]
    assert any("QAT modules" in n for n in report.notes)
    # the model given is left as it was: its fake quantization on, its state unchanged
    assert int(model.c1.weight_fake_quant.fake_quant_enabled[0]) == 1
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_qat_weight_s_clip_is_info_qat_trained_with_it(tmp_path) -> None:  # noqa: ANN001
    """A few QAT steps and no settling: the converted qparams clip some of the folded weights,
    as the fake quantization did in training (a helper's QAT model: undone on its stem, the
    model 0.5 accuracy points worse). QCD020 says so, as info; the bundle file keeps it."""
    from qconvdiag.model.walk import WalkOptions, walk_model

    model, quantized, batches = _qat(0, 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconvdiag.capture_model(model, quantized, batches[:2], tmp_path / "qat.pt")
    report = walk_model(qconvdiag.load_bundle(tmp_path / "qat.pt"), WalkOptions(top=2)).report
    clipped = [f for d in report.details for f in d.report.findings
               if f.code == "QCD020" and f.path == "as_given"]
    assert clipped and all(f.severity == "info" and "QAT trained this weight" in f.message
                           for f in clipped)

