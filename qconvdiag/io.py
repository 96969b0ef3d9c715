"""Case files: load and save ``.pt``/``.pth``, ``.npz`` and ``.safetensors``.

Untrusted files are never unpickled: ``torch.load(..., weights_only=True)`` and
``numpy.load(..., allow_pickle=False)``; safetensors has no code path at all.

Every format decodes into one flat mapping (``input``, ``weight``, ``bias``, ``stride``, ...,
``input_qparams`` ..., ``qinput``/``qweight`` codes, ``qconv.*`` module state), and
``case_from_mapping`` builds the ConvCase from it, so the rules are the same for all formats.
In ``.npz`` and ``.safetensors`` files, non-tensor entries (geometry, qparams dicts) are JSON
text: a 0-d string array in ``.npz``, a metadata entry in ``.safetensors``.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .case import ConvCase, ModuleState, QuantSetup, build_case
from .errors import CaseError, CaseFileError, QParamsError, brief
from .qparams import CODE_DTYPES, QParams, dequantize32, from_mapping, per_tensor
from .torch_ref import capture_warnings
from .writes import atomic_write

FORMATS = (".pt", ".pth", ".npz", ".safetensors")
TENSOR_KEYS = ("input", "weight", "bias", "qinput", "qweight", "qconv.weight", "qconv.bias")
GEOMETRY_KEYS = ("stride", "padding", "dilation", "groups")
QPARAM_KEYS = ("input_qparams", "weight_qparams", "output_qparams", "qconv.weight_qparams")
META_KEYS = ("qconv.scale", "qconv.zero_point", "provenance", "notes", "activation")
KNOWN_KEYS = frozenset(TENSOR_KEYS + GEOMETRY_KEYS + QPARAM_KEYS + META_KEYS)
#: Default guard on the elements of any one tensor (input, weight, output): ``--max-elements``.
MAX_ELEMENTS = 50_000_000
#: Zip members may not expand more than this (a zip bomb is refused before it is inflated).
MAX_COMPRESSION_RATIO = 200


def guard_message(where: str, name: str, count: int, limit: int) -> str:
    return (f"{where}: '{name}' has {count:,} elements, over the --max-elements guard "
            f"({limit:,}); raise it with --max-elements N if this machine has the memory")


def check_size(case: ConvCase, limit: int = MAX_ELEMENTS) -> None:
    """The conv's input, weight and output must each stay under the element guard."""
    import math as _math

    for name, shape in (("input", case.input.shape), ("weight", case.weight.shape),
                        ("output", case.output_shape)):
        count = _math.prod(shape)
        if count > limit:
            raise CaseError(guard_message(case.source or "case", name, count, limit))


def _check_zip(p: Path, limit: int) -> None:
    """Refuse archives that would inflate past the guard, before anything is inflated."""
    try:
        with zipfile.ZipFile(p) as zf:
            total = 0
            for info in zf.infolist():
                total += info.file_size
                if info.compress_size and info.file_size > 1_000_000 and \
                        info.file_size / info.compress_size > MAX_COMPRESSION_RATIO:
                    raise CaseFileError(
                        f"{p}: member '{info.filename}' would expand {info.file_size:,} bytes "
                        f"from {info.compress_size:,} (a zip bomb?); refused"
                    )
            if total > limit * 8 + 64 * 2**20:
                raise CaseFileError(
                    f"{p}: the archive expands to {total:,} bytes, over what the "
                    f"--max-elements guard ({limit:,}) allows; raise it if the file is genuine"
                )
    except zipfile.BadZipFile:
        raise CaseFileError(
            f"{p}: not a readable {p.suffix} archive (truncated or corrupt?); write it again"
        ) from None


@dataclass(frozen=True, eq=False)
class Quantized:
    """A quantized tensor taken apart: integer codes and the qparams torch stored with them."""

    codes: np.ndarray
    qparams: QParams


# --------------------------------------------------------------------------------------------
# loading


def load_case(path: str | os.PathLike[str], max_elements: int = MAX_ELEMENTS) -> ConvCase:
    """Read a case file (``.pt``/``.pth``, ``.npz``, ``.safetensors``) into a ConvCase.

    No tensor (nor the conv's output) may exceed ``max_elements``; hostile files (pickled
    code, object arrays, zip bombs, lying safetensors headers) are refused with a CaseFileError.
    """
    mapping = read_mapping(path, max_elements)
    if BUNDLE_KEY in mapping:
        raise CaseFileError(f"{path} is a model bundle (qconvdiag.capture_model), not one conv: "
                            "`qconvdiag explain` reads it, or qconvdiag.load_bundle")
    case = case_from_mapping(mapping, source=str(path))
    check_size(case, max_elements)
    return case


#: The key that marks a model bundle (several convs of one model) in a file of the case formats.
BUNDLE_KEY = "qconvdiag_bundle"


def read_mapping(path: str | os.PathLike[str], max_elements: int = MAX_ELEMENTS
                 ) -> dict[str, Any]:
    """The flat mapping a case or bundle file holds, read as safely as a case (see
    ``load_case``): numpy arrays, quantized tensors as codes, JSON values."""
    p = Path(path)
    if not p.exists():
        raise CaseFileError(f"{p}: no such file; give the path of a .pt, .npz or .safetensors case")
    if p.is_dir():
        raise CaseFileError(f"{p} is a directory; give the path of a case file inside it")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise CaseFileError(
            f"{p}: unknown extension '{p.suffix}'; case files are {', '.join(FORMATS)}"
        )
    if p.stat().st_size == 0:
        raise CaseFileError(f"{p} is empty (0 bytes); write the case again")
    return _read_any(p, suffix, max_elements)


def _read_any(p: Path, suffix: str, limit: int) -> dict[str, Any]:
    if suffix in (".pt", ".pth"):
        return _read_pt(p, limit)
    if suffix == ".npz":
        return _read_npz(p, limit)
    return _read_safetensors(p, limit)


def _read_pt(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    import pickle

    import torch

    if not zipfile.is_zipfile(p):
        # torch.save has written zip archives since 1.6; anything else is legacy or junk.
        _check_legacy_pickle(p)
    else:
        _check_zip(p, limit)
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
    return _decode_torch_mapping(obj, str(p), limit=limit)


def _check_legacy_pickle(p: Path) -> None:
    with open(p, "rb") as fh:
        head = fh.read(2)
    if head[:1] != b"\x80":
        raise CaseFileError(
            f"{p}: not a torch file (truncated or corrupt: no zip archive, no pickle header); "
            "write it with torch.save or qconvdiag.save_case"
        )


def _decode_torch_mapping(
    obj: Mapping[Any, Any], where: str, prefix: str = "", limit: int = MAX_ELEMENTS
) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CaseFileError(f"{where}: key {key!r} is not a string; use the documented keys")
        name = prefix + key
        if isinstance(value, torch.Tensor):
            out[name] = _tensor_to_numpy(value, name, where, limit)
        elif isinstance(value, Mapping) and name == "qconv":
            out.update(_decode_torch_mapping(value, where, prefix="qconv.", limit=limit))
        elif isinstance(value, Mapping):
            out[name] = {
                str(k): (_tensor_to_numpy(v, f"{name}.{k}", where, limit)
                         if isinstance(v, torch.Tensor) else v)
                for k, v in value.items()
            }
        else:
            out[name] = value
    return out


def _tensor_to_numpy(t: Any, name: str, where: str, limit: int = MAX_ELEMENTS) -> Any:
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


def _read_npz(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    _check_zip(p, limit)
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CaseFileError(
            f"{p}: not a readable .npz archive (truncated or corrupt?): {brief(str(exc))}; write "
            "it again with numpy.savez or qconvdiag.save_case"
        ) from None
    out: dict[str, Any] = {}
    with archive:
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise CaseFileError(f"{p} holds a single array, not an .npz archive of named arrays")
        for name in archive.files:
            try:
                assert archive.zip is not None
                count = _npy_count(archive.zip, name + ".npy")
                if count > limit:
                    raise CaseFileError(guard_message(str(p), name, count, limit))
                value = archive[name]
            except CaseFileError:
                raise
            except ValueError as exc:
                if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                    raise CaseFileError(
                        f"{p}: entry '{name}' is an object array, which would need unpickling; "
                        "save numeric arrays and JSON strings only"
                    ) from None
                raise CaseFileError(
                    f"{p}: entry '{name}' is unreadable: {brief(str(exc))}"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
                raise CaseFileError(
                    f"{p}: entry '{name}' is truncated or corrupt ({type(exc).__name__}); "
                    "write the file again"
                ) from None
            out[name] = _decode_text_entry(value, name, str(p))
    return out


def _npy_count(zf: zipfile.ZipFile, member: str) -> int:
    """Element count declared by an .npy member's header, read before its data."""
    with zf.open(member) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, _ = np.lib.format.read_array_header_1_0(fh)
        else:
            shape, _, _ = np.lib.format.read_array_header_2_0(fh)
    return int(math.prod(shape))


#: Deepest nesting of lists and dicts accepted in a JSON entry (a qparams dict needs 2).
MAX_JSON_DEPTH = 16


def _json_depth(value: Any) -> int:
    depth, level = 0, [value]
    while level:
        level = [v for item in level if isinstance(item, (list, dict))
                 for v in (item.values() if isinstance(item, dict) else item)]
        depth += 1
    return depth - 1


def _json_entry(text: str, name: str, where: str) -> Any:
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


def _decode_text_entry(value: Any, name: str, where: str) -> Any:
    if isinstance(value, np.ndarray) and value.dtype.kind in "US":
        if value.ndim != 0:
            raise CaseFileError(f"{where}: '{name}' is an array of strings; store one JSON string")
        return _json_entry(str(value.item()), name, where)
    if isinstance(value, np.ndarray) and value.ndim == 0 and name in GEOMETRY_KEYS:
        return value.item()
    return value


def _read_safetensors(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    header = _check_safetensors_header(p, limit)
    # numpy has no bfloat16 or float8: those are read through torch (and become float32)
    via_torch = {name for name, info in header.items()
                 if name != "__metadata__" and info.get("dtype") not in _ST_DTYPES.values()}
    out: dict[str, Any] = {}
    try:
        with safe_open(str(p), framework="np") as fh:
            meta = fh.metadata() or {}
            for name in fh.keys():
                if name not in via_torch:
                    out[name] = fh.get_tensor(name)
        if via_torch:
            with safe_open(str(p), framework="pt") as fh:
                for name in sorted(via_torch):
                    out[name] = _tensor_to_numpy(fh.get_tensor(name), name, str(p), limit)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CaseFileError(
            f"{p}: not a readable safetensors file (truncated or corrupt?): {brief(str(exc))}"
        ) from None
    for key, text in meta.items():
        if key == "format":
            continue
        out[key] = _json_entry(text, key, str(p)) if isinstance(text, str) else text
    return out


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_safetensors_header(p: Path, limit: int = MAX_ELEMENTS) -> dict[str, Any]:
    """Refuse declared sizes past the file's end before anything is allocated; the header."""
    size = p.stat().st_size
    with open(p, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CaseFileError(f"{p}: truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > min(size - 8, 100_000_000):
            raise CaseFileError(f"{p}: safetensors header length {n} exceeds the file; corrupt")
        try:
            header = json.loads(fh.read(n))
        except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError included
            raise CaseFileError(f"{p}: safetensors header is not valid JSON; corrupt") from None
    if not isinstance(header, dict):
        raise CaseFileError(f"{p}: safetensors header is not a JSON object; corrupt")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CaseFileError(f"{p}: safetensors entry '{name}' is malformed")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(_natural(s) for s in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_natural(o) for o in offsets)
        ):
            raise CaseFileError(f"{p}: safetensors entry '{name}' is malformed")
        count = math.prod(shape)
        if count > limit:
            raise CaseFileError(guard_message(str(p), name, count, limit))
        if offsets[1] > data_size or offsets[0] > offsets[1]:
            raise CaseFileError(
                f"{p}: '{name}' points past the end of the file (truncated or hostile)"
            )
    return header


# --------------------------------------------------------------------------------------------
# the one mapping -> ConvCase rule


def case_from_mapping(mapping: Mapping[str, Any], source: str = "") -> ConvCase:
    """Build a ConvCase from the flat mapping every format decodes to."""
    where = source or "case"
    unknown = sorted(k for k in mapping if k not in KNOWN_KEYS)
    if unknown:
        raise CaseFileError(
            f"{where}: unknown key(s) {', '.join(repr(k) for k in unknown[:5])}; known keys are "
            "input, weight, bias, stride, padding, dilation, groups, input_qparams, "
            "weight_qparams, output_qparams, qinput, qweight, qconv.* (README 'Case files')"
        )
    notes: list[str] = []
    used_qdtypes = False
    try:
        in_qp = _qparams_entry(mapping, "input_qparams")
        w_qp = _qparams_entry(mapping, "weight_qparams")
        out_qp = _qparams_entry(mapping, "output_qparams")
        qinput = _codes_entry(mapping, "qinput", in_qp, where)
        qweight = _codes_entry(mapping, "qweight", w_qp, where)
        if qinput is not None:
            used_qdtypes |= qinput.qparams.source == "tensor"
            if in_qp is not None and in_qp.source != "tensor" and _differs(in_qp, qinput.qparams):
                notes.append("input_qparams differ from qinput's own; qinput's were used")
            in_qp = qinput.qparams.with_source("user")
        if qweight is not None:
            used_qdtypes |= qweight.qparams.source == "tensor"
            if w_qp is not None and _differs(w_qp, qweight.qparams):
                notes.append("weight_qparams differ from qweight's own; qweight's were used")
            w_qp = qweight.qparams.with_source("user")
        module = _module_entry(mapping, where)
        if module is not None and isinstance(mapping.get("qconv.weight"), Quantized):
            used_qdtypes = True
    except QParamsError as exc:
        raise CaseFileError(f"{where}: {exc}") from None

    inp = mapping.get("input")
    weight = mapping.get("weight")
    if inp is None and qinput is not None:
        inp = dequantize32(qinput.codes, qinput.qparams)
        notes.append("no float 'input': it is the dequantized qinput")
    if weight is None and qweight is not None:
        weight = dequantize32(qweight.codes, qweight.qparams)
        notes.append("no float 'weight': it is the dequantized qweight")
    if weight is None and module is not None:
        weight = dequantize32(module.weight_codes, module.weight_qparams)
        notes.append("no float 'weight': it is the dequantized qconv.weight")
    missing = [k for k, v in (("input", inp), ("weight", weight)) if v is None]
    if missing:
        raise CaseFileError(
            f"{where}: missing {' and '.join(repr(m) for m in missing)}; a case needs at least "
            "'input' and 'weight' tensors (or 'qinput'/'qweight')"
        )
    for key in ("input", "weight", "bias"):
        if isinstance(mapping.get(key), Quantized):
            raise CaseFileError(
                f"{where}: '{key}' is a quantized tensor; store it as 'q{key}' (or the float "
                f"tensor as '{key}')"
            )
        if key in mapping and not isinstance(mapping[key], np.ndarray) and mapping[key] is not None:
            raise CaseFileError(
                f"{where}: '{key}' must be a tensor, got {type(mapping[key]).__name__}"
            )
    bias = mapping.get("bias")
    setup = None
    if any(x is not None for x in (in_qp, w_qp, out_qp, qinput, qweight, module)):
        prov = mapping.get("provenance") or {}
        if not isinstance(prov, Mapping):
            raise CaseFileError(f"{where}: 'provenance' must be a dict")
        apis = tuple(str(a) for a in prov.get("apis", ()) if isinstance(a, str))
        setup = QuantSetup(
            input_qparams=in_qp,
            weight_qparams=w_qp,
            output_qparams=out_qp,
            input_codes=None if qinput is None else qinput.codes,
            weight_codes=None if qweight is None else qweight.codes,
            module=module,
            used_quantized_dtypes=bool(prov.get("used_quantized_dtypes", used_qdtypes)),
            apis=apis,
        )
    extra_notes = mapping.get("notes") or []
    if isinstance(extra_notes, list):
        notes.extend(str(n) for n in extra_notes)
    try:
        return build_case(
            inp, weight, bias,
            stride=mapping.get("stride", 1),
            padding=mapping.get("padding", 0),
            dilation=mapping.get("dilation", 1),
            groups=mapping.get("groups", 1),
            setup=setup,
            source=source,
            notes=tuple(notes),
            activation=_activation_entry(mapping.get("activation"), where),
        )
    except CaseError as exc:
        raise CaseError(f"{where}: {exc}") from None
    except QParamsError as exc:
        raise CaseFileError(f"{where}: {exc}") from None


def _activation_entry(value: Any, where: str) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise CaseFileError(f"{where}: 'activation' must be a string ('relu'), got "
                            f"{type(value).__name__}")
    return value


def _differs(a: QParams, b: QParams) -> bool:
    return (a.scale, a.zero_point, a.dtype) != (b.scale, b.zero_point, b.dtype)


def _qparams_entry(mapping: Mapping[str, Any], key: str) -> QParams | None:
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(value, Mapping):
        clean = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in value.items()}
        return from_mapping(clean, key)
    raise QParamsError(
        f"{key} must be a dict with 'scale', 'zero_point', 'dtype', got {type(value).__name__}"
    )


def _codes_entry(
    mapping: Mapping[str, Any], key: str, qp: QParams | None, where: str
) -> Quantized | None:
    value = mapping.get(key)
    if value is None:
        return None
    if isinstance(value, Quantized):
        return value
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iu":
        raise CaseFileError(
            f"{where}: '{key}' must be a quantized tensor or an integer array of codes"
        )
    if qp is None:
        owner = "input_qparams" if key == "qinput" else "weight_qparams"
        raise CaseFileError(f"{where}: '{key}' holds integer codes but '{owner}' is missing")
    codes = value.astype(np.int64)
    if codes.size and (codes.min() < qp.dtype_min or codes.max() > qp.dtype_max):
        raise CaseFileError(f"{where}: '{key}' holds codes outside the {qp.dtype} range")
    return Quantized(codes, qp)


def _module_entry(mapping: Mapping[str, Any], where: str) -> ModuleState | None:
    keys = [k for k in mapping if k.startswith("qconv.")]
    if not keys:
        return None
    w = mapping.get("qconv.weight")
    if w is None:
        raise CaseFileError(f"{where}: qconv.* given without 'qconv.weight'")
    if not isinstance(w, Quantized):
        qp = _qparams_entry(mapping, "qconv.weight_qparams")
        w = _codes_entry(mapping, "qconv.weight", qp, where)
        assert w is not None
    bias = mapping.get("qconv.bias")
    if bias is not None:
        if not isinstance(bias, np.ndarray) or bias.dtype.kind != "f":
            raise CaseFileError(f"{where}: 'qconv.bias' must be a float tensor")
        if not np.isfinite(bias).all():
            raise CaseFileError(f"{where}: 'qconv.bias' holds NaN/Inf")
        bias = bias.astype(np.float32)
    scale = _scalar(mapping.get("qconv.scale", 1.0), "qconv.scale", where)
    zp = _scalar(mapping.get("qconv.zero_point", 0), "qconv.zero_point", where)
    out_qp = from_mapping(
        {"scale": scale, "zero_point": zp, "dtype": "quint8"}, "qconv.scale/zero_point", "module"
    )
    return ModuleState(w.codes, w.qparams.with_source("module"), bias, out_qp)


def _scalar(value: Any, name: str, where: str) -> float:
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise CaseFileError(f"{where}: '{name}' must hold one number")
        value = value.reshape(()).item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CaseFileError(f"{where}: '{name}' must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise CaseFileError(f"{where}: '{name}' is too large for a float") from None


# --------------------------------------------------------------------------------------------
# saving


def case_to_mapping(case: ConvCase) -> dict[str, Any]:
    """The flat mapping ``save_case`` writes (numpy arrays and JSON-able values)."""
    m: dict[str, Any] = {"input": case.input, "weight": case.weight}
    if case.bias is not None:
        m["bias"] = case.bias
    m.update(case.geometry.to_dict())
    if case.activation is not None:
        m["activation"] = case.activation
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
            m["qconv.weight"] = mod.weight_codes.astype(CODE_DTYPES[mod.weight_qparams.dtype])
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
        return _npz_bytes(mapping)
    return _safetensors_bytes(mapping)


_ST_DTYPES = {"float32": "F32", "float64": "F64", "float16": "F16", "int64": "I64",
              "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _safetensors_bytes(mapping: Mapping[str, Any]) -> bytes:
    """safetensors with sorted keys (the library's metadata order is not reproducible)."""
    tensors = sorted((k, np.ascontiguousarray(v)) for k, v in mapping.items()
                     if isinstance(v, np.ndarray))
    header: dict[str, Any] = {
        "__metadata__": {k: json.dumps(v) for k, v in sorted(mapping.items())
                         if not isinstance(v, np.ndarray)}
    }
    offset = 0
    for name, arr in tensors:
        dtype = _ST_DTYPES.get(arr.dtype.name)
        if dtype is None:
            raise CaseFileError(f"cannot store '{name}' ({arr.dtype}) in safetensors")
        header[name] = {"dtype": dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    body = b"".join(arr.astype(arr.dtype.newbyteorder("<")).tobytes() for _, arr in tensors)
    return len(text).to_bytes(8, "little") + text + body


def _npz_bytes(mapping: Mapping[str, Any]) -> bytes:
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


# --------------------------------------------------------------------------------------------
# capture from live modules


def capture(
    conv: Any,
    input: Any,
    qconv: Any = None,
    qinput: Any = None,
    *,
    path: str | os.PathLike[str] | None = "qconvdiag_case.pt",
) -> ConvCase:
    """Capture a case from live modules and tensors, and write it to ``path`` (unless None).

    ``conv``: the float ``nn.Conv1d/2d/3d``; ``input``: its float input (or None with
    ``qinput``); ``qconv``: the quantized conv module that disagrees; ``qinput``: the quantized
    tensor you fed it. Example::

        qconvdiag.capture(m, x, qconv=qm, qinput=qx, path="my_case.pt")
    """
    import torch

    if not isinstance(conv, torch.nn.modules.conv._ConvNd) or getattr(conv, "transposed", False):
        raise CaseError("capture() needs a float nn.Conv1d/Conv2d/Conv3d as 'conv'")
    if conv.padding_mode != "zeros":
        raise CaseError(
            f"padding_mode='{conv.padding_mode}' is not supported by torch's quantized conv: "
            "use padding_mode='zeros'"
        )
    padding: Any = conv.padding
    if isinstance(padding, str):
        if padding == "valid":
            padding = 0
        else:
            k = conv.kernel_size
            total = [d * (kk - 1) for d, kk in zip(conv.dilation, k)]
            if any(t % 2 for t in total):
                raise CaseError("padding='same' with an even kernel is asymmetric: pad explicitly")
            padding = tuple(t // 2 for t in total)
    mapping: dict[str, Any] = {
        "weight": conv.weight.detach().float().cpu().numpy().copy(),
        "stride": list(conv.stride),
        "padding": list(padding) if not isinstance(padding, int) else padding,
        "dilation": list(conv.dilation),
        "groups": conv.groups,
    }
    if conv.bias is not None:
        mapping["bias"] = conv.bias.detach().float().cpu().numpy().copy()
    if input is not None:
        mapping["input"] = torch.as_tensor(input).detach().cpu().numpy().copy()
    with capture_warnings():
        if qinput is not None:
            mapping["qinput"] = _tensor_to_numpy(qinput, "qinput", "capture")
        if qconv is not None:
            sd = qconv.state_dict()
            for key in ("weight", "bias", "scale", "zero_point"):
                v = sd.get(key)
                if v is not None:
                    mapping[f"qconv.{key}"] = _tensor_to_numpy(v, f"qconv.{key}", "capture")
            for attr in ("stride", "padding", "dilation", "groups"):
                mine, theirs = getattr(conv, attr), getattr(qconv, attr, None)
                if theirs is not None and attr != "padding" and tuple(np.atleast_1d(mine)) != tuple(
                    np.atleast_1d(theirs)
                ):
                    raise CaseError(
                        f"conv.{attr}={mine} but qconv.{attr}={theirs}: they are not twins"
                    )
    if qconv is not None and "ReLU" in type(qconv).__name__:
        mapping["activation"] = "relu"  # ConvReLU: the float conv's output goes through a ReLU
    mapping["provenance"] = {
        "used_quantized_dtypes": qconv is not None or qinput is not None,
        "apis": (["torch.ao.nn.quantized"] if qconv is not None else [])
        + (["torch.quantize_per_tensor"] if qinput is not None else []),
    }
    case = case_from_mapping(mapping, source="capture")
    if path is not None:
        save_case(case, path)
    return case


# --------------------------------------------------------------------------------------------
# calibration data


def load_calibration(path: str | os.PathLike[str], case: ConvCase,
                     max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """A batch of inputs for the production observers: key ``calib`` or ``input`` in a
    ``.pt``/``.npz``/``.safetensors`` file, shape (B, C, *spatial) matching the case. No tensor
    in the file may exceed ``max_elements`` (the ``--max-elements`` guard)."""
    p = Path(path)
    if not p.exists() or p.is_dir():
        raise CaseFileError(f"--calib {p}: no such file")
    suffix = p.suffix.lower()
    if suffix not in FORMATS:
        raise CaseFileError(f"--calib {p}: unknown extension; use {', '.join(FORMATS)}")
    mapping = _read_any(p, suffix, max_elements)
    data = mapping.get("calib", mapping.get("input"))
    if not isinstance(data, np.ndarray):
        raise CaseFileError(f"--calib {p}: needs a tensor under 'calib' or 'input'")
    from .case import as_float_tensor, check_float32_range

    arr = as_float_tensor(data, "calib", [])
    want = case.input.ndim
    if arr.ndim == want - 1:
        arr = arr[None]
    if arr.ndim != want or arr.shape[1] != case.input.shape[1]:
        raise CaseFileError(
            f"--calib {p}: shape {tuple(arr.shape)} does not match the case input "
            f"(B, {case.input.shape[1]}, ...)"
        )
    try:
        check_float32_range(arr, case.weight, case.bias, "calib")
    except CaseError as exc:
        raise CaseFileError(f"--calib {p}: {exc}") from None
    return arr
