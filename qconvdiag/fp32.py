"""Exact float32 arithmetic on numpy arrays, as the engines' vector units do it.

numpy has no fused multiply-add. ``fma32(a, b, c)`` computes ``a * b + c`` with one float32
rounding, like ``vfmadd``: the product of two float32 values is exact in float64, the sum's
float64 rounding error is recovered exactly (TwoSum), and the only case where rounding the
float64 sum to float32 could differ from rounding the exact sum (a float64 sum that lies
exactly halfway between two float32 values while the exact sum does not) is settled by the
error's sign.
"""

from __future__ import annotations

import numpy as np


def f32(x: np.ndarray | float) -> np.ndarray:
    """As float32, without a copy when it already is."""
    return np.asarray(x, dtype=np.float32)


def round_to_f32(s: np.ndarray, err: np.ndarray) -> np.ndarray:
    """Round the exact value ``s + err`` (float64 pair, ``|err| <= ulp(s)/2``) to float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        r1 = s.astype(np.float32)
    suspect = np.flatnonzero(err)  # usually few: s is exact wherever err == 0
    if suspect.size == 0:
        return r1
    s_sub, e_sub, r_sub = s.reshape(-1)[suspect], err.reshape(-1)[suspect], r1.reshape(-1)[suspect]
    with np.errstate(over="ignore", invalid="ignore"):
        r1_64 = r_sub.astype(np.float64)
        toward = np.where(s_sub > r1_64, np.float32(np.inf), np.float32(-np.inf)).astype(np.float32)
        r2 = np.nextafter(r_sub, toward)
        r2_64 = r2.astype(np.float64)
        midpoint = (s_sub != r1_64) & ((r1_64 + r2_64) * 0.5 == s_sub)
    if not midpoint.any():
        return r1
    # Exactly halfway in float64 but not in reality: the error's sign decides.
    go_r2 = np.sign(e_sub) == np.sign(r2_64 - s_sub)
    fixed = np.where(midpoint & go_r2, r2, r_sub).astype(np.float32)
    out = r1.reshape(-1).copy()
    out[suspect] = fixed
    return out.reshape(r1.shape)


def fma32(a: np.ndarray | float, b: np.ndarray | float, c: np.ndarray | float) -> np.ndarray:
    """float32 ``a * b + c`` with a single rounding (all inputs are rounded to float32 first)."""
    a64 = f32(a).astype(np.float64)
    b64 = f32(b).astype(np.float64)
    c64 = f32(c).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        p = a64 * b64  # exact: 24 + 24 bits < 53
        s = p + c64
        bp = s - p
        err = (p - (s - bp)) + (c64 - bp)
    err = np.where(np.isfinite(s), err, 0.0)
    return round_to_f32(s, err)


def add32(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return (f32(a) + f32(b)).astype(np.float32)


def mul32(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    return (f32(a) * f32(b)).astype(np.float32)


def div32(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return (f32(a) / f32(b)).astype(np.float32)


def recip32(a: np.ndarray | float) -> np.ndarray:
    return div32(1.0, a)
