"""render/html_data.py: the numbers the HTML report draws, read from a finished diagnosis."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qconvdiag.diagnosis import run_diagnosis
from qconvdiag.io import load_case
from qconvdiag.quantization.qparams import QParams
from qconvdiag.render import html_data as data
from tests.repo import ROOT


@pytest.fixture(scope="module", params=["forum_conv.pt", "relu_per_channel.npz",
                                        "conv1d_handmade.pt"])
def diagnosed(request):
    case = load_case(ROOT / "samples" / request.param)
    return case, run_diagnosis(case)


def test_path_errors_are_the_reported_totals(diagnosed):
    """quantized - float from the kept codes gives the report's own total error."""
    _, d = diagnosed
    for run in d.runs:
        errors = data.path_errors(run)
        assert errors is not None
        total = run.report.total
        err = errors.error
        assert math.isclose(float(np.sqrt(np.mean(err * err))), total.rmse, rel_tol=1e-6,
                            abs_tol=1e-9)
        assert math.isclose(float(np.abs(err).max()), total.max_abs, rel_tol=1e-6,
                            abs_tol=1e-9)


def test_forum_error_is_the_whole_float_output(diagnosed):
    case, d = diagnosed
    if case.source.endswith("forum_conv.pt"):
        errors = data.path_errors(d.runs[0])
        assert d.runs[0].report.name == "as_given"
        assert errors.quantized.tolist() == [[[[0.0]]]]
        assert errors.error.item() == pytest.approx(-803.6908, abs=1e-4)


def test_channel_errors_and_the_worst_channels():
    err = np.zeros((2, 5, 3, 3))
    err[1, 3, 0, 0] = -4.0
    err[0, 1] = 1.0
    err[0, 4, 2, 2] = 2.0
    ce = data.channel_errors(err)
    assert ce.max_abs.tolist() == [0.0, 1.0, 0.0, 4.0, 2.0]
    assert ce.rmse[3] == pytest.approx(4 / math.sqrt(18))
    assert ce.worst(3) == [3, 1, 4]  # by RMSE: 4/sqrt(18), 1/sqrt(2), 2/sqrt(18)
    assert ce.worst(10) == [3, 1, 4]  # channels without error are never mapped


def test_block_argmax_finds_each_block_s_largest_entry():
    m = np.arange(20.0).reshape(4, 5)
    m[0, 0] = 100.0
    rows, cols = data.block_argmax(m, (2, 2))
    # blocks: rows 0-1 x cols 0-1, 2-3, 4; rows 2-3 likewise (edge blocks smaller)
    assert list(zip(rows.tolist(), cols.tolist())) == [(0, 0), (1, 3), (1, 4),
                                                       (3, 1), (3, 3), (3, 4)]


def _errors(shape, spike_at, spike=9.0, seed=0):
    rng = np.random.default_rng(seed)
    err = rng.uniform(-1, 1, shape)
    err[spike_at] = spike
    quantized = rng.normal(size=shape)
    return data.PathErrors(quantized, err)


def test_a_large_map_is_downsampled_and_keeps_exact_positions():
    errors = _errors((2, 3, 130, 70), (1, 2, 100, 33))
    hm = data.heatmap(errors, 2)
    assert (hm.batch, hm.depth, hm.shape, hm.block) == (1, None, (130, 70), (3, 2))
    assert hm.downsampled and hm.cells == (44, 35)
    assert len(hm.positions) == 44 * 35
    at = tuple(hm.positions.T)
    assert np.array_equal(hm.error, errors.error[at])  # each cell is a real element
    assert np.array_equal(hm.quantized, errors.quantized[at])
    assert (1, 2, 100, 33) in {tuple(p) for p in hm.positions.tolist()}
    # each cell holds its block's largest |error|
    block = np.abs(errors.error[1, 2, 99:102, 32:34]).max()
    cell = hm.error[(100 // 3) * 35 + 33 // 2]
    assert abs(cell) == block


def test_a_small_map_is_whole():
    errors = _errors((1, 4, 5, 6), (0, 1, 4, 5))
    hm = data.heatmap(errors, 1)
    assert not hm.downsampled and hm.cells == (5, 6)
    assert hm.positions.tolist()[:2] == [[0, 1, 0, 0], [0, 1, 0, 1]]


def test_conv1d_is_a_strip_and_conv3d_a_slice_at_the_worst_depth():
    strip = data.heatmap(_errors((2, 2, 1500), (1, 0, 1234)), 0)
    assert strip.shape == (1, 1500) and strip.block == (1, 3) and strip.cells == (1, 500)
    assert strip.positions.shape[1] == 3 and strip.batch == 1
    assert [1, 0, 1234] in strip.positions.tolist()
    cube = data.heatmap(_errors((1, 2, 4, 5, 6), (0, 1, 2, 3, 4)), 1)
    assert cube.depth == 2 and cube.shape == (5, 6)
    assert cube.positions.shape == (30, 5)
    assert set(cube.positions[:, 2].tolist()) == {2}


def test_histogram_marks_the_grid_the_zero_point_and_the_clipped_mass():
    qp = QParams((0.1,), (10,), "quint8")  # representable: [-1.0, 24.5]
    values = np.concatenate([np.linspace(-2, 5, 700), [30.0]])
    h = data.value_histogram(values, qp)
    assert (h.low, h.high) == (pytest.approx(-1.0), pytest.approx(24.5))
    assert h.below == int(np.count_nonzero(values < -1.0)) and h.above == 1
    assert int(h.counts.sum()) == h.total == values.size
    assert -1.0 in h.edges.tolist() and 24.5 in h.edges.tolist()
    centers = (h.edges[:-1] + h.edges[1:]) / 2
    assert h.counts[h.clipped].sum() == h.below + h.above  # clipped bins hold the clipped values
    assert np.all((centers[h.clipped] < h.low) | (centers[h.clipped] > h.high))
    assert h.zero == 0.0 and not h.codes
    assert len(h.grid) <= data.GRID_LINES + 1
    assert np.allclose(np.diff(h.grid), 0.1 * h.grid_every)
    assert np.allclose((h.grid + 1.0) / 0.1, np.round((h.grid + 1.0) / 0.1))  # on levels


def test_per_channel_values_are_shown_in_codes_with_ranges_per_channel():
    w = np.zeros((3, 2, 2, 2), np.float32)
    w[0] = 1.0
    w[1, 0, 0, 0] = 5.0  # beyond channel 1's range: 127 * 0.01 = 1.27
    w[2] = -0.5
    qp = QParams((0.01, 0.01, 0.004), (0, 0, 0), "qint8", axis=0)
    h = data.value_histogram(w, qp)
    assert h.codes and (h.low, h.high) == (-128.0, 127.0) and h.zero is None
    assert (h.below, h.above) == (0, 1)  # 5.0 / 0.01 = 500 > 127; -0.5 / 0.004 = -125 fits
    r = data.channel_ranges(w, qp)
    assert r.clipped.tolist() == [0, 1, 0]
    assert r.high.tolist() == pytest.approx([1.27, 1.27, 0.508])
    assert data.channel_ranges(w, QParams((0.01,), (0,), "qint8")) is None


def test_waterfall_rows_build_up_to_the_total(diagnosed):
    _, d = diagnosed
    for run in d.runs:
        rows = data.waterfall(run.report)
        assert [r.id for r in rows] == [s.id for s in run.report.stages]
        level = 0.0
        for r in rows:
            assert r.start == level
            level = r.end
            if not r.applies:
                assert r.reason and r.start == r.end
        assert level == pytest.approx(run.report.total.rmse)
