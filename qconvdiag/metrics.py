"""Error metrics, in one place. The zero-error case is explicit: SQNR is ``None`` (infinite),
never a division by zero or a NaN.

Worked example (the seed case): float output 803.6908, quantized output 0.0: error -803.69,
max_abs 803.69, rmse 803.69, SQNR = 10*log10(803.69^2 / 803.69^2) = 0 dB, cosine 0 (the
quantized output is all zero), max_abs_lsb 803.69 (output scale 1.0), affected 1.0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class Metrics:
    """How far an output is from the float reference."""

    max_abs: float
    """Largest absolute error, float units."""
    mean_abs: float
    """Mean absolute error, float units."""
    rmse: float
    """Root mean square error, float units."""
    sqnr_db: float | None
    """10*log10(sum(ref^2) / sum(err^2)) in dB; None when the error is exactly 0 (infinite)
    or the reference is all zero."""
    cosine: float
    """Cosine similarity of (reference + error) with the reference; 1.0 when both are zero."""
    max_abs_lsb: float | None
    """max_abs in output quantization steps (None when there is no output scale)."""
    affected: float
    """Fraction of output elements whose error is not 0."""

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else float(np.sign(x) * 1e308)


ZERO_LSB = 0.0


def error_metrics(
    error: np.ndarray, reference: np.ndarray, lsb: float | None, ref_energy: float | None = None
) -> Metrics:
    """Metrics of ``error`` (approximation - reference), against ``reference``.

    ``ref_energy`` (sum of reference^2) may be passed when many errors share one reference.
    """
    e = np.ascontiguousarray(error, dtype=np.float64).reshape(-1)
    r = np.ascontiguousarray(reference, dtype=np.float64).reshape(-1)
    rr = float(np.dot(r, r)) if ref_energy is None else ref_energy
    abs_e = np.abs(e)
    # |e| has no -0.0, so its bit patterns are nonzero exactly where e is (3x faster)
    nonzero = int(np.count_nonzero(abs_e.view(np.int64)))
    if nonzero == 0:
        return Metrics(0.0, 0.0, 0.0, None, 1.0,
                       None if not lsb else ZERO_LSB, 0.0)
    max_abs = float(abs_e.max())
    mean_abs = float(abs_e.sum()) / e.size
    ee = float(np.dot(e, e))
    er = float(np.dot(e, r))
    rmse = math.sqrt(ee / e.size)
    sqnr = 10.0 * math.log10(rr / ee) if ee > 0 and rr > 0 else None
    # cosine of (reference + error) with the reference, from the dot products above
    aa = max(rr + 2 * er + ee, 0.0)
    if aa == 0 and rr == 0:
        cosine = 1.0
    elif aa == 0 or rr == 0:
        cosine = 0.0
    else:
        cosine = float(np.clip((rr + er) / math.sqrt(aa * rr), -1.0, 1.0))
    max_lsb = None if not lsb else max_abs / lsb
    affected = nonzero / e.size
    return Metrics(
        _finite(max_abs), _finite(mean_abs), _finite(rmse),
        None if sqnr is None else _finite(sqnr), cosine,
        None if max_lsb is None else _finite(max_lsb), affected,
    )


def energy_shares(deltas: dict[str, np.ndarray]) -> dict[str, float | None]:
    """Each stage's share of the error energy the stages add: ||delta||^2 / sum ||delta_j||^2.

    Shares are >= 0 and add up to 1 (None for all when no stage adds any error). The deltas
    themselves add up exactly to the total error; their energies do not have to (a stage can
    undo another's error), which is why a share measures how much error a stage *adds*.
    Seed case: weight clipping 239.3, output clipping 310, module state 255 give shares
    0.26, 0.44 and 0.30.
    """
    return shares_from_energies({k: energy(v) for k, v in deltas.items()})


def energy(delta: np.ndarray) -> float:
    """sum(delta^2)."""
    flat = np.asarray(delta, dtype=np.float64).reshape(-1)
    return float(np.dot(flat, flat))


def shares_from_energies(energies: dict[str, float]) -> dict[str, float | None]:
    total = sum(energies.values())
    if total == 0 or not math.isfinite(total):
        return {k: None for k in energies}
    return {k: e / total for k, e in energies.items()}


def summary(values: np.ndarray) -> dict[str, float]:
    """min / max / mean / absmax of an output tensor."""
    v = np.asarray(values, dtype=np.float64)
    return {
        "min": _finite(float(v.min())),
        "max": _finite(float(v.max())),
        "mean": _finite(float(v.mean())),
        "abs_max": _finite(float(np.abs(v).max())),
    }
