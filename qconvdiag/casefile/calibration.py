"""Calibration data for the production observers (``--calib``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..case import ConvCase, as_float_tensor, check_float32_range, validate_shapes
from ..errors import CaseError, CaseFileError
from .entries import FORMATS
from .guards import MAX_ELEMENTS
from .read import read_any


def load_calibration(path: str | os.PathLike[str], case: ConvCase,
                     max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A batch of inputs for the production observers: key ``calib`` or ``input`` in a
    ``.pt``/``.npz``/``.safetensors`` file, shape (B, C, *spatial) matching the case. No tensor
    in the file may exceed ``max_elements`` (the ``--max-elements`` guard)."""
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise CaseFileError(f"--calib {p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise CaseFileError(f"--calib {p}: unknown extension; use {', '.join(FORMATS)}")
    mapping = read_any(p, suffix, max_elements)
    data = mapping.get("calib", mapping.get("input"))
    if not isinstance(data, np.ndarray):
        raise CaseFileError(f"--calib {p}: needs a tensor under 'calib' or 'input'")
    arr = as_float_tensor(data, "calib", [])
    want = case.input.ndim
    if arr.ndim == want - 1:
        arr = arr[None]
    if arr.ndim != want or arr.shape[1] != case.input.shape[1]:
        raise CaseFileError(
            f"--calib {p}: shape {tuple(arr.shape)} does not match the case input "
            f"(B, {case.input.shape[1]}, ...)"
        )
    try:
        # the conv must run on it: each spatial size at least the kernel's reach
        validate_shapes(arr.shape, case.weight.shape,
                        None if case.bias is None else case.bias.shape, case.geometry)
    except CaseError as exc:
        raise CaseFileError(f"--calib {p}: shape {tuple(arr.shape)} does not fit the conv "
                            f"({exc}); give inputs of the case's spatial size") from None
    try:
        check_float32_range(arr, case.weight, case.bias, "calib")
    except CaseError as exc:
        raise CaseFileError(f"--calib {p}: {exc}") from None
    return arr
