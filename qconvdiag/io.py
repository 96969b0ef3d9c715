"""Case files: the public face of ``qconvdiag.casefile`` (load, save, capture, calibration).

The work is done in ``casefile/``: a reader per format, the one mapping -> ConvCase rule,
the writer, capture from live modules and ``--calib`` loading (see its docstring). Callers
import these names from here.
"""

from __future__ import annotations

from .casefile.calibration import load_calibration
from .casefile.capture import capture
from .casefile.entries import (
    BUNDLE_KEY,
    FORMATS,
    GEOMETRY_KEYS,
    KNOWN_KEYS,
    META_KEYS,
    QPARAM_KEYS,
    TENSOR_KEYS,
    Quantized,
)
from .casefile.guards import MAX_COMPRESSION_RATIO, MAX_ELEMENTS, check_size, guard_message
from .casefile.read import load_case, read_mapping
from .casefile.validate import case_from_mapping
from .casefile.write import case_to_mapping, encode_case, save_case

__all__ = [
    "BUNDLE_KEY", "FORMATS", "GEOMETRY_KEYS", "KNOWN_KEYS", "MAX_COMPRESSION_RATIO",
    "MAX_ELEMENTS", "META_KEYS", "QPARAM_KEYS", "TENSOR_KEYS", "Quantized", "capture",
    "case_from_mapping", "case_to_mapping", "check_size", "encode_case", "guard_message",
    "load_calibration", "load_case", "read_mapping", "save_case",
]
