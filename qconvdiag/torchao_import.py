"""torchao, the optional extra ``qconvdiag[pt2e]``: imported only here, quietly.

torchao 0.18 logs a "Failed to load ..." warning for each of its CUDA-only extensions on a CPU
machine (and torch logs a deprecation for one of its enums); none of it may reach qconvdiag's
terminal output, so the import runs with those loggers silenced.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import warnings
from collections.abc import Iterator
from types import ModuleType

from .errors import MissingExtraError

#: qconvdiag is installed from its checkout (it is not on the package index): the extra too
EXTRA_HINT = "pip install -e '.[pt2e]' in qconvdiag's checkout (make demo installs it)"
#: Loggers that speak while torchao is imported.
_IMPORT_LOGGERS = ("torchao", "torch.utils._pytree")


@contextlib.contextmanager
def _silenced(names: tuple[str, ...]) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg.level, lg.propagate, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, (level, propagate, disabled) in zip(loggers, saved):
            lg.setLevel(level)
            lg.propagate = propagate
            lg.disabled = disabled


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def require_torchao(what: str = "a PT2E model or case") -> ModuleType:
    """torchao's PT2E module (``torchao.quantization.pt2e``), imported quietly; without the
    extra, a ``MissingExtraError`` whose one line names it."""
    if not torchao_available():
        raise MissingExtraError(f"{what} needs torchao, the optional extra: {EXTRA_HINT}")
    with _silenced(_IMPORT_LOGGERS):
        return importlib.import_module("torchao.quantization.pt2e")
