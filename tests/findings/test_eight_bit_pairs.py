"""QCD040 where the input's codes use 8 bits on an engine whose default qconfig keeps 7
(reduce_range) so that its int16 pairs cannot saturate (fbgemm's depthwise kernel pairs on
every CPU). A helper's model: the output scale of the conv before, written by hand, sent
8-bit codes into a depthwise conv on fbgemm; QCD040 named the saturation with the default
qconfig as its fix, which read as the qconfig already in use. The message now says the
input's qparams are not that observer's."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402


def _case(input_scale: float):  # noqa: ANN202
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8).eval()
    with torch.no_grad():
        conv.weight.copy_(0.5 + 0.5 * torch.rand_like(conv.weight))  # large, one sign
    x = 0.8 + 0.2 * torch.rand(2, 8, 12, 12)
    torch.backends.quantized.engine = "fbgemm"
    qm = torch.ao.nn.quantized.Conv2d(8, 8, 3, padding=1, groups=8)
    w = conv.weight.detach()
    scales = w.flatten(1).abs().amax(dim=1) / 127.5
    zeros = torch.zeros(8, dtype=torch.long)
    qm.set_weight_bias(torch.quantize_per_channel(w, scales.double(), zeros, 0, torch.qint8),
                       conv.bias.detach())
    with torch.no_grad():
        y = conv(x)
    qm.scale, qm.zero_point = float(y.max() - min(float(y.min()), 0.0)) / 255, 0
    qx = torch.quantize_per_tensor(x, input_scale, 0, torch.quint8)
    return qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)


def _qcd040(case):  # noqa: ANN001, ANN202
    report = qconvdiag.diagnose(case, qconvdiag.Options(engine="fbgemm"))
    return next((f for f in report.findings if f.code == "QCD040" and f.path == "as_given"),
                None)


def test_8_bit_input_codes_on_fbgemm_s_pairs_say_the_input_qparams_are_not_the_observer_s():
    found = _qcd040(_case(1 / 255))  # codes up to 255
    assert found is not None and found.severity in ("warning", "error")
    assert "8 bits, where fbgemm's default qconfig keeps activations to 128 levels" \
        in found.message
    # 7-bit codes: their pair sums stay within int16 (2 * 127 * 127), nothing saturates
    assert _qcd040(_case(1 / 127)) is None
    # a sigmoid's fixed qparams (1/256, 0): 8 bits whatever the qconfig, not a hand's
    found = _qcd040(_case(1 / 256))
    assert found is not None and "8 bits" not in found.message
