"""Findings on torchao's PT2E flow (issue 15, step 5): the migration snippet QCD060 prints runs,
and PT2E layers that are healthy stay quiet."""

from __future__ import annotations

import pytest
import torch

from qconvdiag import Options, diagnose
from qconvdiag.casefile.generate import forum_case
from qconvdiag.findings.backend_rules import ALTERNATIVE


def test_qcd060_s_fix_is_the_alternative():
    report = diagnose(forum_case(), Options(engine="x86"))
    (f,) = [f for f in report.findings if f.code == "QCD060"]
    assert f.fix == ALTERNATIVE


def test_qcd060_s_migration_snippet_runs(monkeypatch):
    """The snippet, pasted after a tiny conv, its input and two calibration batches, runs as it
    is: export (strict), prepare_pt2e with X86InductorQuantizer's default config, calibration,
    convert_pt2e, freezing on, torch.compile. torch.compile is replaced by torchao's
    ``lower_pt2e_quantized_to_x86`` (what inductor's freezing passes make of the graph, without
    the ~20 s of compiling on this machine): the snippet must have turned freezing on before it
    compiles, and the result runs the int8 kernel (onednn.qconv_pointwise), gives what the
    converted graph gives, and stays near the float conv (calibrated on ``x`` among others)."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    calibration_batches = [x, torch.randn(2, 3, 8, 8)]
    monkeypatch.setattr(torch._inductor.config, "freezing", False)
    compiled: list[torch.fx.GraphModule] = []

    def compile_with_freezing(model):  # type: ignore[no-untyped-def]
        assert torch._inductor.config.freezing, "the snippet compiles without freezing"
        lowered = lower_pt2e_quantized_to_x86(model, (x,))
        compiled.append(lowered)
        return lowered

    monkeypatch.setattr(torch, "compile", compile_with_freezing)
    scope = {"torch": torch, "conv": conv, "x": x,
             "calibration_batches": calibration_batches}
    exec(compile(ALTERNATIVE, "QCD060 fix", "exec"), scope)
    (lowered,) = compiled
    targets = {str(n.target) for n in lowered.graph.nodes}
    assert "onednn.qconv_pointwise.default" in targets, targets
    with torch.no_grad():
        expected, eager = conv(x), scope["converted"](x)
    y = scope["y"]
    assert y.shape == expected.shape
    torch.testing.assert_close(y, eager, atol=1e-4, rtol=1e-4)
    sqnr = 10 * torch.log10(expected.pow(2).sum() / (y - expected).pow(2).sum())
    assert sqnr > 25, float(sqnr)


@pytest.fixture(autouse=True)
def _restore_freezing():  # type: ignore[no-untyped-def]
    before = torch._inductor.config.freezing
    yield
    torch._inductor.config.freezing = before
