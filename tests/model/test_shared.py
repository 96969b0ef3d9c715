"""Convs whose output qparams an FX cat shares (model/shared.py): convert_fx gives every input
of a torch.cat one observer, so a branch conv writes at qparams fitted to all the branches'
range. Judged on its own range it got QCD052 on a correctly quantized model, whose fix (its
scale fitted to its own range) clipped the other branches; judged on the group's, it is quiet.
An eager model's FloatFunctional.cat requantizes: nothing is shared there."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


class Branches(torch.nn.Module):
    """Two branch convs, one with 5x the other's output range, concatenated, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = (torch.ao.quantization.QuantStub(),
                                    torch.ao.quantization.DeQuantStub())
        self.narrow = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.wide = torch.nn.Conv2d(3, 8, 1)
        self.r1, self.r2 = torch.nn.ReLU(), torch.nn.ReLU()
        self.cat = torch.ao.nn.quantized.FloatFunctional()
        self.head = torch.nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.wide.weight.mul_(5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        y = self.cat.cat([self.r1(self.narrow(x)), self.r2(self.wide(x))], dim=1)
        return self.dequant(self.head(y))


def _report(flow: str, cls: type[torch.nn.Module] = Branches,
            layers: tuple[str, ...] = ("narrow",)):  # noqa: ANN202
    """``cls`` quantized on x86 (FX, or eager with its ReLUs fused) and calibrated, its bundle,
    and the walk that explains ``layers``."""
    torch.backends.quantized.engine = "x86"
    model = cls().eval()
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(4, 3, 12, 12, generator=g) for _ in range(3)]
    x = torch.randn(4, 3, 12, 12, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flow == "pt2e":
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

            quantizer = xiq.X86InductorQuantizer()
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
            prepared = prepare_pt2e(torch.export.export(copy.deepcopy(model), (x,),
                                                        strict=True).module(), quantizer)
        elif flow == "fx":
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

            prepared = prepare_fx(copy.deepcopy(model), torch.ao.quantization.
                                  get_default_qconfig_mapping("x86"), (x,))
        else:
            prepared = torch.ao.quantization.fuse_modules(
                copy.deepcopy(model), [["narrow", "r1"], ["wide", "r2"]])
            prepared.qconfig = torch.ao.quantization.get_default_qconfig("x86")
            prepared = torch.ao.quantization.prepare(prepared)
        for b in calibration:
            prepared(b)
        quantized = (convert_pt2e(prepared) if flow == "pt2e" else convert_fx(prepared)
                     if flow == "fx" else torch.ao.quantization.convert(prepared))
        bundle = qconvdiag.capture_model(model, quantized, x, calibration=calibration)
        return quantized, bundle, qconvdiag.walk_model(
            bundle, qconvdiag.WalkOptions(layers=layers, top=0)).report


def test_the_convs_an_fx_cat_shares_qparams_with_are_judged_on_their_range_together():
    quantized, bundle, report = _report("fx")
    narrow, wide = quantized.get_submodule("narrow"), quantized.get_submodule("wide")
    assert (narrow.scale, narrow.zero_point) == (wide.scale, wide.zero_point)  # FX shares
    assert bundle.layer("narrow").shared_range == bundle.layer("wide").shared_range
    assert bundle.layer("narrow").shared_range[1] >= bundle.layer("wide").case.output_range[1]
    assert any("shared with wide" in n for n in bundle.layer("narrow").notes)
    # it was broken, with a QCD052 error
    assert report.layer("narrow").verdict == "at_floor"
    assert not [f for d in report.details for f in d.report.findings
                if f.severity != "info"]
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    again = bundle_from_mapping(bundle_to_mapping(bundle), "b")
    assert again.layer("narrow").case.output_range == bundle.layer("narrow").case.output_range


def test_the_convs_a_pt2e_cat_shares_qparams_with_are_judged_on_their_range_together():
    """X86InductorQuantizer annotates a cat's inputs with one shared quantization spec: the
    quantize nodes after both branch convs hold one scale (helper-64's PT2E SqueezeNet-like
    Fire modules: QCD052 warnings and an error on each 1x1 expand conv, whose fix left the
    model's accuracy where it was)."""
    from qconvdiag.torchao_import import require_torchao

    require_torchao()
    _quantized, bundle, report = _report("pt2e")
    assert bundle.layer("narrow").shared_range == bundle.layer("wide").shared_range is not None
    assert bundle.layer("narrow").shared_range[1] >= bundle.layer("wide").case.output_range[1]
    assert any("shared with wide" in n and "X86InductorQuantizer" in n
               for n in bundle.layer("narrow").notes)
    assert report.layer("narrow").verdict == "at_floor"
    assert not [f for d in report.details for f in d.report.findings if f.severity != "info"]


def test_an_eager_cat_shares_nothing():
    _quantized, bundle, _report_ = _report("eager")
    assert bundle.layer("narrow").shared_range is None


class TwoCats(torch.nn.Module):
    """Conv a feeds two cats, one with b and one with c (16x a's range): convert_fx shares one
    observer across all three."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Conv2d(3, 8, 1) for _ in range(3))
        self.h1, self.h2 = torch.nn.Conv2d(16, 4, 1), torch.nn.Conv2d(16, 4, 1)
        with torch.no_grad():
            self.b.weight.mul_(4)
            self.c.weight.mul_(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.a(x), self.b(x), self.c(x)
        return self.h1(torch.cat([a, b], 1)) + self.h2(torch.cat([a, c], 1))


class PoolBranch(torch.nn.Module):
    """Inception-v3's reduction block: cat([conv, conv, max_pool(x)]), the pool's values at
    the stem's qparams, wider than the convs'."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.a = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.h = torch.nn.Conv2d(24, 4, 1)
        with torch.no_grad():
            self.stem.weight.mul_(8)
            self.a.weight.mul_(0.05)
            self.b.weight.mul_(0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.a(x), self.b(x), torch.nn.functional.max_pool2d(x, 3, 2, 1)], 1)
        return self.h(y)


class TransposeBranch(torch.nn.Module):
    """A UNet's skip: cat([relu(conv(x)), conv_transpose(y)]); the ConvTranspose (which the
    capture does not walk) writes signed values, so the shared observer gives the ReLU conv a
    zero point far above 0 (helper-50's healthy FX UNet: QCD052 warnings)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.down = torch.nn.Conv2d(8, 8, 2, stride=2)
        self.up = torch.nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.h = torch.nn.Conv2d(16, 4, 1)
        with torch.no_grad():  # its range 3-4x the ReLU conv's, on both sides of 0
            self.up.weight.mul_(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.relu(self.enc(x))
        return self.h(torch.cat([e, self.up(self.down(e))], 1))


def test_a_cat_with_a_module_no_capture_walks_shares_its_qparams_too():
    """The ReLU conv's output qparams are the ConvTranspose's (one observer for the cat):
    judged on what they represent, not on the conv's own range; the note names the
    ConvTranspose."""
    quantized, bundle, report = _report("fx", TransposeBranch, layers=("enc",))
    enc, up = quantized.get_submodule("enc"), quantized.get_submodule("up")
    assert (enc.scale, enc.zero_point) == (up.scale, up.zero_point) and enc.zero_point > 0
    assert any("shared with up" in n for n in bundle.layer("enc").notes)
    assert report.layer("enc").verdict == "at_floor"
    assert not [f for d in report.details for f in d.report.findings if f.severity != "info"]


@pytest.mark.parametrize("cls", [TwoCats, PoolBranch])
def test_a_cat_group_spans_every_cat_and_every_input(cls):  # noqa: ANN001
    """Found by review: groups built per cat left b judged on a's and b's range alone (a feeds
    a second cat, with c), and a pool branch's values, part of what the shared observer saw,
    were left out: QCD052 errors on correctly quantized models. Groups sharing a conv are one
    group now, and a cat with another input widens its group to what the shared qparams
    represent."""
    _quantized, bundle, report = _report("fx", cls, layers=())
    assert all(row.verdict == "at_floor" for row in report.layers)
    assert bundle.layer("a").shared_range == bundle.layer("b").shared_range is not None


def test_an_fx_layer_s_qconfig_fix_prepares_the_fx_model():
    """An FX model's layer fix that sets a qconfig (reduce_range's: QCD040, QCD042) printed
    the eager flow's prepare(model), which quantizes nothing of an FX model (found by review):
    the walk hands a layer its model's flow, and the fix is prepare_fx with that qconfig,
    which runs: the conv it names is quantized again."""
    import dataclasses

    from qconvdiag.findings.fixes import reduce_range_flow

    _quantized, bundle, report = _report("fx")
    fixes = [f.fix for d in report.details for f in d.report.findings]
    assert not any("prepare(model)" in fix for fix in fixes)
    case = dataclasses.replace(bundle.layer("narrow").case, model_flow="fx")
    fix = reduce_range_flow(case, "x86", True)
    assert "QConfigMapping().set_global(qconfig)" in fix and "prepare_fx(model, mapping" in fix
    assert "HistogramObserver.with_args(reduce_range=True)" in fix
    model = Branches().eval()
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    scope = {"torch": torch, "model": model, "example_inputs": (x,), "calibration_batches": [x]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(fix, "fix", "exec"), scope)  # noqa: S102
    assert type(scope["qm"]).__name__ == "ConvReLU2d"
