"""Weights on fewer levels than qint8 has, on purpose: a weight observer's quant_min/quant_max
(4-bit weights, -8..7, pytorch/ao#2138). The module's codes are then the float weight's at the
module's qparams, clamped at the narrowed range's ends. Before, the clamped codes read as a
weight that moved after convert (QCD024, a false claim), the clip of each channel's largest
weight as 8-bit observers' half step (QCD020, whose text speaks of 127.5), and the coarse step
as an error (QCD026) telling an 8-bit story."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402
from qconvdiag.quantization.qparams import (  # noqa: E402
    make_qparams,
    narrowed_weight_range,
)


def _model(quant_min: int, quant_max: int, per_channel: bool = True
           ) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    """A conv quantized with torch.ao's eager flow on x86, its weight observer narrowed to
    quant_min..quant_max."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.ao.quantization.QuantStub(),
                                torch.nn.Conv2d(16, 32, 3, padding=1),
                                torch.ao.quantization.DeQuantStub()).eval()
    x = torch.rand(4, 16, 12, 12)
    torch.backends.quantized.engine = "x86"
    observer = (torch.ao.quantization.PerChannelMinMaxObserver if per_channel
                else torch.ao.quantization.MinMaxObserver)
    scheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
    model.qconfig = torch.ao.quantization.QConfig(
        activation=torch.ao.quantization.get_default_qconfig("x86").activation,
        weight=observer.with_args(dtype=torch.qint8, qscheme=scheme, quant_min=quant_min,
                                  quant_max=quant_max))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare(copy.deepcopy(model))
        prepared(x)
        quantized = torch.ao.quantization.convert(prepared)
    return model, quantized, x


def _findings(model: torch.nn.Module, quantized: torch.nn.Module, x: torch.Tensor) -> dict:
    report = qconvdiag.diagnose_model(model, quantized, x, top=1)
    return {f.code: f for f in report.details[0].report.findings}


@pytest.mark.parametrize(("quant_min", "quant_max", "per_channel", "title"), [
    (-8, 7, True, "4-bit weights: codes -8..7"),
    (-7, 7, False, "weights on 15 levels: codes -7..7"),
])
def test_narrowed_weights_are_named_as_such_not_as_a_moved_or_half_step_clipped_weight(
        quant_min: int, quant_max: int, per_channel: bool, title: str) -> None:
    model, quantized, x = _model(quant_min, quant_max, per_channel)
    codes = quantized[1].weight().int_repr()
    assert int(codes.min()) >= quant_min and int(codes.max()) == quant_max
    found = _findings(model, quantized, x)
    assert "QCD024" not in found and "QCD020" not in found, found
    few = found["QCD026"]
    assert few.title.startswith(title), few.title
    assert few.severity == "warning"  # a choice, with its cost: not an error
    assert f"quant_min={quant_min}, quant_max={quant_max}" in few.message
    # its fix (8-bit weights) runs on the engine and brings the conv to its floor
    exec(few.fix, {"torch": torch, "conv": model[1], "qm": quantized[1]})  # noqa: S102
    report = qconvdiag.diagnose_model(model, quantized, x, top=1)
    verdict = next(v for v in report.details[0].report.verdicts if v.path == "as_given")
    assert verdict.status == "at_floor"


def test_8_bit_weights_and_a_coarse_scale_are_not_read_as_a_narrowed_range() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    top = np.abs(w).reshape(8, -1).max(axis=1)
    # 8-bit per-channel codes: the whole range, nothing clamped
    qp = make_qparams(list(top / 127.5), [0] * 8, "qint8", 0, "w", "module")
    codes = torch.quantize_per_channel(torch.from_numpy(w), torch.from_numpy(top / 127.5),
                                       torch.zeros(8, dtype=torch.long), 0,
                                       torch.qint8).int_repr().numpy()
    assert narrowed_weight_range(w, codes, qp) is qp
    # a scale 18x coarse that puts the codes on -7..7, none clamped, and is not max|w| / 7:
    # QCD026's 8-bit case, not an observer's narrowed range
    coarse = make_qparams([float(np.abs(w).max()) / 7.2], [0], "qint8", None, "w", "module")
    codes = torch.quantize_per_tensor(torch.from_numpy(w), coarse.scale[0], 0,
                                      torch.qint8).int_repr().numpy()
    assert (int(codes.min()), int(codes.max())) == (-7, 7)
    assert narrowed_weight_range(w, codes, coarse) is coarse
    # the same codes at max|w| / 7, the scale a -7..7 symmetric observer takes: narrowed
    fit = make_qparams([float(np.abs(w).max()) / 7.0], [0], "qint8", None, "w", "module")
    codes = torch.quantize_per_tensor(torch.from_numpy(w), fit.scale[0], 0,
                                      torch.qint8).int_repr().numpy()
    assert (narrowed_weight_range(w, codes, fit).quant_min,
            narrowed_weight_range(w, codes, fit).quant_max) == (-7, 7)


def test_per_tensor_narrowed_codes_that_reach_one_end_only_are_read_as_the_range() -> None:
    """A per-tensor -8..7 observer on a weight whose largest |w| is positive puts its codes on
    -3..7: the range shows at one end, and the scale is the observer's, max|w| / 7.5
    (helper-65: such convs of a ResNet got a QCD026 error telling an 8-bit story, the rest of
    the model a warning). A coarse scale on the same codes is not read as one."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[w < 0] *= 0.3  # the negative side reaches a third of the positive one
    top = float(np.abs(w).max())

    def codes(scale: float) -> np.ndarray:  # torch's, clamped to the observer's range
        q = torch.quantize_per_tensor(torch.from_numpy(w), scale, 0, torch.qint8).int_repr()
        return q.clamp(-8, 7).numpy()

    fit = make_qparams([top / 7.5], [0], "qint8", None, "w", "module")
    held = codes(fit.scale[0])
    assert int(held.max()) == 7 and int(held.min()) > -8
    narrowed = narrowed_weight_range(w, held, fit)
    assert (narrowed.quant_min, narrowed.quant_max) == (-8, 7)
    coarse = make_qparams([top / 7.2], [0], "qint8", None, "w", "module")
    held = codes(coarse.scale[0])
    assert int(held.max()) == 7 and int(held.min()) > -8
    assert narrowed_weight_range(w, held, coarse) is coarse
