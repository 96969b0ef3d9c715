"""QCD073 (model/refold.py): prepare_pt2e folds a BatchNorm into the conv before it for every
reader of that conv's output. A pre-activation block's shortcut reads the stem conv's raw
output while the block's BatchNorm normalizes it; after the fold the shortcut gets the
normalized output (helper-64's pre-activation ResNet: 99.7% float, 11.7% converted; QCD065
blamed "an op between"). Named, with the loss after it blamed on it, and its fix, which keeps
such a BatchNorm out of the fold, runs: the walk of the model it gives is quiet."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import qconvdiag
from qconvdiag import torchao_import as pt2e
from qconvdiag.model.walk import WalkOptions, walk_model


class PreAct(nn.Module):
    """stem -> [bn1 -> relu -> c1 -> bn2 -> relu -> c2] + stem's raw output, then a head conv;
    ``shortcut=False``: the block without the shortcut (bn1 the stem's only reader)."""

    def __init__(self, shortcut: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1, self.r1 = nn.BatchNorm2d(8), nn.ReLU()
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2, self.r2 = nn.BatchNorm2d(8), nn.ReLU()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.c2(self.r2(self.bn2(self.c1(self.r1(self.bn1(x))))))
        return self.head(x + y if self.shortcut else y)


def _model(shortcut: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = PreAct(shortcut).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained statistics: far from 0 and 1
        for bn in (model.bn1, model.bn2):
            bn.running_mean.copy_(torch.rand(8, generator=gen) * 2 - 1)
            bn.running_var.copy_(torch.rand(8, generator=gen) * 4 + 0.2)
            bn.weight.copy_(torch.rand(8, generator=gen) + 0.5)
    return model


def _quantizer():  # noqa: ANN202
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    return quantizer


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(3)]


def _converted(model: nn.Module, batches: list[torch.Tensor]) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(model, (batches[0],), strict=True).module()
    prepared = prepare_pt2e(exported, _quantizer())
    with torch.no_grad():
        for b in batches:
            prepared(b)
    return convert_pt2e(prepared)


def _walk(model: nn.Module, converted: torch.fx.GraphModule, batches: list, path=None):  # noqa: ANN001, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, converted, batches[:1], path,
                                         calibration=batches)
    if path is not None:
        bundle = qconvdiag.load_bundle(path)
    return bundle, walk_model(bundle, WalkOptions(top=0)).report


def test_a_batchnorm_folded_under_a_shortcut_is_named_and_its_fix_runs(tmp_path) -> None:  # noqa: ANN001
    pt2e.require_torchao()
    model, batches = _model(), _batches()
    bundle, report = _walk(model, _converted(model, batches), batches, tmp_path / "b.pt")
    assert [(f.conv, f.bn) for f in bundle.shared_folds] == [("stem", "bn1")]  # read back
    (fold,) = [f for f in report.findings if f.code == "QCD073"]
    assert fold.severity == "error" and "bn1 into stem" in fold.title
    assert bundle.shared_folds[0].readers_sqnr_db < 10
    # the loss where the shortcut joins is this fold's, not "an op between"
    assert not [f for f in report.findings if f.code == "QCD065"]
    assert any(u.blamed_on == "QCD073" for u in report.upstream)
    assert max(len(line) for line in fold.fix.splitlines()) <= 80
    scope = {"torch": torch, "model": model, "quantizer": _quantizer(),
             "calibration_batches": batches}
    exec(compile(fold.fix, "QCD073 fix", "exec"), scope)  # noqa: S102
    converted = scope["converted"]
    with torch.no_grad():  # the fixed model computes the float model's function
        error = (converted(batches[1]) - model(batches[1])).pow(2).mean()
        assert error < 1e-2 * model(batches[1]).pow(2).mean()
    _b, again = _walk(model, converted, batches)
    assert not [(f.code, f.severity) for f in again.findings if f.severity != "info"]


def test_a_batchnorm_that_is_its_conv_s_only_reader_is_folded_quietly() -> None:
    pt2e.require_torchao()
    model, batches = _model(shortcut=False), _batches()
    bundle, report = _walk(model, _converted(model, batches), batches)
    assert bundle.shared_folds == ()
    assert not [f for f in report.findings if f.code == "QCD073"]
    assert bundle.layer("stem").bn_folded == "bn1"


@pytest.mark.parametrize("entry", [{"conv": "stem"}, {"conv": "a b", "bn": "bn1",
                                                      "readers_sqnr_db": 1.0},
                                   {"conv": "stem", "bn": "bn1", "readers_sqnr_db": "nan"}])
def test_a_malformed_fold_entry_is_refused(entry: dict) -> None:
    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.refold import SharedFold

    with pytest.raises(CaseFileError, match="shared_folds"):
        SharedFold.from_mapping(entry, "b.pt")


@pytest.mark.parametrize("readers_db, blamed", [(2.9, True), (35.0, False)])
def test_a_loss_is_blamed_on_a_fold_only_where_the_fold_explains_it(readers_db: float,
                                                                     blamed: bool) -> None:
    """Found by review: any loss after a refolded conv was blamed on QCD073 and left out of
    QCD065, though QCD073 is graded by its readers' SQNR: a harmless fold (its readers at
    35 dB, info) took a 5 dB loss. It takes a loss it explains (ops.EXPLAINS_DB) only."""
    from qconvdiag.model.screen import Screen
    from qconvdiag.model.walk import upstream_losses
    from qconvdiag.model_report import ErrorSummary

    def screen(received: float, propagated: float, floor_ratio: float = 1.0) -> Screen:
        e = ErrorSummary
        return Screen(e(30, 0.1, 0.1), e(propagated, 0.1, 0.1), e(received, 0.1, 0.1),
                      floor_ratio, False, 0.1, "at_floor", None)

    order = ["stem", "c1", "c2"]
    screens = {"stem": screen(40, 35), "c1": screen(34, 33), "c2": screen(5, 4, 20.0)}
    (loss,) = upstream_losses(order, screens, True, refolded={"stem": ("bn1", readers_db)})
    assert (loss.blamed_on == "QCD073") == blamed, loss
    assert ("prepare_pt2e folded BatchNorm bn1 into stem" in loss.message) == blamed


def test_its_code_is_a_model_code_the_cli_takes() -> None:
    """--ignore takes the codes CODES lists (a review of this session found QCD073 missing)."""
    from qconvdiag.findings import CODES, MODEL_CODES

    assert "QCD073" in MODEL_CODES and "QCD073" in CODES
