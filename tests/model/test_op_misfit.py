"""An op's misfit (QCD065's words for it): a step too coarse for the float model's range there,
and, where its zero point also leaves one side of that range out, that side (a QuantStub with
zero point 0 on inputs normalized around 0, a helper's: every negative value, 58% of them,
clipped to 0; the message named the scale alone)."""

from __future__ import annotations

from qconvdiag.model.ops import OpRange


def _stub(scale: float, zero_point: int, low: float = -0.75, high: float = 1.75) -> OpRange:
    return OpRange("quant", "Quantize", scale, zero_point, "quint8", low, high, (), False, True)


def test_a_zero_point_that_leaves_the_negative_side_out_is_named_with_the_coarse_scale() -> None:
    why = _stub(0.05126, 0).misfit()
    assert why is not None and "5.2x the step" in why
    assert "its zero point 0 leaves [-0.75, 0) out, 30% of that range" in why
    # the same scale with a zero point that keeps the negatives: the scale alone
    why = _stub(0.05126, 15).misfit()
    assert why is not None and "5.2x the step" in why and "zero point" not in why
