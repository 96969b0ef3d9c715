"""QCD051 behind a saturated int16 accumulation (discuss.pytorch.org 220920, on a CPU without
AVX512-VNNI): the float output is -0.515 and the output zero point 0 leaves no room for it, but
the saturated pair sums move the integer output to +0.146, inside the range. The ladder's
isolated view gave output clipping 38% of the excess, and the verdict said "38% of the excess
has no named cause": QCD051 counted only the saturated outputs of the emulation. It now counts
the float outputs beyond the range where the emulation shows none, and the verdict names it
second, the first fix alone leaving the conv broken (on a VNNI CPU, where nothing saturates,
QCD051 is the error it always was)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WEIGHT = [[9, -32, 17, 3, -67], [-97, -41, 47, 84, -56], [-128, -125, 11, 63, 54],
          [-15, -58, -31, 50, 48], [23, -3, 64, -87, -91]]


def _case(path: Path) -> None:
    """The post's numbers: input codes all 200 (scale 0.012728, zero point 33), int8 weight
    codes at scale 0.00292, zero point -11, output scale 0.02091, zero point 0, bias 0."""
    import torch.ao.nn.quantized as nnq

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():  # torch's quantized dtypes' deprecation notices
        warnings.simplefilter("ignore")
        qx = torch._make_per_tensor_quantized_tensor(
            torch.full((1, 1, 5, 5), 200, dtype=torch.uint8), 0.012728, 33)
        qw = torch._make_per_tensor_quantized_tensor(torch.tensor([[WEIGHT]], dtype=torch.int8),
                                                     0.00292, -11)
        conv = torch.nn.Conv2d(1, 1, 5)
        with torch.no_grad():
            conv.weight.copy_(qw.dequantize())
            conv.bias.zero_()
        qm = nnq.Conv2d(1, 1, 5)
        qm.set_weight_bias(qw, torch.zeros(1))
        qm.scale, qm.zero_point = 0.02091, 0
        qconvdiag.capture(conv, qx.dequantize(), qconv=qm, qinput=qx, path=path)


def test_an_output_clip_behind_a_saturated_accumulation_is_named(tmp_path):
    case = tmp_path / "clip.pt"
    _case(case)
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-m", "qconvdiag", "explain", str(case), "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    (verdict,) = [v for v in report["verdicts"] if v["path"] == "as_given"]
    causes = [c["code"] for c in verdict["causes"]]
    if "QCD040" not in causes:
        pytest.fail(f"this CPU's AVX2 kernels do not saturate here: causes {causes}")
    assert causes[:2] == ["QCD040", "QCD051"]
    (clip,) = [f for f in report["findings"]
               if f["code"] == "QCD051" and f["path"] == "as_given"]
    assert clip["severity"] == "error" and "the float output reaches -0.515" in clip["message"]
    # what the stage table shows: the integer outputs stayed inside the range
    assert "moved the integer outputs back inside it" in clip["message"]
