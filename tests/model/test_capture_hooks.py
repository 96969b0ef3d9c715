"""The capture's hooks keep each float conv's output as the float model computed it, copying it
only when no folded BatchNorm takes its place, whatever in-place op comes next."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qconvdiag.model.hooks import Seen, run_both


class _Net(torch.nn.Module):
    def __init__(self, after: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(4, 4, 1)
        self.after = after

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.after == "bn":
            y = self.bn(y)
        elif self.after == "relu_module":
            y = self.relu(y)
        elif self.after == "inplace_op":
            y += 1.0  # between modules: no hook sees it
        return self.conv2(y)


def _run(after: str, folded: bool) -> tuple[Seen, torch.Tensor, np.ndarray]:
    net = _Net(after).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    seen = {"conv": Seen()}

    def quantized_side(_batch: torch.Tensor) -> None:  # what the quantized model's hooks add
        seen["conv"].qinput.append(torch.zeros(1))
        seen["conv"].qoutput.append(torch.zeros(1))

    run_both(net, quantized_side, {"conv": net.conv}, seen, [x], 10**9, [], lambda _bn: folded)
    with torch.no_grad():
        want = net.conv(x)
        bn = net.bn(want).numpy()
    return seen["conv"], want, bn


@pytest.mark.parametrize("after", ["relu_module", "inplace_op", "none"])
def test_a_conv_output_is_kept_before_an_in_place_op_changes_it(after: str) -> None:
    s, want, _bn = _run(after, folded=False)
    assert s.bn is None and len(s.float_output) == 1
    np.testing.assert_array_equal(s.float_output[0], want.numpy())


def test_a_folded_batchnorm_stands_for_its_conv_output() -> None:
    s, _want, bn = _run("bn", folded=True)
    assert s.bn == "bn" and s.float_output == []  # not copied: the BatchNorm's output stands
    np.testing.assert_array_equal(s.bn_output[0], bn)


def test_a_batchnorm_kept_in_the_quantized_model_keeps_the_conv_output() -> None:
    s, want, bn = _run("bn", folded=False)
    np.testing.assert_array_equal(s.float_output[0], want.numpy())
    np.testing.assert_array_equal(s.bn_output[0], bn)


class _TwoBranch(torch.nn.Module):
    """Two convs run before either's BatchNorm: another module runs between a conv and its
    BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.ca, self.cb = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(3, 4, 3)
        self.bna, self.bnb = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.ca(x), self.cb(x)
        return self.bna(a) + self.bnb(b)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_a_batchnorm_finds_its_conv_after_other_modules_ran(mode: str) -> None:
    """The BatchNorm is linked to its conv by the conv's output tensor, however many modules ran
    between them, and in inference mode (whose tensors keep no version counter) too."""
    net = _TwoBranch().eval()
    x = torch.randn(2, 3, 8, 8)
    seen = {"ca": Seen(), "cb": Seen()}

    def quantized_side(_batch: torch.Tensor) -> None:
        for s in seen.values():
            s.qinput.append(torch.zeros(1))
            s.qoutput.append(torch.zeros(1))

    with torch.inference_mode() if mode == "inference_mode" else torch.no_grad():
        run_both(net, quantized_side, {"ca": net.ca, "cb": net.cb}, seen, [x], 10**9, [],
                 lambda _bn: True)
        want = {"ca": net.bna(net.ca(x)).numpy(), "cb": net.bnb(net.cb(x)).numpy()}
    for name, bn in (("ca", "bna"), ("cb", "bnb")):
        s = seen[name]
        assert s.bn == bn and s.float_output == [], name  # the folded BatchNorm's stands
        np.testing.assert_array_equal(s.bn_output[0], want[name])


class _ConvThenLinear(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_dynamic_quantization_is_refused_in_one_line_that_says_why():
    """quantize_dynamic (pytorch#70480, a ResNet-18 at 0% accuracy): by default it leaves convs
    in float, and with a mapping to torch.ao.nn.quantized.dynamic.Conv2d its convs quantize
    their input at run time. capture_model said a float32 tensor "packs several codes per
    byte" for the second; now each is refused in one line naming dynamic quantization and the
    static flow qconvdiag diagnoses."""
    import warnings

    import torch.ao.nn.quantized.dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    import qconvdiag
    from qconvdiag.errors import CaseError

    torch.manual_seed(0)
    model, x = _ConvThenLinear().eval(), torch.randn(2, 3, 8, 8)
    qconfig = {torch.nn.Conv2d: default_dynamic_qconfig, torch.nn.Linear: default_dynamic_qconfig}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        linear_only = quantize_dynamic(model, qconfig)
        both = quantize_dynamic(model, qconfig, mapping={torch.nn.Conv2d: nnqd.Conv2d,
                                                         torch.nn.Linear: nnqd.Linear})
    with pytest.raises(CaseError) as e:
        qconvdiag.capture_model(model, linear_only, x)
    assert "quantize_dynamic quantizes Linear and recurrent layers and leaves convs in float" \
        in str(e.value)
    with pytest.raises(CaseError) as e:
        qconvdiag.capture_model(model, both, x)
    message = str(e.value)
    assert "'conv' is a dynamically quantized conv (torch.ao.nn.quantized.dynamic.Conv2d" \
        in message and "prepare, calibration batches and convert" in message
    assert "\n" not in message


class _LaterRegistered(torch.nn.Module):
    """Its convs registered in one order (tail, head) and run in the other (head, tail), as
    XLSR registers conv4 before the blocks it runs first (cxzhou95/XLSR#5)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        self.tail = torch.nn.Conv2d(4, 2, 1)
        self.head = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.tail(self.head(self.quant(x))))


def test_the_convs_are_in_the_order_the_model_runs_them() -> None:
    """The bundle's layers (the walk's "before" and "last") are in run order, not in the order
    the model registers its modules."""
    import copy
    import warnings

    import qconvdiag
    from qconvdiag.model.walk import WalkOptions, walk_model

    torch.manual_seed(0)
    model, x = _LaterRegistered().eval(), torch.randn(4, 3, 8, 8)
    q = copy.deepcopy(model)
    q.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.prepare(q, inplace=True)
        q(x)
        torch.ao.quantization.convert(q, inplace=True)
    assert [n for n, m in q.named_modules() if "Conv" in type(m).__name__] == ["tail", "head"]
    bundle = qconvdiag.capture_model(model, q, x)
    assert [lay.name for lay in bundle.layers] == ["head", "tail"]
    report = walk_model(bundle, WalkOptions(top=0)).report
    assert [row.name for row in report.layers] == ["head", "tail"]


@pytest.mark.parametrize("engine", ["x86", "fbgemm", "qnnpack"])
def test_qint8_activations_are_refused_in_one_line_that_names_the_qconfig(engine: str) -> None:
    """pytorch#76298, #83156: a qconfig whose activation observer has dtype qint8
    (default_symmetric_qnnpack_qconfig) gives convs a qint8 input, which each engine refuses
    in its own words ("should be QUint8", "Expected activation data type QUInt8 but got
    QInt8"); the refusal asked whether the model runs on these inputs. It names the qconfig
    and the engine's default now."""
    import copy
    import warnings

    import qconvdiag
    from qconvdiag.errors import CaseError

    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        model, x = _LaterRegistered().eval(), torch.randn(2, 3, 8, 8)
        q = copy.deepcopy(model)
        q.qconfig = torch.ao.quantization.default_symmetric_qnnpack_qconfig
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.ao.quantization.prepare(q, inplace=True)
            q(x)
            torch.ao.quantization.convert(q, inplace=True)
        with pytest.raises(CaseError) as refused:
            qconvdiag.capture_model(model, q, x)
    finally:
        torch.backends.quantized.engine = previous
    message = str(refused.value)
    assert "\n" not in message and "its input is qint8" in message
    assert f"get_default_qconfig({engine!r})" in message and "QCD011" in message


def test_linear_and_conv_transpose_layers_are_named_where_they_are_not_walked() -> None:
    """pytorch#123824: a convert_fx model of Linear layers only was refused as 'a graph
    without quantize or dequantize nodes'; it names its quantized layers now. A quantized
    ConvTranspose between convs (a UNet's up-sampling) was skipped silently: a note says so
    (helper-50: torch's fbgemm ConvTranspose2d lost the signal, and nothing pointed at it)."""
    import copy
    import warnings

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    import qconvdiag
    from qconvdiag.errors import CaseError
    from tests.model.test_shared import TransposeBranch

    torch.manual_seed(0)
    cases = [(torch.nn.Sequential(torch.nn.Linear(5, 5)).eval(), torch.rand(2, 5)),
             (TransposeBranch().eval(), torch.randn(2, 3, 8, 8))]
    converted = []
    for model, x in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"),
                                  (x,))
            prepared(x)
            converted.append(convert_fx(prepared))
    with pytest.raises(CaseError) as refused:
        qconvdiag.capture_model(cases[0][0], converted[0], cases[0][1])
    assert "its quantized layers are Linear (0)" in str(refused.value)
    bundle = qconvdiag.capture_model(cases[1][0], converted[1], cases[1][1])
    assert any(n.startswith("not walked") and "ConvTranspose2d up" in n for n in bundle.notes)


def test_a_model_whose_forward_takes_two_inputs_is_refused_as_such() -> None:
    """helper-50: forward(x, d) with (x, d) batches: the pair was read as (inputs, labels), d
    dropped, and the refusal asked whether the model runs on these inputs (it does). It says
    what capture_model takes now."""
    import qconvdiag
    from qconvdiag.errors import CaseError

    class TwoIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + d.mean()

    model = TwoIn().eval()
    with pytest.raises(CaseError, match=r"forward takes 2 inputs \(x, d\)"):
        qconvdiag.capture_model(model, model, [(torch.randn(1, 3, 8, 8), torch.randn(1))])

    class KeywordIn(TwoIn):
        def forward(self, x: torch.Tensor, *, d: torch.Tensor) -> torch.Tensor:
            return self.conv(x) + d.mean()

    model = KeywordIn().eval()
    with pytest.raises(CaseError, match=r"forward takes 2 inputs \(x, d\)"):
        qconvdiag.capture_model(model, model, torch.randn(1, 3, 8, 8))
