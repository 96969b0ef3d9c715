"""The error budget: the floor model against independent references (convs of squares, the
healthy corpus), and the forum's worked numbers (docs/stages.md)."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag import Options, diagnose
from qconvdiag.case import build_case
from qconvdiag.casefile.generate import forum_case
from qconvdiag.measure.budget import input_noise_gain, weight_noise_gains
from tests.conftest import FLOOR_MODEL_RANGE
from tests.corpus import healthy_layer, healthy_specs

GEOMETRIES = [
    dict(x=(2, 4, 9, 7), w=(6, 4, 3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(x=(1, 6, 11), w=(6, 2, 5), stride=3, padding=4, dilation=2, groups=3),
    dict(x=(1, 4, 5, 6, 4), w=(4, 1, 3, 3, 2), stride=1, padding=(1, 0, 1), groups=4),
    dict(x=(3, 2, 8, 8), w=(5, 2, 1, 1), stride=2),
]


def _torch_conv(x, w, geo):  # type: ignore[no-untyped-def]
    import torch
    import torch.nn.functional as F

    conv = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}[w.ndim]
    return conv(torch.from_numpy(x), torch.from_numpy(w), None, geo.stride, geo.padding,
                geo.dilation, geo.groups).numpy()


@pytest.mark.parametrize("spec", GEOMETRIES)
def test_noise_gains_equal_convs_of_squares(spec):
    rng = np.random.default_rng(0)
    spec = dict(spec)
    x = rng.standard_normal(spec.pop("x"))
    w = rng.standard_normal(spec.pop("w"))
    case = build_case(x.astype(np.float32), w.astype(np.float32), None, **spec)
    g = case.geometry
    x64, w64 = case.input.astype(np.float64), case.weight.astype(np.float64)
    # input noise: every real input position carries unit variance, so an output's variance
    # is conv(ones, w^2); the gain is its mean
    ones = np.ones_like(x64[:1])
    assert input_noise_gain(case) == pytest.approx(float(_torch_conv(ones, w64 ** 2, g).mean()),
                                                   rel=1e-12)
    # weight noise: output channel o's variance per unit of weight variance is the window sum
    # of x^2 over its group's channels: a conv of x^2 with ones
    per_o = _torch_conv(x64 ** 2, np.ones_like(w64), g)
    want = per_o.mean(axis=tuple(i for i in range(per_o.ndim) if i != 1))
    assert weight_noise_gains(case) == pytest.approx(want, rel=1e-12)


def test_the_forum_floor_is_the_worked_example():
    report = diagnose(forum_case(), Options(engine="x86"))
    b = next(p for p in report.paths if p.name == "as_given").budget
    assert b.stage("input_rounding").floor == pytest.approx(0.802, abs=5e-4)
    assert b.stage("weight_rounding").floor == pytest.approx(1.529, abs=5e-4)
    assert b.stage("output_rounding").floor == pytest.approx(0.910, abs=5e-4)
    assert b.floor_rmse == pytest.approx(1.951, abs=5e-4)
    assert b.verdict == "broken" and b.ratio == pytest.approx(803.6908 / 1.9514, rel=1e-3)
    assert report.verdict.floor_sqnr_db == pytest.approx(52.3, abs=0.05)


@pytest.mark.parametrize("spec", healthy_specs()[::7], ids=lambda s: "/".join(map(str, s[1:5])))
def test_the_floor_model_predicts_healthy_layers(spec):
    """Layers from torch's eager flow land on their floor: the model is neither lenient nor
    harsh."""
    lay = healthy_layer(*spec)
    for p in diagnose(lay.case, Options(engine=lay.engine)).paths:
        lo, hi = FLOOR_MODEL_RANGE
        assert lo <= p.budget.ratio <= hi, (p.name, p.budget.ratio)
        assert p.budget.verdict == "at_floor"
