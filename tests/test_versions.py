"""The torch releases verified: declared once, consistent with the packaging, and said in the
report when the installed torch is outside them."""

from __future__ import annotations

import re

import torch

from qconvdiag import Options, diagnose
from qconvdiag.casefile.generate import forum_case
from qconvdiag.versions import VERIFIED_TORCH, torch_release, torch_verified
from tests.repo import ROOT


def test_packaging_requires_the_oldest_verified_release_and_pins_a_verified_one():
    pyproject = (ROOT / "pyproject.toml").read_text()
    minimum = re.search(r'"torch>=(\d+)\.(\d+)"', pyproject)
    assert minimum is not None
    assert (int(minimum.group(1)), int(minimum.group(2))) == min(VERIFIED_TORCH)
    pinned = re.search(r"^torch==(\S+)", (ROOT / "constraints.txt").read_text(), re.M)
    assert pinned is not None and torch_verified(pinned.group(1))
    assert f"torch {min(VERIFIED_TORCH)[0]}.{min(VERIFIED_TORCH)[1]}" in (
        ROOT / "README.md").read_text()


def test_the_test_suite_runs_on_a_verified_release():
    assert torch_verified(), torch.__version__


def test_release_parsing():
    assert torch_release("2.13.0+cpu") == (2, 13)
    assert torch_release("2.14.0a0+git1234") == (2, 14)
    assert torch_release("nonsense") is None


def test_the_report_says_when_torch_is_outside_the_verified_releases(monkeypatch):
    report = diagnose(forum_case(), Options(engine="x86"))
    assert not any("outside the releases" in n for n in report.case.notes)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    data = diagnose(forum_case(), Options(engine="x86")).to_dict()
    notes = data["case"]["notes"]
    assert any(n.startswith("torch 2.99.0 is outside the releases qconvdiag was verified on")
               for n in notes), notes
    assert data["paths"][0]["torch_check"]["ran"]  # the per-output check still runs
