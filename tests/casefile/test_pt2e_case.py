"""A single conv of torchao's PT2E flow as a case (issue 15): ``"flow": "pt2e"`` in a case
file, engine x86_inductor by default and its torch check, ``--engine all``, the production path
(X86InductorQuantizer's default config), and the missing extra."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import pytest

import qconvdiag
from qconvdiag import torchao_import as pt2e
from qconvdiag.case import ModuleState, QuantSetup, build_case
from qconvdiag.diagnosis import Options, resolve_engines, run_diagnosis
from qconvdiag.errors import MissingExtraError
from qconvdiag.quantization.qparams import QParams, per_tensor, quantize
from tests.repo import ROOT


def pt2e_case(seed: int = 0):  # noqa: ANN201
    """A conv as convert_pt2e leaves it: uint8 input codes (zero point 120), int8 weights
    per channel with zero point 0, a float32 bias, uint8 output qparams, a fused ReLU."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    w = (rng.standard_normal((6, 4, 3, 3)) * 0.2).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32) * 0.1
    x_qp = per_tensor(0.025, 120, "quint8", "user")
    w_scales = tuple(float(np.float32(s)) for s in np.abs(w).reshape(6, -1).max(1) / 127.5)
    w_qp = QParams(w_scales, (0,) * 6, "qint8", 0, "module")
    module = ModuleState(quantize(w, w_qp), w_qp, b, per_tensor(0.02, 0, "quint8", "module"))
    setup = QuantSetup(input_qparams=x_qp, input_codes=quantize(x, x_qp), module=module)
    return build_case(x, w, b, padding=1, setup=setup, activation="relu", flow="pt2e")


def test_case_file_carries_the_flow(tmp_path):  # noqa: ANN001
    for suffix in (".pt", ".npz", ".safetensors"):
        path = tmp_path / f"c{suffix}"
        qconvdiag.save_case(pt2e_case(), path)
        assert qconvdiag.load_case(path).flow == "pt2e"
    eager = tmp_path / "eager.npz"
    qconvdiag.save_case(build_case(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3))), eager)
    assert "flow" not in np.load(eager).files  # legacy case files are unchanged


def test_pt2e_case_runs_on_x86_inductor_torch_exact():
    report = run_diagnosis(pt2e_case()).report
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    schema = json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert [(p.name, p.engine) for p in report.paths] == [("as_given", "x86_inductor"),
                                                          ("production", "x86_inductor")]
    for p in report.paths:
        assert p.torch_check.ran and p.torch_check.mismatched_elements == 0, p.name
        assert p.kernel == "onednn"
    production = report.path("production")
    assert production.observers["input"] == "HistogramObserver"
    assert production.observers["weight"] == "PerChannelMinMaxObserver"
    weight = production.qparams["weight"]
    assert weight.axis == 0 and set(weight.zero_point) == {0}
    assert production.qparams["input"].dtype == "quint8"


def test_engine_all_puts_x86_inductor_first_for_pt2e_only():
    legacy = resolve_engines("all")
    assert "x86_inductor" not in legacy
    assert resolve_engines("all", pt2e=True) == ("x86_inductor", *legacy)
    assert resolve_engines(None, pt2e=True) == ("x86_inductor",)
    assert resolve_engines("x86_inductor") == ("x86_inductor",)  # asked for by name
    report = run_diagnosis(pt2e_case(), Options(engine="all", production_path=False)).report
    assert [p.engine for p in report.paths] == list(resolve_engines("all", pt2e=True))


def test_explicit_engine_on_a_legacy_case():
    case = pt2e_case()
    legacy = build_case(case.input, case.weight, case.bias, padding=1, setup=case.setup,
                        activation="relu")
    report = run_diagnosis(legacy, Options(engine="x86_inductor", production_path=False)).report
    assert report.paths[0].engine == "x86_inductor"
    assert report.paths[0].torch_check.mismatched_elements == 0


def _cli(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from qconvdiag.cli import app

    return CliRunner().invoke(app, list(args))


def test_case_file_refuses_an_unknown_flow(tmp_path):  # noqa: ANN001
    path = tmp_path / "c.npz"
    np.savez(path, input=np.ones((1, 1, 3, 3), np.float32),
             weight=np.ones((1, 1, 3, 3), np.float32), flow=np.array('"fx"'))
    r = _cli("explain", str(path))
    assert r.exit_code == 2 and "'flow' must be one of eager, pt2e" in r.stderr


def test_without_torchao_a_pt2e_case_names_the_extra(tmp_path, monkeypatch):  # noqa: ANN001
    path = tmp_path / "case.npz"
    qconvdiag.save_case(pt2e_case(), path)
    monkeypatch.setattr(pt2e, "torchao_available", lambda: False)
    r = _cli("explain", str(path))
    assert r.exit_code == 2, r.stdout
    assert r.stderr.count("\n") == 1 and "pip install -e '.[pt2e]'" in r.stderr
    with pytest.raises(MissingExtraError):
        run_diagnosis(pt2e_case(), Options(engine="x86_inductor"))
    assert _cli("explain", str(path), "--engine", "x86", "--json").exit_code == 0


def near_tie_case():  # noqa: ANN201
    """A dense 1x1 conv (8 -> 8 channels, 16x16) on which the eager Q/DQ graph and the integer
    kernel give one output code differently (seed 246 of a search over 400), on any CPU: the
    input takes 7-bit codes (0..127, a reduce_range minmax observer's range), so no int16 pair
    of u8 x s8 products can saturate (2 * 127 * 127 < 32767) and oneDNN's kernels with and
    without VNNI accumulate exactly; the search kept a seed whose kernel codes are the same
    under both of oneDNN's scale orders (VNNI: source then weight scale; without: their
    product) and whose eager codes are the same for the fp32 conv's sum in several orders."""
    rng = np.random.default_rng(246)
    x = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((8, 8, 1, 1)) * 0.3).astype(np.float32)
    b = (rng.standard_normal(8) * 0.1).astype(np.float32)
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    x_scale = float(np.float32((hi - lo) / 127))
    x_qp = per_tensor(x_scale, round(-lo / x_scale), "quint8", "user")
    w_scales = tuple(float(np.float32(s)) for s in np.abs(w).reshape(8, -1).max(1) / 127.5)
    w_qp = QParams(w_scales, (0,) * 8, "qint8", 0, "module")
    out = per_tensor(float(np.float32(rng.uniform(0.002, 0.01))), int(rng.integers(100, 140)),
                     "quint8", "module")
    module = ModuleState(quantize(w, w_qp), w_qp, b, out)
    setup = QuantSetup(input_qparams=x_qp, input_codes=quantize(x, x_qp), module=module)
    return build_case(x, w, b, setup=setup, flow="pt2e")


def test_ladder_separates_the_eager_graph_from_the_integer_kernel():
    """On x86_inductor the output stages are the eager Q/DQ graph's and integer_kernel is what
    the kernel changes: here one near-tie output, one step, at the floor (no finding)."""
    from qconvdiag.arithmetic.torch_ref import run_eager_qdq
    from qconvdiag.measure.ladder_plan import PT2E_STAGE_IDS, STAGE_IDS

    case = near_tie_case()
    assert case.setup.input_codes.max() <= 127  # no int16 pair can saturate, VNNI or not
    d = run_diagnosis(case, Options(engine="all", production_path=False, keep_arrays=True))
    (inductor,) = [r for r in d.runs if r.report.engine == "x86_inductor"]
    assert [s.id for s in inductor.report.stages] == list(PT2E_STAGE_IDS)
    for legacy in (r for r in d.runs if r.report.engine != "x86_inductor"):
        assert [s.id for s in legacy.report.stages] == list(STAGE_IDS)
    accumulation = inductor.report.stage("accumulation")
    assert not accumulation.applies and "eager Q/DQ graph" in accumulation.reason
    spec = inductor.spec
    eager = np.clip(run_eager_qdq(spec.input_codes, spec.input_qparams, spec.weight_codes,
                                  spec.weight_qparams, spec.bias, spec.output_qparams,
                                  case.geometry), 0, 255)
    kernel = inductor.emulation.output_codes
    assert inductor.emulation.saturated_pairs == 0
    differ = int(np.count_nonzero(eager != kernel))
    assert differ == 1 and int(np.abs(eager - kernel).max()) == 1
    stage = inductor.report.stage("integer_kernel")
    assert stage.applies and stage.delta.affected * kernel.size == pytest.approx(differ)
    assert stage.delta.max_abs_lsb == pytest.approx(1.0)
    s, zp = spec.output_qparams.scale[0], spec.output_qparams.zero_point[0]
    assert np.allclose(d.arrays.paths[0].stages["output_clipping"], (eager - zp) * s)
    assert inductor.report.budget.stage("integer_kernel").excess == 0
    assert inductor.report.torch_check.mismatched_elements == 0
    assert not [f for f in d.report.findings if f.code == "QCD061"]


SATURATING = """
import json
import numpy as np
from qconvdiag.case import ModuleState, QuantSetup, build_case
from qconvdiag.diagnosis import Options, run_diagnosis
from qconvdiag.quantization.qparams import QParams, per_tensor, quantize
rng = np.random.default_rng(0)
x = rng.uniform(4.5, 5.0, (1, 8, 6, 6)).astype(np.float32)   # codes near 255 at scale 1/51
w = rng.uniform(0.4, 0.5, (4, 8, 3, 3)).astype(np.float32)   # codes near 127, one sign
x_qp = per_tensor(1 / 51, 0, "quint8", "user")
w_qp = QParams((0.5 / 127,) * 4, (0,) * 4, "qint8", 0, "module")
module = ModuleState(quantize(w, w_qp), w_qp, None, per_tensor(0.5, 0, "quint8", "module"))
setup = QuantSetup(input_qparams=x_qp, input_codes=quantize(x, x_qp), module=module)
case = build_case(x, w, None, setup=setup, flow="pt2e")
report = run_diagnosis(case, Options(production_path=False)).report
path = report.paths[0]
qcd040 = [f for f in report.findings if f.code == "QCD040"]
print(json.dumps({"accumulation": path.accumulation, "stage": path.stage("integer_kernel")
                  .delta.max_abs_lsb, "excess": path.budget.stage("integer_kernel").excess,
                  "qcd040": [(f.severity, list(f.stages)) for f in qcd040],
                  "mismatches": path.torch_check.mismatched_elements}))
"""


def test_int16_saturation_without_vnni_is_the_integer_kernels():
    """ISA forced to AVX2: oneDNN sums adjacent channels' products in saturating int16, which
    the eager Q/DQ graph (fp32) does not: integer_kernel carries it, many steps, as excess,
    and QCD040 names it there."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", SATURATING], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["accumulation"] == "int16_pairs_channels" and result["mismatches"] == 0
    assert result["stage"] > 1 and result["excess"] > 0
    assert result["qcd040"] and result["qcd040"][0][1] == ["integer_kernel"]
