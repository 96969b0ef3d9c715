"""The fast routes give the same numbers as the plain ones: the float reference derived from an
exact integer conv (also checked on every generated case in test_stages), the int8-GEMM exact
accumulator, and the sparse scatter convs of mostly-zero stage differences."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag.arithmetic import accumulate
from qconvdiag.arithmetic.float_conv import (
    ChannelSparse,
    DequantizedInput,
    _conv_sparse_input,
    _conv_sparse_weight,
    conv64,
    conv_diff,
    conv_diff_any,
)
from qconvdiag.case import Geometry, build_case
from qconvdiag.casefile.generate import RandomSpec, generate
from qconvdiag.diagnosis import Options, diagnose_runs
from qconvdiag.measure.blocks import blocks
from qconvdiag.measure.reference import input_steps
from qconvdiag.quantization.qparams import dequantize, make_qparams, quantize
from tests.conftest import REFERENCE_RTOL


def _random_geometry(rng: np.random.Generator, max_groups: int = 4):
    while True:
        dims = int(rng.integers(1, 4))
        groups = int(rng.choice([g for g in (1, 1, 2, 3, 4) if g <= max_groups]))
        cin_g, out_g = int(rng.integers(1, 9)), int(rng.integers(1, 6))
        k = tuple(int(v) for v in rng.integers(1, 4, dims))
        sp = tuple(int(v) for v in rng.integers(3, 9, dims))
        stride = tuple(int(v) for v in rng.integers(1, 3, dims))
        pad = tuple(int(v) for v in rng.integers(0, 3, dims))
        dil = tuple(int(v) for v in rng.integers(1, 3, dims))
        if all(s + 2 * p - d * (kk - 1) - 1 >= 0 for s, p, d, kk in zip(sp, pad, dil, k)):
            g = Geometry(stride, pad, dil, groups)
            return g, (int(rng.integers(1, 3)), cin_g * groups, *sp), (out_g * groups, cin_g, *k)


def test_float_reference_does_not_depend_on_the_engines_or_observers():
    case = generate(RandomSpec(seed=5, recipe="handmade"))
    ref = diagnose_runs(case, Options(engine="qnnpack"))[0][0].ladder.float_output
    for opts in (Options(engine="all"), Options(engine="onednn"),
                 Options(calib=case.input[:1] * 0.5)):
        runs, _ = diagnose_runs(case, opts)
        assert all(np.array_equal(r.ladder.float_output, ref) for r in runs)


def test_realistic_layer_reference_and_stages():
    """A ResNet-like layer with a user setup that clips a few inputs and weights: the sparse
    routes run, the reference stays float64-accurate, the ladder still telescopes."""
    from qconvdiag.case import QuantSetup
    from qconvdiag.quantization.qparams import make_qparams

    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((1, 32, 20, 20)), 0).astype(np.float32)
    x[0, 3, 4, 4] = 40.0  # an outlier the user's input scale clips
    w = (rng.standard_normal((48, 32, 3, 3)) / 20).astype(np.float32)
    b = (rng.standard_normal(48) * 0.1).astype(np.float32)
    setup = QuantSetup(
        make_qparams([3.0 / 255], [0], "quint8", None, "i", "user"),
        make_qparams([float(w.max()) / 130], [0], "qint8", None, "w", "user"),
        make_qparams([0.05], [128], "quint8", None, "o", "user"))
    case = build_case(x, w, b, padding=1, setup=setup)
    runs, _ = diagnose_runs(case, Options(engine="x86", keep_arrays=True))
    want = conv64(x, w, b, case.geometry)
    for run in runs:
        assert float(np.abs(run.ladder.float_output - want).max()) <= (
            REFERENCE_RTOL * float(np.abs(want).max()))
        total = run.ladder.final - run.ladder.float_output
        assert np.allclose(sum(run.ladder.deltas.values()), total, rtol=0, atol=1e-9 * 40)
    given = next(r for r in runs if r.report.name == "as_given")
    assert given.report.stage("input_clipping").delta.max_abs > 1.0
    assert given.report.stage("weight_clipping").delta.max_abs > 0


@pytest.mark.parametrize("seed", range(6))
def test_sparse_convs_equal_the_dense_conv(seed):
    rng = np.random.default_rng(seed)
    for _ in range(40):
        g, xs, ws = _random_geometry(rng)
        x = rng.standard_normal(xs).astype(np.float32)
        w = rng.standard_normal(ws).astype(np.float32)
        sparse_x = x * (rng.random(xs) < 0.1)
        sparse_w = w * (rng.random(ws) < 0.1)
        shape = conv64(x, w, None, g).shape
        for a, b, fn in ((x, sparse_w, _conv_sparse_weight), (sparse_x, w, _conv_sparse_input)):
            want = conv64(a, b, None, g)
            got = fn(a, b, g, shape)
            assert np.allclose(got, want, rtol=1e-12, atol=1e-12), (fn.__name__, g, xs, ws)


def test_conv_diff_picks_the_sparse_route_and_agrees():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 64, 24, 24)).astype(np.float32)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float32)
    g = Geometry((1, 1), (1, 1), (1, 1), 1)
    dw = np.zeros_like(w)
    dw[np.arange(64), rng.integers(0, 64, 64), 1, 1] = 0.01  # one clipped weight per channel
    dx = np.zeros_like(x)
    dx[0, rng.integers(0, 64, 30), rng.integers(0, 24, 30), rng.integers(0, 24, 30)] = 0.5
    for a, b in ((x, dw), (dx, w)):
        want = conv64(a, b, None, g)
        assert np.allclose(conv_diff(a, b, g), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True])
def test_dequantized_input_equals_the_dequantized_array(per_channel, monkeypatch):
    """conv_diff of dequant(codes) formed lazily (float64 per channel, float32 for a conv) gives
    the numbers of the materialised float64 array, on every route (sparse weight, sparse
    input, dense conv)."""
    from qconvdiag.arithmetic import float_conv

    rng = np.random.default_rng(3)
    g = Geometry((1, 1), (1, 1), (1, 1), 1)
    x = np.maximum(rng.standard_normal((2, 16, 12, 12)), 0).astype(np.float32)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    qp = (make_qparams(list(rng.random(16) * 0.05 + 0.01), [0] * 16, "quint8", 1, "i", "user")
          if per_channel else make_qparams([0.023], [3], "quint8", None, "i", "user"))
    routes: list[str] = []
    for name in ("_conv_sparse_weight", "_conv_sparse_input", "_conv"):
        fn = getattr(float_conv, name)
        monkeypatch.setattr(float_conv, name,
                            lambda *a, _f=fn, _n=name: routes.append(_n) or _f(*a))
    for xs in (x, x * (rng.random(x.shape) < 0.005)):
        codes = quantize(xs, qp)
        lazy, dense = DequantizedInput(codes, qp), dequantize(codes, qp)
        assert lazy.count_nonzero() == np.count_nonzero(dense)
        assert np.array_equal(lazy.dense32(), dense.astype(np.float32))
        assert np.array_equal(lazy.dense32(minus=xs), (dense - xs).astype(np.float32))
        flat = rng.integers(0, xs.size, 50)
        assert np.array_equal(lazy.at(flat), dense.reshape(-1)[flat])
        for weight in (w * (rng.random(w.shape) < 0.01), w):
            assert np.allclose(conv_diff(lazy, weight, g), conv_diff(dense, weight, g),
                               rtol=1e-12, atol=1e-12)
    assert {"_conv_sparse_weight", "_conv_sparse_input", "_conv"} <= set(routes)


def test_channel_sparse_scatter_equals_the_dense_one(monkeypatch):
    """A few clipped weights feeding a few output channels: the compact result stores those
    channels only; densified, read block by block, and its energy added to another
    array, it gives the dense scatter's numbers."""
    from qconvdiag import parallel as blocks_module  # blocks() and BLOCK live there

    rng = np.random.default_rng(8)
    g = Geometry((1, 1), (1, 1), (1, 1), 1)
    x = rng.standard_normal((2, 6, 9, 9)).astype(np.float32)
    dw = np.zeros((8, 6, 3, 3), np.float32)
    dw[[1, 1, 5], [0, 3, 2], [0, 1, 2], [2, 1, 0]] = [0.5, -0.25, 0.125]
    dense = conv_diff(x, dw, g)
    compact = conv_diff_any(x, dw, g, compact=True)
    assert isinstance(compact, ChannelSparse) and list(compact.channels) == [1, 5]
    assert np.array_equal(compact.dense(), dense)
    rows = dense.reshape(2 * 8, -1)
    monkeypatch.setattr(blocks_module, "BLOCK", 20)  # blocks of part rows
    for k in blocks(dense.shape) + blocks((2, 8, 9, 9))[:3]:
        assert np.array_equal(compact.block(k), k.of(rows))
    monkeypatch.setattr(blocks_module, "BLOCK", 200)  # blocks of several rows
    for k in blocks(dense.shape):
        assert np.array_equal(compact.block(k), k.of(rows))
    base = rng.standard_normal(rows.shape)
    added = float(((base + rows) ** 2).sum() - (base ** 2).sum())
    assert compact.row_energy_added(base) == pytest.approx(added, rel=1e-12)
    dw[:, 0, 0, 0] = 1.0  # every output channel: no saving, a dense array
    assert isinstance(conv_diff_any(x, dw, g, compact=True), np.ndarray)


def test_input_steps_match_the_plain_formulas():
    """The clipping step is conv(clip(x) - x, w) and the rounding step conv(dequant(codes) -
    clip(x), w), found without float64 copies of the input."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32) * 3
    w = rng.standard_normal((4, 8, 3, 3)).astype(np.float32)
    case = build_case(x, w, None, padding=1)
    for qp in (make_qparams([0.01], [128], "quint8", None, "i", "user"),  # most inputs clip
               make_qparams([0.05], [128], "quint8", None, "i", "user"),  # a few clip
               make_qparams([0.2], [128], "quint8", None, "i", "user")):  # nothing clips
        codes = quantize(x, qp)
        lo, hi = 0 - 128 * qp.scale[0], 127 * qp.scale[0]
        clipped = np.clip(x.astype(np.float64), lo, hi)
        clip_step, rounding_step, any_clip = input_steps(case, qp, codes)
        assert any_clip == bool((clipped != x).any())
        want_round = conv64(dequantize(codes, qp) - clipped, w, None, case.geometry)
        assert np.allclose(rounding_step, want_round, rtol=1e-5, atol=1e-6)
        if any_clip:
            want_clip = conv64(clipped - x, w, None, case.geometry)
            assert np.allclose(clip_step, want_clip, rtol=1e-5, atol=1e-5)
        else:
            assert clip_step is None


@pytest.mark.parametrize("seed", range(4))
def test_int8_gemm_accumulator_is_exact(seed, monkeypatch):
    """The int8 GEMM route equals the float conv route bit for bit (zero points, wrapped pad
    codes, unsigned or signed codes, groups, strides, dilations, blocks of rows)."""
    exact_here = accumulate.int_gemm_exact()  # False without AVX512-VNNI: the route is refused
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(accumulate, "IM2COL_BLOCK_BYTES", 64 if seed % 2 else 1 << 24)
    used, dtypes = 0, set()
    for _ in range(100):
        g, xs, ws = _random_geometry(rng)
        signed_x, unsigned_w = rng.random() < 0.3, rng.random() < 0.3
        x = rng.integers(-128, 128, xs) if signed_x else rng.integers(0, 256, xs)
        w = rng.integers(0, 256, ws) if unsigned_w else rng.integers(-128, 128, ws)
        # mostly moderate zero points (int32 route); now and then one far enough out that
        # the bound K * |x - zx| * |w - zw| leaves int32 (int64 route)
        zx = int(rng.integers(-20, 300)) if rng.random() < 0.8 else int(rng.integers(-2**20, 2**20))
        zw = (rng.integers(-130, 260, ws[0]) if rng.random() < 0.5
              else np.zeros(ws[0], dtype=np.int64))
        pad = int(rng.choice([zx, zx % 256, int(rng.integers(0, 256))]))
        fast = accumulate._gemm_accumulator(x, zx, w, zw, g, pad)
        with monkeypatch.context() as m:
            m.setattr(accumulate, "int_gemm_exact", lambda: False)
            slow = accumulate.exact_accumulator(x, zx, w, zw, g, pad)
        if not exact_here:
            assert fast is None
            continue
        if fast is not None:
            used += 1
            assert np.array_equal(fast, slow), (g, xs, ws)
            dtypes.add(fast.dtype)
            if fast.dtype == np.int32:  # only when every partial sum fits
                assert np.abs(slow).max() < 2**31
    assert used >= 5 or not exact_here
    assert dtypes == {np.dtype(np.int32), np.dtype(np.int64)} or not exact_here
