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


def quantized_block(engine: str) -> tuple[Block, torch.nn.Module]:
    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    f = Block().eval()
    m = copy.deepcopy(f)
    fuse_modules(m, [["c1", "b1"]], inplace=True)
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
    assert op.wrong.wrong > 0.01 * op.wrong.total and not op.own_qparams
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
