"""QCD064: one activation module called after several convs. Fused into one conv by torch.ao's
eager flow, it is gone after the others (a warning, an error where the input it costs a conv
is below 10 dB; its repair runs here); not fused, it is
the trap a non-strict torch.export meets in prepare_pt2e (info, its claim checked here)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.ao.quantization as tq

import qconvdiag
from qconvdiag.errors import CaseFileError
from qconvdiag.io import BUNDLE_KEY
from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping, save_bundle
from qconvdiag.model.reuse import CODE, ReusedActivation
from qconvdiag.model.walk import WalkOptions, walk_model


class Shared(torch.nn.Module):
    """conv1 -> relu -> conv2 -> relu -> conv3, one ReLU module for both (or two)."""

    def __init__(self, shared: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 4, 1)
        self.relu = torch.nn.ReLU()
        self.shared = shared
        if not shared:
            self.relu2 = torch.nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(self.quant(x)))
        second = self.relu if self.shared else self.relu2
        return self.dequant(self.conv3(second(self.conv2(x))))


@pytest.fixture(autouse=True)
def _engine():  # noqa: ANN202
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    yield
    torch.backends.quantized.engine = before


def _quantized(model: torch.nn.Module, fuse: list[list[str]], x: torch.Tensor
               ) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = tq.fuse_modules(copy.deepcopy(model), fuse) if fuse else copy.deepcopy(model)
        m.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(m)
        prepared(x)
        return tq.convert(prepared)


def _walk(model: torch.nn.Module, quantized: torch.nn.Module, x: torch.Tensor):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, quantized, [x], calibration=[x])
        return bundle, walk_model(bundle, WalkOptions(top=0)).report


def test_a_shared_relu_fused_into_one_conv_is_gone_after_the_other():
    model, x = Shared().eval(), torch.randn(4, 3, 12, 12)
    quantized = _quantized(model, [["conv1", "relu"]], x)
    bundle, report = _walk(model, quantized, x)
    assert bundle.reused == (ReusedActivation("relu", "ReLU", ("conv1", "conv2"), 0, ("conv2",),
                                              bns=("", "")),)
    (f,) = report.findings
    # an error: the input it costs conv3 is below 10 dB, as QCD065 would grade that loss
    assert (f.code, f.severity) == (CODE, "error") and "without it at conv2:" in f.message
    assert "conv3's input is" in f.message and f.evidence["input_sqnr_db"] < 10
    # the cost is real: conv3 receives conv2's negative outputs, where the float model's are 0
    conv3 = report.layer("conv3")
    assert conv3 is not None and conv3.input.sqnr_db is not None and conv3.input.sqnr_db < 10
    (loss,) = report.upstream  # blamed on the missing ReLU, not on an op between the convs
    assert loss.layer == "conv3" and "the ReLU the float model applies after conv2 is gone" \
        in loss.message
    # the repair the fix prints, run: the ReLU is back after conv2, and the finding is info;
    # the fix says the scales after it were calibrated without it (a stopgap: QCD052 may
    # follow), and the lasting fix quantizes again
    assert "calibrated without it: quantizing again" in f.fix and "# for good" in f.fix
    exec(compile(f.fix, "QCD064 fix", "exec"), {"torch": torch, "quantized": quantized})
    bundle, report = _walk(model, quantized, x)
    assert bundle.reused[0].lost == () and [g.severity for g in report.findings] == ["info"]
    assert "after 2 convs (conv1, conv2)" in report.findings[0].message
    assert report.layer("conv3").input.sqnr_db > 25  # type: ignore[union-attr]


class Block(torch.nn.Module):
    """torchvision's BasicBlock: one ReLU after conv1's BatchNorm and after the residual add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv3 = torch.nn.Conv2d(4, 4, 1)
        self.relu = torch.nn.ReLU()
        self.add = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.dequant(self.conv3(self.relu(self.add.add(out, x))))


def test_a_relu_after_the_residual_add_fused_away_is_named():
    model, x = Block().eval(), torch.randn(4, 4, 10, 10)
    quantized = _quantized(model, [["conv1", "bn1", "relu"], ["conv2", "bn2"]], x)
    bundle, report = _walk(model, quantized, x)
    (r,) = bundle.reused
    assert (r.convs, r.other_calls, r.lost, r.lost_other, r.other_after) == (
        ("conv1",), 1, (), 1, ("conv2",))
    (loss,) = report.upstream  # the ReLU after the add, gone: blamed, not an op between convs
    assert loss.layer == "conv3" and "applies after conv2 is gone" in loss.message
    (f,) = report.findings
    assert "fuse_modules(model, [['conv1', 'bn1', 'relu1']])" in f.fix  # its BatchNorm kept
    assert f.severity == "error" and "without it at 1 call(s) after other ops" in f.message
    assert "2 times per forward: after conv1 and after another op" in f.message
    conv3 = report.layer("conv3")
    assert conv3 is not None and conv3.input.sqnr_db is not None and conv3.input.sqnr_db < 10
    exec(compile(f.fix, "QCD064 fix", "exec"), {"torch": torch, "quantized": quantized})
    assert _walk(model, quantized, x)[1].layer("conv3").input.sqnr_db > 25  # type: ignore


def test_a_shared_relu_not_fused_is_the_pt2e_trap():
    model, x = Shared().eval(), torch.randn(4, 3, 12, 12)
    bundle, report = _walk(model, _quantized(model, [], x), x)
    (f,) = report.findings
    assert (f.code, f.severity) == (CODE, "info") and "strict=True" in f.fix
    assert bundle.reused[0].lost == ()
    assert walk_model(bundle, WalkOptions(top=0, ignore=(CODE,))).report.findings == ()
    own = Shared(shared=False).eval()
    fused = _quantized(own, [["conv1", "relu"], ["conv2", "relu2"]], x)
    assert _walk(own, fused, x)[1].findings == ()


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_pt2e_claim_and_the_fix():
    """A non-strict export of the shared-ReLU model fails in prepare_pt2e; the fix's strict
    export goes through it."""
    from qconvdiag.torchao_import import require_torchao

    require_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    class Plain(torch.nn.Module):  # no QuantStub: PT2E quantizes the graph
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.conv2 = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)
            self.relu = torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.relu(self.conv2(self.relu(self.conv1(x))))

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    model, x = Plain().eval(), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="Input partition has more than one output node"):
        prepare_pt2e(torch.export.export(model, (x,), strict=False).module(), quantizer)
    f = qcd064_info()
    scope = {"torch": torch, "model": model, "x": x}
    exec(compile(f.fix, "QCD064 fix", "exec"), scope)
    prepare_pt2e(scope["exported"], quantizer)


def qcd064_info():  # noqa: ANN201
    from qconvdiag.model.reuse import qcd064

    (f,) = qcd064((ReusedActivation("relu", "ReLU", ("conv1", "conv2")),), pt2e=False)
    assert qcd064((ReusedActivation("relu", "ReLU", ("conv1", "conv2")),), pt2e=True) == []
    return f


def test_the_bundle_keeps_the_reused_modules(tmp_path):  # noqa: ANN001
    model, x = Shared().eval(), torch.randn(2, 3, 8, 8)
    bundle, _report = _walk(model, _quantized(model, [["conv1", "relu"]], x), x)
    for suffix in (".pt", ".safetensors", ".npz"):
        path = save_bundle(bundle, tmp_path / f"b{suffix}")
        assert qconvdiag.load_bundle(path).reused == bundle.reused
    mapping = bundle_to_mapping(bundle)
    mapping[BUNDLE_KEY]["reused"] = [{"name": "relu", "kind": "ReLU", "convs": "conv1"}]
    with pytest.raises(CaseFileError, match="'reused' entry"):
        bundle_from_mapping(mapping, "b.pt")



def test_an_fx_model_with_a_shared_relu_gets_the_info_only():
    """FX fuses each call of the module with its own conv: no call loses the ReLU, so the
    warning stays silent (its near miss) and the PT2E trap is the info."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    class Plain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
            self.conv3 = torch.nn.Conv2d(8, 4, 1)
            self.relu = torch.nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv3(self.relu(self.conv2(self.relu(self.conv1(x)))))

    model, x = Plain().eval(), torch.randn(4, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        quantized = convert_fx(prepared)
    bundle, report = _walk(model, quantized, x)
    assert bundle.reused and bundle.reused[0].lost == ()
    assert [(f.code, f.severity) for f in report.findings] == [(CODE, "info")]
    assert report.upstream == ()


class TwoShared(torch.nn.Module):
    """relu_a after conv1 and conv2 (fused into conv1: lost after conv2), relu_b after conv4
    and conv5 (fused into conv4: lost after conv5)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(8, 8, 1)
        self.conv4 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv5 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv6 = torch.nn.Conv2d(8, 4, 1)
        self.relu_a, self.relu_b, self.relu3 = (torch.nn.ReLU() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu_a(self.conv2(self.relu_a(self.conv1(self.quant(x)))))
        x = self.relu_b(self.conv4(self.relu3(self.conv3(x))))
        return self.dequant(self.conv6(self.relu_b(self.conv5(x))))


def test_each_lost_activation_carries_its_own_cost():
    """Two reused ReLUs, each lost after one conv: the loss at conv3 (under 2 dB) is relu_a's,
    an error; relu_b's costs no conv its signal, a warning (both were errors: one cost shared)."""
    model, x = TwoShared().eval(), torch.randn(4, 3, 12, 12)
    quantized = _quantized(model, [["conv1", "relu_a"], ["conv3", "relu3"],
                                   ["conv4", "relu_b"]], x)
    _bundle, report = _walk(model, quantized, x)
    found = {f.evidence["module"]: f for f in report.findings if f.code == CODE}
    assert found["relu_a"].severity == "error" and found["relu_a"].evidence["conv"] == "conv3"
    assert found["relu_b"].severity == "warning" and "conv" not in found["relu_b"].evidence


class AddAfterShared(Shared):
    """Shared's ReLU lost after conv2, where conv2's outputs are mostly positive (its bias +3:
    the lost ReLU costs little), then an add before conv3."""

    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.conv2.bias += 3.0
        self.ff = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.conv1(self.quant(x)))
        return self.dequant(self.conv3(self.ff.add(y, self.relu(self.conv2(y)))))


def test_an_op_that_loses_the_signal_is_named_over_a_lost_activation():
    """The add's scale 30x too coarse loses conv3's input; the ReLU lost after conv2 costs
    little: the add is named (QCD065), the ReLU stays a warning with no cost (before, the loss
    was blamed on the ReLU, whose fix would not bring it back)."""
    model, x = AddAfterShared().eval(), torch.randn(8, 3, 12, 12)
    quantized = _quantized(model, [["conv1", "relu"]], x)
    _bundle, report = _walk(model, quantized, x)
    assert [f.code for f in report.findings] == [CODE] and report.upstream == ()  # near miss
    quantized.ff.scale = quantized.ff.scale * 30
    _bundle, report = _walk(model, quantized, x)
    (loss,) = report.upstream
    assert loss.op == "ff" and loss.blamed_on is None
    codes = {f.code: f for f in report.findings}
    assert codes["QCD065"].title.endswith("by ff's output qparams")
    assert codes[CODE].severity == "warning" and "input_sqnr_db" not in codes[CODE].evidence


def test_the_lasting_fix_names_modules_by_their_path_in_the_model():
    """A shared ReLU inside a submodule: the fuse list the fix prints takes paths from the
    model, the new modules' too ('blk.relu1'; it printed 'relu1', and fuse_modules raised
    AttributeError: 'Net' object has no attribute 'relu1', pytorch#118829's Bottleneck)."""
    import ast
    import re

    class Parent(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blk = Block()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.blk(x)

    model, x = Parent().eval(), torch.randn(4, 4, 10, 10)
    quantized = _quantized(model, [["blk.conv1", "blk.bn1", "blk.relu"],
                                   ["blk.conv2", "blk.bn2"]], x)
    (f,) = _walk(model, quantized, x)[1].findings
    groups = ast.literal_eval(re.search(r"fuse_modules\(model, (\[\[.*\]\])\)", f.fix)[1])
    assert groups == [["blk.conv1", "blk.bn1", "blk.relu1"]]
    lasting = copy.deepcopy(model)  # the fix's new modules, then its fuse list
    lasting.blk.relu1, lasting.blk.relu2 = torch.nn.ReLU().eval(), torch.nn.ReLU().eval()
    tq.fuse_modules(lasting, groups, inplace=True)
    assert type(lasting.blk.conv1).__name__ == "ConvReLU2d"


class Bottleneck(torch.nn.Module):
    """NVIDIA's ResNet-50 Bottleneck (pytorch#118829): one ReLU after conv1's and conv2's
    BatchNorm and after the residual add, none after conv3's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1 = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv3, self.bn3 = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU()
        self.add = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.dequant(self.relu(self.add.add(self.bn3(self.conv3(out)), x)))


def test_a_relu_fused_into_a_conv_it_never_follows_is_named():
    """['conv3', 'bn3', 'relu'] fuses the shared ReLU into conv3, whose output the float model
    passes to the add without one: QCD064 says so, as an error, and its lasting fix fuses conv3
    with its BatchNorm alone (the report named only the ReLU lost at conv1 and conv2)."""
    model, x = Bottleneck().eval(), torch.randn(4, 4, 10, 10)
    quantized = _quantized(model, [["conv1", "bn1"], ["conv2", "bn2"],
                                   ["conv3", "bn3", "relu"]], x)
    bundle, report = _walk(model, quantized, x)
    (r,) = bundle.reused
    assert r.misfused == ("conv3",) and r.lost == ("conv1", "conv2")
    (f,) = report.findings
    assert f.severity == "error" and "fused into conv3, whose output the float" in f.message
    assert "conv3 without a ReLU" in f.fix and "conv3 still clips" in f.fix
    # conv3's float output is the float model's (negatives kept: its propagated error shows
    # what the fused ReLU clips); its output qparams are judged on the range after the ReLU
    conv3 = bundle.layer("conv3")
    assert conv3.float_output.min() < 0 and conv3.case.output_range[0] == 0.0
    assert conv3.case.activation == "relu"
    right = _quantized(model, [["conv1", "bn1", "relu"], ["conv2", "bn2"], ["conv3", "bn3"]], x)
    fused_right = _walk(model, right, x)[0]
    assert fused_right.reused[0].misfused == ()
    assert fused_right.layer("conv1").float_output.min() >= 0  # its ReLU, as the float model's


class AddThenRelu(torch.nn.Module):
    """A residual block whose only ReLU comes after the add: relu1 after conv1's BatchNorm,
    `relu` once, after the add."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv1, self.bn1 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv2, self.bn2 = torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.relu1, self.relu = torch.nn.ReLU(), torch.nn.ReLU()
        self.add = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.dequant(self.relu(self.add.add(out, x)))


def test_a_relu_used_once_after_the_add_fused_into_the_conv_before_it_is_named():
    """['conv2', 'bn2', 'relu'] fuses the ReLU the float model applies after the add into
    conv2: conv2 clips what the float model keeps until the add, and the add's output goes
    without its ReLU. QCD064 names it though the module has one call (it looked only at
    modules called more than once); conv2's propagated error shows the clipping."""
    model, x = AddThenRelu().eval(), torch.randn(4, 4, 10, 10)
    quantized = _quantized(model, [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu"]], x)
    bundle, report = _walk(model, quantized, x)
    (r,) = bundle.reused
    assert (r.name, r.convs, r.misfused, r.lost_other) == ("relu", (), ("conv2",), 1)
    (f,) = [x for x in report.findings if x.code == "QCD064"]
    assert f.severity == "error" and f.title.endswith("fused into a conv it does not follow")
    assert "once per forward, after another op" in f.message and "fused into conv2" in f.message
    assert "conv2 without a ReLU" in f.fix and "keep 'relu' out of fuse_modules" in f.fix
    healthy = _quantized(model, [["conv1", "bn1", "relu1"], ["conv2", "bn2"]], x)
    assert _walk(model, healthy, x)[0].reused == ()
    conv2 = report.layer("conv2")
    fine = _walk(model, healthy, x)[1].layer("conv2")
    assert conv2 is not None and fine is not None
    assert conv2.propagated.sqnr_db < fine.propagated.sqnr_db - 10  # the clipping shows


class ConvBnRelu(torch.nn.Module):
    """conv, BatchNorm (trained-like: some channels' scale negative, shifted), ReLU, conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
        self.conv, self.bn = torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.relu = torch.nn.ReLU()
        self.head = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.bn.weight.copy_(torch.tensor([1.5, -1.0, 0.8, -2.0, 1.0, -0.5, 2.0, -1.2]))
            self.bn.bias.copy_(torch.linspace(-0.5, 0.5, 8))
            self.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, 8))
            self.bn.running_var.copy_(torch.linspace(0.5, 2.0, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        return self.dequant(self.head(self.relu(self.bn(self.conv(x)))))


def test_a_relu_fused_across_the_batchnorm_left_out_is_named():
    """fuse_modules([['conv', 'relu']]) on conv-BatchNorm-ReLU (the BatchNorm left out of the
    group, a sweep's segmentation head: 96% to 57% accuracy): torch fuses the ReLU into the
    conv, so the conv clips before the BatchNorm, which stays quantized. Every conv was at its
    floor and QCD065 blamed the BatchNorm's output qparams, whose fix changed nothing. Now
    QCD064 names the fusion (an error), with the one group that fuses all three; the conv's
    propagated error shows what it clipped. Fused right, the model is quiet."""
    model, x = ConvBnRelu().eval(), torch.randn(4, 4, 10, 10)
    bundle, report = _walk(model, _quantized(model, [["conv", "relu"]], x), x)
    (r,) = bundle.reused
    assert r.misfused == ("conv",) and r.across == ("bn",) and r.lost == ()
    (f,) = report.findings
    assert f.code == "QCD064" and f.severity == "error"
    assert f.title == "ReLU module 'relu' fused into conv across BatchNorm bn"
    assert "model = fuse_modules(model.eval(), [['conv', 'bn', 'relu']])" in f.fix
    # the fix runs: the float model (its qconfig set), the three fused, quantized again
    scope = {"torch": torch, "model": copy.deepcopy(model), "calibration_batches": [x]}
    scope["model"].qconfig = tq.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(f.fix, "QCD064 fix", "exec"), scope)  # noqa: S102
    fixed_bundle, fixed = _walk(model, scope["quantized"], x)
    assert fixed_bundle.reused == () and fixed.findings == ()
    head = fixed.layer("head")
    assert head is not None and head.input.sqnr_db > 25
    conv = bundle.layer("conv")
    assert conv.float_output.min() < 0  # the float model's, before its BatchNorm
    assert report.layer("conv").propagated.sqnr_db < 10
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    assert bundle_from_mapping(bundle_to_mapping(bundle), "b").reused == bundle.reused
    right_bundle, right = _walk(model, _quantized(model, [["conv", "bn", "relu"]], x), x)
    assert right_bundle.reused == () and right.findings == ()


def test_a_relu_fused_across_a_batchnorm_that_keeps_its_sign_is_a_warning():
    """The same fusion where it costs nothing the model pays for: a BatchNorm with positive
    scales and BN(0) = 0 maps the conv's negative values to negative ones, which the float
    model's ReLU clips after it, as the quantized conv clips them before it (a sweep's
    Inception branch: accuracy 97.4% either way). QCD064 still names the fusion, as a
    warning: no conv after it receives a worse input, and the table's head is at its floor.
    Where the next conv's input is lost to it (the test above), it is an error, and the loss
    is blamed on the fusion, not on the BatchNorm's qparams."""
    model, x = ConvBnRelu().eval(), torch.randn(4, 4, 10, 10)
    with torch.no_grad():
        model.bn.weight.abs_()
        model.bn.bias.zero_()
        model.bn.running_mean.zero_()
    bundle, report = _walk(model, _quantized(model, [["conv", "relu"]], x), x)
    (f,) = report.findings
    assert f.code == "QCD064" and f.severity == "warning"
    assert "on these inputs it costs little" in f.message
    assert report.upstream == ()
    head = report.layer("head")
    assert head is not None and head.input.sqnr_db > 25
    model, x = ConvBnRelu().eval(), torch.randn(4, 4, 10, 10)
    _bundle, harmful = _walk(model, _quantized(model, [["conv", "relu"]], x), x)
    (loss,) = harmful.upstream
    assert loss.blamed_on == CODE and loss.lost_after == ("conv",) and loss.op is None
    assert "clips before its BatchNorm bn" in loss.message
    assert "(worst: conv (its input), " in loss.message


class ConvInplaceReluBn(ConvBnRelu):
    """conv, ReLU(inplace=True), BatchNorm, conv: the ReLU hands the BatchNorm the conv's own
    tensor, and ['conv', 'relu'] is the right fusion for this order."""

    def __init__(self) -> None:
        super().__init__()
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        return self.dequant(self.head(self.bn(self.relu(self.conv(x)))))


def test_an_in_place_relu_before_its_batchnorm_fused_with_the_conv_is_right():
    """The near miss of the fusion across a BatchNorm: the BatchNorm reads the conv's own
    tensor (an in-place ReLU ran on it), so it looked as if the ReLU followed the BatchNorm,
    and QCD064 raised an error whose fix would have changed the model (a review found it).
    The activation's call records that it read the conv's output: nothing is named."""
    model, x = ConvInplaceReluBn().eval(), torch.randn(4, 4, 10, 10)
    bundle, report = _walk(model, _quantized(model, [["conv", "relu"]], x), x)
    assert bundle.reused == () and not [f for f in report.findings if f.code == "QCD064"]
