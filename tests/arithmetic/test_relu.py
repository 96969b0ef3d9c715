"""Fused ReLU (ConvReLU modules, torch.ops.quantized.conv{d}d_relu): the emulation matches
torch's kernels on every engine, natively and with the int16-pairing kernels forced; a layer
quantized by torch's eager flow with a fused ReLU is diagnosed after the activation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qconvdiag import Options, diagnose
from tests.conftest import CODES_MAX_MISMATCH, TELESCOPE_RTOL
from tests.corpus import healthy_layer
from tests.emulation_check import check
from tests.repo import ROOT

CASES = 150


def _exact(result: dict) -> None:
    for engine, stats in result["engines"].items():
        assert stats["mismatched_cases"] <= CODES_MAX_MISMATCH, (engine, stats["failures"][:5])
        assert stats["refused"] == stats["refusal_predicted"], (engine, stats["failures"][:5])
        assert stats["ran"] > CASES // 2, engine


def test_fused_relu_bit_exact_on_this_cpu():
    _exact(check(CASES, seed=11, relu=True))


def test_fused_relu_bit_exact_with_int16_saturating_kernels():
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-m", "tests.emulation_check", str(CASES), "12",
                          "--relu"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600, check=True)
    _exact(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_an_eager_conv_relu_is_diagnosed_after_its_activation(engine):
    """torch's eager flow fuses conv + ReLU into ConvReLU2d: captured, the case says so; the
    torch check passes, the ladder's deltas add up to the error after the activation, the
    float output in the report is after it, and the layer is at its floor."""
    lay = healthy_layer(7, engine, "default", "normal", "conv2d", relu=True)
    assert lay.case.activation == "relu"
    report = diagnose(lay.case, Options(engine=engine))
    assert report.case.activation == "relu" and report.float_output.min >= 0
    for p in report.paths:
        assert p.torch_check.mismatched_elements == 0
        assert p.budget.verdict == "at_floor"
    from qconvdiag.diagnosis import diagnose_runs

    runs, _ = diagnose_runs(lay.case, Options(engine=engine, keep_arrays=True))
    for run in runs:
        y = np.maximum(run.float_output, 0)
        total = sum(run.ladder.deltas.values())
        final = run.ladder.states[[s for s in run.ladder.states][-1]]
        assert np.allclose(total, final - y, rtol=0, atol=TELESCOPE_RTOL * np.abs(y).max())
        assert final.min() >= 0  # every state is measured after the ReLU
