"""``budget.uses_seven_bits``: activations on 128 levels (reduce_range, x86's and fbgemm's
default), told from the codes and the step. A conv3d whose BatchNorm ran unfused on x86 was at
its floor in the model walk's table and 1.58x above it, with a QCD052 warning, in its full
diagnosis: its captured inputs reach beyond the calibration batches, and the few codes far
below the observer's range (unclamped) hid the 128 levels the rest use."""

from __future__ import annotations

import numpy as np

from qconvdiag.measure.budget import uses_seven_bits


def test_a_few_codes_far_beyond_the_range_do_not_hide_128_levels():
    rng = np.random.default_rng(0)
    inside = rng.integers(0, 128, 9_980)
    below = rng.integers(-80, -20, 20)  # 0.2% far below code 0 (unclamped)
    assert uses_seven_bits(np.concatenate([inside, below]), 2.0, 1.0)


def test_codes_spread_over_256_levels_are_8_bit():
    rng = np.random.default_rng(0)
    assert not uses_seven_bits(rng.integers(0, 256, 10_000), 2.0, 1.0)
    # 7-bit codes but a step no 7-bit observer gives (the ideal 8-bit step's): 8-bit
    assert not uses_seven_bits(rng.integers(0, 128, 10_000), 0.9, 1.0)


def test_heavy_tailed_8_bit_codes_are_not_read_as_7_bit():
    """8-bit codes at the ideal step, heavy-tailed (most near the middle, a few out to 0 and
    255): the codes but the tails span few levels, yet they are 8-bit ones (a review found a
    quantile rule read them as 7-bit, which quadruples the output floor)."""
    rng = np.random.default_rng(0)
    middle = np.clip(np.rint(128 + rng.laplace(0, 6, 19_920)), 0, 255)
    codes = np.concatenate([middle, np.zeros(40), np.full(40, 255)]).astype(np.int64)
    assert not uses_seven_bits(codes, 1.0, 1.0)


def test_7_bit_qparams_on_data_wider_than_their_calibration_are_7_bit():
    """x86's default qconfig (reduce_range) calibrated on other data, run on data about 30%
    wider (a healthy sweep's 1x1 conv): its codes spread past 128 levels and below code 0, so
    they cannot show the 7 bits, and the floor was the 8-bit one: 1.77x above it, with a QCD052
    warning for the default qconfig's step, and --fail-on warning exited 1. Codes beyond the
    dtype at a 7-bit step are 7-bit qparams (8-bit ones that coarse would cover the data): the
    conv is at its 7-bit floor, with QCD051's saturation to say (info, a trim's few). 8-bit
    codes of that spread that saturate nothing stay 8-bit."""
    import qconvdiag
    from qconvdiag.measure.budget import beyond_seven_bits
    from qconvdiag.quantization.qparams import per_tensor
    from tests.repo import ROOT

    case = qconvdiag.load_case(ROOT / "tests" / "data" / "seven_bit_beyond_calibration.pt")
    report = qconvdiag.diagnose(case, qconvdiag.Options(engine="x86"))
    given = report.path("as_given")
    assert given is not None and given.budget is not None
    assert given.budget.output_bits == 7 and given.budget.verdict == "at_floor"
    assert not [f for f in report.findings if f.severity != "info"]
    qp = per_tensor(0.02, 60, "quint8", "t")
    rng = np.random.default_rng(0)
    spread = rng.integers(0, 200, 10_000)
    assert beyond_seven_bits(np.concatenate([spread, [-12]]), qp, 1.5)
    assert not beyond_seven_bits(spread, qp, 1.5)  # inside the dtype: 8-bit qparams may
    assert not beyond_seven_bits(np.concatenate([spread, [-12]]), qp, 1.0)  # an 8-bit step
    # qparams a user wrote: misplaced 8-bit ones saturate too (a review's case)
    user = per_tensor(0.02, 60, "quint8", "user")
    assert not beyond_seven_bits(np.concatenate([spread, [-12]]), user, 1.5)


def test_the_walk_s_screen_and_its_detail_read_7_bits_alike_beyond_the_calibration():
    """A model calibrated on inputs half as wide as those captured: the last conv saturates.
    Its detail (the emulation's unclamped codes) read the 7 bits beyond the dtype, its screen
    (the model's clamped codes) did not: the table said broken, the detail above its floor
    (a review found it). The screen tells saturation from the float output now."""
    import copy
    import warnings

    import pytest

    torch = pytest.importorskip("torch")
    from torch.ao.quantization import convert, fuse_modules, prepare

    import qconvdiag
    from qconvdiag.model.walk import WalkOptions, walk_model
    from tests import models
    from tests.cpu import healthy_qconfig

    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    model = models.Net2d().eval()
    models._randomize_bn(model, 0)
    q = fuse_modules(copy.deepcopy(model), models.FUSE_2D)
    q.qconfig = healthy_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        with torch.no_grad():
            for i in range(4):
                q(models.inputs(2, 8, 100 + i) * 0.5)
        convert(q, inplace=True)
        bundle = qconvdiag.capture_model(model, q, models.inputs(2, 8, 7))
    report = walk_model(bundle, WalkOptions(top=len(bundle.layers))).report
    for row in report.layers:
        detail = report.detail(row.name)
        assert detail is not None
        given = detail.path("as_given")
        assert given is not None and given.budget is not None
        assert row.verdict == given.budget.verdict, row.name
