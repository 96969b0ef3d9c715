"""Verdicts on convs quantized right but diagnosed on other data than they were calibrated on,
and on a bias that moved with the float model: graded by cost, never a warning at the floor."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


def _eager(conv, x, engine: str, calibration: list, reduce_range: bool):  # noqa: ANN001, ANN202
    """conv quantized by torch.ao's eager flow (minmax activations, per-channel weights),
    calibrated on ``calibration``; returns the quantized conv and x quantized as it gets it."""
    from torch.ao.quantization import DeQuantStub, QConfig, QuantStub, convert, prepare
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

    model = torch.nn.Sequential(QuantStub(), copy.deepcopy(conv), DeQuantStub()).eval()
    model.qconfig = QConfig(
        activation=MinMaxObserver.with_args(reduce_range=reduce_range),
        weight=PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                  qscheme=torch.per_channel_symmetric))
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = prepare(model)
        for batch in calibration:
            prepared(batch)
        quantized = convert(prepared)
        qx = quantized[0](x)
    return quantized[1], qx



def _default_flow(conv, x, engine: str, calibration: list):  # noqa: ANN001, ANN202
    """conv quantized by torch.ao's eager flow with ``engine``'s default qconfig, calibrated
    on ``calibration``; the quantized conv and x quantized as it gets it."""
    from torch.ao.quantization import get_default_qconfig

    model = torch.nn.Sequential(torch.ao.quantization.QuantStub(), copy.deepcopy(conv),
                                torch.ao.quantization.DeQuantStub()).eval()
    model.qconfig = get_default_qconfig(engine)
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare(model)
        for batch in calibration:
            prepared(batch)
        quantized = torch.ao.quantization.convert(prepared)
        return quantized[1], quantized[0](x)

@pytest.mark.parametrize("factor", [1.2, 1.4])
def test_seven_bit_activations_calibrated_on_a_wider_range_are_judged_like_eight_bit(
        factor: float) -> None:
    """x86's 7-bit activations (reduce_range) calibrated on data up to ``factor`` x the range
    diagnosed: 8-bit ones are let be up to 1.5x, and so are these (at SEVEN_BIT_RATIO 2.6,
    1.3x already read as an 8-bit step 2.5x too coarse: QCD012 and QCD052 warnings)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).eval()
    x = torch.relu(torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.2)
    qm, qx = _eager(conv, x, "x86", [x, factor * x], reduce_range=True)
    report = qconvdiag.diagnose(qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None),
                                qconvdiag.Options(engine="x86"))
    loud = [(f.code, f.severity) for f in report.findings
            if f.path == "as_given" and f.severity != "info"]
    assert not loud
    budget = next(p for p in report.paths if p.name == "as_given").budget
    assert budget is not None and (budget.input_bits, budget.output_bits) == (7, 7)


def test_a_bias_that_moved_costs_nothing_at_the_floor_so_is_info() -> None:
    """The float bias moved a little after convert (training continued): QCD030 names it,
    graded by what it costs (it passed 'warning' as its least severity: a warning on a conv
    at its floor)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).eval()
    x = torch.relu(torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.2)
    qm, qx = _eager(conv, x, "x86", [x], reduce_range=True)
    with torch.no_grad():
        conv.bias += 0.1 * float(conv.bias.abs().max())  # a small move, every channel alike
    report = qconvdiag.diagnose(qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None),
                                qconvdiag.Options(engine="x86"))
    verdict = next(v for v in report.verdicts if v.path == "as_given")
    found = [f for f in report.findings if f.path == "as_given" and f.code == "QCD030"]
    assert verdict.status == "at_floor" and found and found[0].severity == "info"


def test_a_zero_bias_where_the_float_conv_has_none_is_not_a_finding() -> None:
    """qnnpack reads a bias-less conv's bias back as zeros: the module adds what the float
    layer adds, nothing (a user sweep's QCD030 said 'a bias (max |b| 0) the float layer does
    not have: outputs shift by 0 RMSE', with a fix)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1, bias=False).eval()
    x = torch.relu(torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1)))
    qm, qx = _eager(conv, x, "qnnpack", [x], reduce_range=False)
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    assert case.bias is None and case.setup is not None and case.setup.module is not None
    assert case.setup.module.bias is not None and not case.setup.module.bias.any()
    report = qconvdiag.diagnose(case, qconvdiag.Options(engine="qnnpack"))
    assert "QCD030" not in {f.code for f in report.findings}


def test_a_bias_from_another_checkpoint_is_fixed_with_its_weight() -> None:
    """A module converted from another checkpoint holds its weight and its bias: QCD030's fix
    packs the float bias with the meant weight (QCD024's), not with the module's own weight,
    which a sweep measured to cost more (a depthwise conv: 42.8% -> 32.0% accuracy)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1).eval()
    other = torch.nn.Conv2d(8, 8, 3, padding=1).eval()  # another checkpoint's conv
    x = torch.relu(torch.randn(2, 8, 12, 12, generator=torch.Generator().manual_seed(1)))
    qm, qx = _eager(other, x, "x86", [x], reduce_range=True)
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    report = qconvdiag.diagnose(case, qconvdiag.Options(engine="x86"))
    found = {f.code: f for f in report.findings if f.path == "as_given"}
    assert {"QCD024", "QCD030"} <= set(found)
    fix = found["QCD030"].fix
    assert "QCD024" in fix and "qm.set_weight_bias(qm.weight()" not in fix
    namespace = {"torch": torch, "conv": conv, "qm": qm}
    exec(fix, namespace)  # noqa: S102 - the finding's own fix, as a user pastes it
    w, b = qm.weight().dequantize(), qm.bias()
    assert torch.allclose(b, conv.bias.detach())
    assert float((w - conv.weight.detach()).abs().max()) <= float(
        conv.weight.detach().abs().max()) / 127


def _heavy_tailed(g: torch.Generator) -> torch.Tensor:
    """A batch whose 1 in 300 values are 25x the rest (helper-49's 'outliers' data)."""
    x = torch.randn(4, 3, 11, 11, generator=g)
    return torch.where(torch.rand(x.shape, generator=g) < 1 / 300, x * 25, x)


def test_an_input_judged_against_the_calibration_batches_given_with_it() -> None:
    """The engine's default flow calibrated on three batches of heavy-tailed data, diagnosed
    on one of them (2.3x narrower than the three): its input step is 4x what that batch needs,
    so QCD012 named it an error on a layer quantized as torch's default flow does (helper-49:
    9-11 of 220 healthy layers per engine), and --calib changed only the production path.
    Without batches it is a warning now, as on an 8-bit engine.
    Given the batches, the input's step is judged against their range: quiet. Batches unlike
    the input (6x its scale, what a user calibrates on by mistake) are not taken as its range:
    QCD012 stays, and says how much wider they are; without batches it says that
    --calib would tell."""

    g = torch.Generator().manual_seed(2)
    calibration = [_heavy_tailed(g) for _ in range(3)]
    x = calibration[0]
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).eval()

    def loud(qm, qx, calib):  # noqa: ANN001, ANN202
        case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
        options = qconvdiag.Options(
            engine="x86", calib=None if calib is None else torch.cat(calib).numpy())
        report = qconvdiag.diagnose(case, options)
        return {f.code: f for f in report.findings
                if f.path == "as_given" and f.severity != "info"}

    qm, qx = _default_flow(conv, x, "x86", calibration)
    without = loud(qm, qx, None)
    # its 7-bit input read as such (x86's default reduce_range) at a step 4x this batch's
    # 8-bit one: judged as an 8-bit layer calibrated as widely is (qnnpack: a warning), not
    # as an 8-bit step 4x too coarse (an error, before SEVEN_BIT_RATIO went from 3 to 8)
    assert without["QCD012"].severity == "warning" and "--calib" in without["QCD012"].message
    assert loud(qm, qx, calibration) == {}
    unlike = [6 * b for b in calibration]
    qm, qx6 = _eager(conv, x, "x86", unlike, reduce_range=True)
    named = loud(qm, qx6, unlike)["QCD012"]
    assert named.severity == "error" and "calibration batches given with it span" in named.message


def test_an_8_bit_engine_s_input_calibrated_on_6x_the_data_stays_8_bit():
    """onednn's default qconfig keeps 8-bit activations: its input calibrated on 6x the data
    has a step 6x what the data needs, on fewer than 128 levels. Read as 7-bit (reduce_range)
    once the 7-bit reading went to 8x on every engine, its floor rose 6 dB and QCD012 fell
    to a warning (helper-53: 35 onednn runs); the wider reading is for engines whose default
    takes 7 bits (x86, fbgemm)."""
    from qconvdiag.measure.budget import SEVEN_BIT_RATIO, seven_bit_bound

    assert seven_bit_bound("onednn") == seven_bit_bound("qnnpack") == SEVEN_BIT_RATIO
    assert seven_bit_bound("x86") > SEVEN_BIT_RATIO
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1).eval()
    x = torch.randn(4, 16, 16, 16)
    qm, qx = _default_flow(conv, x, "onednn", [x * 6])
    report = qconvdiag.diagnose(qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None),
                                qconvdiag.Options(engine="onednn"))
    found = {f.code: f for f in report.findings if f.path == "as_given"}
    assert found["QCD012"].severity == "error" and "QCD042" not in found
    budget = next(p for p in report.paths if p.name == "as_given").budget
    assert budget is not None and budget.input_bits == 8


def test_an_output_judged_against_the_calibration_batches_given_with_it() -> None:
    """helper-53: given the calibration batches, the input's step was judged against them,
    the output's not: QCD052 warned on healthy layers calibrated on two batches of
    heavy-tailed data. The float conv's output range on the batches is what the output
    observer saw; where it is like the output's own, the output is judged against it."""

    def batch(g: torch.Generator) -> torch.Tensor:  # 1 in 100 values 12x the rest
        x = torch.randn(1, 1, 16, 16, generator=g)
        return torch.where(torch.rand(x.shape, generator=g) < 1 / 100, x * 12, x)

    g = torch.Generator().manual_seed(14)
    calibration = [batch(g) for _ in range(2)]
    x = calibration[0]
    torch.manual_seed(14)
    conv = torch.nn.Conv2d(1, 4, 2, bias=False).eval()
    qm, qx = _default_flow(conv, x, "x86", calibration)
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    report = qconvdiag.diagnose(case, qconvdiag.Options(
        engine="x86", calib=torch.cat(calibration).numpy()))
    assert not [f for f in report.findings if f.path == "as_given" and f.severity != "info"]
