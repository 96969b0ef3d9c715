"""Findings on the error budget: what fires, how severe, on which path, and what the verdict
says. Every code's triggers and near misses are in the corpus (tests/findings/test_corpus.py); every
fix is run with torch (tests/findings/test_fixes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag import Options, diagnose
from qconvdiag.arithmetic.engines import refusals
from qconvdiag.case import ConvCase, build_case
from qconvdiag.casefile.generate import forum_case
from qconvdiag.io import load_case
from qconvdiag.measure.budget import FAR
from tests.corpus import healthy_layer
from tests.corpus_faults import layer, qp
from tests.repo import ROOT


def _codes(report, path=None):  # type: ignore[no-untyped-def]
    return {f.code: f.severity for f in report.findings if path is None or f.path == path}


def test_the_forum_verdict_names_its_three_causes_and_a_first_fix():
    report = diagnose(forum_case(), Options(engine="x86"))
    v = report.verdict
    assert v is not None and v.judged and v.path == "as_given" and v.status == "broken"
    assert [c.code for c in v.causes] == ["QCD024", "QCD050", "QCD021"]
    assert sum(c.share for c in v.causes) == pytest.approx(1.0, abs=0.01)
    assert v.first_fix is not None
    assert "qm.set_weight_bias(qw, conv.bias)" in v.first_fix  # the weight it never received
    production = next(x for x in report.verdicts if x.path == "production")
    assert production.status == "at_floor" and production.healthy


def test_a_never_set_weight_is_named_where_saturated_outputs_hide_it() -> None:
    """The forum's module on a 6x6 input: every output saturates at 255 with the weight the
    module runs (uninitialised codes) as with the meant one, so in the chain the module's
    state adds nothing. Judged by its effect alone on the float path (conv(x, its weight -
    the meant one)), the never-set weight is an error the verdict names first, before the output
    qparams (a user sweep's verdict was QCD050 100%: its fix alone gave 4.4 dB, with the
    weight repacked too 51.6 dB)."""
    import dataclasses

    base = forum_case()
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(1, 1, 6, 6)).astype(np.float32)
    s = base.setup
    module = dataclasses.replace(s.module, stored_codes=rng.integers(1, 128, size=(1, 1, 3, 3)))
    setup = dataclasses.replace(s, input_codes=np.clip(
        np.rint(x / s.input_qparams.scale[0]) + s.input_qparams.zero_point[0], 0, 255
    ).astype(np.int64), module=module)
    case = build_case(x, base.weight, base.bias, setup=setup, source="test")
    report = diagnose(case, Options(engine="x86"))
    ladder = {st.id: st for st in report.paths[0].stages}
    assert ladder["module_state"].delta.rmse == 0  # 255 either way
    assert ladder["module_state"].isolated.rmse > 100 * report.paths[0].budget.floor_rmse
    v = report.verdict
    assert v is not None and v.status == "broken"
    assert [(c.code, c.severity) for c in v.causes[:2]] == [("QCD024", "error"),
                                                            ("QCD050", "error")], v.causes


def test_the_production_path_is_advice_never_an_error():
    """A production path broken by its own default (a float-only case whose output observer
    cannot see the extremes: outputs of 1e6 next to 1e-3) reports at most warnings."""
    for engine in ("x86", "qnnpack"):
        report = diagnose(forum_case(), Options(engine=engine))
        assert all(f.severity != "error" for f in report.findings if f.path == "production")
    big = layer(1)
    report = diagnose(big.case(big.setup(input_qparams=big.input_qp(40))), Options())
    assert any(f.severity == "error" for f in report.findings if f.path == "as_given")


def test_gates_judge_the_judged_path_only():
    """--fail-on counts the judged path's findings: an as_given path that is healthy passes,
    whatever the advice on the production path says."""
    lay = healthy_layer(3, "x86", "default", "relu", "conv2d")
    report = diagnose(lay.case, Options(engine="x86", fail_on="warning"))
    assert report.status == "ok", report.gate
    report = diagnose(forum_case(), Options(engine="x86", fail_on="error"))
    assert report.status == "fail"
    assert all(b.startswith("QCD") for b in report.gate.breaches)
    judged = {f.code for f in report.findings if f.path == "as_given" and f.severity == "error"}
    assert {b.split()[0] for b in report.gate.breaches} == judged


def test_readme_ci_recipe_passes_healthy_samples_and_fails_the_forum():
    for sample, status in (("relu_per_channel.npz", "ok"),
                           ("depthwise_outlier.safetensors", "ok"),
                           ("forum_conv.pt", "fail"), ("conv1d_handmade.pt", "fail")):
        report = diagnose(load_case(ROOT / "samples" / sample), Options(fail_on="warning"))
        assert report.status == status, (sample, report.gate)


def test_fixes_are_checked_against_the_engine():
    """onednn takes only symmetric weights: the forum's QCD024 fix there repacks a symmetric
    weight, not the user's zero point -14 (which onednn refuses)."""
    report = diagnose(forum_case(), Options(engine="onednn"))
    f024 = next(f for f in report.findings if f.code == "QCD024")
    assert "-14" not in f024.fix and ", 0, torch.qint8)" in f024.fix
    assert "QCD022" in _codes(report, "as_given")
    x86 = next(f for f in diagnose(forum_case(), Options(engine="x86")).findings
               if f.code == "QCD024")
    assert "0.07086614519357681, -14, torch.qint8" in x86.fix


def test_numbers_in_messages_are_torch_s():
    """The conv1d sample's weight zero point 135.828 is truncated by torch to 135 (outside
    qint8's range): messages say 135, and no fix offers 136."""
    report = diagnose(load_case(ROOT / "samples" / "conv1d_handmade.pt"), Options())
    f021 = next(f for f in report.findings if f.code == "QCD021")
    assert "with 135 (torch truncates 135.828)" in f021.message
    assert all("= 136" not in f.fix and "136, torch" not in f.fix for f in report.findings)


def test_a_fresh_module_captured_alone_is_named_qcd024_not_a_rounding_problem():
    import torch

    import qconvdiag

    conv = torch.nn.Conv2d(4, 6, 3, padding=1).eval()
    x = torch.rand(1, 4, 8, 8)
    qm = torch.ao.nn.quantized.Conv2d(4, 6, 3, padding=1)  # weight never set
    qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    codes = _codes(diagnose(case, Options(engine="x86")), "as_given")
    assert "QCD024" in codes and "QCD026" not in codes


def test_single_output_cases_get_no_output_scale_verdicts():
    """One output value does not show an output range: no QCD052 on the forum's production
    path, whose 7-bit output scale is twice what 803.69 alone needs."""
    report = diagnose(forum_case(), Options(engine="x86"))
    assert "QCD052" not in _codes(report)


def test_reduce_range_is_named_as_the_default_trade_off_not_a_coarse_scale():
    lay = healthy_layer(1, "x86", "default", "relu", "conv2d")
    codes = _codes(diagnose(lay.case, Options(engine="x86")))
    assert codes.get("QCD042") == "info" and "QCD052" not in codes and "QCD012" not in codes


def test_stage_deltas_within_the_reference_noise_are_exact():
    report = diagnose(forum_case(), Options(engine="x86"))
    b = next(p for p in report.paths if p.name == "as_given").budget
    assert b.stage("bias_quantization").exact and b.stage("bias_quantization").excess == 0


def test_ignore_skips_codes_and_rejects_unknown():
    from qconvdiag.errors import UsageError

    report = diagnose(forum_case(), Options(ignore=("QCD024", "QCD060")))
    assert {"QCD024", "QCD060"}.isdisjoint(f.code for f in report.findings)
    with pytest.raises(UsageError, match="unknown finding"):
        diagnose(forum_case(), Options(ignore=("QCD999",)))


def test_qcd061_when_torch_disagrees_with_the_emulation(monkeypatch):
    import qconvdiag.diagnosis as d

    lay = layer(2)
    case = lay.case(lay.setup())
    real = d.emulate

    def off_by_one(*args, **kwargs):  # type: ignore[no-untyped-def]
        em = real(*args, **kwargs)
        object.__setattr__(em, "output_codes", np.clip(em.output_codes + 1, 0, 255))
        return em

    assert "QCD061" not in _codes(diagnose(case))
    monkeypatch.setattr(d, "emulate", off_by_one)
    assert _codes(diagnose(case)).get("QCD061") == "warning"


def test_every_weight_fix_is_accepted_by_its_engine():
    """A clipping asymmetric weight on every engine: each fix that requantizes the weight uses
    qparams the engine accepts (onednn: zero point 0)."""
    import re

    from qconvdiag.findings.fixes import checked

    lay = layer(3)
    case = lay.case(lay.setup(weight_qparams=qp(float(np.abs(lay.w).max()) / 127.5 / 4, 5,
                                                "qint8")))
    for engine in ("x86", "fbgemm", "onednn", "qnnpack"):
        report = diagnose(case, Options(engine=engine))
        assert {"QCD020", "QCD022"} & set(_codes(report)), engine
        for f in report.findings:
            for scale, zp in re.findall(r"quantize_per_tensor\(conv\.weight\.detach\(\), "
                                        r"([0-9.e-]+), (-?\d+), torch\.qint8\)", f.fix):
                kernel = "onednn" if engine == "onednn" else "fbgemm"
                assert not refusals(kernel, qp(0.1, 0), qp(float(scale), int(zp), "qint8"), 1), \
                    (engine, f.code, f.fix)
    with pytest.raises(Exception, match="would be refused"):
        checked("onednn", qp(0.1, 0), qp(0.1, 3, "qint8"), 1)


def test_a_case_without_setup_is_judged_on_production():
    case = build_case(np.ones((1, 2, 5, 5), np.float32), np.full((3, 2, 3, 3), 0.1, np.float32),
                      None, setup=None)
    report = diagnose(case, Options(engine="x86"))
    assert report.verdict is not None and report.verdict.path == "production"


@pytest.mark.parametrize("out_channels", [2, 3])
def test_per_channel_weight_along_axis_1_is_explained_not_a_crash(out_channels):
    """2 scales along axis 1: with 2 output channels torch accepts it silently (and applies
    them per output channel); with 3 it refuses. Either way the report says so (QCD025)."""
    from qconvdiag.case import QuantSetup
    from qconvdiag.quantization.qparams import make_qparams

    rng = np.random.default_rng(0)
    case = build_case(
        rng.standard_normal((1, 2, 5, 5)).astype(np.float32),
        rng.standard_normal((out_channels, 2, 3, 3)).astype(np.float32), None,
        setup=QuantSetup(
            input_qparams=make_qparams([0.1], [0], "quint8", None, "input_qparams", "user"),
            weight_qparams=make_qparams([0.1, 0.2], [0, 0], "qint8", 1, "weight_qparams",
                                        "user")))
    report = diagnose(case, Options(engine="x86"))
    assert "QCD025" in {f.code for f in report.findings}
    as_given = report.path("as_given")
    assert (as_given.refused is None) == (out_channels == 2), as_given.refused


def test_fused_relu_outputs_below_zero_are_not_saturation():
    """With a fused ReLU, negative conv outputs are zeroed by the ReLU, whatever the output
    qparams: QCD051 counts only what the output range really cuts (above its top)."""
    import dataclasses

    from qconvdiag.case import QuantSetup
    from qconvdiag.quantization.qparams import make_qparams

    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    w = (rng.standard_normal((8, 4, 3, 3)) / 6).astype(np.float32)
    setup = QuantSetup(
        input_qparams=make_qparams([float(np.abs(x).max()) / 127.5], [128], "quint8", None,
                                   "input", "user"),
        weight_qparams=make_qparams([float(np.abs(w).max()) / 127.5], [0], "qint8", None,
                                    "weight", "user"),
        output_qparams=make_qparams([1 / 255], [0], "quint8", None, "output", "user"))
    case = build_case(x, w, None, padding=1, setup=setup, activation="relu")
    (f,) = [f for f in diagnose(case, Options(engine="qnnpack")).findings
            if f.code == "QCD051" and f.path == "as_given"]
    assert f.evidence["below"] == 0 and f.evidence["above"] > 0
    assert "below" not in f.message
    # a model walk widens the output's range to the float model's: the fix covers it
    wide = dataclasses.replace(case, output_range=(0.0, 50.0))
    (g,) = [f for f in diagnose(wide, Options(engine="qnnpack")).findings
            if f.code == "QCD051" and f.path == "as_given"]
    assert "[0, 50]" in g.fix


def test_a_histogram_observers_trim_is_told_apart_from_a_range_too_small() -> None:
    """QCD051's trim test: few outputs (0.5%, or 2 where there are few) beyond a range that
    keeps at least half of the float output's reach on each saturated side."""
    from qconvdiag.findings.output_rules import trimmed_outliers as _trimmed

    assert _trimmed(2, 96, (0.0, 8.0), (0.0, 10.0), False, True)  # a squeeze-excite conv
    assert not _trimmed(3, 96, (0.0, 8.0), (0.0, 10.0), False, True)  # 3% of its outputs
    assert _trimmed(5, 1000, (-4.0, 6.0), (-5.0, 10.0), True, True)
    assert not _trimmed(6, 1000, (-4.0, 6.0), (-5.0, 10.0), True, True)  # 0.6%
    assert not _trimmed(1, 1000, (0.0, 4.0), (0.0, 10.0), False, True)  # keeps 40% of reach
    assert not _trimmed(1, 1000, (-2.0, 9.0), (-5.0, 10.0), True, False)  # low side kept 40%


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_a_setup_torch_refuses_gets_a_refused_verdict_even_where_it_emulates(engine: str) -> None:
    """A qint8 input: torch refuses it on every engine, while the emulation computes what it
    would give (here at the floor on x86). The verdict is torch's refusal, never 'at its floor'
    (a sweep found 'at_floor ... nothing is misconfigured' under a 'refused by torch' header)."""
    lay = layer(1)
    case = lay.case(lay.setup(input_qparams=qp(float(lay.x.max()) / 127, 0, "qint8")))
    report = diagnose(case, Options(engine=engine))
    verdict = next(v for v in report.verdicts if v.path == "as_given")
    assert verdict.status == "refused" and not verdict.healthy
    assert [c.code for c in verdict.causes] == ["QCD011"]


@pytest.mark.parametrize("outliers, reach, trim", [(6, 1.15, True), (16, 1.15, False),
                                                   (2, 1.9, True), (3, 1.9, False)])
def test_a_few_inputs_beyond_the_calibrated_range_are_a_trim_not_a_warning(
        outliers: int, reach: float, trim: bool) -> None:
    """A histogram observer trims a few outliers for a finer step, and data other than the
    calibration set reaches past its range: QCD010 says so as info (QCD051's rule for
    outputs), as it is a trade-off the default observer makes, not a misuse (a sweep's trained
    conv1d: 7 of 32,768 inputs clipped, a warning, whose fix fitted the one sample and cost
    other batches); clipping more (here 1% of the inputs) keeps its severity. Far past the
    range (1.9x) the clip is an error, said all the same where only two inputs reach there
    (TRIMMED_FEW: chance, no evidence), an error with three."""
    import dataclasses

    lay = layer(16)
    x = lay.x.copy()
    top = float(x.max())
    flat = x.reshape(-1)
    flat[np.argsort(flat)[-outliers:]] = reach * top  # beyond the range calibration saw
    lay = dataclasses.replace(lay, x=x)
    case = lay.case(lay.setup(input_qparams=qp(top / 255, 0, "quint8")))
    report = diagnose(case, Options(engine="x86"))
    found = [f for f in report.findings if f.code == "QCD010" and f.path == "as_given"]
    assert found and (found[0].severity == "info") == trim, [(f.code, f.severity) for f in found]
    assert ("histogram observer" in found[0].message) == trim


def test_qcd042_names_where_7_bit_activations_come_from() -> None:
    """x86's and fbgemm's default qconfigs set reduce_range; onednn's and qnnpack's keep 8 bits,
    so 7-bit activations there are the user's choice, not 'the onednn default qconfig' (a sweep
    read that)."""
    from types import SimpleNamespace

    from qconvdiag.findings.accumulation_rules import _whose

    def run(engine: str) -> SimpleNamespace:
        return SimpleNamespace(report=SimpleNamespace(name="as_given", engine=engine))

    assert _whose(run("x86")) == "the x86 default qconfig"
    assert _whose(run("onednn")) == ("reduce_range=True, which the onednn default qconfig "
                                     "does not set")
    assert "qnnpack default qconfig does not set" in _whose(run("qnnpack"))


def test_a_layer_qconvdiag_does_not_run_on_torch_is_not_a_refusal() -> None:
    """5 groups of 4 channels on fbgemm: torch's groupwise kernel would overrun its buffers, so
    qconvdiag does not run it (QCD062); torch did not refuse it, so the verdicts stay the
    emulation's (the refused verdict is for torch's refusals: it read 'refused by torch' with
    no cause here)."""
    from tests.corpus_faults import Layer, _input, _weight

    rng = np.random.default_rng(5)
    lay = Layer(_input(rng, (1, 20, 8, 8), "relu"), _weight(rng, (20, 4, 3, 3), False),
                (rng.standard_normal(20) * 0.1).astype(np.float32), dict(padding=1, groups=5))
    report = diagnose(lay.case(lay.setup()), Options(engine="fbgemm"))
    assert "QCD062" in _codes(report)
    assert all(v.status != "refused" for v in report.verdicts), report.verdicts


def test_an_info_root_takes_no_stage_a_warning_or_error_explains() -> None:
    """Per-tensor weights on qnnpack (its default: QCD023 is info) clipped by a scale 0.3x
    what they need: the verdict names the clipping (QCD020, error), not the granularity advice
    (it named QCD023 info 100% on a broken path)."""
    lay = layer(6, "conv2d", "relu", spread=20.0)
    report = diagnose(lay.case(lay.setup(weight_qparams=lay.weight_qp(0.3))),
                      Options(engine="qnnpack"))
    v = report.verdict
    assert v is not None and v.status == "broken"
    assert _codes(report, "as_given")["QCD023"] == "info"
    assert v.causes[0].code == "QCD020" and v.causes[0].severity == "error"
    assert "QCD023" not in [c.code for c in v.causes]


def test_a_per_channel_input_is_refused_without_numbers_it_does_not_have() -> None:
    """pytorch#84052: a per-channel quantized input. Every engine refuses it and no kernel
    defines its arithmetic, so the path has no stage numbers and no input-clipping finding (it
    used channel 0's qparams for every channel: a false QCD010 error). The verdict names what
    stops it, then what would remain once it runs (an output zero point written for qint8)."""
    import io

    from rich.console import Console

    from qconvdiag.render.rich_report import render_rich

    lay = layer(2, inputs="normal")
    per_channel = qp((np.abs(lay.x).max(axis=(0, 2, 3)) / 127).tolist(), 0, "quint8", 1)
    out = lay.output_qp()
    case = lay.case(lay.setup(input_qparams=per_channel,
                              output_qparams=qp(out.scale[0], -16)))
    report = diagnose(case, Options(engine="x86"))
    given = next(p for p in report.paths if p.name == "as_given")
    assert given.refused and given.budget is None and not any(s.applies for s in given.stages)
    codes = _codes(report, "as_given")
    assert codes["QCD011"] == "error" and "QCD010" not in codes
    v = report.verdict
    assert v is not None and v.status == "refused"
    assert [(c.code, c.share) for c in v.causes][:2] == [("QCD011", 1.0), ("QCD053", 0.0)]
    assert v.first_fix is not None and "quantize_per_tensor(x," in v.first_fix
    text = io.StringIO()
    render_rich(report, Console(file=text, width=100))
    shown = text.getvalue()
    assert "refused" in shown and "then" in shown and "no stage ran" in shown
    assert "total RMSE 0," not in shown


def test_a_fresh_module_is_told_from_a_weight_packed_by_hand_at_scale_one() -> None:
    """Scale 1.0 and zero point 0 are a fresh module's weight qparams, and the float weight
    packed at that scale (set_weight_bias) rounds mostly to 0 as well: nonzero codes of the
    float weight, or the float bias beside all-zero codes, say it was packed (a coarse step,
    QCD026); all-zero codes with a zero bias are a module never set (QCD024)."""
    from qconvdiag.case import ModuleState
    from qconvdiag.quantization.paths import holds_float_weight
    from qconvdiag.quantization.qparams import quantize

    one = qp(1.0, 0, "qint8")
    x = np.random.default_rng(0).random((1, 2, 6, 6), dtype=np.float32)
    small = np.full((3, 2, 3, 3), 0.2, np.float32)
    bias = np.array([0.1, -0.2, 0.3], np.float32)
    out = qp(0.1, 0)

    def holds(w, b, module_bias):  # type: ignore[no-untyped-def]
        case = build_case(x, w, b)
        return holds_float_weight(case, ModuleState(quantize(w, one), one, module_bias, out))

    big = small.copy()
    big[0, 0, 0, 0] = 0.9  # one code rounds to 1
    assert holds(big, None, None)
    assert holds(small, bias, bias)  # all codes 0, the float bias packed beside them
    assert not holds(small, bias, np.zeros(3, np.float32))  # a fresh module's zero bias
    assert not holds(small, None, None)


def test_a_refused_verdict_leads_with_what_torch_refuses() -> None:
    """The handmade recipe on onednn: its weight zero point is refused (QCD022) and its output
    qparams are the defaults (QCD050, an error too). The verdict leads with the refusal and
    its fix (it led with QCD050, the first error in report order, and called it 'refused')."""
    from qconvdiag.casefile.generate import RandomSpec, generate

    report = diagnose(generate(RandomSpec(seed=0, recipe="handmade")), Options(engine="onednn"))
    v = report.verdict
    assert v is not None and v.status == "refused"
    assert v.causes[0].code == "QCD022" and v.causes[0].share == 1.0
    assert "QCD050" in [c.code for c in v.causes[1:]]
    qcd022 = next(f for f in report.findings if f.code == "QCD022")
    assert v.first_fix == qcd022.fix


def test_a_broken_path_whose_cause_shows_only_in_the_chain_names_it() -> None:
    """The handmade recipe on qnnpack with a weight zero point of 135 (above qint8's 127):
    qnnpack's weight codes shift past 255, which the chain shows (weight_rounding adds 8.46
    RMSE) but no stage's effect alone does. The verdict names the formula that gave that zero
    point (it named nothing: 96% of the excess unexplained, no first fix)."""
    from qconvdiag.casefile.generate import RandomSpec, generate

    report = diagnose(generate(RandomSpec(seed=4, recipe="handmade")), Options(engine="qnnpack"))
    v = report.verdict
    assert v is not None and v.status == "broken"
    assert v.causes and v.causes[0].code == "QCD021" and v.unexplained < 0.05
    assert v.first_fix is not None


def test_quint8_weight_codes_read_as_int8_by_onednn_are_the_verdict_s_cause() -> None:
    """onednn reads quint8 weight codes above 127 as negative: QCD028 carries the weight
    stages, so the broken verdict names it (it named nothing while QCD028 fired)."""
    lay = layer(1)
    case = lay.case(lay.setup(weight_qparams=qp(float(np.abs(lay.w).max()) / 255, 0, "quint8")))
    v = diagnose(case, Options(engine="onednn")).verdict
    assert v is not None and v.status == "broken" and v.causes[0].code == "QCD028"


def test_an_uncalibrated_conv_s_first_fix_calibrates() -> None:
    """Converted without calibration: input and output qparams are the observers' defaults.
    The verdict's first fix (QCD050's, the larger share) calibrates, which sets both; setting
    the output qparams alone is its alternative (pasted alone it gave 6.2 dB where calibrating
    gave 38.0, a forum report's conv)."""
    from qconvdiag.render.rich_report import main_fix
    from tests.corpus_faults import faults

    case = next(f for f in faults() if f.label == "QCD013 normal input").build()
    report = diagnose(case, Options(engine="x86"))
    v = report.verdict
    assert v is not None and {"QCD050", "QCD013"} <= {c.code for c in v.causes}
    assert v.first_fix is not None
    first = main_fix(v.first_fix)
    assert "prepared(batch)" in first and "qm.scale" not in first
    assert "# or this conv's output qparams alone:" in v.first_fix


def _pair_saturating_case() -> ConvCase:
    """8-bit activations (codes up to 255) against large positive weights, symmetric qint8:
    int16 pair sums of raw codes saturate wherever a kernel forms them."""
    from qconvdiag.arithmetic.float_conv import conv64
    from qconvdiag.case import QuantSetup
    from qconvdiag.quantization.qparams import quantize
    from tests.corpus_faults import module

    rng = np.random.default_rng(7)
    x = rng.uniform(0, 1, (1, 16, 8, 8)).astype(np.float32)
    w = rng.uniform(0.5, 1.0, (8, 16, 3, 3)).astype(np.float32)
    out_qp = qp(float(conv64(x, w, None, build_case(x, w, None).geometry).max()) / 255, 0)
    w_qp = qp(float(w.max()) / 127.5, 0, "qint8")
    case = build_case(x, w, None, setup=QuantSetup(
        input_qparams=qp(1 / 255, 0), weight_qparams=w_qp, output_qparams=out_qp,
        module=module(quantize(w, w_qp), w_qp, None, out_qp)))
    return case


def test_what_a_cpu_without_vnni_would_compute_is_measured(tmp_path) -> None:
    """8-bit activations (codes up to 255) against large positive weights: fbgemm's GEMMs on a
    CPU without AVX512-VNNI saturate int16 pair sums. Where this CPU accumulates exactly,
    QCD040 (info) says what that CPU would compute: its RMSE equals the as_given path's
    measured with the ISA forced down to AVX2 (torch's kernels pairing, in a subprocess).
    Where this CPU pairs already, the path itself saturates and QCD040 names it."""
    import json
    import os
    import subprocess
    import sys

    from qconvdiag.casefile.write import save_case

    case = _pair_saturating_case()
    path = save_case(case, tmp_path / "pairs.npz")
    report = diagnose(case, Options(engine="fbgemm"))
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    forced = subprocess.run([sys.executable, "-m", "qconvdiag", "explain", str(path),
                             "--engine", "fbgemm", "--json"], env=env, capture_output=True,
                            text=True, timeout=300)
    assert forced.returncode == 0, forced.stderr
    there = next(p for p in json.loads(forced.stdout)["paths"] if p["name"] == "as_given")
    assert there["torch_check"]["mismatched_elements"] == 0 and there["saturated_pairs"] > 0
    f040 = next(f for f in report.findings if f.code == "QCD040" and f.path == "as_given")
    given = next(p for p in report.paths if p.name == "as_given")
    if given.saturated_pairs:  # this CPU pairs too: the path itself saturates
        assert given.total.rmse == pytest.approx(there["total"]["rmse"], rel=1e-9)
    else:
        assert f040.severity == "info" and "x its floor" in f040.message
        ratio = there["total"]["rmse"] / given.budget.floor_rmse
        assert f040.evidence["floor_ratio_without_vnni"] == pytest.approx(ratio, rel=1e-6)
        # the title, all a terminal report shows of an info finding, says what happens there
        moved = f040.evidence["outputs_moved_without_vnni"]
        assert moved > 0 and f040.title.endswith(
            ": broken there" if ratio >= FAR else
            f": {moved} output{'s move' if moved != 1 else ' moves'} there")


def test_foretold_pairs_on_onednn_say_how_they_were_counted() -> None:
    """QCD040's foretelling counts pairs as fbgemm forms them (along K); oneDNN pairs input
    channels, and on AVX2 not in its grouped and depthwise convs: on an onednn path its
    message says so, not that "the fbgemm/x86 kernels" would run there."""
    from tests.cpu import pairs_here

    case = _pair_saturating_case()
    report = diagnose(case, Options(engine="onednn"))
    foretold = [f for f in report.findings if "saturated_pairs_without_vnni" in f.evidence]
    # where this CPU's oneDNN pairs already, the path itself saturates: nothing is foretold
    assert bool(foretold) == (not pairs_here("onednn"))
    for f in foretold:
        assert "counted here as fbgemm pairs them" in f.message
        assert "fbgemm/x86 kernels" not in f.message


def test_a_refused_verdict_lists_the_symptoms_that_would_remain() -> None:
    """quint8 weights (refused on x86) and an output scale a tenth of what the output needs:
    after the refusal, the verdict lists the saturation that would remain once it runs
    (QCD051, a symptom: only root causes were listed, and it fell out of the verdict)."""
    from tests.corpus_faults import asymmetric_quint8

    lay = layer(1)
    case = lay.case(lay.setup(weight_qparams=asymmetric_quint8(lay.w),
                              output_qparams=lay.output_qp(0.1)))
    v = diagnose(case, Options(engine="x86")).verdict
    assert v is not None and v.status == "refused"
    assert v.causes[0].code == "QCD028" and "QCD051" in [c.code for c in v.causes[1:]]


def test_quint8_weights_onednn_reads_the_same_are_said_as_info() -> None:
    """quint8 weights, zero point 0, every code below 128: onednn reads them as the same int8
    codes, at no cost, while every other engine refuses them: QCD028 says so as info."""
    lay = layer(1)
    case = lay.case(lay.setup(weight_qparams=qp(float(np.abs(lay.w).max()) / 127, 0,
                                                "quint8")))
    assert _codes(diagnose(case, Options(engine="onednn")), "as_given")["QCD028"] == "info"


def test_a_broken_verdict_lists_the_errors_its_causes_fixes_leave() -> None:
    """A fresh module (its weight never set, its output qparams the defaults 1.0 / 0): the
    never-set weight costs nearly all the excess, so the output's defaults were credited with
    0.01% and left to the findings list, and a user who applied the first fix found the layer
    still broken. The verdict lists them after the named causes ('then', share 0); errors on
    the named causes' stages go with their fixes (the conv1d sample: QCD020's clipping and
    QCD002's zero point are QCD021's weight qparams) and are not listed."""
    import dataclasses

    from qconvdiag.case import QuantSetup
    from qconvdiag.quantization.qparams import per_tensor
    from qconvdiag.render.rich_report import cause_share
    from tests.corpus_faults import module

    lay = layer(2)  # positive weights and bias: outputs 1.1..11.3, none clipped at 0 by 1.0 / 0
    lay = dataclasses.replace(lay, w=np.abs(lay.w), b=np.abs(lay.b))
    fresh = lay.case(QuantSetup(input_qparams=lay.input_qp(), module=module(
        np.zeros(lay.w.shape, np.int64), per_tensor(1.0, 0, "qint8", "m"), None)))
    v = diagnose(fresh, Options(engine="x86")).verdict
    assert v is not None and v.status == "broken"
    assert [c.code for c in v.causes][:2] == ["QCD024", "QCD050"]
    assert v.causes[0].share > 0.95 and v.causes[1].share == 0.0
    assert cause_share(v, 2, v.causes[1].share) == "then"
    # the never-set weight's fix repacks the float bias too: the bias (QCD030) is not listed
    assert "QCD030" not in [c.code for c in v.causes]
    # with the intended qparams in the case as well, QCD050 is about the module's state, the
    # stage QCD024 is on too: it is listed all the same (it was dropped as covered)
    given = lay.case(QuantSetup(
        input_qparams=lay.input_qp(), weight_qparams=lay.weight_qp(),
        output_qparams=lay.output_qp(), module=module(
            np.zeros(lay.w.shape, np.int64), per_tensor(1.0, 0, "qint8", "m"), None)))
    v2 = diagnose(given, Options(engine="x86")).verdict
    assert v2 is not None and [c.code for c in v2.causes][:2] == ["QCD024", "QCD050"]
    sample = diagnose(load_case(ROOT / "samples" / "conv1d_handmade.pt"),
                      Options(engine="x86")).verdict
    assert sample is not None
    assert not {"QCD020", "QCD002"} & {c.code for c in sample.causes}


def test_symmetric_weights_with_no_negative_weight_are_not_quint8_s_formula():
    """torch's per-tensor symmetric observer on weights that are all >= 0 (an all-zero
    channel, the rest positive: a healthy sweep's layer, 0.13x its floor): zero point 0 is
    -min/scale too, and float32's 127 * scale lands a hair below max - scale / 2. QCD021 said
    'quint8's zero point formula' (a warning: --fail-on warning exited 1); now it needs a clip
    beyond half a step, as QCD020 does."""
    import warnings

    import torch

    import qconvdiag

    w = torch.tensor([0.0, 0.0, 0.0, 0.5408849120140076, 0.3182084262371063,
                      0.28284981846809387]).reshape(2, 3, 1, 1)
    conv = torch.nn.Conv2d(3, 2, 1).eval()
    with torch.no_grad():
        conv.weight.copy_(w)
        conv.bias.copy_(torch.tensor([0.05742178, 0.06583682]))
    x = torch.rand(2, 3, 1, 1, generator=torch.Generator().manual_seed(0)) * 900
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = torch.ao.nn.intrinsic.quantized.ConvReLU2d(3, 2, 1)
        qm.set_weight_bias(torch.quantize_per_tensor(w, 0.004242234397679567, 0, torch.qint8),
                           conv.bias.detach())
        qm.scale, qm.zero_point = 1.1092299222946167, 0
        qx = torch.quantize_per_tensor(x, 3.9200572967529297, 0, torch.quint8)
    case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    report = diagnose(case, Options(engine="x86"))
    assert "QCD021" not in _codes(report, "as_given")


def test_a_bias_beyond_int32_at_its_step_is_said_to_be_clamped():
    """qnnpack quantizes the bias to int32 at input_scale * weight_scale; weights about 2e-6
    (torch's observer clamps their scale to float32's eps) put a bias of 1.0 past int32's
    range. QCD031 said qnnpack 'rounds the bias to int32' where it clamps it, 8 output steps
    off: it says the bias is clamped now, and how many values."""
    import warnings

    import torch

    import qconvdiag

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(16, 16, 3, 3, generator=g) * 2e-6)
        conv.bias.copy_(torch.linspace(-1.0, 1.05, 16))
    x = torch.rand(1, 16, 6, 6, generator=g)
    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qm = torch.ao.nn.quantized.Conv2d(16, 16, 3, padding=1)
            qm.set_weight_bias(torch.quantize_per_tensor(conv.weight.detach(),
                                                         1.1920928955078125e-07, 0,
                                                         torch.qint8), conv.bias.detach())
            qm.scale, qm.zero_point = 0.008, 128
            qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
        case = qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None)
    finally:
        torch.backends.quantized.engine = previous
    report = diagnose(case, Options(engine="qnnpack"))
    given = next(p for p in report.paths if p.name == "as_given")
    assert given.torch_check.ran and given.torch_check.mismatched_elements == 0
    (f031,) = [f for f in report.findings if f.code == "QCD031" and f.path == "as_given"]
    assert "lie beyond int32's range there and are clamped" in f031.message
    # its fix gives the bias room (a weight scale no finer than it needs): the default flow
    # it printed is what clamped it (a sweep measured -0.4 dB after it)
    from tests.fix_harness import apply_fix

    fixed = diagnose(apply_fix(case, "qnnpack", f031.fix), Options(engine="qnnpack"))
    assert not [f for f in fixed.findings if f.code == "QCD031" and f.path == "as_given"]
    assert fixed.verdict.sqnr_db > report.verdict.sqnr_db + 20


def test_torch_codes_that_differ_only_where_the_window_reads_padding_are_said_so():
    """helper-49: torch's onednn depthwise kernel with padding past the kernel's reach leaves
    the outputs whose window reads padding only undefined (their codes change from call to
    call); QCD061 called that 'the known unmatched class (AVX512 CPUs without VNNI)' on a CPU
    with VNNI. Mismatches all in such outputs are named as such; one elsewhere is not."""
    from types import SimpleNamespace

    import numpy as np

    from qconvdiag.case import build_case
    from qconvdiag.findings.backend_rules import _in_padding_only

    case = build_case(np.zeros((1, 2, 4, 4), np.float32), np.ones((2, 1, 2, 2), np.float32),
                      None, stride=[2, 2], padding=[2, 2], groups=2)
    assert case.output_shape == (1, 2, 4, 4)
    codes = np.full(case.output_shape, 7, dtype=np.int64)
    theirs = codes.copy()
    theirs[0, 1, 0, 3] = 200  # row 0 reads input rows -2, -1: padding only
    theirs[0, 0, 3, 3] = 9  # column 3 reads input columns 4, 5: past the input
    run = SimpleNamespace(torch_codes=theirs, module_emulation=None,
                          emulation=SimpleNamespace(output_codes=codes))
    ctx = SimpleNamespace(case=case)
    assert _in_padding_only(ctx, run)
    theirs[0, 0, 2, 2] = 8  # a window over real inputs
    assert not _in_padding_only(ctx, run)


def test_a_symmetric_weight_scale_over_127_is_not_the_thread_s_formula():
    """helper-49: QCD003 ('the formula divides by 254') fired on max|w| / 127, QCD020's own fix,
    and on torch's symmetric observers (/ 127.5) over a range a little short of symmetric (45
    of 682 healthy qnnpack layers). Symmetric qint8 weights are not the thread's (max - min) /
    254: no QCD003."""
    import torch

    import qconvdiag

    torch.manual_seed(0)
    torch.backends.quantized.engine = "qnnpack"
    conv = torch.nn.Conv2d(4, 6, 3).eval()
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = -float(conv.weight.abs().max()) * 1.0  # a little asymmetric
    x = torch.rand(2, 4, 8, 8)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])  # its range is the input qparams' own
    w = conv.weight.detach()
    top = float(w.abs().max())
    assert abs(float(w.max() - w.min()) / (top / 127) - 254) <= 0.5  # the thread's count
    qm = torch.ao.nn.quantized.Conv2d(4, 6, 3)
    qm.set_weight_bias(torch.quantize_per_tensor(w, top / 127, 0, torch.qint8),
                       conv.bias.detach())
    with torch.no_grad():
        y = conv(x)
    qm.scale, qm.zero_point = float(y.max() - y.min()) / 255, int(round(-float(y.min()) / (
        float(y.max() - y.min()) / 255)))
    qx = torch.quantize_per_tensor(x, 1 / 255, 0, torch.quint8)
    report = qconvdiag.diagnose(qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=None),
                                qconvdiag.Options(engine="qnnpack"))
    assert "QCD003" not in {f.code for f in report.findings}


def test_an_8_bit_output_step_4x_too_coarse_on_qnnpack_is_not_called_reduce_range():
    """7-bit activations are read as such up to SEVEN_BIT_RATIO (8x the data's 8-bit step),
    but QCD052's claim that a qnnpack output is reduce_range's takes the step within 3x: an
    8-bit output scale set 4x too coarse spans 64 levels, and is named as too coarse."""
    import copy
    import warnings

    import torch
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

    import qconvdiag
    from qconvdiag.findings.output_rules import REDUCED_TITLE

    torch.manual_seed(0)
    torch.backends.quantized.engine = "qnnpack"
    conv, x = torch.nn.Conv2d(8, 16, 3).eval(), torch.randn(4, 8, 12, 12)
    model = torch.nn.Sequential(QuantStub(), copy.deepcopy(conv), DeQuantStub()).eval()
    model.qconfig = get_default_qconfig("qnnpack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(model)
        prepared(x)
        q = convert(prepared)
    q[1].scale = float(q[1].scale) * 4
    report = qconvdiag.diagnose(qconvdiag.capture(conv, x, qconv=q[1], qinput=q[0](x),
                                                  path=None), qconvdiag.Options(engine="qnnpack"))
    (found,) = [f for f in report.findings if f.code == "QCD052" and f.path == "as_given"]
    assert found.title != REDUCED_TITLE and "reduce_range" not in found.evidence


@pytest.mark.parametrize("past, said", [(1, True), (2, True), (3, False)])
def test_one_or_two_outputs_past_a_trim_are_said_even_where_they_break_the_conv(
        past: int, said: bool) -> None:
    """A squeeze-excite conv's few outputs (800 here) and a histogram observer's range that
    keeps most of their reach: one or two outputs past it (TRIMMED_FEW) are what a sample
    beyond the calibration data gives by chance, info even where they lift the conv far above
    its floor (helper-64's SE squeeze conv: 1 of 800 outputs, an error whose fix left the
    model's accuracy where it was); three of them break it as a warning's evidence would."""
    from qconvdiag.case import QuantSetup
    from qconvdiag.quantization.qparams import make_qparams

    rng = np.random.default_rng(3)
    x = np.maximum(rng.standard_normal((100, 32, 1, 1)), 0).astype(np.float32)
    w = (rng.standard_normal((8, 32, 1, 1)) / 6).astype(np.float32)
    b = (rng.standard_normal(8) / 10).astype(np.float32)
    y = np.sort(np.maximum(np.einsum("nc,oc->no", x[:, :, 0, 0].astype(np.float64),
                                     w[:, :, 0, 0]) + b, 0).reshape(-1))
    top = min(y[-past - 1], 0.8 * y[-1])  # keeps 80% of the reach, ``past`` outputs beyond
    setup = QuantSetup(
        input_qparams=make_qparams([float(x.max()) / 255], [0], "quint8", None, "input",
                                   "user"),
        weight_qparams=make_qparams(list(np.abs(w).reshape(8, -1).max(1) / 127.5), [0] * 8,
                                    "qint8", 0, "weight", "module"),
        output_qparams=make_qparams([top / 255], [0], "quint8", None, "output", "module"))
    report = diagnose(build_case(x, w, b, setup=setup, activation="relu"),
                      Options(engine="qnnpack"))
    assert report.verdict is not None and report.verdict.status == "broken"
    (f,) = [f for f in report.findings if f.code == "QCD051" and f.path == "as_given"]
    assert f.evidence["saturated"] == past
    assert f.severity == ("info" if said else "error")
    assert ("histogram observer" in f.message) == said
    # two of a conv's 10 outputs are a fifth of them, not chance: they keep their error
    from qconvdiag.findings.output_rules import said_as_trim

    assert said_as_trim("error", 2, 400) and not said_as_trim("error", 2, 399)
    assert not said_as_trim("error", 1, 10) and said_as_trim("warning", 5, 10)


def test_qcd023_s_qconfig_line_is_in_the_model_s_flow() -> None:
    """helper-74 (pytorch#90289): on an FX model's conv the fix said 'in the eager flow:
    model.qconfig = qconfig'; convert_fx's user sets a qconfig mapping."""
    import dataclasses

    lay = layer(6, "conv2d", "relu", spread=20.0)
    case = lay.case(lay.setup())
    for flow, said in ((None, "# in the eager flow: model.qconfig = qconfig"),
                       ("fx", "# in the FX flow: qconfig_mapping.set_global(qconfig)")):
        report = diagnose(dataclasses.replace(case, model_flow=flow), Options(engine="qnnpack"))
        (found,) = [f for f in report.findings if f.code == "QCD023" and f.path == "as_given"]
        assert said in found.fix
