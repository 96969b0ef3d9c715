"""QCD023 on a per-tensor conv at its floor whose weight error per-channel weights would cut
FAR times, and which is a third of its error or more: the conv is at its floor overall only
because the floor of its other stages is as large. A helper's model (a
BatchNorm made one channel 40x the others, per-tensor weights on x86): that conv read "at its
floor, nothing is misconfigured" while per-channel weights took the model from 59% to 89%
accuracy. Where per-tensor is the engine's default (qnnpack) it stays advice (info)."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


def _model(per_tensor: bool) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A ConvReLU whose first output channel is 40x the others (as a BatchNorm's gain folds
    in), quantized on x86 with per-tensor (or per-channel) weights."""
    from torch.ao.quantization import (
        DeQuantStub,
        MinMaxObserver,
        QConfig,
        QuantStub,
        convert,
        fuse_modules,
        get_default_qconfig,
        prepare,
    )

    torch.manual_seed(0)
    model = torch.nn.Sequential(QuantStub(), torch.nn.Conv2d(64, 32, 3, stride=2, padding=1),
                                torch.nn.ReLU(), DeQuantStub()).eval()
    with torch.no_grad():
        model[1].weight[0] *= 40
        model[1].bias[0] = abs(model[1].bias[0]) * 40
    x = torch.relu(torch.randn(8, 64, 16, 16))
    torch.backends.quantized.engine = "x86"
    weight = (MinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
              if per_tensor else get_default_qconfig("x86").weight)
    fused = fuse_modules(copy.deepcopy(model), [["1", "2"]])
    fused.qconfig = QConfig(activation=get_default_qconfig("x86").activation, weight=weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(fused)
        prepared(x)
        return model, convert(prepared), x


def _as_given(per_tensor: bool):  # noqa: ANN202
    report = qconvdiag.diagnose_model(*_model(per_tensor), top=1).details[0].report
    verdict = next(v for v in report.verdicts if v.path == "as_given")
    return verdict, {f.code: f for f in report.findings if f.path == "as_given"}


def test_per_tensor_weights_far_from_per_channel_s_at_the_floor_get_a_warning() -> None:
    verdict, found = _as_given(per_tensor=True)
    assert verdict.status == "at_floor"
    f = found["QCD023"]
    assert f.severity == "warning"
    assert "x what per-channel weights give" in f.message
    assert "at its floor overall only because the floor of its other stages" in f.message
    assert "QCD070" not in found  # not "nothing is misconfigured"
    # per-channel weights: at the floor, no QCD023
    verdict, found = _as_given(per_tensor=False)
    assert verdict.status == "at_floor" and "QCD023" not in found and "QCD070" in found
