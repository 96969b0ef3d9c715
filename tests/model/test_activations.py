"""A quantized activation module checked against its float twin on its own input
(model/activations.py): a kernel that computes wrong values is named by QCD065 where the conv
after it loses its input, with a workaround that runs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.ao.quantization import (
    DeQuantStub,
    QuantStub,
    convert,
    fuse_modules,
    get_default_qconfig,
    prepare,
)

import qconvdiag
from qconvdiag.model.walk import WalkOptions, walk_model


@pytest.fixture(autouse=True)
def _engine():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


class Block(torch.nn.Module):
    """conv-BatchNorm, an unfused ReLU6 (eager mode fuses no ReLU6), conv: MobileNetV2's."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.BatchNorm2d(8)
        self.act = torch.nn.ReLU6()
        self.c2 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.dequant(self.c2(self.act(self.b1(self.c1(self.quant(x))))))


class Before(Block):
    """The ReLU6 on the model's input, before the convs."""

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.dequant(self.c2(self.b1(self.c1(self.act(self.quant(x))))))


def quantized_block(engine: str, cls: type[torch.nn.Module] = Block,
                    fuse: tuple[list[str], ...] = (["c1", "b1"],)
                    ) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    f = cls().eval()
    m = copy.deepcopy(f)
    fuse_modules(m, list(fuse), inplace=True)
    m.qconfig = get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(m)
        for _ in range(4):
            prepared(torch.randn(4, 3, 16, 16) * 2)
        return f, convert(prepared)


def walk(f: torch.nn.Module, q: torch.nn.Module):  # noqa: ANN201
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, x)
    return bundle, walk_model(bundle, WalkOptions(top=0)).report


def test_qnnpack_s_relu6_on_a_channels_last_input_is_named_and_worked_around():
    """torch 2.13's qnnpack ReLU6 writes wrong values on a channels_last input (what its
    convs write): the conv after it gets its input near 0 dB, every conv at its floor. QCD065
    names the ReLU6 and its kernel, not qparams (it said 'an op between them', and its fix
    printed qparams that were right); its fix, run, gives the ReLU6 a contiguous input and the
    loss is gone. On x86 the same block records nothing."""
    f, q = quantized_block("qnnpack")
    bundle, report = walk(f, q)
    (op,) = [o for o in bundle.ops if o.wrong is not None]
    assert op.name == "act" and op.wrong.channels_last and op.wrong.contiguous_ok
    assert op.wrong.outputs_off > 0.01 * op.wrong.total and not op.own_qparams
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    assert lost.severity == "error" and lost.evidence["layer"] == "c2"
    assert lost.title.endswith("by act, whose quantized kernel computes wrong values")
    assert "memory format" in lost.message and "x.contiguous()" in lost.fix
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()
    assert report.layer("c2").propagated.sqnr_db > 25

    f, q = quantized_block("x86")
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()


class ReLU6(torch.nn.Module):
    """A quantized ReLU6 whose kernel is wrong on every layout: its outputs halved."""

    def forward(self, x):  # noqa: ANN001, ANN201
        y = torch.nn.functional.relu6(x.dequantize()) * 0.5
        return torch.quantize_per_tensor(y, x.q_scale(), x.q_zero_point(), x.dtype)


def in_place_relu6() -> torch.nn.Module:
    """A wrong in-place quantized ReLU6 (its outputs halved, written over its input)."""

    class ReLU6(torch.nn.Module):  # the check pairs a module with its float twin's class name
        def forward(self, x):  # noqa: ANN001, ANN202
            return x.copy_(globals()["ReLU6"]()(x))

    return ReLU6()


def test_a_wrong_in_place_kernel_is_checked_on_a_copy_of_its_input():
    """An in-place module overwrites its input: the check compares its output with the float
    twin on the input as it was (copied before the kernel ran), or the halved values would be
    compared with themselves."""
    f, q = quantized_block("x86", Before)
    q.act = in_place_relu6()  # on the QuantStub's output: contiguous, copied by nothing else
    bundle, _report = walk(f, q)
    (op,) = [o for o in bundle.ops if o.wrong is not None]
    assert op.name == "act" and op.wrong.outputs_off > 0.01 * op.wrong.total
    assert op.after == ("",)  # before any conv


def test_a_kernel_wrong_on_every_layout_is_run_in_float_by_its_fix():
    """Where a contiguous input does not help, QCD065's fix runs the op in float (its float
    twin, between a dequantize and a quantize to its output qparams): run, the loss is gone.
    The bundle keeps what the check found."""
    f, q = quantized_block("x86")
    q.act = ReLU6()
    bundle, report = walk(f, q)
    (op,) = [o for o in bundle.ops if o.wrong is not None]
    assert not op.wrong.contiguous_ok and op.wrong.max_steps > 2
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    assert "run it in float" in lost.fix and "memory format" not in lost.message
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    again = bundle_from_mapping(bundle_to_mapping(bundle), "test")
    assert [o.wrong for o in again.ops] == [o.wrong for o in bundle.ops]
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q, "model": f})  # noqa: S102
    _b, report = walk(f, q)
    assert report.findings == () and report.layer("c2").propagated.sqnr_db > 25


class Shared(Block):
    """One in-place ReLU6 module after both convs (a model that reuses its activation)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = torch.nn.ReLU6(inplace=True)
        self.c3 = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):  # noqa: ANN001, ANN201
        y = self.act(self.b1(self.c1(self.quant(x))))
        return self.dequant(self.c3(self.act(self.c2(y))))


def test_a_shared_in_place_relu6_is_named_after_each_conv_it_follows():
    """The check copies an in-place module's input before the kernel overwrites it, and keeps
    every call's conv (``OpRange.after``), as the ops recorder does: the loss at c2 (the first
    call's) is blamed on the ReLU6, not on 'an op between c1 and c2'."""
    f, q = quantized_block("qnnpack", Shared)
    bundle, report = walk(f, q)
    (op,) = [o for o in bundle.ops if o.wrong is not None]
    assert op.name == "act" and op.after == ("c1", "c2")
    lost = [x for x in report.findings if x.code == "QCD065"]
    assert lost and lost[0].evidence["layer"] == "c2"
    assert lost[0].title.endswith("by act, whose quantized kernel computes wrong values")


def test_a_wrong_kernel_s_float_fix_keeps_the_qparams_it_computed_with():
    """The float workaround quantizes to the output qparams the module computed with (a
    Sigmoid's are fixed, 1/256 and 0), not its input's."""
    import dataclasses

    from qconvdiag.model.activations import WrongValues
    from qconvdiag.model.ops import OpRange

    op = OpRange("head.gate", "Sigmoid", 1 / 256, 0, "quint8", 0.0, 0.0, ("c2",), False, False,
                 wrong=WrongValues("Sigmoid", 90, 100, 30.0, False, False), own_qparams=False)
    fix = op.fix()
    assert "('head.gate',\n         0.00390625, 0, torch.quint8)," in fix
    # a scale of many digits, as an observer's are: every line within 80 columns, indented
    wide = dataclasses.replace(op, scale=0.03851956129074097, zero_point=140).fix()
    assert max(len(line) for line in wide.split("\n")) <= 78
    assert "copy.deepcopy(model.get_submodule(name))" in fix


class Functional(torch.nn.Module):
    """conv, F.relu6, conv, clamp(0, 6), conv: the activations called as functions in the
    forward, as many MobileNet implementations call them (no module to hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.c1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c3 = torch.nn.Conv2d(16, 8, 1)

    def forward(self, x):  # noqa: ANN001, ANN201
        y = torch.nn.functional.relu6(self.c1(self.quant(x)))
        return self.dequant(self.c3(torch.clamp(self.c2(y), 0, 6)))


class InPlace(Functional):
    """The same activations in place: F.relu6(inplace=True), and F.hardtanh_ whose return
    value the forward ignores (it reads the tensor it passed)."""

    def forward(self, x):  # noqa: ANN001, ANN201
        y = torch.nn.functional.relu6(self.c1(self.quant(x)), inplace=True)
        y = self.c2(y)
        torch.nn.functional.hardtanh_(y, 0.0, 6.0)
        return self.dequant(self.c3(y))


def quantized_functional(engine: str, flow: str, cls: type[torch.nn.Module] = Functional
                         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    f = cls().eval()
    x = torch.randn(4, 3, 16, 16) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if flow == "fx":
            from torch.ao.quantization import get_default_qconfig_mapping
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

            prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping(engine), (x,))
            prepared(x)
            return f, convert_fx(prepared)
        m = copy.deepcopy(f)
        m.qconfig = get_default_qconfig(engine)
        prepared = prepare(m)
        prepared(x)
        return f, convert(prepared)


@pytest.mark.parametrize("flow", ["eager", "fx"])
def test_qnnpack_s_functional_relu6_and_clamp_are_named_and_mended_in_one_pass(flow):  # noqa: ANN001
    """F.relu6 and torch.clamp on a quantized tensor run the same qnnpack kernel as the ReLU6
    module, with the same channels_last fault; an FX graph keeps them as call_function nodes.
    QCD065 named 'an op between c1 and c2 (its output scale)', with a fix that printed
    qparams: now it names the call, and its fix (a TorchFunctionMode over the quantized
    model's forward) mends both functions, the clamp's fault included, which c2's broken
    input hid (no loss of its own). Run, the model is clean; on x86 nothing is recorded."""
    f, q = quantized_functional("qnnpack", flow)
    bundle, report = walk(f, q)
    wrong = {o.name: o.wrong for o in bundle.ops if o.wrong is not None}
    assert set(wrong) == {"the relu6 call after c1", "the clamp call after c2"}
    assert {w.function for w in wrong.values()} == {"torch.nn.functional.relu6", "torch.clamp"}
    assert all(w.contiguous_ok and w.channels_last for w in wrong.values())
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    assert lost.title.endswith("by the relu6 call after c1, whose quantized kernel computes "
                               "wrong values")
    assert "the relu6 call after c1 loses it" in lost.message and "(relu6)" not in lost.message
    assert max(len(line) for line in lost.fix.split("\n")) <= 80
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()
    assert report.layer("c3").propagated.sqnr_db > 25

    f, q = quantized_functional("x86", flow)
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()


class FXReLU6(Block):
    """An FX model's ReLU6 module: convert_fx keeps the float module, which calls hardtanh."""


def test_a_call_inside_a_checked_module_is_the_module_s():
    """FX keeps a float ReLU6 module in the converted graph; its forward calls hardtanh on the
    quantized tensor. The module is checked and named; its inner call is not recorded again
    as 'the hardtanh call after c1'."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    torch.backends.quantized.engine = "qnnpack"
    f = FXReLU6().eval()
    x = torch.randn(4, 3, 16, 16) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(f), get_default_qconfig_mapping("qnnpack"), (x,))
        prepared(x)
        q = convert_fx(prepared)
    bundle, _report = walk(f, q)
    assert [o.name for o in bundle.ops if o.wrong is not None] == ["act"]


def halved_clamp(x, low, high):  # noqa: ANN001, ANN201
    """A function torch dispatches to modes (as its own functions), whose quantized result
    is wrong on every layout: its values halved."""
    from torch.overrides import handle_torch_function, has_torch_function_unary

    if has_torch_function_unary(x):
        return handle_torch_function(halved_clamp, (x,), x, low, high)
    if not x.is_quantized:
        return torch.clamp(x, low, high)
    y = torch.clamp(x.dequantize(), low, high) * 0.5
    return torch.quantize_per_tensor(y, x.q_scale(), x.q_zero_point(), x.dtype)


class HalvedClamp(Functional):
    def forward(self, x):  # noqa: ANN001, ANN201
        y = torch.halved_clamp(self.c1(self.quant(x)), 0.0, 6.0)
        return self.dequant(self.c3(self.c2(y)))


def test_a_function_wrong_on_every_layout_is_run_in_float_by_its_fix(monkeypatch):  # noqa: ANN001
    """Where a contiguous input does not help, the function's fix runs it in float on the
    dequantized input, quantized to the qparams its kernel chose: run, the loss is gone. The
    bundle keeps the function (read back, checked against FUNCTIONS)."""
    from qconvdiag.model import activations

    monkeypatch.setattr(torch, "halved_clamp", halved_clamp, raising=False)
    monkeypatch.setattr(activations, "FUNCTIONS", (*activations.FUNCTIONS, "torch.halved_clamp"))
    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    f = HalvedClamp().eval()
    m = copy.deepcopy(f)
    m.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(m)
        prepared(torch.randn(4, 3, 16, 16) * 2)
        q = convert(prepared)
    bundle, report = walk(f, q)
    (op,) = [o for o in bundle.ops if o.wrong is not None]
    assert op.name == "the halved_clamp call after c1" and not op.wrong.contiguous_ok
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    again = bundle_from_mapping(bundle_to_mapping(bundle), "test")
    assert [o.wrong for o in again.ops] == [o.wrong for o in bundle.ops]
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    assert "run it in float" in lost.fix and "torch.halved_clamp" in lost.fix
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    _b, report = walk(f, q)
    assert report.findings == () and report.layer("c2").propagated.sqnr_db > 25


class TwoReLU6(torch.nn.Module):
    """conv-BatchNorm, ReLU6, conv-BatchNorm, ReLU6, conv: two unfused ReLU6 modules, each
    after a conv (MobileNetV2 has one per block)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.c1, self.b1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.act1 = torch.nn.ReLU6()
        self.c2, self.b2 = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.act2 = torch.nn.ReLU6()
        self.c3 = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):  # noqa: ANN001, ANN201
        y = self.act1(self.b1(self.c1(self.quant(x))))
        return self.dequant(self.c3(self.act2(self.b2(self.c2(y)))))


def test_every_wrong_activation_module_is_mended_by_one_fix():
    """qnnpack's ReLU6 is wrong after both convs; the loss shows before c2 only (c2's output
    is broken already when act2 runs). The fix named act1 alone, and a sweep's MobileNet-like
    model took four walks, one module each; now one fix mends every module found wrong, and
    the model is clean after it."""
    f, q = quantized_block("qnnpack", TwoReLU6, (["c1", "b1"], ["c2", "b2"]))
    bundle, report = walk(f, q)
    assert {o.name for o in bundle.ops if o.wrong is not None} == {"act1", "act2"}
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    assert "'act1'" in lost.fix and "'act2'" in lost.fix
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()
    assert report.layer("c3").propagated.sqnr_db > 25


def test_in_place_activation_calls_are_mended_where_the_forward_reads_them():
    """An in-place call's fix must write its result back: the fix clamped a contiguous copy,
    and the model, reading the tensor it passed, kept its wrong values (a review measured -0.1
    dB becoming 1.6 dB). Run, the in-place model is clean."""
    f, q = quantized_functional("qnnpack", "eager", InPlace)
    bundle, report = walk(f, q)
    assert {o.wrong.function for o in bundle.ops if o.wrong is not None} == {
        "torch.nn.functional.relu6", "torch.nn.functional.hardtanh_"}
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()
    assert report.layer("c3").propagated.sqnr_db > 25


class Mixed(Block):
    """A ReLU6 module after c1 and F.relu6 after c2: a module and a function, both wrong on
    qnnpack's channels_last input."""

    def __init__(self) -> None:
        super().__init__()
        self.c3 = torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):  # noqa: ANN001, ANN201
        y = self.act(self.b1(self.c1(self.quant(x))))
        return self.dequant(self.c3(torch.nn.functional.relu6(self.c2(y))))


def test_a_module_and_a_function_found_wrong_are_mended_by_one_fix():
    """The fix mended the module's kind or the function's, and a model with both took two
    walks (found by review): it mends both now, and a long module path keeps every line of
    the float variant within 80 columns."""
    f, q = quantized_block("qnnpack", Mixed)
    bundle, report = walk(f, q)
    assert {o.name for o in bundle.ops if o.wrong is not None} == {
        "act", "the relu6 call after c2"}
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    assert "class Fixed" in lost.fix and "class Mended" in lost.fix
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    bundle, report = walk(f, q)
    assert not [o for o in bundle.ops if o.wrong is not None] and report.findings == ()

    import dataclasses

    from qconvdiag.model.activations import WrongValues
    from qconvdiag.model.ops import OpRange

    op = OpRange("encoder.stages.3.blocks.11.mlp.act", "Sigmoid", 0.0235294122248888, 0,
                 "quint8", 0.0, 0.0, ("c2",), False, False,
                 wrong=WrongValues("Sigmoid", 90, 100, 30.0, False, False), own_qparams=False)
    assert max(len(line) for line in dataclasses.replace(op).fix().split("\n")) <= 80


def test_a_loss_the_model_carries_to_its_last_conv_below_10_db_is_an_error():
    """helper-50: an EfficientNet-like model calibrated on 16x its inputs lost a few dB at each
    SiLU's quantize, none 10 dB below the convs before it, and ended at -0.8 dB (51% against
    99.7%) with QCD065 a warning (its first conv's input, 29 dB) and --fail-on error exiting
    0. Where the model carries the loss to its last conv below LOST_DB and no conv is broken
    by its own error, QCD065 is an error, and says so."""
    from qconvdiag.model.lost import LOST_DB, qcd065
    from qconvdiag.model_report import ErrorSummary, UpstreamLoss

    loss = UpstreamLoss("stem", ErrorSummary(29.2, 0.01, 0.1), 25.0, None, None,
                        "stem's input is 29.2 dB from the float model's.")
    (alone,) = qcd065((loss,), False)
    assert alone.severity == "warning"
    (carried,) = qcd065((loss,), False, carried=("head", -0.8))
    assert carried.severity == "error" and "its last conv (head), -0.8 dB" in carried.message
    (kept,) = qcd065((loss,), False, carried=("head", LOST_DB + 5))
    assert kept.severity == "warning"


def test_what_the_model_carries_to_its_end_is_the_losses_only_where_no_conv_is_broken():
    from types import SimpleNamespace

    from qconvdiag.model.walk import carried_to_end

    def screen(verdict, propagated):  # noqa: ANN001, ANN202
        return SimpleNamespace(verdict=verdict, propagated=SimpleNamespace(sqnr_db=propagated))

    screens = {"a": screen("at_floor", 20.0), "b": screen("above_floor", -0.8)}
    assert carried_to_end(["a", "b"], screens) == ("b", -0.8)
    screens["a"] = screen("broken", 3.0)  # a conv's own error explains it: not the losses'
    assert carried_to_end(["a", "b"], screens) is None
