"""Numbers in words: the two short forms of a float that messages and tables use.

``fmt`` for prose (findings' messages): 4 decimals up to 1000, 2 up to 1e6, else 4 significant
digits: 0.05910 -> ``0.0591``, 1234.5678 -> ``1234.57``, 2.5e-05 -> ``2.5e-05``.
``table_number`` for table cells: ``digits`` decimals from 1e-3 to 1e5, else scientific:
803.69080 -> ``803.6908``, 2.5e-05 -> ``2.500e-05``; None -> ``-``.
"""

from __future__ import annotations


def _fixed(x: float, digits: int) -> str:
    """``digits`` decimals, trailing zeros dropped: 0.05910 -> 0.0591, 3.0 -> 3."""
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def fmt(x: float) -> str:
    """Short human number: 4 significant digits, no exponent for everyday magnitudes."""
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e6:
        return _fixed(x, 4) if ax < 1000 else f"{x:.2f}"
    return f"{x:.4g}"


def table_number(x: float | None, digits: int = 4) -> str:
    """A table cell: ``digits`` decimals (trailing zeros dropped) from 1e-3 to 1e5, else
    scientific with ``digits - 1`` decimals; ``-`` for None."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e5:
        return _fixed(x, digits)
    return f"{x:.{digits - 1}e}"
