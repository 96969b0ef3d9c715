from __future__ import annotations

import math

import numpy as np

from qconvdiag.measure.metrics import error_metrics, shares_from_energies
from tests.conftest import SCREEN_RTOL


def test_zero_error_has_no_sqnr_and_full_cosine():
    ref = np.array([1.0, -2.0, 3.0])
    m = error_metrics(np.zeros(3), ref, lsb=0.5)
    assert m.sqnr_db is None and m.max_abs == 0 and m.cosine == 1.0 and m.affected == 0
    assert m.max_abs_lsb == 0


def test_seed_case_metrics():
    m = error_metrics(np.array([-803.6908]), np.array([803.6908]), lsb=1.0)
    assert m.max_abs == m.rmse == 803.6908
    assert m.sqnr_db == 0.0
    assert m.cosine == 0.0
    assert m.max_abs_lsb == 803.6908 and m.affected == 1.0


def test_known_sqnr():
    ref = np.ones(100)
    m = error_metrics(np.full(100, 0.1), ref, lsb=None)
    assert math.isclose(m.sqnr_db, 20.0)
    assert m.max_abs_lsb is None


def test_all_zero_reference_with_error_is_not_nan():
    m = error_metrics(np.ones(4), np.zeros(4), lsb=1.0)
    assert m.sqnr_db is None and m.cosine == 0.0


def test_energy_shares_add_up_to_one():
    s = shares_from_energies({"a": 3.0**2, "b": 4.0**2, "c": 0.0})
    assert s == {"a": 9 / 25, "b": 16 / 25, "c": 0.0}
    assert shares_from_energies({"a": 0.0}) == {"a": None}


def test_difference_gives_the_metrics_of_the_float32_difference() -> None:
    """The screen's lean pass gives error_metrics' SQNR, RMSE and max |error| of a - b taken in
    float32, within SCREEN_RTOL (its chunks' sums of squares are float32 dots); max |error|
    exactly."""
    from qconvdiag.measure.metrics import difference

    rng = np.random.default_rng(3)
    b = rng.normal(size=(3, 70_001)).astype(np.float32)  # several chunks and a tail
    a = (b + rng.normal(scale=0.01, size=b.shape)).astype(np.float32)
    want = error_metrics(a - b, b, None)
    got = difference(a, b)
    assert got.max_abs == want.max_abs
    assert math.isclose(got.rmse, want.rmse, rel_tol=SCREEN_RTOL)
    # the SQNR's energy ratio, 10^(SQNR/10), within SCREEN_RTOL
    assert math.isclose(10 ** (got.sqnr_db / 10), 10 ** (want.sqnr_db / 10), rel_tol=SCREEN_RTOL)
    assert difference(b, b) == (None, 0.0, 0.0)  # exact: no error, no SQNR
    assert difference(np.zeros(5, np.float32), np.ones(5, np.float32)).max_abs == 1.0


def test_fused_pass_gives_the_numbers_of_separate_passes() -> None:
    """One pass over the chunks gives what difference() and the arrays' min, max and positive
    count give, to the bit (same chunks, same sums)."""
    from qconvdiag.measure.metrics import Span, difference, fused_pass
    from qconvdiag.quantization.qparams import dequantize32, per_tensor

    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, size=(2, 3, 150, 151), dtype=np.uint8)  # chunks and a tail
    qp = per_tensor(0.05, 128, "quint8", "test")
    q = dequantize32(codes, qp)
    y = (q + rng.normal(scale=0.02, size=q.shape)).astype(np.float32)
    model = (q + rng.normal(scale=0.1, size=q.shape)).astype(np.float32)
    flat = codes.reshape(-1)
    diffs, spans = fused_pass(lambda sl: dequantize32(flat[sl], qp), (y, model), (y, codes))
    assert diffs == [difference(q, y), difference(q, model)]
    for got, a in zip(spans, (y, codes)):
        assert got == Span(float(a.min()), float(a.max()), int(np.count_nonzero(a > 0)))
    assert Span(-2.0, 3.1, 1).ideal_step() == (3.1 + 2.0) / 255
    empty = np.zeros((0, 4), np.float32)
    assert fused_pass(lambda sl: empty.reshape(-1)[sl], (empty,), (empty,)) == (
        [(None, 0.0, 0.0)], [Span(0.0, 0.0, 0)])
