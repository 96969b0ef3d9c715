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
    # the writer as the capture saw it, and the conv that reads what dw's output becomes,
    # read back from the file; only this conv has one
    assert bundle.layer("dw").writer == WriterChain("expand", ("act1",), True, ("head",))
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
    """The constants are there, and moved, but nothing amplifies them: no record (and no
    extra forward at capture: a review measured it at 27% of a pruned model's capture)."""
    from qconvdiag.model.constant import moved_constants

    model, batches = _Pruned(gain=1.0).eval(), _batches()
    bundle, findings = _findings(model, _quantize(model, batches), batches)
    lay = bundle.layer("dw")
    assert list(moved_constants(lay.float_input, lay.case.input)) == [0, 1]
    assert lay.writer is None and not _qcd074(findings)


def test_a_residual_reading_the_writer_s_output_gets_words_not_a_fix_that_crashes() -> None:
    """Review item 2: the eager fix made the writer's output float, which the residual add
    (a QFunctional) then refused. The capture counts the other reads; the fix says what to
    do with them."""
    model, batches = _Residual().eval(), _batches()
    bundle, findings = _findings(model, _quantize(model, batches), batches)
    assert bundle.layer("dw").writer.sole is False
    assert bundle.layer("dw").writer.readers == ("head",)  # through the add
    (found,) = _qcd074(findings)
    # words, as comment lines whole at 80 columns
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    words = " ".join(line.removeprefix("# ") for line in found.fix.splitlines())
    assert all(line.startswith("# ") for line in found.fix.splitlines())
    assert "Other ops read expand's output too" in words
    assert "DeQuantStub before expand" in words and "QuantStub after each of dw" in words


def test_overlapping_chains_are_kept_in_float_as_one() -> None:
    """Review item 1: b reads a's constant channels and writes c's. Here b's loss does not
    show where its output is read (its ReLU6 zeroes the interior it moves), so c alone is
    named; regions that share a conv join (a -> b -> c below), so no conv is wrapped twice
    (the first fix left the model as broken as before)."""
    from qconvdiag.model.constant import _regions

    model, batches = _Overlapping().eval(), _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    bundle, findings = _findings(model, q, batches)
    assert bundle.layer("b").writer.readers == ("c",)
    (found,) = _qcd074(findings)
    assert found.evidence["convs"] == ["c"] and found.evidence["writers"] == ["b"]
    assert "(['b'], ['r2'], ['c'])" in found.fix
    after = _sqnr(model, _run_eager_fix(model, found.fix, batches), batches[1])
    assert after > before + 20, (before, after)

    class Hit:  # the fields _regions reads
        def __init__(self, writer: str, path: tuple[str, ...], reader: str) -> None:
            from qconvdiag.model.bundle import WriterChain

            self.writer = WriterChain(writer, path, True)
            self.lay = type("L", (), {"name": reader})()

    joined = _regions([Hit("a", ("r1",), "b"), Hit("b", ("r2",), "c")])  # type: ignore[list-item]
    assert joined == [(["a"], ["r1", "b", "r2"], ["c"])]
    shared = _regions([Hit("e", ("act",), "dw"), Hit("e", ("act",), "dw2")])  # type: ignore[list-item]
    assert shared == [(["e"], ["act"], ["dw", "dw2"])]


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


class _Variant(torch.nn.Module):
    """stem -> act -> expand (channels 0, 1 pruned) -> act_b -> se -> dw (400x on them) ->
    after -> head; ``dw2``: a second depthwise conv reading act_b's output too, added to dw's.
    ``reuse``: act_b is act (one ReLU6 module after stem and expand)."""

    def __init__(self, after: torch.nn.Module | None = None,
                 se: torch.nn.Module | None = None, reuse: bool = False,
                 dw2: bool = False) -> None:
        super().__init__()
        from torch.ao.nn.quantized import FloatFunctional
        from torch.ao.quantization import DeQuantStub, QuantStub

        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.stem, self.act = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6()
        self.expand = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.act_b = self.act if reuse else torch.nn.ReLU6()
        self.se = se or torch.nn.Identity()
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.after = after or torch.nn.Identity()
        self.head = torch.nn.Conv2d(8, 4, 1)
        _prune(self.expand, self.dw, slice(0, 2), 400.0)
        self.dw2 = None
        if dw2:
            self.dw2, self.add = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), FloatFunctional()
            _prune(torch.nn.Conv2d(8, 8, 3), self.dw2, slice(0, 2), 400.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.se(self.act_b(self.expand(self.act(self.stem(self.quant(x))))))
        y = self.after(self.dw(a))
        if self.dw2 is not None:
            y = self.add.add(y, self.dw2(a))
        return self.dequant(self.head(y))


def test_a_loss_an_activation_after_the_conv_clips_away_is_quiet() -> None:
    """Review item 1 (helper-71): a ReLU6 after dw zeroes, in the float model too, the
    border response the rounding removes: 36 dB end to end, yet QCD074 said error on dw's
    output before the ReLU6. The loss must show where dw's output is read (head's input)."""
    model, batches = _Variant(after=torch.nn.ReLU6()).eval(), _batches()
    q = _quantize(model, batches)
    assert _sqnr(model, q, batches[1]) > 30
    bundle, findings = _findings(model, q, batches)
    assert bundle.layer("dw").writer.readers == ("head",)
    assert not _qcd074(findings)


def test_an_identity_between_is_on_the_chain_an_fx_fix_keeps_in_float() -> None:
    """Review item 2: an Identity (a timm block's se, aa) returns its input object; the chain
    left it out, and FX quantized again there, so the fix recovered nothing."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    for se in (torch.nn.Identity(), torch.nn.Dropout(0.1)):
        model, batches = _Variant(se=se).eval(), _batches()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                                  (batches[0],))
            with torch.no_grad():
                for b in batches:
                    prepared(b)
            q = convert_fx(prepared)
        before = _sqnr(model, q, batches[1])
        bundle, findings = _findings(model, q, batches)
        assert bundle.layer("dw").writer.path == ("act_b", "se")
        (found,) = _qcd074(findings)
        scope = {"torch": torch, "model": copy.deepcopy(model),
                 "qconfig_mapping": get_default_qconfig_mapping("x86"),
                 "example_inputs": (batches[0],), "calibration_batches": batches}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            exec(compile(found.fix, "QCD074 fix", "exec"), scope)  # noqa: S102
        assert _sqnr(model, scope["quantized"], batches[1]) > before + 20


def test_two_amplifying_readers_of_one_writer_are_kept_in_float_together() -> None:
    """Review item 3: dw and dw2 both read expand's constant channels; each counted the other
    as another reader, and the words it printed left dw2 quantized (-6.3 to 0.7 dB)."""
    model, batches = _Variant(dw2=True).eval(), _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    bundle, findings = _findings(model, q, batches)
    assert bundle.layer("dw").writer.sole and bundle.layer("dw2").writer.sole
    (found,) = _qcd074(findings)
    assert found.evidence["convs"] == ["dw", "dw2"]
    assert "(['expand'], ['act_b', 'se'], ['dw', 'dw2'])" in found.fix
    after = _sqnr(model, _run_eager_fix(model, found.fix, batches), batches[1])
    assert after > before + 20, (before, after)


def test_an_activation_module_called_after_another_conv_too_is_no_other_reader() -> None:
    """Review item 4: one ReLU6 after stem and after expand; its output after stem (read by
    expand) counted as another read of expand's chain, and the fix became words about a
    residual that does not exist."""
    model, batches = _Variant(reuse=True).eval(), _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    bundle, findings = _findings(model, q, batches)
    assert bundle.layer("dw").writer.sole
    (found,) = [f for f in findings if f.code == "QCD074"]
    assert "Other ops read" not in found.fix
    after = _sqnr(model, _run_eager_fix(model, found.fix, batches), batches[1])
    assert after > before + 20, (before, after)


def test_a_bundle_whose_writer_is_not_another_conv_of_it_is_refused(tmp_path) -> None:  # noqa: ANN001
    """Review item 5: a crafted writer naming the reader itself, or no conv of the bundle,
    loaded, and its message said 'dw writes one value there'."""
    import dataclasses

    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.bundle import save_bundle

    model, batches = _Pruned(gain=400.0).eval(), _batches()
    bundle, _f = _findings(model, _quantize(model, batches), batches)
    for conv, readers in (("dw", ("head",)), ("nowhere", ("head",)), ("expand", ("gone",))):
        lay = bundle.layer("dw")
        bad = dataclasses.replace(lay, writer=dataclasses.replace(lay.writer, conv=conv,
                                                                 readers=readers))
        crafted = dataclasses.replace(bundle, layers=tuple(
            bad if x.name == "dw" else x for x in bundle.layers))
        path = tmp_path / f"{conv}.pt"
        save_bundle(crafted, path)
        with pytest.raises(CaseFileError, match="'writer' must name another conv"):
            qconvdiag.load_bundle(path)


@pytest.mark.parametrize("kept, named", [(0.05, True), (0.03, False)])
def test_a_loss_an_activation_clips_in_part_shows_10_db_below_the_input_received(
        kept: float, named: bool) -> None:
    """helper-72: a pruned MobileNetV2's blocks.0 dropped out when QCD074 asked for the reader's
    input below 10 dB: its ReLU6 clips part of the loss, and project received 11.8 dB where
    dw had received 27 dB. The loss shows at a reader's input below 10 dB, or 10 dB or more
    below what the amplifying conv received. Here ``kept`` of the interior response passes the
    ReLU6 in the float model: head receives 16.1 dB (dw 29.6 dB), and 20.4 dB, a near miss."""
    model = _Variant(after=torch.nn.ReLU6()).eval()
    with torch.no_grad():
        model.dw.bias[:2] += kept * 0.004 * model.dw.weight[:2].sum(dim=(1, 2, 3))
    batches = _batches()
    q = _quantize(model, batches)
    before = _sqnr(model, q, batches[1])
    _b, findings = _findings(model, q, batches)
    found = _qcd074(findings)
    assert bool(found) == named
    if named:
        assert 10 < found[0].evidence["reader_input_sqnr_db"] < 20
        after = _sqnr(model, _run_eager_fix(model, found[0].fix, batches), batches[1])
        assert after > before + 10, (before, after)
