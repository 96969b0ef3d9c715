"""QCD074 (model/constant.py): channels pruned in one conv write a constant that 8-bit rounding
reads as 0 (below half a step, like the zero padding), and the next conv's large weights on
them carry a response that varies only at the border: gone in the quantized model, with every
conv at its floor (helper-64's pruned MobileNetV2: 98.5% float, 10.3% quantized, no finding;
its fix, each chain kept in float, gave 98.5%). Named with the conv the capture saw write
those channels, and its fix runs; the cases a review of its first version found (helper-69:
a residual reading the writer's output, chains that overlap, a grouped conv's weights, a
batch-1 pooled 1x1 conv, an op between that is no module) each have a test; a conv whose
weights on those channels are ordinary is quiet."""

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


class _Residual(_Pruned):
    """The same, and a residual add reads the writer's chain output too."""

    def __init__(self) -> None:
        super().__init__(gain=400.0)
        from torch.ao.nn.quantized import FloatFunctional

        self.add = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.expand(self.quant(x)))
        return self.dequant(self.head(self.add.add(self.dw(a), a)))


class _Between(_Pruned):
    """The same, with a functional op (no module) between the ReLU6 and the depthwise conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.nn.functional.max_pool2d(self.act1(self.expand(self.quant(x))), 1)
        return self.dequant(self.head(self.dw(a)))


def _prune(writer: torch.nn.Module, reader: torch.nn.Module, channels: slice,
           gain: float) -> None:
    """``writer``'s ``channels`` pruned (zero weights, a small bias); ``reader``'s weights on
    them ``gain`` times larger, their interior response cancelled by its bias."""
    with torch.no_grad():
        writer.weight[channels] = 0
        writer.bias[channels] = 0.004
        reader.weight.abs_()
        if reader.groups == 1:
            reader.weight[:, channels] *= gain
            reader.bias[:] -= 0.004 * reader.weight[:, channels].sum(
                dim=tuple(range(1, reader.weight.ndim)))
        else:
            reader.weight[channels] *= gain
            reader.bias[channels] = -0.004 * reader.weight[channels].sum(
                dim=tuple(range(1, reader.weight.ndim)))


class _Overlapping(torch.nn.Module):
    """a -> b -> c: b reads a's pruned channels and has pruned channels c reads."""

    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.a, self.r1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6()
        self.b, self.r2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6()
        self.c, self.head = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 4, 1)
        _prune(self.a, self.b, slice(0, 2), 400.0)
        _prune(self.b, self.c, slice(2, 4), 400.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.a(self.quant(x)))
        x = self.r2(self.b(x))
        return self.dequant(self.head(self.c(x)))


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _batches(shape: tuple[int, ...] = (4, 3, 12, 12)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=gen) for _ in range(3)]


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


def _run_eager_fix(model: torch.nn.Module, fix: str, batches: list[torch.Tensor]
                   ) -> torch.nn.Module:
    from torch.ao.quantization import get_default_qconfig

    fixed = copy.deepcopy(model)
    fixed.qconfig = get_default_qconfig("x86")
    scope = {"torch": torch, "model": fixed, "calibration_batches": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(fix, "QCD074 fix", "exec"), scope)  # noqa: S102
    return scope["quantized"]


def _qcd074(findings):  # noqa: ANN001, ANN202
    return [f for f in findings if f.code == "QCD074"]


def test_constant_channels_lost_to_rounding_are_named_and_the_chain_kept_in_float(tmp_path):  # noqa: ANN001
    from qconvdiag.model.bundle import WriterChain

    model, batches = _Pruned(gain=400.0).eval(), _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    assert before < 10
    bundle, findings = _findings(model, q, batches, tmp_path / "b.pt")
    # the writer as the capture saw it, read back from the file; only this conv has one
    assert bundle.layer("dw").writer == WriterChain("expand", ("act1",), True)
    assert [lay.name for lay in bundle.layers if lay.writer] == ["dw"]
    (found,) = _qcd074(findings)
    assert found.severity == "error" and found.evidence["channels"] == [0, 1]
    assert found.evidence["writers"] == ["expand"] and found.evidence["weight_ratio"] >= 10
    assert "channels pruned in expand" in found.message
    assert "reading 0 like the zero padding" in found.message
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    fixed = _run_eager_fix(model, found.fix, batches)
    after = _sqnr(model, fixed, batches[1])
    assert after > before + 20, (before, after)
    assert not _qcd074(_findings(model, fixed, batches)[1])


def test_ordinary_weights_on_constant_channels_are_quiet() -> None:
    model, batches = _Pruned(gain=1.0).eval(), _batches()
    bundle, findings = _findings(model, _quantize(model, batches), batches)
    assert bundle.layer("dw").writer is not None  # the constants are there, and moved
    assert not _qcd074(findings)


def test_a_residual_reading_the_writer_s_output_gets_words_not_a_fix_that_crashes() -> None:
    """Review item 2: the eager fix made the writer's output float, which the residual add
    (a QFunctional) then refused. The capture counts the other reads; the fix says what to
    do with them."""
    model, batches = _Residual().eval(), _batches()
    bundle, findings = _findings(model, _quantize(model, batches), batches)
    assert bundle.layer("dw").writer.sole is False
    (found,) = _qcd074(findings)
    assert "Other ops read expand's output too" in found.fix
    assert "DeQuantStub before expand" in found.fix and "QuantStub after dw" in found.fix


def test_overlapping_chains_are_kept_in_float_as_one() -> None:
    """Review item 1: b reads a's constant channels and writes c's; the chains join, so b is
    not wrapped twice (the first fix left the model as broken as before)."""
    model, batches = _Overlapping().eval(), _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    _b, findings = _findings(model, q, batches)
    (found,) = _qcd074(findings)
    assert found.evidence["convs"] == ["b", "c"] and found.evidence["writers"] == ["a", "b"]
    assert "('a', ['r1', 'b', 'r2'], 'c')" in found.fix
    after = _sqnr(model, _run_eager_fix(model, found.fix, batches), batches[1])
    assert after > before + 20, (before, after)


def test_a_grouped_conv_s_weights_on_a_channel_are_its_group_s() -> None:
    """Review item: the weights on input channel c of a grouped conv were read from the
    wrong rows. Conv1d, groups 4: channels 0 and 1 of group 0 feed its outputs 0 and 1."""

    class M(_Pruned):
        def __init__(self) -> None:
            super().__init__(gain=1.0)
            self.expand = torch.nn.Conv1d(3, 8, 3, padding=1)
            self.dw = torch.nn.Conv1d(8, 8, 3, padding=1, groups=4)
            self.head = torch.nn.Conv1d(8, 4, 1)
            with torch.no_grad():
                self.expand.weight[:2] = 0
                self.expand.bias[:2] = 0.004
                self.dw.weight.abs_()
                self.dw.weight[:2, 0] *= 400  # on input channel 0 only
                self.dw.bias[:2] = -0.004 * self.dw.weight[:2, 0].sum(dim=-1)

    model, batches = M().eval(), _batches((4, 3, 32))
    q = _quantize(model, batches)
    (found,) = _qcd074(_findings(model, q, batches)[1])
    largest = float(model.dw.weight.detach().abs()[:2, 0].max())
    assert f"reach {largest:.3g}," in found.message
    assert _sqnr(model, _run_eager_fix(model, found.fix, batches), batches[1]) > 30


def test_a_pooled_feature_of_one_sample_is_no_constant() -> None:
    """Review item 4: a batch-1 1x1 conv on pooled features, one value per channel, read as
    constant channels; and nothing there was amplified."""

    class M(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            from torch.ao.quantization import DeQuantStub, QuantStub

            torch.manual_seed(0)
            self.quant, self.dequant = QuantStub(), DeQuantStub()
            self.c1, self.r = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()
            self.pool, self.c2 = torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(16, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.c2(self.pool(self.r(self.c1(self.quant(x))))))

    from qconvdiag.model.constant import moved_constants

    x = torch.rand(1, 16, 1, 1).numpy() + 0.01
    assert not moved_constants(x, x * 0.5).size  # one value per channel: no evidence
    assert moved_constants(x.repeat(16, axis=0), x.repeat(16, axis=0) * 0.5).size == 16
    model, batches = M().eval(), _batches((1, 3, 16, 16))
    assert not _qcd074(_findings(model, _quantize(model, batches), batches)[1])


def test_an_op_between_that_is_no_module_gets_no_chain_and_no_fix() -> None:
    """Review item 3: a functional op between the convs, which a fix that keeps modules in
    float cannot keep; the capture records no writer there (a miss, not a wrong fix)."""
    model, batches = _Between(gain=400.0).eval(), _batches()
    bundle, findings = _findings(model, _quantize(model, batches), batches)
    assert bundle.layer("dw").writer is None
    assert not _qcd074(findings)


def test_a_bundle_s_writer_is_a_record_of_module_paths_or_refused() -> None:
    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.bundle import WriterChain

    good = {"conv": "blocks.0.expand", "path": ["blocks.0.act1"], "sole": True}
    assert WriterChain.from_mapping(good, "b.pt") == WriterChain(
        "blocks.0.expand", ("blocks.0.act1",), True)
    for bad in ([], {**good, "conv": "a b"}, {**good, "conv": ""}, {**good, "path": "act"},
                {**good, "path": [1]}, {**good, "sole": 1}, {**good, "conv": "x);import os"}):
        with pytest.raises(CaseFileError, match="'writer'"):
            WriterChain.from_mapping(bad, "b.pt")


def test_its_code_is_a_model_code_the_cli_takes() -> None:
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
    (found,) = _qcd074(_findings(model, q, batches)[1])
    assert "qconfig_mapping.set_module_name(name, None)" in found.fix
    scope = {"torch": torch, "model": copy.deepcopy(model),
             "qconfig_mapping": get_default_qconfig_mapping("x86"),
             "example_inputs": (batches[0],), "calibration_batches": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD074 fix", "exec"), scope)  # noqa: S102
    assert _sqnr(model, scope["quantized"], batches[1]) > before + 20
    assert not _qcd074(_findings(model, scope["quantized"], batches)[1])
