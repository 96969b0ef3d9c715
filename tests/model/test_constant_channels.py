"""QCD074 (model/constant.py): channels pruned in one conv write a constant that 8-bit rounding
reads as 0 (below half a step, like the zero padding), and the next conv's large weights on
them carry a response that varies only at the border: gone in the quantized model, with every
conv at its floor (helper-64's pruned MobileNetV2: 98.5% float, 10.3% quantized, no finding;
its fix, each chain kept in float, gave 98.5%). Named, and its fix runs; a conv whose weights
on those channels are ordinary is quiet."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qconvdiag
from qconvdiag.model.walk import WalkOptions, walk_model


class _Pruned(torch.nn.Module):
    """expand (channels 0 and 1 pruned: zero weights, a small bias) -> ReLU6 -> depthwise
    (``gain`` times the weights on those channels, the interior response cancelled by its
    bias, as a folded BatchNorm's shift does) -> head."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.expand = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = torch.nn.ReLU6()
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.expand.weight[:2] = 0
            self.expand.bias[:2] = 0.004  # below half the output step
            self.dw.weight.abs_()
            self.dw.weight[:2] *= gain
            self.dw.bias[:2] = -0.004 * self.dw.weight[:2].sum(dim=(1, 2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.expand(self.quant(x)))
        return self.dequant(self.head(self.dw(x)))


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 12, 12, generator=gen) for _ in range(3)]


def _quantize(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    from torch.ao.quantization import convert, get_default_qconfig, prepare

    torch.backends.quantized.engine = "x86"
    q = copy.deepcopy(model)
    q.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        with torch.no_grad():
            for b in batches:
                q(b)
        convert(q, inplace=True)
    return q


def _findings(model: torch.nn.Module, q: torch.nn.Module, batches: list[torch.Tensor],
              path=None):  # noqa: ANN001, ANN202
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


def test_constant_channels_lost_to_rounding_are_named_and_the_chain_kept_in_float(tmp_path):  # noqa: ANN001
    model, batches = _Pruned(gain=400.0).eval(), _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    assert before < 10
    bundle, findings = _findings(model, q, batches, tmp_path / "b.pt")
    assert bundle.layer("expand").activations_after == ("act1",)  # read back
    (found,) = [f for f in findings if f.code == "QCD074"]
    assert found.severity == "error" and found.evidence["channels"] == [0, 1]
    assert "channels pruned in expand" in found.message
    assert "reading 0 like the zero padding" in found.message
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    fixed = copy.deepcopy(model)
    from torch.ao.quantization import get_default_qconfig

    fixed.qconfig = get_default_qconfig("x86")
    scope = {"torch": torch, "model": fixed, "calibration_batches": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD074 fix", "exec"), scope)  # noqa: S102
    after = _sqnr(model, scope["quantized"], batches[1])
    assert after > before + 20, (before, after)
    _b, again = _findings(model, scope["quantized"], batches)
    assert not [f for f in again if f.code == "QCD074"]


def test_ordinary_weights_on_constant_channels_are_quiet() -> None:
    model, batches = _Pruned(gain=1.0).eval(), _batches()
    _b, findings = _findings(model, _quantize(model, batches), batches)
    assert not [f for f in findings if f.code == "QCD074"]


def test_a_bundle_s_activations_after_are_module_paths_or_refused() -> None:
    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.bundle import _paths

    assert _paths(["blocks.0.act1"], "b.pt", "activations_after") == ("blocks.0.act1",)
    for bad in ("act1", ["a b"], [1], [""]):
        with pytest.raises(CaseFileError, match="activations_after"):
            _paths(bad, "b.pt", "activations_after")


def test_its_code_is_a_model_code_the_cli_takes() -> None:
    """--ignore takes the codes CODES lists (a review of this session found QCD073 missing)."""
    from qconvdiag.findings import CODES, MODEL_CODES

    assert "QCD074" in MODEL_CODES and "QCD074" in CODES


def test_an_fx_model_s_fix_sets_the_chain_s_qconfig_to_none() -> None:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    model, batches = _Pruned(gain=400.0).eval(), _batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                              (batches[0],))
        with torch.no_grad():
            for b in batches:
                prepared(b)
        q = convert_fx(prepared)
    before = _sqnr(model, q, batches[1])
    (found,) = [f for f in _findings(model, q, batches)[1] if f.code == "QCD074"]
    assert "qconfig_mapping.set_module_name(name, None)" in found.fix
    scope = {"torch": torch, "model": copy.deepcopy(model),
             "qconfig_mapping": get_default_qconfig_mapping("x86"),
             "example_inputs": (batches[0],), "calibration_batches": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD074 fix", "exec"), scope)  # noqa: S102
    assert _sqnr(model, scope["quantized"], batches[1]) > before + 20
    assert not [f for f in _findings(model, scope["quantized"], batches)[1]
                if f.code == "QCD074"]
