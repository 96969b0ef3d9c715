"""Shared test settings. Numerical tolerances are defined once, here."""

from __future__ import annotations

import os
import warnings

import pytest
from hypothesis import HealthCheck, settings

#: Relative tolerance of the stage ladder's telescoping sum (DESIGN: 1e-9 relative).
TELESCOPE_RTOL = 1e-9
#: Accuracy of the float reference (exact integer conv + float32 convs of rounding differences)
#: against a float64 conv, relative to the output's largest magnitude (measured: up to 1e-8).
REFERENCE_RTOL = 1e-7
#: Tolerance for float numbers in golden JSON files: relative, and absolute as a fraction of
#: the case's largest float output (stage states use float32 convs for their differences).
GOLDEN_RTOL, GOLDEN_ATOL_FRACTION = 1e-4, 1e-6
#: A healthy layer's RMSE over its modelled floor (budget.py), as measured on the corpus: the
#: floor model is within this band for every layer torch's eager flow makes.
FLOOR_MODEL_RANGE = (0.85, 1.55)
#: The model walk's screen (metrics.difference, fused_pass) against float64 metrics: each
#: chunk's sums of squares are float32 dots (relative, on the sums' RMSE and SQNR ratio).
SCREEN_RTOL = 1e-5
#: Emulated vs torch output codes: bit-exact.
CODES_MAX_MISMATCH = 0

settings.register_profile(
    "fast", max_examples=60, derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=int(os.environ.get("QCONVDIAG_FUZZ_EXAMPLES", "2500")),
    derandomize=True, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("QCONVDIAG_HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture(autouse=True)
def _quiet_torch_deprecations():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        yield
