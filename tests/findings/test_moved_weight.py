"""QCD024 on a weight that moved after convert: the float model trained on (or another
checkpoint loaded) after its quantized twin was converted. The module's codes are then the
float weight's at the module's own qparams but for codes one step off, which
``holds_float_weight`` still takes for the float weight: before, a broken conv got no finding
at all."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


def _moved(shift: float, cin: int = 128) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A conv quantized with torch.ao's eager flow on x86, then its float weight moved by
    ``shift`` weight steps, every weight the same way (0: the float weight it was made from)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.ao.quantization.QuantStub(),
                                torch.nn.Conv2d(cin, 32, 3, padding=1),
                                torch.ao.quantization.DeQuantStub()).eval()
    x = torch.rand(4, cin, 12, 12)
    torch.backends.quantized.engine = "x86"
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare(copy.deepcopy(model))
        prepared(x)
        quantized = torch.ao.quantization.convert(prepared)
    with torch.no_grad():
        w = model[1].weight
        w.add_(w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127.5 * shift)
    return model, quantized, x


def _qcd024(model: torch.nn.Module, quantized: torch.nn.Module, x: torch.Tensor):  # noqa: ANN202
    report = qconvdiag.diagnose_model(model, quantized, x, top=1)
    detail = report.details[0].report
    verdict = next(v for v in detail.verdicts if v.path == "as_given")
    return next((f for f in detail.findings if f.code == "QCD024"), None), verdict


def test_a_moved_weight_is_named_with_the_codes_off_and_its_fix_runs() -> None:
    model, quantized, x = _moved(0.3)
    found, verdict = _qcd024(model, quantized, x)
    assert verdict.status == "broken"
    assert found is not None and found.severity == "error", found
    assert "one step" in found.message and "converted from other float weights" in found.message
    # the fix repacks this float weight at the module's own qparams: the conv is then healthy
    exec(found.fix, {"torch": torch, "conv": model[1], "qm": quantized[1]})  # noqa: S102
    found, verdict = _qcd024(model, quantized, x)
    assert found is None and verdict.status == "at_floor"


def test_a_small_move_that_costs_nothing_is_info_and_the_weight_it_was_made_from_is_quiet(
) -> None:
    found, verdict = _qcd024(*_moved(0.3, cin=2))  # few inputs: output rounding dominates
    assert verdict.status == "at_floor" and found is not None and found.severity == "info"
    found, verdict = _qcd024(*_moved(0.0))
    assert found is None and verdict.status == "at_floor"


def _requantized(engine: str, factor: float) -> tuple[torch.nn.Module, torch.nn.Module,
                                                      torch.Tensor]:
    """A conv quantized with the engine's default qconfig, then its weight packed again from
    the dequantized module weight at a scale ``factor`` times max|w| / 127 (a scale written
    after convert, as users write it: rounded twice; nothing moved)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.ao.quantization.QuantStub(),
                                torch.nn.Conv2d(32, 32, 3, padding=1),
                                torch.ao.quantization.DeQuantStub()).eval()
    x = torch.rand(4, 32, 12, 12)
    torch.backends.quantized.engine = engine
    model.qconfig = torch.ao.quantization.get_default_qconfig(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare(copy.deepcopy(model))
        prepared(x)
        quantized = torch.ao.quantization.convert(prepared)
    qm = quantized[1]
    w = qm.weight().dequantize()
    qm.set_weight_bias(torch.quantize_per_tensor(w, float(w.abs().max()) / 127 * factor, 0,
                                                 torch.qint8), qm.bias())
    return model, quantized, x


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
@pytest.mark.parametrize(("factor", "cause"), [(6.0, "QCD026"), (0.25, "QCD020")])
def test_a_weight_quantized_twice_is_its_scale_s_story_not_a_moved_or_foreign_weight(
        engine: str, factor: float, cause: str) -> None:
    model, quantized, x = _requantized(engine, factor)
    report = qconvdiag.diagnose_model(model, quantized, x, top=1).details[0].report
    codes = {f.code: f for f in report.findings}
    assert "QCD024" not in codes, codes.get("QCD024")
    verdict = next(v for v in report.verdicts if v.path == "as_given")
    assert verdict.causes[0].code == cause  # a coarse scale (QCD026), a clipping one (QCD020)
    assert codes[cause].severity in ("warning", "error")
    assert any("quantized twice" in n for n in next(
        p for p in report.paths if p.name == "as_given").notes)


def test_a_weight_quantized_once_is_not_read_as_quantized_twice() -> None:
    from qconvdiag.quantization.paths import requantized

    model, quantized, x = _moved(0.0)
    case = qconvdiag.capture_model(model, quantized, x).layers[0].case
    assert case.setup is not None and case.setup.module is not None
    assert not requantized(case, case.setup.module)

