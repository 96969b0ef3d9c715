"""``--save-outputs FILE.npz``: the float output, and per path its quantized output, integer
codes, torch's codes and the cumulative output after each stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..io import _npz_bytes, atomic_write
from ..report import Report


def save_outputs(report: Report, path: str | Path) -> Path:
    p = Path(path)
    data = _npz_bytes({k: np.ascontiguousarray(v) for k, v in report.tensors.items()})
    atomic_write(p, lambda tmp: tmp.write_bytes(data))
    return p
