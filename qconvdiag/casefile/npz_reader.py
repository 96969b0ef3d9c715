"""The ``.npz`` reader: ``numpy.load(..., allow_pickle=False)``, sizes read from the headers
before any data."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CaseFileError, brief
from .entries import GEOMETRY_KEYS, json_entry
from .guards import MAX_ELEMENTS, check_zip, guard_message


def read_npz(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    check_zip(p, limit)
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CaseFileError(
            f"{p}: not a readable .npz archive (truncated or corrupt?): {brief(str(exc))}; write "
            "it again with numpy.savez or qconvdiag.save_case"
        ) from None
    out: dict[str, Any] = {}
    with archive:
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise CaseFileError(f"{p} holds a single array, not an .npz archive of named arrays")
        for name in archive.files:
            try:
                assert archive.zip is not None
                count = _npy_count(archive.zip, name + ".npy")
                if count > limit:
                    raise CaseFileError(guard_message(str(p), name, count, limit))
                value = archive[name]
            except CaseFileError:
                raise
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise CaseFileError(
                        f"{p}: entry '{name}' is an object array, which would need unpickling; "
                        "save numeric arrays and JSON strings only"
                    ) from None
                raise CaseFileError(
                    f"{p}: entry '{name}' is unreadable: {brief(str(exc))}"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
                raise CaseFileError(
                    f"{p}: entry '{name}' is truncated or corrupt ({type(exc).__name__}); "
                    "write the file again"
                ) from None
            out[name] = _decode_text_entry(value, name, str(p))
    return out


def _npy_count(zf: zipfile.ZipFile, member: str) -> int:
    """Element count declared by an .npy member's header, read before its data."""
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(fh)
    return int(math.prod(shape))


def _decode_text_entry(value: Any, name: str, where: str) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        if value.ndim != 0:
            raise CaseFileError(f"{where}: '{name}' is an array of strings; store one JSON string")
        return json_entry(str(value.item()), name, where)
    if isinstance(value, np.ndarray) and value.ndim == 0 and name in GEOMETRY_KEYS:
        return value.item()
    return value
