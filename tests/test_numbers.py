"""The two number forms (qconvdiag/numbers.py), on the docstring's examples."""

from __future__ import annotations

from qconvdiag.numbers import fmt, table_number


def test_prose_numbers():
    assert [fmt(x) for x in (0.0, 0.0591, 3.0, 1234.5678, 2.5e-05, -803.69080)] == [
        "0", "0.0591", "3", "1234.57", "2.5e-05", "-803.6908"]


def test_table_numbers():
    assert [table_number(x) for x in (None, 0.0, 803.6908, 2.5e-05, 239.323, 1e6)] == [
        "-", "0", "803.6908", "2.500e-05", "239.323", "1.000e+06"]
    assert table_number(0.05912, 3) == "0.059"
