"""trace: one element's arithmetic, checked against torch's output for that element."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from qconvdiag.arithmetic.engines import probe
from qconvdiag.casefile.generate import RandomSpec, forum_case, generate
from qconvdiag.cli import app
from qconvdiag.errors import UsageError
from qconvdiag.trace import trace
from tests.repo import ROOT

ENGINES = [e for e, p in probe().items() if p.available]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("seed", range(4))
def test_trace_agrees_with_torch_at_random_positions(engine, seed):
    case = generate(RandomSpec(seed=seed, recipe="handmade" if seed % 2 else None,
                               distribution=["relu", "int", "normal", "heavy"][seed]))
    path = "as_given" if case.setup is not None else "production"
    rng = np.random.default_rng(seed)
    shape = case.output_shape
    for _ in range(3):
        pos = tuple(int(rng.integers(0, s)) for s in shape)
        try:
            tr = trace(case, pos, path=path, engine=engine)
        except UsageError as exc:  # onednn refuses asymmetric hand-made weights
            assert engine == "onednn" and "cannot run" in str(exc)
            return
        assert tr.torch_agrees is True, (engine, pos)
        assert tr.position == pos
        assert sum(t["product"] for t in tr.terms) == tr.accumulator_exact
        assert tr.dequantized == pytest.approx(
            (tr.output_int - tr.output_zero_point) * tr.output_scale)


def test_default_position_is_the_largest_error():
    case = generate(RandomSpec(seed=5, recipe="handmade"))
    tr = trace(case, None)
    assert len(tr.position) == len(case.output_shape)


def test_forum_trace_packed_params_and_module_note():
    tr = trace(forum_case(), (0, 0, 0, 0), engine="x86")
    assert tr.output_int == 255 and tr.accumulator_exact == 106571
    assert tr.packed_params["weight_int"][0] == [28, 0, 71, 127, 127, 127, 127, 127, 99]
    assert "qm.weight() calls unpack()" in tr.packed_params["returns"]
    assert "output code 0" in tr.module_note


def test_bad_position_is_a_usage_error():
    with pytest.raises(UsageError, match="outside the output"):
        trace(forum_case(), (0, 0, 5, 5))
    r = CliRunner().invoke(app, ["trace", str(ROOT / "samples" / "forum_conv.pt"),
                                 "--at", "0,0,9,9"])
    assert r.exit_code == 2 and "outside the output" in r.stderr


def test_cli_trace_json():
    r = CliRunner().invoke(app, ["trace", str(ROOT / "samples" / "forum_conv.pt"), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("position", "path", "engine", "terms", "pairs", "saturated_pairs",
                "accumulator", "bias_int32", "multiplier", "pre_round", "output_int",
                "dequantized", "float_reference", "torch_output_int"):
        assert key in d, key


def test_seed_trace_shows_saturated_pairs_on_saturating_engines():
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    found = {}
    for engine in ("fbgemm", "x86", "qnnpack"):
        out = subprocess.run(
            [sys.executable, "-m", "qconvdiag", "trace", "samples/forum_conv.pt", "--engine",
             engine, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        found[engine] = json.loads(out.stdout)
    for engine in ("fbgemm", "x86"):
        d = found[engine]
        assert d["saturated_pairs"] == 1, engine
        sat = [p for p in d["pairs"] if p["saturated"]]
        assert sat[0]["k"] == [4, 5] and sat[0]["sum"] == 37338 and sat[0]["value"] == 32767
        assert d["accumulator"] == 106571 - (37338 - 32767)
        assert d["torch_output_int"] == d["output_int"]
    assert found["qnnpack"]["pairs"] == [] and found["qnnpack"]["accumulator"] == 106571


def test_trace_runs_one_path_not_the_whole_diagnosis(monkeypatch):
    import qconvdiag.diagnosis as d
    from qconvdiag.casefile.generate import forum_case
    from qconvdiag.trace import trace

    calls = []
    real = d.run_path
    monkeypatch.setattr(d, "run_path", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    tr = trace(forum_case(), (0, 0, 0, 0), path="production", engine="x86")
    assert calls == ["production"] and tr.path == "production"


def test_trace_of_a_depthwise_window_whose_code_sum_leaves_int16():
    """fbgemm's depthwise kernel keeps each window's input code sum (for the weight zero
    point's correction) in saturating int16: a 7x5x5 window of codes near 255 passes 32767."""
    from qconvdiag.case import QuantSetup, build_case
    from qconvdiag.quantization.qparams import per_tensor

    rng = np.random.default_rng(3)
    x = rng.uniform(2.0, 2.6, (1, 8, 7, 5, 5)).astype(np.float32)
    w = rng.uniform(-1, 1, (8, 1, 7, 5, 5)).astype(np.float32)
    setup = QuantSetup(per_tensor(0.01, 0, "quint8", "user"),
                       per_tensor(0.01, 3, "qint8", "user"), per_tensor(0.5, 128, "quint8", "user"))
    case = build_case(x, w, None, padding=(3, 2, 2), groups=8, setup=setup)
    tr = trace(case, (0, 2, 3, 2, 2), path="as_given", engine="fbgemm")
    assert tr.kernel == "fbgemm" and tr.input_code_sum is not None
    assert tr.input_code_sum["saturated"] and tr.input_code_sum["value"] == 32767
    assert tr.accumulator == tr.accumulator_exact + sum(
        p["value"] - p["sum"] for p in tr.pairs) + 3 * (tr.input_code_sum["sum"] - 32767)
    assert tr.torch_agrees is True


def test_a_fused_relu_is_traced_against_the_float_output_after_it():
    """A ConvReLU's quantized output approximates relu(conv): its zeros where the conv is
    negative are exact, so they are not the largest error, and the reference is never below 0."""
    import dataclasses

    case = dataclasses.replace(generate(RandomSpec(seed=3, distribution="normal")),
                               activation="relu")
    tr = trace(case, None, path="production", engine="x86")
    assert tr.float_reference >= 0.0
    from qconvdiag.diagnosis import Options, diagnose_path

    run = diagnose_path(case, "production", Options(engine="x86"))
    assert run.emulation is not None and run.ladder is not None
    qp = run.spec.output_qparams
    err = np.abs((run.emulation.output_codes - qp.zero_point[0]) * qp.scale[0]
                 - np.maximum(run.ladder.float_output, 0.0))
    assert abs(tr.dequantized - tr.float_reference) == pytest.approx(float(err.max()))
