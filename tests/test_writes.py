"""Output files: checked before any work, put in place together, never over a non-file."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qconvdiag.cli as cli
from qconvdiag.errors import UsageError
from qconvdiag.writes import PendingWrites, atomic_write
from tests.repo import ROOT

FORUM = str(ROOT / "samples" / "forum_conv.pt")
runner = CliRunner()


def _one_line_error(r, fragment):
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "internal error" not in r.stderr


def _special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    sock_path = tmp_path / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    return sock, {"a FIFO": fifo, "a directory": folder, "a socket": sock_path}


@pytest.mark.parametrize("option", ["--output", "--save-outputs"])
def test_a_device_fifo_socket_or_directory_destination_is_refused_and_left_alone(tmp_path,
                                                                                   option):
    sock, targets = _special_files(tmp_path)
    with sock:
        before = {p: os.lstat(p).st_mode for p in targets.values()}
        for kind, target in targets.items():
            r = runner.invoke(cli.app, ["explain", FORUM, option, str(target)])
            _one_line_error(r, f"is {kind}")
        assert {p: os.lstat(p).st_mode for p in targets.values()} == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "folder", "sock"]
    with pytest.raises(UsageError, match="FIFO"):
        atomic_write(targets["a FIFO"], b"data")
    assert stat.S_ISFIFO(os.lstat(targets["a FIFO"]).st_mode)


def test_a_symlink_is_written_through_not_replaced(tmp_path):
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(real)
    r = runner.invoke(cli.app, ["explain", FORUM, "--json", "--output", str(link)])
    assert r.exit_code == 0, r.output
    assert link.is_symlink() and real.read_text() == r.stdout


def test_every_destination_is_checked_before_work_and_a_failed_run_writes_nothing(tmp_path):
    report = tmp_path / "r.json"
    r = runner.invoke(cli.app, ["explain", FORUM, "--output", str(report),
                                "--save-outputs", str(tmp_path)])
    _one_line_error(r, "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_outputs_are_put_in_place_only_when_the_whole_run_succeeded(tmp_path, monkeypatch):
    import qconvdiag.render.npz as npz

    def broken(report):
        raise ValueError("boom")

    monkeypatch.setattr(npz, "npz_bytes", broken)
    old = tmp_path / "r.json"
    old.write_text("the previous report")
    args = ["random", "--seed", "2", "--save", str(tmp_path / "case.npz"),
            "--output", str(old), "--save-outputs", str(tmp_path / "t.npz")]
    r = runner.invoke(cli.app, args)
    assert r.exit_code == 2 and "internal error: ValueError: boom" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert old.read_text() == "the previous report"


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return tmp_path / "file" / "r.json", "is not a directory"


OUTPUT_PATHS = {
    "missing directory": lambda tmp: (tmp / "missing" / "r.json", "does not exist"),
    "under a file": _under_a_file,
}
if Path("/proc").is_dir():
    OUTPUT_PATHS["in /proc"] = lambda tmp: (Path("/proc/qconvdiag-test.json"), "cannot create")


@pytest.mark.parametrize("where", sorted(OUTPUT_PATHS))
def test_unwritable_output_paths_are_one_line_errors(tmp_path, where):
    target, fragment = OUTPUT_PATHS[where](tmp_path)
    before = sorted(tmp_path.rglob("*"))
    r = runner.invoke(cli.app, ["explain", FORUM, "--output", str(target)])
    _one_line_error(r, fragment)
    assert sorted(tmp_path.rglob("*")) == before


def test_pending_writes_discard_their_temporary_files(tmp_path):
    with pytest.raises(KeyboardInterrupt), PendingWrites() as writes:
        dest = writes.reserve(tmp_path / "a.json", "--output")
        writes.write(dest, b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_two_options_naming_one_file_are_refused(tmp_path):
    target = tmp_path / "same.npz"
    cases = [
        ["explain", FORUM, "--output", str(tmp_path / "same.json"),
         "--save-outputs", str(tmp_path / "same.json")],
        ["random", "--seed", "1", "--save", str(target), "--save-outputs", str(target)],
        ["random", "--seed", "1", "--save", str(target), "--output", str(target)],
    ]
    (tmp_path / "existing.npz").write_bytes(b"old")
    os.link(tmp_path / "existing.npz", tmp_path / "hardlink.npz")
    (tmp_path / "symlink.npz").symlink_to(tmp_path / "existing.npz")
    for alias in ("hardlink.npz", "symlink.npz"):
        cases.append(["random", "--seed", "1", "--save-outputs", str(tmp_path / "existing.npz"),
                      "--save", str(tmp_path / alias)])
    for args in cases:
        r = runner.invoke(cli.app, args)
        _one_line_error(r, "names the same file as")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "existing.npz", "hardlink.npz", "symlink.npz"]
    assert (tmp_path / "existing.npz").read_bytes() == b"old"


def test_save_over_the_calibration_file_is_refused(tmp_path):
    import numpy as np

    calib = tmp_path / "calib.npz"
    np.savez(calib, calib=np.ones((2, 1, 3, 3), np.float32))
    before = calib.read_bytes()
    r = runner.invoke(cli.app, ["random", "--seed", "0", "--recipe", "forum",
                                "--calib", str(calib), "--save", str(calib)])
    _one_line_error(r, "is an input of this run")
    assert calib.read_bytes() == before


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002], ids=oct)
def test_new_files_follow_the_umask_like_torch_save(tmp_path, mask):
    import torch

    old = os.umask(mask)
    try:
        torch.save({"x": torch.zeros(1)}, tmp_path / "torch.pt")
        r = runner.invoke(cli.app, ["random", "--seed", "0", "--recipe", "forum",
                                    "--save", str(tmp_path / "case.pt"),
                                    "--output", str(tmp_path / "r.json"),
                                    "--save-outputs", str(tmp_path / "t.npz")])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    want = stat.S_IMODE((tmp_path / "torch.pt").stat().st_mode)
    assert want == 0o666 & ~mask
    for name in ("case.pt", "r.json", "t.npz"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name


def test_a_replaced_file_keeps_its_permissions(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")
    target.chmod(0o640)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640


@pytest.mark.parametrize("option, name, ok", [
    ("--save-outputs", "t.txt", "t.npz"),
    ("--save-outputs", "t", "T.NPZ"),
    ("--output", "r.txt", "r.json"),
    ("--save", "case.txt", "case.safetensors"),
])
def test_one_rule_for_every_file_written_the_extension_names_the_format(tmp_path, option,
                                                                         name, ok):
    r = runner.invoke(cli.app, ["random", "--seed", "0", "--recipe", "forum",
                                option, str(tmp_path / name)])
    _one_line_error(r, "needs a name ending in")
    assert list(tmp_path.iterdir()) == []
    r = runner.invoke(cli.app, ["random", "--seed", "0", "--recipe", "forum",
                                option, str(tmp_path / ok)])
    assert r.exit_code == 0, r.output
    assert [p.name for p in tmp_path.iterdir()] == [ok]


#: Runs the real command line in a subprocess that signals itself in the middle of writing one
#: output: after the second chunk of that file (chunks made small so the files have several).
KILLED_MID_WRITE = """
import os, signal, sys
import qconvdiag.writes as writes

which, signum = sys.argv[1], getattr(signal, sys.argv[2])
# Python's own Ctrl-C handler, also when started with SIGINT ignored (a background job)
signal.signal(signal.SIGINT, signal.default_int_handler)
writes.WRITE_CHUNK = 1024
state = {"file": None, "chunks": 0}
real_os_write, real_pending_write = os.write, writes.PendingWrites.write

def pending_write(self, dest, data):
    state.update(file=dest.label.split()[0], chunks=0, size=len(data))
    return real_pending_write(self, dest, data)

def os_write(fd, data):
    n = real_os_write(fd, data)
    if state["file"] == which:
        state["chunks"] += 1
        if state["chunks"] == 2:
            assert state["size"] > 3 * writes.WRITE_CHUNK  # the file is not done yet
            os.kill(os.getpid(), signum)
    return n

writes.PendingWrites.write = pending_write
os.write = os_write
sys.argv = ["qconvdiag", *sys.argv[3:]]
from qconvdiag.cli import main
main()
"""


@pytest.mark.parametrize("option, signame", [
    ("--output", "SIGKILL"), ("--output", "SIGINT"), ("--output", "SIGTERM"),
    ("--save-outputs", "SIGKILL"), ("--save-outputs", "SIGINT"), ("--save-outputs", "SIGTERM"),
])
def test_a_kill_in_the_middle_of_a_write_never_leaves_a_truncated_file(tmp_path, option,
                                                                       signame):
    import subprocess
    import sys

    report, tensors = tmp_path / "r.json", tmp_path / "t.npz"
    report.write_text("previous report")
    tensors.write_bytes(b"previous tensors")
    run = subprocess.run(
        [sys.executable, "-c", KILLED_MID_WRITE, option, signame, "explain", FORUM,
         "--json", "--output", str(report), "--save-outputs", str(tensors)],
        capture_output=True, text=True, cwd=ROOT)
    assert report.read_text() == "previous report"
    assert tensors.read_bytes() == b"previous tensors"
    left = sorted(p for p in tmp_path.iterdir() if p not in (report, tensors))
    if signame == "SIGKILL":  # no clean-up possible: the partial file is a hidden temporary
        assert run.returncode == -9, run.stderr
        killed = report if option == "--output" else tensors
        partial = [p for p in left if p.name.startswith(f".{killed.name}.")]
        assert len(partial) == 1 and partial[0].name.endswith(".tmp"), left
        assert partial[0].stat().st_size == 2 * 1024  # the signal landed mid-write
    else:
        code, word = (130, "interrupted") if signame == "SIGINT" else (143, "terminated")
        assert run.returncode == code, run.stderr
        assert run.stderr.strip().splitlines() == [f"qconvdiag: {word}; nothing was written"]
        assert left == []


def test_a_device_node_is_refused_before_anything_is_created_beside_it():
    with PendingWrites() as writes, pytest.raises(UsageError, match="is a character device"):
        writes.reserve(os.devnull, "--output")
