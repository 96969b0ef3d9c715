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
