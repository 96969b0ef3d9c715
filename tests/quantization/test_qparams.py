"""qparams formulas against torch's own quantize_per_tensor / per_channel (ties included)."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest

from qconvdiag.errors import QParamsError
from qconvdiag.fp32 import fma32
from qconvdiag.quantization.qparams import dequantize, from_mapping, make_qparams, quantize


def _torch_codes(x, scale, zp, dtype, axis=None):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = torch.from_numpy(x)
        if axis is None:
            q = torch.quantize_per_tensor(t, scale, zp, getattr(torch, dtype))
        else:
            q = torch.quantize_per_channel(t, torch.tensor(scale, dtype=torch.float64),
                                           torch.tensor(zp), axis, getattr(torch, dtype))
        return q.int_repr().numpy().astype(np.int64)


@pytest.mark.parametrize(
    "dtype, per_channel",
    [("quint8", False), ("qint8", False), ("qint32", False), ("quint8", True), ("qint8", True)],
)
def test_quantize_matches_torch_on_ties_and_neighbours(dtype, per_channel):
    rng = np.random.default_rng(3)
    for _ in range(60):
        s = float(rng.uniform(0.3, 2))
        zp = int(rng.integers(0, 100)) if dtype == "quint8" else int(rng.integers(-60, 60))
        inv = np.float32(1) / np.float32(s)
        x = ((rng.integers(-100, 100, 37) + 0.5) / inv).astype(np.float32)
        x = np.concatenate([x, np.nextafter(x, np.float32(np.inf)),
                            np.nextafter(x, np.float32(-np.inf))]).astype(np.float32)
        if per_channel:
            qp = make_qparams([s], [zp], dtype, 0, "t", "user")
            got = quantize(x[None], qp)
            want = _torch_codes(x[None], [s], [zp], dtype, axis=0)
        else:
            qp = make_qparams([s], [zp], dtype, None, "t", "user")
            got = quantize(x, qp)
            want = _torch_codes(x, s, zp, dtype)
        assert np.array_equal(got, want)


def test_float_zero_point_is_truncated_toward_zero_like_torch():
    qp = make_qparams([0.0708661], [-14.1111], "qint8", None, "w", "user")
    assert qp.zero_point == (-14,) and qp.zero_point_given == (-14.1111,)
    assert make_qparams([1.0], [2.9], "quint8", None, "x", "user").zero_point == (2,)
    assert make_qparams([1.0], [3.0], "quint8", None, "x", "user").zero_point_given is None


def test_seed_weight_codes_clip_at_127():
    w = np.array([3, 1, 6, 16, 19, 18, 16, 16, 8], dtype=np.float32)
    qp = make_qparams([0.07086614519357681], [-14.11111068725586], "qint8", None, "w", "user")
    assert quantize(w, qp).tolist() == [28, 0, 71, 127, 127, 127, 127, 127, 99]
    assert dequantize(np.array([127]), qp)[0] == pytest.approx(9.9921, abs=1e-4)


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"scale": 0.0, "zero_point": 0}, "must be > 0"),
        ({"scale": -1.0, "zero_point": 0}, "must be > 0"),
        ({"scale": float("nan"), "zero_point": 0}, "finite"),
        ({"scale": 1e-40, "zero_point": 0}, "outside 1e-30"),
        ({"scale": 0.1, "zero_point": float("inf")}, "finite"),
        ({"scale": 0.1}, "missing 'zero_point'"),
        ({"scale": 0.1, "zero_point": 0, "dtype": "float16"}, "unknown quantized dtype"),
        ({"scale": [0.1, 0.2], "zero_point": [0, 0, 0], "axis": 0}, "2 scales but 3"),
        ({"scale": "big", "zero_point": 0}, "must be a number"),
    ],
)
def test_invalid_qparams_say_what_to_do(mapping, message):
    with pytest.raises(QParamsError, match=message):
        from_mapping(mapping, "input_qparams")


def test_fma32_rounds_once():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(2000).astype(np.float32)
    b = rng.standard_normal(2000).astype(np.float32)
    c = rng.standard_normal(2000).astype(np.float32)
    got = fma32(a, b, c)
    for ai, bi, ci, gi in zip(a[:300], b[:300], c[:300], got[:300]):
        exact = Fraction(float(ai)) * Fraction(float(bi)) + Fraction(float(ci))
        # nearest float32 to the exact value, ties to even
        lo = np.float32(float(exact))
        cands = {lo, np.nextafter(lo, np.float32(np.inf)), np.nextafter(lo, np.float32(-np.inf))}
        best = min(cands, key=lambda v: (abs(Fraction(float(v)) - exact),
                                         int(np.float32(v).view(np.int32)) & 1))
        assert gi == best


@pytest.mark.parametrize("zp, fits", [(2**31 - 1, True), (-(2**31), True), (2**31, False),
                                      (-(2**31) - 1, False), (2**31 - 0.5, True)])
def test_zero_points_must_fit_in_int32_exactly(zp, fits):
    if fits:
        assert make_qparams([0.1], [zp], "quint8", None, "q", "user").zero_point[0] == int(zp)
    else:
        with pytest.raises(QParamsError, match=r"does not fit in int32 \(-2147483648"):
            make_qparams([0.1], [zp], "quint8", None, "q", "user")
