"""qconvdiag: explain, number by number, why a float conv and its quantized twin disagree.

Public API (imported lazily so ``import qconvdiag`` does not import torch)::

    case = qconvdiag.load_case("case.pt")
    qconvdiag.save_case(case, "case.npz")
    qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path="my_case.pt")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_case", "save_case", "capture", "ConvCase", "QconvdiagError"]

_LAZY = {
    "load_case": ("qconvdiag.io", "load_case"),
    "save_case": ("qconvdiag.io", "save_case"),
    "capture": ("qconvdiag.io", "capture"),
    "ConvCase": ("qconvdiag.case", "ConvCase"),
    "QconvdiagError": ("qconvdiag.errors", "QconvdiagError"),
}

if TYPE_CHECKING:
    from .case import ConvCase
    from .errors import QconvdiagError
    from .io import capture, load_case, save_case


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qconvdiag' has no attribute {name!r}")
