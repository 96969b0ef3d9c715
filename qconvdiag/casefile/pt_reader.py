"""The ``.pt``/``.pth`` reader: ``torch.load(..., weights_only=True)``, never a full unpickle."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CaseError, CaseFileError, brief
from ..quantization.qparams import QParams, per_tensor
from ..torch_calls import capture_warnings
from .entries import Quantized
from .guards import MAX_ELEMENTS, check_zip, guard_message


def read_pt(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    import pickle

    import torch

    if not zipfile.is_zipfile(p):
        # torch.save has written zip archives since 1.6; anything else is legacy or junk.
        _check_legacy_pickle(p)
    else:
        check_zip(p, limit)
    try:
        with capture_warnings():
            obj = torch.load(p, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"the Python object {found.group(1)}" if found else "Python objects"
        raise CaseFileError(
            f"{p}: refused to unpickle it: it holds {what}, not only tensors and plain "
            "containers (weights_only=True); save plain tensors and dicts, see README 'Case files'"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError) as exc:
        reason = brief(str(exc) or type(exc).__name__, 160)
        raise CaseFileError(
            f"{p}: not a readable torch file (truncated or corrupt?): {reason}; write it again "
            "with torch.save or qconvdiag.save_case"
        ) from None
    if not isinstance(obj, Mapping):
        raise CaseFileError(
            f"{p} holds a {type(obj).__name__}, not a dict: save "
            "{'input': x, 'weight': w, ...} (see README 'Case files')"
        )
    return decode_torch_mapping(obj, str(p), limit=limit)


def _check_legacy_pickle(p: Path) -> None:
    with open(p, "rb") as fh:
        head = fh.read(2)
    if head[:1] != b"\x80":
        raise CaseFileError(
            f"{p}: not a torch file (truncated or corrupt: no zip archive, no pickle header); "
            "write it with torch.save or qconvdiag.save_case"
        )


def decode_torch_mapping(
    obj: Mapping[Any, Any], where: str, prefix: str = "", limit: int = MAX_ELEMENTS
) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CaseFileError(f"{where}: key {key!r} is not a string; use the documented keys")
        name = prefix + key
        if isinstance(value, torch.Tensor):
            out[name] = tensor_to_numpy(value, name, where, limit)
        elif isinstance(value, Mapping) and name == "qconv":
            out.update(decode_torch_mapping(value, where, prefix="qconv.", limit=limit))
        elif isinstance(value, Mapping):
            out[name] = {
                str(k): (tensor_to_numpy(v, f"{name}.{k}", where, limit)
                         if isinstance(v, torch.Tensor) else v)
                for k, v in value.items()
            }
        else:
            out[name] = value
    return out


def tensor_to_numpy(t: Any, name: str, where: str, limit: int = MAX_ELEMENTS) -> Any:
    import torch

    if t.numel() > limit:
        raise CaseFileError(guard_message(where, name, t.numel(), limit))
    if t.is_quantized:
        with capture_warnings():
            codes = t.int_repr().numpy().astype(np.int64)
            dtype = str(t.dtype).rsplit(".", 1)[-1]
            if t.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                qp = per_tensor(float(t.q_scale()), int(t.q_zero_point()), dtype, "tensor")
            elif t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                qp = QParams(
                    tuple(float(s) for s in t.q_per_channel_scales().tolist()),
                    tuple(int(z) for z in t.q_per_channel_zero_points().tolist()),
                    dtype, int(t.q_per_channel_axis()), "tensor",
                )
            else:
                raise CaseFileError(
                    f"{where}: '{name}' uses qscheme {t.qscheme()}, which qconvdiag does not "
                    "support; use per-tensor or per-channel affine"
                )
        return Quantized(codes, qp)
    t = t.detach().cpu()
    if t.is_complex():
        raise CaseError(f"{where}: '{name}' is complex: qconvdiag needs real float32 tensors")
    dtype = str(t.dtype).rsplit(".", 1)[-1]
    try:
        if t.dtype.is_floating_point and t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # float16, bfloat16, float8 variants: exact in float32
        return t.numpy().copy()
    except (TypeError, RuntimeError):
        raise CaseError(f"{where}: '{name}' has dtype {dtype}, which qconvdiag cannot read: "
                        "save it as float32") from None
