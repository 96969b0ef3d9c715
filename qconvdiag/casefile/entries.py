"""What a case file holds: the formats, the known keys, quantized tensors taken apart, and
the JSON text entries (geometry, qparams dicts) of ``.npz`` and ``.safetensors`` files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CaseFileError
from ..quantization.qparams import QParams

FORMATS = (".pt", ".pth", ".npz", ".safetensors")
TENSOR_KEYS = ("input", "weight", "bias", "qinput", "qweight", "qconv.weight", "qconv.bias")
GEOMETRY_KEYS = ("stride", "padding", "dilation", "groups")
QPARAM_KEYS = ("input_qparams", "weight_qparams", "output_qparams", "qconv.weight_qparams")
META_KEYS = ("qconv.scale", "qconv.zero_point", "provenance", "notes", "activation", "flow",
             "engine")
KNOWN_KEYS = frozenset(TENSOR_KEYS + GEOMETRY_KEYS + QPARAM_KEYS + META_KEYS)

#: The key that marks a model bundle (several convs of one model) in a file of the case formats.
BUNDLE_KEY = "qconvdiag_bundle"

@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized tensor taken apart: integer codes and the qparams torch stored with them."""

    codes: np.ndarray
    qparams: QParams



#: Deepest nesting of lists and dicts accepted in a JSON entry (a qparams dict needs 2).
MAX_JSON_DEPTH = 16


def _json_depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        level = [v for item in level if isinstance(item, (list, dict))
                 for v in (item.values() if isinstance(item, dict) else item)]
        depth += 1
    return depth - 1


def json_entry(text: str, name: str, where: str) -> Any:
    """A JSON text entry (geometry, qparams dicts); text that is not JSON stays a string."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    except RecursionError:
        raise CaseFileError(f"{where}: '{name}' is JSON nested too deeply to read; store "
                            "numbers, lists and dicts") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise CaseFileError(f"{where}: '{name}' holds an integer too long to read; store "
                            "plain numbers") from None
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise CaseFileError(f"{where}: '{name}' nests lists or dicts more than "
                            f"{MAX_JSON_DEPTH} levels deep; store numbers, lists and dicts")
    return value



#: numpy dtype name -> safetensors dtype code (the dtypes numpy reads; others go through torch).
ST_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
