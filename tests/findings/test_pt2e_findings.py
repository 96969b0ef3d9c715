"""Findings on torchao's PT2E flow (issue 15, step 5): the migration snippet QCD060 prints runs,
and PT2E layers that are healthy stay quiet."""

from __future__ import annotations

import pytest
import torch

from qconvdiag import Options, diagnose
from qconvdiag.casefile.generate import forum_case
from qconvdiag.findings.backend_rules import (
    ALTERNATIVE,
    DEFAULT_CONFIG,
    SEVEN_BIT_CONFIG,
    alternative,
)
from tests.cpu import pairs_here


def test_qcd060_s_fix_is_the_alternative():
    """The fix is the PT2E snippet with X86InductorQuantizer's default config, or, where this
    CPU's oneDNN sums int16 pairs (no VNNI: 8-bit activations saturate them), with the 7-bit
    config torchao advises there."""
    report = diagnose(forum_case(), Options(engine="x86"))
    (f,) = [f for f in report.findings if f.code == "QCD060"]
    assert f.fix == alternative()
    if pairs_here("x86_inductor"):
        assert f.fix == ALTERNATIVE.replace(DEFAULT_CONFIG, SEVEN_BIT_CONFIG)
        assert f.fix != ALTERNATIVE and "reduce_range=True" in f.fix
    else:
        assert f.fix == ALTERNATIVE


# the snippet is user code: torch's and torchao's own deprecation notices (torch.jit, pytree's
# LeafSpec) are theirs, not the test's subject
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_qcd060_s_migration_snippet_runs(monkeypatch):
    """The snippet the report gives on this CPU (``alternative()``), pasted after a tiny conv,
    its input and two calibration batches, runs as it is: export (strict), prepare_pt2e with
    X86InductorQuantizer's default config (7-bit activations where oneDNN sums int16 pairs:
    there 8-bit ones saturate them, and the int8 kernel's output leaves the converted graph's,
    37 of 512 outputs by up to 0.62 on this conv), calibration, convert_pt2e, freezing on,
    torch.compile. torch.compile is replaced by torchao's ``lower_pt2e_quantized_to_x86`` (what
    inductor's freezing passes make of the graph, without the ~20 s of compiling on this
    machine): the snippet must have turned freezing on before it compiles, and the result runs
    the int8 kernel (onednn.qconv_pointwise), gives what the converted graph gives, and stays
    near the float conv (calibrated on ``x`` among others)."""
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
    snippet = alternative()
    assert ("reduce_range=True" in snippet) == pairs_here("x86_inductor")
    exec(compile(snippet, "QCD060 fix", "exec"), scope)
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


#: The PT2E traps' codes, and those a BatchNorm folded only into the quantized conv would
#: otherwise raise (QCD024, QCD030): none belongs on a healthy PT2E layer.
TRAPS = {"QCD024", "QCD027", "QCD030"}


def test_the_digits_pt2e_sample_stays_quiet():
    """Every conv of samples/model/digits_pt2e.pt explained in full: no trap fires (the capture
    folded the float model's BatchNorm-free convs as prepare_pt2e quantized them)."""
    import qconvdiag
    from qconvdiag.model.walk import WalkOptions, walk_model
    from tests.repo import SAMPLES

    bundle = qconvdiag.load_bundle(SAMPLES / "model" / "digits_pt2e.pt")
    names = tuple(layer.name for layer in bundle.layers)
    report = walk_model(bundle, WalkOptions(top=0, layers=names)).report
    assert {d.layer for d in report.details} == set(names)
    for d in report.details:
        fired = {f.code for f in d.report.findings}
        assert not fired & TRAPS, (d.layer, fired)


def test_random_pt2e_convs_stay_quiet():
    """Random PT2E convs (tests/pt2e_check.py's generator: every geometry, uint8 activations,
    int8 per-channel weights) whose module holds the float weight quantized: no trap fires,
    on x86_inductor as on the eager engines."""
    import numpy as np

    from qconvdiag.case import ModuleState, QuantSetup, build_case
    from qconvdiag.quantization.qparams import dequantize, per_tensor
    from tests.pt2e_check import pt2e_case

    rng = np.random.default_rng(15)
    checked = 0
    for i in range(12):
        c, relu, float_output = pt2e_case(rng, i)
        if float_output:
            continue
        steps = np.asarray(c.w_qp.scale).reshape((-1,) + (1,) * (c.w.ndim - 1))
        # a float weight that rounds to these codes, and the input the codes came from
        w = dequantize(c.w, c.w_qp) + rng.uniform(-0.45, 0.45, c.w.shape) * steps
        x = dequantize(c.x, c.x_qp)
        module = ModuleState(c.w, c.w_qp.with_source("module"), c.bias,
                             per_tensor(c.out_qp.scale[0], c.out_qp.zero_point[0], "quint8",
                                        "module"))
        setup = QuantSetup(input_qparams=c.x_qp, input_codes=c.x, module=module)
        g = c.geometry
        case = build_case(x, w.astype(np.float32), c.bias, stride=g.stride, padding=g.padding,
                          dilation=g.dilation, groups=g.groups, setup=setup,
                          activation="relu" if relu else None, flow="pt2e")
        fired = {f.code for f in diagnose(case, Options(engine="x86_inductor")).findings}
        assert not fired & TRAPS, (c.label, fired)
        checked += 1
    assert checked >= 6


def test_qcd027_s_fix_folds_the_reference():
    """A conv with a BatchNorm after it, quantized with the BatchNorm folded in (as
    prepare_pt2e does), compared with the conv alone: QCD027, not QCD024/QCD030. Its fix, run
    with the BatchNorm as ``bn``, makes the reference the folded conv: nothing fires then."""
    import numpy as np

    from qconvdiag.case import ModuleState, QuantSetup, build_case
    from qconvdiag.quantization.qparams import QParams, per_tensor, quantize

    torch.manual_seed(3)
    conv, bn = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 4, 8, 8)
    folded = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
    w = folded.weight.detach().numpy()
    w_qp = QParams(tuple(float(v) for v in np.abs(w).reshape(6, -1).max(1) / 127.5),
                   (0,) * 6, "qint8", 0, "module")
    xs = x.numpy()
    x_qp = per_tensor(float(xs.max() - xs.min()) / 255, int(round(-xs.min() * 255
                      / float(xs.max() - xs.min()))), "quint8", "user")
    with torch.no_grad():
        y = folded(x).numpy()
    out_qp = per_tensor(float(y.max() - y.min()) / 255,
                        int(round(-y.min() * 255 / float(y.max() - y.min()))), "quint8",
                        "module")
    setup = QuantSetup(input_qparams=x_qp, input_codes=quantize(xs, x_qp), module=ModuleState(
        quantize(w, w_qp), w_qp, folded.bias.detach().numpy(), out_qp))

    def codes(reference: torch.nn.Conv2d) -> set[str]:
        case = build_case(xs, reference.weight.detach().numpy(),
                          reference.bias.detach().numpy(), padding=1, setup=setup,
                          flow="pt2e")
        return {f.code for f in diagnose(case, Options(engine="x86_inductor")).findings
                if f.path == "as_given"}

    before = codes(conv)
    assert "QCD027" in before and not before & {"QCD024", "QCD030"}, before
    report = diagnose(build_case(xs, conv.weight.detach().numpy(), conv.bias.detach().numpy(),
                                 padding=1, setup=setup, flow="pt2e"),
                      Options(engine="x86_inductor"))
    (fix,) = [f.fix for f in report.findings if f.code == "QCD027"]
    scope = {"torch": torch, "conv": conv, "bn": bn, "x": x}
    exec(compile(fix, "QCD027 fix", "exec"), scope)
    assert not codes(scope["conv"]) & TRAPS


def test_fixes_on_a_pt2e_engine_write_the_quantizer_s_flow():
    """x86_inductor has no torch.ao qconfig (get_default_qconfig("x86_inductor") fails): where
    a fix would set one up, it writes X86InductorQuantizer's flow, with the config this CPU
    needs."""
    report = diagnose(forum_case(), Options(engine="x86_inductor"))
    fixes = {f.code: f.fix for f in report.findings}
    for code, fix in fixes.items():
        assert 'engine = "x86_inductor"' not in fix and 'qconfig("x86_inductor")' not in fix, code
    assert alternative() in fixes["QCD050"]  # its "or the flow that sets them" part
    assert "# or the quantizer's flow, which sets them from observers:" in fixes["QCD050"]
