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
    assert why is not None and "represent no negative value" in why
    assert "every negative value is clipped to 0" in why and "5.2x the step" in why
    # not as coarse: the negatives clipped all the same (a misfit the scale alone missed)
    why = _stub(0.02, 0).misfit()
    assert why is not None and "every negative value is clipped to 0" in why
    assert "x the step" not in why
    # a side left out by an affine zero point, the step too coarse: both named
    why = _stub(0.05126, 8).misfit()
    assert why is not None and "5.2x the step" in why
    assert "its zero point 8 leaves [-0.75, -0.4101) out, 14% of that range" in why
    # the same scale with a zero point that keeps the negatives: the scale alone
    why = _stub(0.05126, 15).misfit()
    assert why is not None and "5.2x the step" in why and "zero point" not in why


def test_the_stub_s_loss_names_its_qparams_and_the_side_its_zero_point_leaves_out() -> None:
    """A QuantStub given a ReLU's qparams (zero point 0, a coarse scale) on inputs normalized
    around 0: the walk's sentence names its qparams, and the misfit the negatives clipped."""
    import warnings

    import pytest

    torch = pytest.importorskip("torch")
    import qconvdiag
    from tests import models

    f, q = models.eager("x86")
    q.quant.scale, q.quant.zero_point = torch.tensor([0.1]), torch.tensor([0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qconvdiag.diagnose_model(f, q, models.inputs(2, 8, 7), top=0)
    (loss,) = [u for u in report.upstream if u.op == "quant"]
    assert "quantization (its QuantStub) has qparams that do not fit the inputs" in loss.message
    assert "represent no negative value" in loss.message and "clipped to 0" in loss.message


def test_a_batchnorm_is_blamed_for_its_moved_statistics_only_where_they_explain_the_loss() -> None:
    """A train-mode calibration moves a BatchNorm's statistics: by 0.01 standard deviations
    and its variances by 0.95x to 1.03x (an error of about 32 dB in its output), it was blamed
    for a conv's input at 24.4 dB, and its fix left that input at 24.6 dB (helper-65: the
    loss was the unfused BatchNorm's, QCD072). It is named where its move explains half the
    loss's error power or more (EXPLAINS_DB), and for its qparams whatever its move."""
    from qconvdiag.model.ops import between

    def bn(stats: tuple[float, float, float], scale: float = 0.02) -> OpRange:
        return OpRange("bn1", "BatchNorm2d", scale, 50, "quint8", -1.0, 4.0, ("conv1",), False,
                       False, stats)

    order = ["conv1", "conv2"]
    small = bn((0.01, 0.95, 1.03))
    assert 31 < small.drift_db() < 33
    assert between((small,), order, "conv2", 24.4) == []
    assert [o.name for o in between((small,), order, "conv2", 30.0)] == ["bn1"]
    assert [o.name for o in between((small,), order, "conv2")] == ["bn1"]  # no loss given
    large = bn((0.3, 0.8, 1.2))  # 10.5 dB: it explains the loss
    (named,) = between((large,), order, "conv2", 24.4)
    assert "running statistics" in (named.misfit() or "")
    coarse = bn((0.01, 0.95, 1.03), scale=0.2)  # its step 10x what its range needs
    (named,) = between((coarse,), order, "conv2", 24.4)
    assert "output scale" in (named.misfit() or "")


def test_qcd065_names_the_qparams_of_a_batchnorm_whose_small_move_it_leaves_out() -> None:
    """Found by review: ``between`` named a BatchNorm for its coarse output scale, its small
    move left out, while QCD065 looked the op up again and titled it by its running statistics,
    with the eval-mode calibration as its fix. Now both judge it alike: its output qparams, and
    their fix; a move that explains the loss keeps the statistics' title and fix."""
    from qconvdiag.model.lost import qcd065
    from qconvdiag.model_report import ErrorSummary, UpstreamLoss

    def finding(stats: tuple[float, float, float]):  # noqa: ANN202
        op = OpRange("bn1", "BatchNorm2d", 0.2, 50, "quint8", -1.0, 4.0, ("conv1",), False,
                     False, stats)
        loss = UpstreamLoss("conv2", ErrorSummary(24.4, 0.1, 0.5), None, "conv1", 35.0, "m",
                            "bn1")
        (found,) = qcd065((loss,), False, (op,))
        return found

    small = finding((0.01, 0.95, 1.03))
    assert small.title.endswith("by bn1's output qparams") and "model.eval()" not in small.fix
    large = finding((0.3, 0.8, 1.2))
    assert large.title.endswith("by bn1's running statistics") and "model.eval()" in large.fix
