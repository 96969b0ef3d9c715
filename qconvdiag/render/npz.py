"""``--save-outputs FILE.npz``: the float output, and per path its quantized output, integer
codes, torch's codes and the cumulative output after each stage, named as DESIGN.md says
(``<path>.<name>``, or ``<path>@<engine>.<name>`` with several engines)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..casefile.write import npz_bytes as encode_npz
from ..measure.evidence import OutputArrays
from ..writes import atomic_write

if TYPE_CHECKING:
    from ..diagnosis import Diagnosis


def named_arrays(arrays: OutputArrays) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {"float_output": arrays.float_output}
    multi_engine = len({p.engine for p in arrays.paths}) > 1
    for p in arrays.paths:
        prefix = f"{p.path}@{p.engine}" if multi_engine else p.path
        for name, value in (("quantized", p.quantized), ("quantized_int", p.quantized_int),
                            ("torch_int", p.torch_int)):
            if value is not None:
                out[f"{prefix}.{name}"] = value
        for sid, state in p.stages.items():
            out[f"{prefix}.stage.{sid}"] = state
    return out


def render_npz(diagnosis: Diagnosis) -> bytes:
    """The npz archive of the diagnosis's kept arrays (``Options.keep_arrays``)."""
    return npz_bytes(diagnosis.arrays)


def npz_bytes(arrays: OutputArrays) -> bytes:
    """The bytes of the npz ``save_outputs`` writes."""
    return encode_npz({k: np.ascontiguousarray(v) for k, v in named_arrays(arrays).items()})


def save_outputs(arrays: OutputArrays, path: str | Path) -> Path:
    p = Path(path)
    atomic_write(p, npz_bytes(arrays))
    return p
