"""Writing a case file: the flat mapping of a ConvCase, encoded deterministically (the same
case gives the same bytes) and written atomically."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..case import PERSISTED_NOTES, ConvCase
from ..errors import CaseFileError
from ..quantization.qparams import CODE_DTYPES
from ..writes import atomic_write
from .entries import FORMATS, ST_DTYPES


def case_to_mapping(case: ConvCase) -> dict[str, Any]:
    """The flat mapping ``save_case`` writes (numpy arrays and JSON-able values)."""
    m: dict[str, Any] = {"input": case.input, "weight": case.weight}
    if case.bias is not None:
        m["bias"] = case.bias
    m.update(case.geometry.to_dict())
    if case.activation is not None:
        m["activation"] = case.activation
    if case.flow != "eager":
        m["flow"] = case.flow
    if case.engine is not None:
        m["engine"] = case.engine
    kept = [n for n in case.notes if n in PERSISTED_NOTES]  # the others are made on reading
    if kept:
        m["notes"] = kept
    s = case.setup
    if s is not None:
        for key, qp in (
            ("input_qparams", s.input_qparams),
            ("weight_qparams", s.weight_qparams),
            ("output_qparams", s.output_qparams),
        ):
            if qp is not None:
                m[key] = qp.to_dict()
        if s.input_codes is not None and s.input_qparams is not None:
            m["qinput"] = s.input_codes.astype(CODE_DTYPES[s.input_qparams.dtype])
        if s.weight_codes is not None and s.weight_qparams is not None:
            m["qweight"] = s.weight_codes.astype(CODE_DTYPES[s.weight_qparams.dtype])
        if s.module is not None:
            mod = s.module
            m["qconv.weight"] = mod.stored_codes.astype(CODE_DTYPES[mod.weight_qparams.dtype])
            m["qconv.weight_qparams"] = mod.weight_qparams.to_dict()
            if mod.bias is not None:
                m["qconv.bias"] = mod.bias
            m["qconv.scale"] = mod.output_qparams.scale[0]
            m["qconv.zero_point"] = (
                mod.output_qparams.zero_point_given or mod.output_qparams.zero_point
            )[0]
        m["provenance"] = {"used_quantized_dtypes": s.used_quantized_dtypes, "apis": list(s.apis)}
    return m


def save_case(case: ConvCase, path: str | os.PathLike[str]) -> Path:
    """Write a case file; the format follows the extension. The write is atomic."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise CaseFileError(f"{p}: unknown extension '{p.suffix}'; use one of {', '.join(FORMATS)}")
    mapping = case_to_mapping(case)

    atomic_write(p, encode_case(mapping, suffix))
    return p


def encode_case(mapping: Mapping[str, Any], suffix: str) -> bytes:
    """The bytes of a case file; deterministic (the same case gives the same bytes)."""
    if suffix in (".pt", ".pth"):
        import io as _io

        import torch

        obj = {
            k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
            for k, v in mapping.items()
        }
        buf = _io.BytesIO()  # a file name would become the archive's (random) folder name
        torch.save(obj, buf)
        return buf.getvalue()
    if suffix == ".npz":
        return npz_bytes(mapping)
    return safetensors_bytes(mapping)


def safetensors_bytes(mapping: Mapping[str, Any]) -> bytes:
    """safetensors with sorted keys (the library's metadata order is not reproducible)."""
    tensors = sorted((k, np.ascontiguousarray(v)) for k, v in mapping.items()
                     if isinstance(v, np.ndarray))
    header: dict[str, Any] = {
        "__metadata__": {k: json.dumps(v) for k, v in sorted(mapping.items())
                         if not isinstance(v, np.ndarray)}
    }
    offset = 0
    for name, arr in tensors:
        dtype = ST_DTYPES.get(arr.dtype.name)
        if dtype is None:
            raise CaseFileError(f"cannot store '{name}' ({arr.dtype}) in safetensors")
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    body = b"".join(arr.astype(arr.dtype.newbyteorder("<")).tobytes() for _, arr in tensors)
    return len(text).to_bytes(8, "little") + text + body


def npz_bytes(mapping: Mapping[str, Any]) -> bytes:
    """Like ``numpy.savez`` but with fixed zip timestamps, so the bytes are reproducible."""
    import io as _io

    buf = _io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in mapping.items():
            arr = value if isinstance(value, np.ndarray) else np.array(json.dumps(value))
            item = _io.BytesIO()
            np.lib.format.write_array(item, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, item.getvalue())
    return buf.getvalue()
