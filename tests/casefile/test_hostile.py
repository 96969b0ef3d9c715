"""Hostile and extreme input: refused without allocating, never a partial file, no NaN."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import qconvdiag.cli as cli
from qconvdiag import Options, diagnose
from qconvdiag.case import QuantSetup, build_case
from qconvdiag.errors import CaseError, CaseFileError
from qconvdiag.io import load_case, save_case
from qconvdiag.quantization.qparams import make_qparams
from tests.repo import ROOT

FORUM = ROOT / "samples" / "forum_conv.pt"
runner = CliRunner()


def _bomb(path: Path, member: str, size: int) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(member, "w", force_zip64=True) as fh:
            chunk = b"\0" * 2**20
            for _ in range(size // 2**20):
                fh.write(chunk)


@pytest.mark.parametrize("name, member", [("bomb.npz", "input.npy"),
                                          ("bomb.pt", "archive/data/0")])
def test_zip_bomb_is_refused_before_inflating(tmp_path, name, member):
    path = tmp_path / name
    _bomb(path, member, 64 * 2**20)
    assert path.stat().st_size < 2**20
    t = time.perf_counter()
    with pytest.raises(CaseFileError, match="zip bomb"):
        load_case(path)
    assert time.perf_counter() - t < 5


def test_npz_header_declaring_a_huge_array_is_refused(tmp_path):
    header = np.lib.format.header_data_from_array_1_0(np.zeros(1, np.float32))
    header["shape"] = (10**6, 10**6)
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    with zipfile.ZipFile(tmp_path / "h.npz", "w") as zf:
        zf.writestr("input.npy", buf.getvalue() + b"\0" * 16)
    with pytest.raises(CaseFileError, match="over the --max-elements guard"):
        load_case(tmp_path / "h.npz")


def test_max_elements_guard_and_how_to_raise_it():
    r = runner.invoke(cli.app, ["explain", str(ROOT / "samples" / "relu_per_channel.npz"),
                                "--max-elements", "1000"])
    assert r.exit_code == 2 and "raise it with --max-elements" in r.stderr
    r = runner.invoke(cli.app, ["random", "--seed", "1", "--shape", "1,4,300,300",
                                "--max-elements", "100000"])
    assert r.exit_code == 2 and "--max-elements" in r.stderr
    with pytest.raises(CaseError, match="over the --max-elements guard"):
        from qconvdiag.io import check_size

        check_size(load_case(FORUM), limit=0)


@pytest.mark.parametrize("args, name", [
    (["--shape", "1,16,3000,3000", "--max-elements", "1000"], "'input' has 144,000,000"),
    (["--shape", "1,16,30000,30000"], "'input' has 14,400,000,000"),  # the default guard
    (["--shape", "1,1,20,20", "--weight-shape", "50,1,1,1", "--max-elements", "1000"],
     "'output' has 20,000"),
    (["--weight-shape", "2000,1,30,30", "--max-elements", "100000", "--recipe", "handmade"],
     "'weight' has 1,800,000"),
])
def test_random_checks_shapes_against_the_guard_before_making_tensors(monkeypatch, args, name):
    import qconvdiag.casefile.generate as generate

    def no_tensors(*args, **kwargs):
        raise AssertionError("a tensor was made before the size check")

    monkeypatch.setattr(generate, "_draw_tensor", no_tensors)
    r = runner.invoke(cli.app, ["random", "--seed", "1", *args])
    assert r.exit_code == 2, r.output
    assert name in r.stderr and "raise it with --max-elements" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", [".npz", ".pt"])
def test_calibration_data_obeys_the_max_elements_guard(tmp_path, fmt):
    calib = np.ones((500, 1, 3, 3), np.float32)  # 4,500 elements; the forum case has 9 each
    path = tmp_path / f"calib{fmt}"
    if fmt == ".npz":
        np.savez(path, calib=calib)
    else:
        import torch

        torch.save({"calib": torch.from_numpy(calib)}, path)
    args = ["explain", str(FORUM), "--calib", str(path), "--json"]
    r = runner.invoke(cli.app, [*args, "--max-elements", "1000"])
    assert r.exit_code == 2, r.output
    assert "'calib' has 4,500 elements, over the --max-elements guard (1,000)" in r.stderr
    assert runner.invoke(cli.app, [*args, "--max-elements", "5000"]).exit_code == 0


@pytest.mark.parametrize("zero_point, exit_code", [(2**31, 2), (2**31 - 1, 0)])
def test_a_zero_point_past_int32_is_a_one_line_error(tmp_path, zero_point, exit_code):
    rng = np.random.default_rng(0)
    path = tmp_path / "zp.npz"
    np.savez(path, input=rng.standard_normal((1, 2, 5, 5)).astype(np.float32),
             weight=rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
             input_qparams=np.array(json.dumps({"scale": 0.1, "zero_point": zero_point,
                                                "dtype": "quint8"})))
    r = runner.invoke(cli.app, ["explain", str(path), "--json"])
    assert r.exit_code == exit_code, r.output
    if exit_code:
        assert len(r.stderr.strip().splitlines()) == 1
        assert "zero_point 2147483648 does not fit in int32" in r.stderr


def _huge(kind):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    if kind == "one input of 3.4e38":
        x[0, 0, 0, 0] = 3.4e38
    elif kind == "input spanning -3e38..3e38":
        x, w = np.sign(x) * np.float32(3e38), w * np.float32(1e-30)
    elif kind == "weights of 3.4e38":
        w[:] = 3.4e38
    return x, w


@pytest.mark.parametrize("kind, fragment", [
    ("one input of 3.4e38", "the conv's output may overflow float32"),
    ("input spanning -3e38..3e38", "a range float32 cannot hold"),
    ("weights of 3.4e38", "the conv's output may overflow float32"),
])
def test_finite_values_that_overflow_float32_are_a_one_line_error(tmp_path, kind, fragment):
    x, w = _huge(kind)
    np.savez(tmp_path / "huge.npz", input=x, weight=w)
    r = runner.invoke(cli.app, ["explain", str(tmp_path / "huge.npz"), "--json"])
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "internal error" not in r.stderr


def test_calibration_values_that_overflow_float32_are_a_one_line_error(tmp_path):
    calib = np.ones((2, 1, 3, 3), np.float32)
    calib[1, 0, 1, 1] = 3.4e38
    np.savez(tmp_path / "calib.npz", calib=calib)
    r = runner.invoke(cli.app, ["explain", str(FORUM), "--calib", str(tmp_path / "calib.npz")])
    assert r.exit_code == 2, r.output
    assert "--calib" in r.stderr and "may overflow float32" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_progress_on_stderr_for_long_diagnoses(monkeypatch):
    monkeypatch.setattr(cli, "PROGRESS_ELEMENTS", 1)
    r = runner.invoke(cli.app, ["explain", str(FORUM), "--json"])
    assert r.exit_code == 0
    assert "probing the engines" in r.stderr and "findings" in r.stderr
    json.loads(r.stdout)  # stdout still carries only the payload


def test_ctrl_c_exits_130_with_one_line_and_writes_nothing(monkeypatch, tmp_path):
    import qconvdiag.diagnosis as d

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(d, "diagnose_runs", interrupted)
    out = tmp_path / "r.json"
    r = runner.invoke(cli.app, ["explain", str(FORUM), "--output", str(out)])
    assert r.exit_code == 130
    assert len(r.stderr.strip().splitlines()) == 1 and "interrupted" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_output_never_overwrites_the_input(tmp_path):
    case = tmp_path / "case.pt"
    case.write_bytes(FORUM.read_bytes())
    for opt in ("--output", "--save-outputs"):
        r = runner.invoke(cli.app, ["explain", str(case), opt, str(case)])
        assert r.exit_code == 2 and "is an input of this run" in r.stderr
    assert case.read_bytes() == FORUM.read_bytes()


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import qconvdiag.casefile.write as write_mod

    def boom(mapping, suffix):
        raise KeyboardInterrupt

    monkeypatch.setattr(write_mod, "encode_case", boom)
    with pytest.raises(KeyboardInterrupt):
        save_case(load_case(FORUM), tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []


def test_json_is_byte_identical_across_runs():
    args = ["random", "--seed", "11", "--recipe", "handmade", "--engine", "all", "--json"]
    assert runner.invoke(cli.app, args).stdout == runner.invoke(cli.app, args).stdout


def _qp(s, z, d="quint8", axis=None):
    return make_qparams(s if isinstance(s, list) else [s], z if isinstance(z, list) else [z], d,
                        axis, "t", "user")


W = np.random.default_rng(0).standard_normal((3, 2, 3, 3)).astype(np.float32)
W_ZERO_CHANNEL = W.copy()
W_ZERO_CHANNEL[1] = 0
EXTREME = {
    "all-zero input": lambda: build_case(np.zeros((1, 2, 5, 5), np.float32), W, None),
    "constant tensors": lambda: build_case(np.full((1, 2, 5, 5), 3, np.float32),
                                           np.full((3, 2, 3, 3), 0.5, np.float32),
                                           np.zeros(3, np.float32)),
    "single-element conv": lambda: build_case(np.ones((1, 1, 1, 1), np.float32),
                                              np.ones((1, 1, 1, 1), np.float32), None),
    "denormal weights": lambda: build_case(np.ones((1, 2, 5, 5), np.float32),
                                           np.full((3, 2, 3, 3), 1e-40, np.float32), None),
    "per-channel weight with a zero channel": lambda: build_case(
        np.ones((1, 2, 5, 5), np.float32), W_ZERO_CHANNEL, None,
        setup=QuantSetup(_qp(1 / 255, 0), _qp([0.01, 1e-30, 0.01], [0, 0, 0], "qint8", 0),
                         _qp(0.1, 0))),
    "outputs exactly on rounding ties": lambda: build_case(
        np.full((1, 1, 2, 2), 0.5, np.float32), np.ones((1, 1, 1, 1), np.float32), None,
        setup=QuantSetup(_qp(0.5, 0), _qp(1.0, 0, "qint8"), _qp(1.0, 0))),
    "eps-sized observer ranges": lambda: build_case(
        (1 + np.random.default_rng(1).random((1, 2, 5, 5)) * 1e-7).astype(np.float32), W, None),
    "tiny and huge values": lambda: build_case(np.full((1, 2, 5, 5), 1e30, np.float32),
                                               np.full((3, 2, 3, 3), 1e-30, np.float32), None),
}


@pytest.mark.parametrize("name", sorted(EXTREME))
def test_extreme_but_valid_numerics_give_valid_reports(name):
    report = diagnose(EXTREME[name](), Options(engine="all"))
    text = json.dumps(report.to_dict(), allow_nan=False)
    assert report.findings, name  # always explained, even if only "at the rounding floor"
    assert "NaN" not in text and "Infinity" not in text
