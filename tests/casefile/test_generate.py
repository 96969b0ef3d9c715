"""random --seed and the recipes."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag.arithmetic.float_conv import conv64
from qconvdiag.casefile.generate import DISTRIBUTIONS, RandomSpec, forum_case, generate
from qconvdiag.errors import UsageError
from qconvdiag.io import save_case


def test_forum_recipe_reenacts_the_thread():
    case = forum_case()
    assert case.input.reshape(-1).tolist() == [4, 19, 13, 0, 3, 19, 7, 3, 17]
    assert case.weight.reshape(-1).tolist() == [3, 1, 6, 16, 19, 18, 16, 16, 8]
    assert float(case.bias[0]) == pytest.approx(-0.309223473072052, abs=1e-7)
    y = conv64(case.input, case.weight, case.bias, case.geometry)
    assert y.item() == pytest.approx(803.6908, abs=1e-4)
    s = case.setup
    assert s.input_qparams.scale[0] == pytest.approx(0.07480315119028091)
    assert s.weight_qparams.scale[0] == pytest.approx(0.07086614519357681)
    assert s.weight_qparams.zero_point_given[0] == pytest.approx(-14.1111, abs=1e-4)
    assert s.input_codes.reshape(-1).tolist() == [53, 254, 174, 0, 40, 254, 94, 40, 227]
    assert s.weight_codes.reshape(-1).tolist() == [28, 0, 71, 127, 127, 127, 127, 127, 99]
    assert s.output_qparams is None
    assert not s.module.weight_codes.any() and not s.module.bias.any()
    assert s.module.output_qparams.scale == (1.0,) and s.module.output_qparams.zero_point == (0,)


def test_forum_recipe_as_given_output_is_zero_as_in_the_thread():
    from qconvdiag import Options, diagnose

    report = diagnose(forum_case(), Options(engine="x86"))
    as_given = report.path("as_given")
    assert as_given.output_summary.values == (0.0,)
    assert report.float_output.values[0] == pytest.approx(803.6908, abs=1e-4)


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
def test_random_is_reproducible_byte_for_byte(dist, tmp_path):
    a = save_case(generate(RandomSpec(seed=7, distribution=dist)), tmp_path / "a.npz")
    b = save_case(generate(RandomSpec(seed=7, distribution=dist)), tmp_path / "b.npz")
    assert a.read_bytes() == b.read_bytes()
    c = save_case(generate(RandomSpec(seed=8, distribution=dist)), tmp_path / "c.npz")
    assert c.read_bytes() != a.read_bytes()


def test_forum_recipe_file_is_reproducible(tmp_path):
    a = save_case(forum_case(), tmp_path / "a.pt").read_bytes()
    b = save_case(forum_case(), tmp_path / "b.pt").read_bytes()
    assert a == b


def test_random_geometries_cover_every_conv_rank():
    ops = {generate(RandomSpec(seed=s)).op for s in range(30)}
    assert ops == {"conv1d", "conv2d", "conv3d"}


def test_shape_options_are_obeyed():
    case = generate(RandomSpec(seed=1, input_shape=(2, 8, 10, 10), weight_shape=(8, 1, 3, 3),
                               groups=8, padding=1, stride=2))
    assert case.input.shape == (2, 8, 10, 10) and case.geometry.groups == 8
    assert case.output_shape == (2, 8, 5, 5)


def test_distributions_have_their_shape():
    relu = generate(RandomSpec(seed=2, distribution="relu")).input
    ints = generate(RandomSpec(seed=2, distribution="int")).input
    assert relu.min() == 0 and np.array_equal(ints, np.round(ints)) and ints.max() < 20


def test_per_channel_varied_weights_differ_by_channel():
    w = generate(RandomSpec(seed=3, weight_shape=(16, 4, 3, 3), input_shape=(1, 4, 8, 8),
                            per_channel_varied=True)).weight
    r = np.abs(w.reshape(16, -1)).max(axis=1)
    assert r.max() / r.min() > 5


def test_unknown_recipe_and_distribution():
    with pytest.raises(UsageError, match="unknown recipe"):
        generate(RandomSpec(seed=0, recipe="nope"))
    with pytest.raises(UsageError, match="unknown distribution"):
        generate(RandomSpec(seed=0, distribution="cauchy"))


def test_forum_recipe_notes_name_no_path_outside_the_repository():
    notes = forum_case().notes
    assert notes and all("../" not in n and "shared" not in n for n in notes), notes
