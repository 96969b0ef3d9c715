"""What a model bundle may hold as a module path or a kind: names that a report prints into
code (its fixes, pasted and run as they are), so a crafted bundle cannot put code there."""

from __future__ import annotations

import re

#: A module path as torch's named_modules gives it (``features.3.conv``; "" for the model
#: itself, or where no conv ran yet).
_PATH = re.compile(r"(?:[A-Za-z0-9_\-]+(?:\.[A-Za-z0-9_\-]+)*)?")
#: A class or function name (``ReLU6``, ``QFunctional``, ``relu6``).
_KIND = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A function's call, as the activation check names it (activations.call_name).
_CALL = re.compile(r"the [A-Za-z_][A-Za-z0-9_]* call (?:after (?:[A-Za-z0-9_\-]+)"
                   r"(?:\.[A-Za-z0-9_\-]+)*|before any conv)")


def is_path(value: object) -> bool:
    return isinstance(value, str) and _PATH.fullmatch(value) is not None


def is_kind(value: object) -> bool:
    return isinstance(value, str) and _KIND.fullmatch(value) is not None


def is_op_name(value: object) -> bool:
    """A module path, or a function's call (``the relu6 call after c1``)."""
    return is_path(value) or (isinstance(value, str) and _CALL.fullmatch(value) is not None)
