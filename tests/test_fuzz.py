"""Fuzz: random case files in every format. explain must end with exit 0, 1 or 2, never a
traceback; exit 2 with one line on stderr; exit 0/1 with a schema-valid report and no NaN.

``make test`` runs the fast profile; ``make fuzz`` the long one (QCONVDIAG_HYPOTHESIS_PROFILE).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qconvdiag.cli import app

runner = CliRunner()
SCHEMA = json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())

WEIRD_FLOATS = [0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30, 1e-40, 0.1, 0.0078125, 3.0]
WEIRD_ZPS = [0, 3, 3.7, -14.11, 127, 128, 255, 256, 300, -129, -1e12, 1e20, float("nan")]
DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int64", "bool", "complex64"]


@st.composite
def arrays(draw, base_shape=None):
    dtype = draw(st.sampled_from(DTYPES))
    if base_shape is not None and draw(st.booleans()):
        shape = base_shape
    else:
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=6)))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    a = np.asarray(rng.standard_normal(shape) * draw(st.sampled_from([1.0, 20.0, 1e-6, 1e6])))
    if draw(st.integers(0, 9)) == 0 and a.size:
        a.reshape(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e38]))
    if dtype == "bool":
        return np.asarray(a > 0)
    if dtype.startswith("complex"):
        with np.errstate(invalid="ignore", over="ignore"):
            return np.asarray((a + 1j * a).astype(dtype))
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(a.astype(dtype))


@st.composite
def qparams_values(draw):
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.sampled_from(["junk", [1, 2], 7, None]))
    d = {}
    if draw(st.integers(0, 5)):
        d["scale"] = draw(st.one_of(st.sampled_from(WEIRD_FLOATS),
                                    st.lists(st.sampled_from(WEIRD_FLOATS), max_size=4)))
    if draw(st.integers(0, 5)):
        d["zero_point"] = draw(st.one_of(st.sampled_from(WEIRD_ZPS),
                                         st.lists(st.sampled_from(WEIRD_ZPS), max_size=4)))
    if draw(st.booleans()):
        d["dtype"] = draw(st.sampled_from(["quint8", "qint8", "qint32", "torch.qint8", "float",
                                           3]))
    if draw(st.integers(0, 3)) == 0:
        d["axis"] = draw(st.sampled_from([0, 1, -1, 5, "x", 1.5]))
    return d


GEOMETRY = st.one_of(st.integers(-2, 4), st.sampled_from([10**9, 1.5, "2", None, [1, 2, 3]]),
                     st.lists(st.integers(0, 3), max_size=4))


@st.composite
def mappings(draw):
    """Start from a valid small case and mutate it, so both ends of the CLI get exercised."""
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    c, o, k = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    m = {"input": rng.standard_normal((1, c, 6, 6)).astype(np.float32),
         "weight": rng.standard_normal((o, c, k, k)).astype(np.float32)}
    if draw(st.booleans()):
        m["bias"] = rng.standard_normal(o).astype(np.float32)
    if draw(st.booleans()):
        m["input_qparams"] = {"scale": 0.02, "zero_point": 128, "dtype": "quint8"}
        m["weight_qparams"] = {"scale": 0.01, "zero_point": 0, "dtype": "qint8"}
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        key = draw(st.sampled_from(["input", "weight", "bias", "stride", "padding", "dilation",
                                    "groups", "input_qparams", "weight_qparams",
                                    "output_qparams", "qinput", "qweight", "qconv.weight",
                                    "qconv.scale", "qconv.zero_point", "provenance", "junk",
                                    "notes"]))
        if key in ("input", "weight", "bias", "qinput", "qweight", "qconv.weight"):
            m[key] = draw(arrays(base_shape=m.get(key, np.zeros(0)).shape))
        elif key in ("stride", "padding", "dilation", "groups"):
            m[key] = draw(GEOMETRY)
        elif key.endswith("qparams"):
            m[key] = draw(qparams_values())
        elif key in ("qconv.scale", "qconv.zero_point"):
            m[key] = draw(st.sampled_from(WEIRD_FLOATS + WEIRD_ZPS))
        else:
            m[key] = draw(st.sampled_from([{"a": {"b": [1, {"c": None}]}}, [[1], [2]], "x", 5]))
    if draw(st.integers(0, 12)) == 0:
        m.pop(draw(st.sampled_from(sorted(m))), None)
    return m


def _write(path: Path, m: dict, fmt: str) -> None:
    import torch

    from qconvdiag.casefile.write import npz_bytes

    if fmt == ".pt":
        obj = {k: (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v)
               for k, v in m.items()}
        torch.save(obj, path)
    elif fmt == ".npz":
        path.write_bytes(npz_bytes({k: v for k, v in m.items()}))
    else:
        header: dict = {"__metadata__": {k: json.dumps(v) for k, v in m.items()
                                         if not isinstance(v, np.ndarray)}}
        body = b""
        for k, v in m.items():
            if not isinstance(v, np.ndarray):
                continue
            if v.dtype.kind == "c":
                v = v.real.astype(np.float32)
            code = {"float32": "F32", "float64": "F64", "float16": "F16", "int8": "I8",
                    "uint8": "U8", "int64": "I64", "bool": "BOOL"}[v.dtype.name]
            data = np.ascontiguousarray(v).tobytes()
            header[k] = {"dtype": code, "shape": list(v.shape),
                         "data_offsets": [len(body), len(body) + len(data)]}
            body += data
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def _no_nan(text: str) -> dict:
    def refuse(name):
        raise AssertionError(f"JSON holds {name}")

    return json.loads(text, parse_constant=refuse)


def _check(path: Path, gate: list[str]) -> int:
    """explain's exit code on this file, after checking what it printed."""
    r = runner.invoke(app, ["explain", str(path), "--json", *gate])
    assert r.exception is None or isinstance(r.exception, SystemExit), (
        f"crash on {path.name}: {r.exception!r}")
    assert r.exit_code in (0, 1, 2), r.output
    assert "Traceback" not in r.output
    if r.exit_code == 2:
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("qconvdiag: error:"), r.stderr
    else:
        jsonschema.validate(_no_nan(r.stdout), SCHEMA)
    return r.exit_code


def test_fuzz_case_files():
    """Every drawn file ends in a report or a one-line refusal, and the profile's examples
    (derandomized) reach both ends: reports (exit 0/1) and refusals (exit 2)."""
    exits: Counter[int] = Counter()

    @settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(m=mappings(), fmt=st.sampled_from([".pt", ".npz", ".safetensors"]),
           cut=st.one_of(st.none(), st.none(), st.none(), st.floats(0.0, 0.999)),
           gate=st.sampled_from([[], [], ["--fail-under-sqnr", "35"], ["--fail-on", "warning"]]))
    def explain_one(m, fmt, cut, gate):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"case{fmt}"
            _write(path, m, fmt)
            if cut is not None:
                data = path.read_bytes()
                path.write_bytes(data[: math.floor(len(data) * cut)])
            exits[_check(path, gate)] += 1

    explain_one()
    assert exits[2] > 0 and exits[0] + exits[1] > 0, f"exit codes {dict(exits)}"
