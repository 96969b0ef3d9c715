"""Whole-report comparisons against golden files, and schema validation of every report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources

import jsonschema
import pytest

from qconvdiag import Options, diagnose
from qconvdiag.io import load_case
from tests.conftest import GOLDEN_ATOL_FRACTION, GOLDEN_RTOL, REFERENCE_RTOL
from tests.golden_reports import GOLDEN
from tests.repo import ROOT

SAMPLES = sorted(p.name for p in (ROOT / "samples").iterdir()
                 if p.suffix in (".pt", ".npz", ".safetensors"))


@pytest.fixture(scope="module")
def fresh_reports():
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-m", "tests.golden_reports"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _compare(got, want, atol, where="$"):
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (
            where, sorted(set(got) ^ set(want)))
        for k in want:
            _compare(got[k], want[k], atol, f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _compare(g, w, atol, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert isinstance(got, (int, float)), where
        if where.endswith("sqnr_db"):
            # compare the error's rms relative to the output's, 10^(-SQNR/20): a tiny error
            # (SQNR 160 dB) is only known to the float reference's accuracy
            assert 10 ** (-got / 20) == pytest.approx(
                10 ** (-want / 20), rel=GOLDEN_RTOL, abs=REFERENCE_RTOL), where
        else:
            assert got == pytest.approx(want, rel=GOLDEN_RTOL, abs=atol), where
    else:
        assert got == want, where


@pytest.mark.parametrize("sample", SAMPLES)
def test_golden_report(sample, fresh_reports):
    want = json.loads((GOLDEN / f"{sample}.json").read_text())
    atol = GOLDEN_ATOL_FRACTION * max(want["float_output"]["abs_max"], 1e-12)
    _compare(fresh_reports[sample], want, atol)


def _schema():
    return json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())


@pytest.mark.parametrize("sample", SAMPLES)
def test_every_sample_report_validates_against_the_schema(sample):
    report = diagnose(load_case(ROOT / "samples" / sample), Options(engine="all"))
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    jsonschema.validate(data, _schema())
