"""The ``.safetensors`` reader: the header checked against the file's size before anything is
allocated; qparams and geometry come from its metadata."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import CaseFileError, brief
from .entries import ST_DTYPES, json_entry
from .guards import MAX_ELEMENTS, guard_message
from .pt_reader import tensor_to_numpy


def read_safetensors(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    header = _check_safetensors_header(p, limit)
    # numpy has no bfloat16 or float8: those are read through torch (and become float32)
    via_torch = {name for name, info in header.items()
                 if name != "__metadata__" and info.get("dtype") not in ST_DTYPES.values()}
    out: dict[str, Any] = {}
    try:
        with safe_open(str(p), framework="np") as fh:
            meta = fh.metadata() or {}
            for name in fh.keys():
                if name not in via_torch:
                    out[name] = fh.get_tensor(name)
        if via_torch:
            with safe_open(str(p), framework="pt") as fh:
                for name in sorted(via_torch):
                    out[name] = tensor_to_numpy(fh.get_tensor(name), name, str(p), limit)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CaseFileError(
            f"{p}: not a readable safetensors file (truncated or corrupt?): {brief(str(exc))}"
        ) from None
    for key, text in meta.items():
        if key == "format":
            continue
        out[key] = json_entry(text, key, str(p)) if isinstance(text, str) else text
    return out


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_safetensors_header(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    """Refuse declared sizes past the file's end before anything is allocated; the header."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CaseFileError(f"{p}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise CaseFileError(f"{p}: safetensors header length {n} exceeds the file; corrupt")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError included
            raise CaseFileError(f"{p}: safetensors header is not valid JSON; corrupt") from None
    if not isinstance(header, dict):
        raise CaseFileError(f"{p}: safetensors header is not a JSON object; corrupt")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CaseFileError(f"{p}: safetensors entry '{name}' is malformed")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(_natural(s) for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_natural(o) for o in offsets)
        ):
            raise CaseFileError(f"{p}: safetensors entry '{name}' is malformed")
        count = math.prod(shape)
        if count > limit:
            raise CaseFileError(guard_message(str(p), name, count, limit))
        if offsets[1] > data_size or offsets[0] > offsets[1]:
            raise CaseFileError(
                f"{p}: '{name}' points past the end of the file (truncated or hostile)"
            )
    return header
