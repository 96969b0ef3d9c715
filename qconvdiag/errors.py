"""The package's own exceptions. Only ``cli.py`` turns them into exit codes.

Every message is one line that names the problem and what to do about it.
"""

from __future__ import annotations

import re


class QconvdiagError(Exception):
    """Base class: a problem the user can fix (exit code 2 on the command line)."""


class CaseFileError(QconvdiagError):
    """A case file is missing, unreadable, corrupt, hostile or has the wrong keys."""


class CaseError(QconvdiagError):
    """The tensors or the geometry of a case are inconsistent or unusable."""


class QParamsError(QconvdiagError):
    """Quantization parameters that no engine can use (scale <= 0, NaN, unknown dtype...)."""


class UsageError(QconvdiagError):
    """A command-line option or API argument is wrong."""


class MissingExtraError(QconvdiagError):
    """An optional dependency (an extra, e.g. ``qconvdiag[pt2e]``) is not installed."""


def brief(text: str, limit: int = 120) -> str:
    """A library's message for one of ours: its first line, terminal escapes removed, cut at a
    word boundary (with "...") when longer than ``limit``."""
    first = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).strip().split("\n", 1)[0].strip()
    if len(first) <= limit:
        return first
    return first[:limit].rsplit(" ", 1)[0].rstrip(" ,;:") + "..."
