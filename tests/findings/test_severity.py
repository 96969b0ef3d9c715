"""A finding's severity follows what its cause costs, and a path at its floor gets no warning."""

from __future__ import annotations

from qconvdiag.findings.base import severity_of
from qconvdiag.measure.budget import MATERIAL


def test_a_path_at_its_floor_gets_no_warning():
    """Its stages' excess is rounding's scatter: a material share of it (a 7-bit output step on
    qnnpack, 1.26x the floor, warned before) is at most info there; above the floor the same
    excess warns, and a broken path's main cause is an error."""
    energy = 2 * MATERIAL  # of a floor energy of 1
    assert severity_of(energy, 1.0, energy, "at_floor") == "info"
    assert severity_of(energy, 1.0, energy, "at_floor", floor="warning") == "warning"
    assert severity_of(energy, 1.0, energy, "above_floor") == "warning"
    assert severity_of(100.0, 1.0, 100.0, "broken") == "error"


def test_saturations_the_float_model_does_not_give_are_the_received_input_s():
    """In a model walk, a conv's outputs that saturate where the float model's own output there
    does not are the received input's doing (a sweep: a conv after one qnnpack kept stale,
    QCD068; 2688 saturate, 3 of the float model's own, only 775 beyond its range): counted as
    fed astray, so QCD051 says so without widening a scale that fits the float model."""
    from types import SimpleNamespace

    import numpy as np

    from qconvdiag.findings.output_rules import _beyond_float_model

    rng = np.random.default_rng(0)
    y0 = rng.uniform(0.0, 13.0, 131072)
    y0[:1913] = rng.uniform(13.5, 16.8, 1913)  # beyond the scale, within the float range
    y0[1913:2688] = rng.uniform(17.0, 27.0, 775)  # beyond the float range too
    own = rng.uniform(0.0, 13.0, 131072)
    own[:3] = 14.0
    step, representable = 0.0524, (0.0, 13.35)
    case = SimpleNamespace(output_range=(0.0, 16.9), model_output=None)
    ctx = SimpleNamespace(case=case)
    assert _beyond_float_model(ctx, y0, step, representable, False, True) == 775  # by range
    case.model_output = own
    astray = _beyond_float_model(ctx, y0, step, representable, False, True)
    assert astray == 2688 - 3 and 2 * astray >= 2688  # by count: fed astray
    case.model_output = y0.copy()  # the float model saturates as much: the conv's own doing
    assert _beyond_float_model(ctx, y0, step, representable, False, True) == 775
