"""Guards applied before anything is allocated: the ``--max-elements`` element guard and the
zip checks (a zip bomb is refused before it is inflated)."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

from ..case import ConvCase
from ..errors import CaseError, CaseFileError

#: Default guard on the elements of any one tensor (input, weight, output): ``--max-elements``.
MAX_ELEMENTS = 50_000_000
#: Zip members may not expand more than this (a zip bomb is refused before it is inflated).
MAX_COMPRESSION_RATIO = 200


def guard_message(where: str, name: str, count: int, limit: int) -> str:
    return (f"{where}: '{name}' has {count:,} elements, over the --max-elements guard "
            f"({limit:,}); raise it with --max-elements N if this machine has the memory")



def check_size(case: ConvCase, limit: int = MAX_ELEMENTS) -> None:
    """The conv's input, weight and output must each stay under the element guard."""
    for name, shape in (("input", case.input.shape), ("weight", case.weight.shape),
                        ("output", case.output_shape)):
        count = math.prod(shape)
        if count > limit:
            raise CaseError(guard_message(case.source or "case", name, count, limit))


def check_zip(p: Path, limit: int) -> None:
    """Refuse archives that would inflate past the guard, before anything is inflated."""
    try:
        with zipfile.ZipFile(p) as zf:
            total = 0
            for info in zf.infolist():
                total += info.file_size
                if info.compress_size and info.file_size > 1_000_000 and \
                        info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
                    raise CaseFileError(
                        f"{p}: member '{info.filename}' would expand {info.file_size:,} bytes "
                        f"from {info.compress_size:,} (a zip bomb?); refused"
                    )
            if total > limit * 8 + 64 * 2**20:
                raise CaseFileError(
                    f"{p}: the archive expands to {total:,} bytes, over what the "
                    f"--max-elements guard ({limit:,}) allows; raise it if the file is genuine"
                )
    except zipfile.BadZipFile:
        raise CaseFileError(
            f"{p}: not a readable {p.suffix} archive (truncated or corrupt?); write it again"
        ) from None
