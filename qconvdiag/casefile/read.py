"""Reading a case file: the path checked, the reader chosen by the extension, the ConvCase
built and checked against the element guard."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..case import ConvCase
from ..errors import CaseFileError
from .entries import BUNDLE_KEY, FORMATS
from .guards import MAX_ELEMENTS, check_size
from .npz_reader import read_npz
from .pt_reader import read_pt
from .safetensors_reader import read_safetensors
from .validate import case_from_mapping


def load_case(path: str | os.PathLike[str], max_elements: int = MAX_ELEMENTS) -> ConvCase:
    """Read a case file (``.pt``/``.pth``, ``.npz``, ``.safetensors``) into a ConvCase.

    No tensor (nor the conv's output) may exceed ``max_elements``; hostile files (pickled
    code, object arrays, zip bombs, lying safetensors headers) are refused with a CaseFileError.
    """
    mapping = read_mapping(path, max_elements)
    if BUNDLE_KEY in mapping:
        raise CaseFileError(f"{path} is a model bundle (qconvdiag.capture_model), not one conv: "
                            "`qconvdiag explain` reads it, or qconvdiag.load_bundle")
    case = case_from_mapping(mapping, source=str(path))
    check_size(case, max_elements)
    return case



def read_mapping(path: str | os.PathLike[str], max_elements: int = MAX_ELEMENTS
                 ) -> dict[str, Any]:
    """The flat mapping a case or bundle file holds, read as safely as a case (see
    ``load_case``): numpy arrays, quantized tensors as codes, JSON values."""
    p = Path(path)
    if not p.exists():
        raise CaseFileError(f"{p}: no such file; give the path of a .pt, .npz or .safetensors case")
    if p.is_dir():
        raise CaseFileError(f"{p} is a directory; give the path of a case file inside it")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise CaseFileError(
            f"{p}: unknown extension '{p.suffix}'; case files are {', '.join(FORMATS)}"
        )
    if p.stat().st_size == 0:
        raise CaseFileError(f"{p} is empty (0 bytes); write the case again")
    return read_any(p, suffix, max_elements)


def read_any(p: Path, suffix: str, limit: int) -> dict[str, Any]:
    if suffix in (".pt", ".pth"):
        return read_pt(p, limit)
    if suffix == ".npz":
        return read_npz(p, limit)
    return read_safetensors(p, limit)
