"""qconvdiag: explain, number by number, why a float conv and its quantized twin disagree.

Public API (imported lazily: ``import qconvdiag`` does not import torch)::

    import qconvdiag
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path="my_case.pt")
    case = qconvdiag.load_case("my_case.pt")          # .pt / .npz / .safetensors
    report = qconvdiag.diagnose(case)                 # a qconvdiag.Report
    print(report.verdict.status, [c.code for c in report.verdict.causes])
    qconvdiag.save_case(case, "my_case.npz")

    # a whole model: which conv is to blame (torch.ao eager or FX quantized models)
    qconvdiag.capture_model(model.eval(), quantized, [x1, x2], path="model.pt")
    report = qconvdiag.diagnose_model(model.eval(), quantized, [x1, x2], top=3)

``diagnose(case, options=qconvdiag.Options(engine="onednn", fail_on="warning"))`` takes the
command line's options; every error is a ``qconvdiag.QconvdiagError`` with a message that says
what to do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "__version__", "load_case", "save_case", "capture", "diagnose", "Options", "Report",
    "ConvCase", "QconvdiagError", "capture_model", "load_bundle", "walk_model",
    "diagnose_model", "WalkOptions", "ModelReport", "ModelBundle",
]

_LAZY = {
    "load_case": ("qconvdiag.io", "load_case"),
    "save_case": ("qconvdiag.io", "save_case"),
    "capture": ("qconvdiag.io", "capture"),
    "diagnose": ("qconvdiag.diagnosis", "diagnose"),
    "Options": ("qconvdiag.diagnosis", "Options"),
    "Report": ("qconvdiag.report", "Report"),
    "ConvCase": ("qconvdiag.case", "ConvCase"),
    "QconvdiagError": ("qconvdiag.errors", "QconvdiagError"),
    "capture_model": ("qconvdiag.model.capture", "capture_model"),
    "load_bundle": ("qconvdiag.model.bundle", "load_bundle"),
    "walk_model": ("qconvdiag.model.walk", "walk_model"),
    "diagnose_model": ("qconvdiag.model.walk", "diagnose_model"),
    "WalkOptions": ("qconvdiag.model.walk", "WalkOptions"),
    "ModelReport": ("qconvdiag.model_report", "ModelReport"),
    "ModelBundle": ("qconvdiag.model.bundle", "ModelBundle"),
}

if TYPE_CHECKING:
    from .case import ConvCase
    from .diagnosis import Options, diagnose
    from .errors import QconvdiagError
    from .io import capture, load_case, save_case
    from .model.bundle import ModelBundle, load_bundle
    from .model.capture import capture_model
    from .model.walk import WalkOptions, diagnose_model, walk_model
    from .model_report import ModelReport
    from .report import Report


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'qconvdiag' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
