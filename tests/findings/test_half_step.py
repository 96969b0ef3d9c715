"""QCD020 for the largest weights clipped by half a step (pytorch#95785): torch's symmetric
weight observers take scale max|w| / 127.5, so each channel's largest weight lands on code
127.5 and is clipped to 127. With many weights of that magnitude (an identity 1x1 conv) half
the outputs come out one step low, the path is above its floor with weight_clipping the stage,
and qconvdiag said "No misuse found". Now QCD020 names it, its fix (scale max|w| / 127) runs
and takes the conv to its floor; a trained-like conv, whose channels each have one largest
weight, gets no such finding."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


def _identity(weight: torch.Tensor | None = None
              ) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A 1x1 conv (identity weights unless ``weight``) and ReLU, and its twin quantized with
    torch.ao's eager flow (ReLU fused) and a per-tensor symmetric MinMax weight observer on
    fbgemm; the input a ramp 0..1 at scale 1/255 as the report's."""
    torch.backends.quantized.engine = "fbgemm"
    model = torch.nn.Sequential(torch.ao.quantization.QuantStub(),
                                torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(),
                                torch.ao.quantization.DeQuantStub()).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.eye(3).reshape(3, 3, 1, 1) if weight is None else weight)
        model[1].bias.zero_()
    x = torch.arange(0, 256).repeat(1, 3, 64, 1) / 255.0
    q = copy.deepcopy(model)
    torch.ao.quantization.fuse_modules(q, [["1", "2"]], inplace=True)
    q.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.MinMaxObserver.with_args(dtype=torch.quint8),
        weight=torch.ao.quantization.MinMaxObserver.with_args(
            dtype=torch.qint8, qscheme=torch.per_tensor_symmetric))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare(q)
        prepared(x)
        return model, torch.ao.quantization.convert(prepared), x


def _walk(model: torch.nn.Module, quantized: torch.nn.Module, x: torch.Tensor):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qconvdiag.diagnose_model(model, quantized, x, top=1)


def test_the_half_step_clip_of_many_largest_weights_is_named_and_fixed():
    """In the model walk (the conv on the input it received: no input floor), the identity
    conv is 1.6x its floor, every error on weight_clipping."""
    model, quantized, x = _identity()
    report = _walk(model, quantized, x)
    (detail,) = report.details
    assert detail.report.verdict.status == "above_floor"
    (clip,) = [f for f in detail.report.findings if f.code == "QCD020"]
    assert clip.path == "as_given" and clip.severity == "warning"
    assert clip.title == "the largest weights clipped by half a step"
    assert clip.evidence["clipped"] == 3 and "/ 127\n" in clip.fix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(clip.fix, "QCD020 fix", "exec"),  # noqa: S102 - our own fix text
             {"torch": torch, "qm": quantized.get_submodule("1"), "conv": model[1]})
    (again,) = _walk(model, quantized, x).details
    assert again.report.verdict.status == "at_floor"
    assert not [f for f in again.report.findings if f.code == "QCD020"]
    with torch.no_grad():  # every output the float model's (to float32's rounding of the
        # step): none one step low, as half of them were
        assert float((quantized(x) - model(x)).abs().max()) < 1e-6


def test_one_largest_weight_per_channel_is_not_named():
    """Trained-like weights: one weight per channel at its largest magnitude, clipped by half a
    step as every torch symmetric observer clips it: no finding."""
    weight = torch.randn(3, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    report = _walk(*_identity(weight))
    assert not [f for d in report.details for f in d.report.findings if f.code == "QCD020"]


def test_half_steps_beside_an_input_clipped_away_are_not_named():
    """A healthy sweep's conv1d (two weights per channel, about 700 in magnitude, onednn's
    per-channel default qconfig; one of its four inputs clipped by qparams calibrated on other
    data): every channel's largest weight is clipped by half a step, a material share of its
    floor, but the clipped input carries the excess. QCD020 warned beside QCD010 on 0.5% of
    the excess; only the input is named now."""
    from tests.repo import ROOT

    case = qconvdiag.load_case(ROOT / "tests" / "data" / "half_step_beside_clip.pt")
    report = qconvdiag.diagnose(case, qconvdiag.Options(engine="onednn"))
    codes = {f.code for f in report.findings if f.path == "as_given"}
    assert "QCD010" in codes and "QCD020" not in codes


def test_a_lone_largest_weight_clipped_by_half_a_step_is_not_named():
    """helper-49: a healthy qnnpack Conv1d (1 to 16 channels, 16 weights, per tensor, its
    default qconfig calibrated on its input) got a QCD020 warning for its one largest weight,
    which torch's observer scale max|w| / 127.5 clips by half a step by design. QCD020 names
    the half-step clip where many weights share that magnitude (two or more in a channel)."""
    from tests.repo import ROOT

    case = qconvdiag.load_case(ROOT / "tests" / "data" / "half_step_one_weight.pt")
    report = qconvdiag.diagnose(case, qconvdiag.Options(engine="qnnpack"))
    assert not [f for f in report.findings if f.severity != "info"]
