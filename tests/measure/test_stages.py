"""The stage ladder: deltas telescope exactly to the total, the float reference matches a
float64 conv; the seed case's story."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag.arithmetic.accumulate import PAIRS_K
from qconvdiag.arithmetic.float_conv import conv64
from qconvdiag.casefile.generate import RandomSpec, forum_case, generate
from qconvdiag.diagnosis import Options, diagnose_runs
from qconvdiag.measure.ladder_plan import STAGE_IDS
from qconvdiag.measure.metrics import error_metrics, summary
from tests.conftest import REFERENCE_RTOL, TELESCOPE_RTOL
from tests.cpu import accumulation, pairs_here


def _check_telescoping(run):
    ladder = run.ladder
    total = ladder.final - ladder.float_output
    summed = sum(ladder.deltas.values())
    scale = max(float(np.abs(total).max()), float(np.abs(ladder.float_output).max()), 1e-30)
    assert float(np.abs(summed - total).max()) <= TELESCOPE_RTOL * scale


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("recipe", [None, "handmade"])
def test_deltas_telescope_to_the_total(seed, recipe):
    dist = ["normal", "relu", "int", "heavy"][seed % 4]
    case = generate(RandomSpec(seed=seed, distribution=dist, recipe=recipe,
                               per_channel_varied=seed % 3 == 0))
    runs, _ = diagnose_runs(case, Options(keep_arrays=True))
    # the float reference (exact integer conv + float32 rounding differences) vs float64
    want = conv64(case.input, case.weight, case.bias, case.geometry)
    scale = max(float(np.abs(want).max()), 1e-30)
    for run in runs:
        assert float(np.abs(run.ladder.float_output - want).max()) <= REFERENCE_RTOL * scale
        _check_telescoping(run)
        assert [s.id for s in run.report.stages] == list(STAGE_IDS)
        shares = [s.share for s in run.report.stages if s.applies and s.share is not None]
        if shares:
            assert sum(shares) == pytest.approx(1.0)


def test_seed_case_ladder_tells_the_story():
    case = forum_case()
    runs, _ = diagnose_runs(case, Options(engine="x86", keep_arrays=True))
    as_given = next(r for r in runs if r.report.name == "as_given")
    st = as_given.ladder.states
    assert as_given.ladder.float_output.item() == pytest.approx(803.6908, abs=1e-4)
    # clipped weights give ~565, the default output scale saturates at 255, the never-set
    # weight makes it 0, and torch agrees.
    assert st["weight_rounding"].item() == pytest.approx(564.6248, abs=1e-3)
    # x86 runs these asymmetric weights on fbgemm: exact with VNNI; without, it sums pairs of
    # raw products along K in saturating int16, and taps 4 and 5 (input codes 40 and 254,
    # weight codes 127) make 37338: 4571 accumulator steps lost, ~565 becomes ~540
    kernel = as_given.emulation.kernel
    assert kernel.kernel == "fbgemm" and kernel.accumulation == accumulation("fbgemm")
    exact = int(as_given.emulation.acc_exact.item())
    assert exact == 106571
    if pairs_here("fbgemm"):
        assert kernel.accumulation == PAIRS_K and as_given.emulation.saturated_pairs == 1
        assert int(as_given.emulation.acc.item()) == exact - (40 * 127 + 254 * 127 - 32767)
        assert st["accumulation"].item() == pytest.approx(540.3939, abs=1e-3)
        assert st["output_rounding"].item() == 540
    else:
        assert as_given.emulation.saturated_pairs == 0
        assert int(as_given.emulation.acc.item()) == exact
        assert st["accumulation"].item() == st["bias_quantization"].item()
        assert st["output_rounding"].item() == 565
    assert st["output_clipping"].item() == 255
    assert st["module_state"].item() == 0
    assert st["backend_residual"].item() == 0
    assert as_given.report.torch_check.mismatched_elements == 0
    production = next(r for r in runs if r.report.name == "production")
    assert production.report.total.max_abs < 0.01 * 803.69
    assert not production.report.stage("module_state").applies


def test_stage_that_does_not_apply_has_a_reason():
    case = generate(RandomSpec(seed=1, bias=False))
    runs, _ = diagnose_runs(case, Options())
    st = runs[0].report.stage("bias_quantization")
    assert not st.applies and st.reason == "the layer has no bias" and st.delta is None


def _close(a, b):
    if a is None or b is None:
        return a is b
    return all(
        (x is None and y is None) or (x is not None and y is not None
                                      and x == pytest.approx(y, rel=1e-9, abs=1e-12))
        for x, y in zip(a.to_dict().values(), b.to_dict().values(), strict=True))


@pytest.mark.parametrize("seed", range(8))
def test_streamed_metrics_equal_the_metrics_of_the_whole_arrays(seed, monkeypatch):
    """The ladder measures block by block on two threads; its delta and cumulative metrics
    must be those of the whole state arrays, its output summary that of the whole final
    output, with or without the arrays kept. Small blocks (BLOCK) make many of them."""
    from qconvdiag import parallel
    from qconvdiag.measure import metrics

    monkeypatch.setattr(parallel, "BLOCK", 37 + seed)  # blocks of part rows and of many rows
    case = generate(RandomSpec(seed=seed, recipe="handmade" if seed % 2 else None,
                               distribution=["normal", "relu", "int", "heavy"][seed % 4]))
    kept, _ = diagnose_runs(case, Options(keep_arrays=True))
    streamed, _ = diagnose_runs(case, Options())
    for run, plain in zip(kept, streamed, strict=True):
        ladder, y0 = run.ladder, run.ladder.float_output
        lsb = float(run.spec.output_qparams.scale[0])
        assert plain.ladder.final is None
        want, got = summary(ladder.final), plain.ladder.final_summary
        for key in ("min", "max", "mean", "abs_max"):
            assert getattr(got, key) == pytest.approx(getattr(want, key), rel=1e-12, abs=1e-12)
        assert list(got.values) == list(ladder.final.reshape(-1)[:8])
        for st, st_plain in zip(run.report.stages, plain.report.stages, strict=True):
            assert _close(st.delta, st_plain.delta) and _close(st.cumulative, st_plain.cumulative)
            assert _close(st.isolated, st_plain.isolated)
            if not st.applies or st.id in ("module_state", "backend_residual"):
                continue
            assert _close(st.delta, error_metrics(ladder.deltas[st.id], y0, lsb))
            assert _close(st.cumulative, error_metrics(ladder.states[st.id] - y0, y0, lsb))
    assert metrics.CHUNK == 1 << 16  # the metric chunks are untouched
