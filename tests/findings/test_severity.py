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
