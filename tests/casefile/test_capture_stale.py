"""capture() refuses a quantized conv whose kernel runs other codes than its state gives: on
qnnpack, ``qm.weight().data = w`` changes what ``qm.weight()`` (and so the case) holds, while the
kernel keeps the weight it packed; a case of that state would be a module that does not run."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402
from qconvdiag.errors import CaseError, CaseFileError  # noqa: E402


@pytest.fixture(autouse=True)
def _engine_kept():  # noqa: ANN202 - the tests set torch's engine: put it back
    before = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = before


def _forum_on_qnnpack():  # noqa: ANN202
    """The forum's setup on qnnpack: a fresh module given its weight through .data."""
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "qnnpack"
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).eval()
    x = torch.relu(torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(3)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = torch.quantize_per_tensor(x, float(x.max() / 255), 0, torch.quint8)
        w = conv.weight.detach()
        qw = torch.quantize_per_tensor(w, float(w.abs().max() / 127), 0, torch.qint8)
        qm = nnq.Conv2d(8, 16, 3, padding=1)
    qm.weight().data = qw  # changes qm.weight(), not the packed weight qnnpack runs
    qm.bias().data = conv.bias.detach()
    with torch.no_grad():
        y = conv(x)
    qm.scale = float((y.max() - y.min()) / 255)
    qm.zero_point = int(round(float(-y.min()) / qm.scale))
    return conv, x, qm, qx


def test_a_weight_set_through_data_on_qnnpack_is_refused_with_its_fix() -> None:
    conv, x, qm, qx = _forum_on_qnnpack()
    with pytest.raises(CaseError, match=r"qm.weight\(\).data = w.*set_weight_bias") as info:
        qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    assert "\n" not in str(info.value)
    qm.set_weight_bias(qm.weight(), qm.bias())  # the fix the error gives
    report = qconvdiag.diagnose(qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None),
                                qconvdiag.Options(engine="qnnpack"))
    assert next(v for v in report.verdicts if v.path == "as_given").status == "at_floor"


def _packed_on(engine: str, qint32_bias: bool = False):  # noqa: ANN202
    """A float conv, its input, and a quantized twin packed on ``engine`` from its symmetric
    per-tensor weight (and its bias, as a float tensor or a qint32 one), with the input
    quantized as it gets it."""
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = engine
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1).eval()
    x = torch.relu(torch.randn(2, 8, 12, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qx = torch.quantize_per_tensor(x, float(x.max() / 255), 0, torch.quint8)
        w = conv.weight.detach()
        w_scale = float(w.abs().max() / 127)
        bias = conv.bias.detach()
        if qint32_bias:
            bias = torch.quantize_per_tensor(bias, qx.q_scale() * w_scale, 0, torch.qint32)
        qm = nnq.Conv2d(8, 16, 3, padding=1)
        qm.set_weight_bias(torch.quantize_per_tensor(w, w_scale, 0, torch.qint8), bias)
    qm.scale, qm.zero_point = 0.05, 10
    return conv, x, qm, qx


def test_a_module_packed_for_another_engine_is_not_stale() -> None:
    """Packed for fbgemm, captured with the engine set to qnnpack: its kernels are fbgemm's,
    which a copy packed on fbgemm reproduces (the model walk's QCD067 case, not this one)."""
    conv, x, qm, qx = _packed_on("fbgemm")
    torch.backends.quantized.engine = "qnnpack"
    qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)  # not refused


def test_a_quantized_bias_is_refused_with_the_float_bias_as_its_fix() -> None:
    """A qint32 bias (a TFLite habit): torch's x86 conv runs it and computes other numbers;
    the case is refused in one line that says torch takes a float bias, and how to set it."""
    conv, x, qm, qx = _packed_on("x86", qint32_bias=True)
    with pytest.raises(CaseFileError, match=r"float bias.*set_weight_bias") as info:
        qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    assert "\n" not in str(info.value)
