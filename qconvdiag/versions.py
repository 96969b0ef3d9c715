"""The torch releases qconvdiag's exactness claims were verified on.

The emulation's bit-exactness, the observers' fast search (``observers.py``) and the golden
reports are tested on torch 2.13 (``constraints.txt`` pins 2.13.0). On another release
qconvdiag still runs: the per-output torch check keeps comparing torch's real kernels with the
emulation (QCD061 on any mismatch), the production path uses torch's own HistogramObserver
search, and the report's case notes say that the release is outside what was verified.
"""

from __future__ import annotations

import re

#: (major, minor) of the torch releases the test suite verified.
VERIFIED_TORCH: tuple[tuple[int, int], ...] = ((2, 13),)


def torch_release(version: str) -> tuple[int, int] | None:
    """``"2.13.0+cpu"`` -> ``(2, 13)``; None when the text is not a version."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else None


def installed_torch() -> str:
    import torch

    return str(torch.__version__)


def torch_verified(version: str | None = None) -> bool:
    """Is ``version`` (default: the installed torch) a release the tests verified?"""
    return torch_release(installed_torch() if version is None else version) in VERIFIED_TORCH


def verified_releases() -> str:
    return ", ".join(f"{major}.{minor}.x" for major, minor in VERIFIED_TORCH)


def unverified_torch_note(version: str | None = None) -> str | None:
    """The report's note when the installed torch is outside the verified releases."""
    version = installed_torch() if version is None else version
    if torch_verified(version):
        return None
    return (f"torch {version} is outside the releases qconvdiag was verified on "
            f"({verified_releases()}): the emulation's exactness is not proven here, but torch's "
            "own kernels are still compared with it for every output (torch_check, QCD061), "
            "and the production path uses torch's own HistogramObserver search")
