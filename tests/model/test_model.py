"""The model walk (issue 14): capture_model, bundles, walk_model, diagnose_model, the CLI."""

from __future__ import annotations

import copy
import json
import warnings
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from torch.ao.quantization import DeQuantStub as DeQuantStub_
from torch.ao.quantization import QuantStub as QuantStub_

import qconvdiag
from qconvdiag.errors import QconvdiagError
from qconvdiag.model.walk import WalkOptions, walk_model
from tests import models
from tests.cpu import healthy_qconfig, vnni
from tests.repo import SAMPLES

#: The float model's activations recomputed with BatchNorm folded into the conv agree with the
#: float model's own to float32 rounding of the fold (relative to the activation's magnitude).
FOLD_TOL = 1e-5
#: The screen's own RMSE and the full diagnosis's as_given total are the same quantity computed
#: two ways (one float64 conv each): equal to float64 rounding.
SAME_RMSE = 1e-6
ENGINES = ("x86", "fbgemm", "qnnpack", "onednn")
SAMPLE = SAMPLES / "model" / "digits.pt"


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    """The models set torch's quantized engine (capture_model records it): put it back."""
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def walk(float_model, quantized, x, top=0, **kw):  # noqa: ANN001, ANN201
    """Capture and walk, every conv torch-checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(float_model, quantized, x)
    return bundle, walk_model(bundle, WalkOptions(top=top, torch_check="all", **kw))


@pytest.fixture(scope="module")
def healthy_x86():  # noqa: ANN201
    f, q = models.eager("x86")
    x = models.inputs(2, 8, 7)
    bundle, d = walk(f, q, x, top=1)
    return f, q, x, bundle, d


def test_capture_folds_batchnorm_as_the_float_model_computes(healthy_x86):  # noqa: ANN001
    f, _q, x, bundle, _d = healthy_x86
    seen = {}
    points = {"stem": f.relu1, "dw": f.relu2, "pw": f.bn3, "head": f.head}
    hooks = [m.register_forward_hook(lambda _m, _a, out, n=n: seen.__setitem__(n, out.detach()))
             for n, m in points.items()]
    with torch.no_grad():
        f(x)
    for h in hooks:
        h.remove()
    assert [lay.name for lay in bundle.layers] == ["stem", "dw", "pw", "head"]
    for lay in bundle.layers:
        ref = seen[lay.name].numpy()
        scale = float(np.abs(ref).max())
        np.testing.assert_allclose(lay.float_output, ref, atol=FOLD_TOL * scale, rtol=0)
    folded = {lay.name: lay.bn_folded for lay in bundle.layers}
    assert folded == {"stem": "bn1", "dw": "bn2", "pw": "bn3", "head": None}
    assert [lay.case.activation for lay in bundle.layers] == ["relu", "relu", None, None]


@pytest.mark.parametrize("engine", ENGINES)
def test_healthy_model_is_quiet_and_torch_exact(engine):  # noqa: ANN001
    f, q = models.eager(engine)
    _bundle, d = walk(f, q, models.inputs(2, 8, 7))
    for row in d.report.layers:
        assert row.torch_mismatches == 0, row.name
        assert row.verdict == "at_floor", (row.name, row.own, row.floor_rmse)
        assert not [x for x in row.findings if x.severity != "info"], (row.name, row.findings)
    assert d.report.status == "ok"


def test_conv1d_model_and_fx_flow():
    f, q = models.eager("x86", dims=1)
    _b, d = walk(f, q, models.inputs(1, 8, 7))
    assert [r.op for r in d.report.layers] == ["conv1d+relu", "conv1d"]
    assert all(r.torch_mismatches == 0 and r.verdict == "at_floor" for r in d.report.layers)
    f, q = models.fx("x86")
    bundle, d = walk(f, q, models.inputs(2, 8, 7))
    assert [lay.bn_folded for lay in bundle.layers] == ["bn1", "bn2", "bn3", None]
    assert all(r.torch_mismatches == 0 and r.verdict == "at_floor" for r in d.report.layers)


def test_screen_agrees_with_the_full_diagnosis(healthy_x86):  # noqa: ANN001
    *_, d = healthy_x86
    (detail,) = d.report.details
    row = d.report.layer(detail.layer)
    assert detail.layer == d.report.ranking[0]
    total = detail.report.path("as_given").total
    assert row.own.rmse == pytest.approx(total.rmse, rel=SAME_RMSE)
    assert row.own.sqnr_db == pytest.approx(total.sqnr_db, rel=SAME_RMSE)


def test_the_table_and_the_detail_judge_a_conv_on_one_floor():
    """An explained conv's detail has the table's floor: its input is the one it received,
    on its input grid, so neither counts input rounding (the detail did: 38.9x against the
    table's 63.8x on the sample's broken conv)."""
    from qconvdiag.model.bundle import load_bundle

    bundle = load_bundle(SAMPLE)
    d = walk_model(bundle, WalkOptions(top=3))
    for detail in d.report.details:
        row = d.report.layer(detail.layer)
        budget = detail.report.path("as_given").budget
        assert budget.floor_rmse == pytest.approx(row.floor_rmse, rel=SAME_RMSE), row.name
        assert budget.verdict == row.verdict, row.name


def _break_output(q: torch.nn.Module, name: str, scale: float, zero_point: int) -> None:
    m = q.get_submodule(name)
    m.scale, m.zero_point = scale, zero_point


def test_handmade_output_qparams_are_blamed_on_that_conv_only():
    f, q = models.eager("x86")
    _break_output(q, "dw", 1 / 255, 0)  # "the activations are in [0, 1]"
    _b, d = walk(f, q, models.inputs(2, 8, 7), top=1)
    r = d.report
    assert r.ranking[0] == "dw"
    dw = r.layer("dw")
    assert dw.verdict == "broken" and dw.dominant_stage == "output_clipping"
    assert dw.findings[0].code == "QCD051" and dw.findings[0].severity == "error"
    # downstream convs receive a damaged input; their own error stays at the floor and
    # nothing blames them, while their propagated error shows the damage
    for name in ("pw", "head"):
        row = r.layer(name)
        assert row.verdict == "at_floor", (name, row.own, row.floor_rmse)
        assert not [x for x in row.findings if x.severity != "info"]
        assert row.propagated.sqnr_db < row.own.sqnr_db - 10
    assert r.details[0].layer == "dw"
    assert r.details[0].report.findings[0].code == "QCD051"
    # the screen's estimate of the dominant stage agrees with the stage ladder's
    from qconvdiag.model.screen import screen_layer
    from qconvdiag.model.walk import ladder_dominant

    assert screen_layer(_b.layer("dw"), "x86").dominant_stage == "output_clipping"
    assert ladder_dominant(r.details[0].report) == "output_clipping"


def test_coarse_weight_is_named():
    f, q = models.eager("qnnpack")
    m = q.get_submodule("pw")
    w, b = m.weight(), m.bias()
    coarse = torch.quantize_per_tensor(w.dequantize(), float(w.dequantize().abs().max()) / 4,
                                       0, torch.qint8)
    m.set_weight_bias(coarse, b)
    _b, d = walk(f, q, models.inputs(2, 8, 7))
    row = d.report.layer("pw")
    assert d.report.ranking[0] == "pw" and row.verdict != "at_floor"
    assert row.dominant_stage in ("weight_rounding", "module_state")
    assert row.findings and row.findings[0].severity in ("error", "warning")
    assert all(d.report.layer(n).verdict == "at_floor" for n in ("stem", "dw"))


@pytest.mark.parametrize("suffix", [".pt", ".npz", ".safetensors"])
def test_bundle_round_trip(healthy_x86, tmp_path, suffix):  # noqa: ANN001
    *_, bundle, d = healthy_x86
    path = tmp_path / f"model{suffix}"
    from qconvdiag.model.bundle import save_bundle

    save_bundle(bundle, path)
    loaded = qconvdiag.load_bundle(path)
    assert [lay.name for lay in loaded.layers] == [lay.name for lay in bundle.layers]
    for a, b in zip(loaded.layers, bundle.layers):
        np.testing.assert_array_equal(a.quantized_output, b.quantized_output)
        np.testing.assert_array_equal(a.float_output, b.float_output)
        np.testing.assert_array_equal(a.case.setup.input_codes, b.case.setup.input_codes)
    again = walk_model(loaded, WalkOptions(top=1)).report
    assert [r.to_dict()["own"] for r in again.layers] == [r.to_dict()["own"]
                                                         for r in d.report.layers]
    with pytest.raises(QconvdiagError, match="model bundle"):
        qconvdiag.load_case(path)


def test_bundle_output_codes_outside_their_dtype_are_refused(healthy_x86, tmp_path):  # noqa: ANN001
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy_x86[-2])
    codes = mapping["layer0.quantized_output"].astype(np.int64)
    codes.reshape(-1)[0] = 256  # a cast to uint8 would read 0
    mapping["layer0.quantized_output"] = codes
    with pytest.raises(QconvdiagError, match="quantized_output must hold integer codes within"):
        bundle_from_mapping(mapping, "b.npz")


def test_bundle_float_input_of_another_shape_is_refused(healthy_x86):  # noqa: ANN001
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy_x86[-2])
    mapping["layer0.float_input"] = mapping["layer0.float_input"][:1]  # a truncated one
    with pytest.raises(QconvdiagError, match="float_input must be finite with the conv's input"):
        bundle_from_mapping(mapping, "b.npz")


@pytest.mark.parametrize("meta, fragment", [
    ({"flow": "bogus"}, "'flow' must be one of eager, fx, pt2e"),
    ({"flow": "pt2e"}, "pt2e with a PT2E engine only"),  # an x86 bundle
    ({"ops": [{"name": "act", "kind": "ReLU6", "scale": 0.1, "zero_point": 0,
               "dtype": "quint8", "float_range": [0, 0], "after": ["c1"], "sampled": True,
               "tensor_qparams": False, "wrong": {"kind": "ReLU6", "outputs_off": 3,
                                                  "total": 10, "max_steps": float("nan"),
                                                  "contiguous_ok": True,
                                                  "channels_last": True}}]},
     "an entry of 'ops' is malformed"),
    ({"ops": [{"name": "act", "kind": "ReLU6", "scale": 0.1, "zero_point": 0,
               "dtype": "quint8", "float_range": [0, 0], "after": ["c1"], "sampled": True,
               "tensor_qparams": False, "wrong": {"kind": "ReLU6", "outputs_off": 3,
                                                  "total": 10, "max_steps": 4.0,
                                                  "contiguous_ok": "false",
                                                  "channels_last": True}}]},
     "an entry of 'ops' is malformed"),
    # a function's name is printed into its fix, code the user runs: only FUNCTIONS' names
    ({"ops": [{"name": "the relu6 call after c1", "kind": "relu6", "scale": 0.1,
               "zero_point": 0, "dtype": "quint8", "float_range": [0, 0], "after": ["c1"],
               "sampled": True, "tensor_qparams": False,
               "wrong": {"kind": "relu6", "outputs_off": 3, "total": 10, "max_steps": 4.0,
                         "contiguous_ok": True, "channels_last": True,
                         "function": "__import__('os').remove"}}]},
     "an entry of 'ops' is malformed"),
])
def test_a_bundle_s_flow_and_wrong_values_are_checked_on_reading(healthy_x86, meta, fragment
                                                                 ):  # noqa: ANN001
    from qconvdiag.io import BUNDLE_KEY
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy_x86[-2])
    mapping[BUNDLE_KEY] = {**mapping[BUNDLE_KEY], **meta}
    with pytest.raises(QconvdiagError, match=fragment):
        bundle_from_mapping(mapping, "b.npz")


def test_case_file_is_not_a_bundle():
    with pytest.raises(QconvdiagError, match="not a model bundle"):
        qconvdiag.load_bundle(SAMPLES / "forum_conv.pt")


def test_model_json_follows_the_schema(healthy_x86):  # noqa: ANN001
    *_, d = healthy_x86
    data = json.loads(json.dumps(d.report.to_dict(), allow_nan=False))
    schema = json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert data["kind"] == "model" and data["details"][0]["kind"] == "conv"
    assert data["details"][0]["layer"] == data["ranking"][0]
    sqnr = {lay["name"]: lay["own"]["sqnr_db"] for lay in data["layers"]}
    assert [sqnr[n] for n in data["ranking"]] == sorted(sqnr.values())


def test_gates_per_layer():
    f, q = models.eager("x86")
    _break_output(q, "dw", 1 / 255, 0)
    _b, d = walk(f, q, models.inputs(2, 8, 7), fail_on="error", fail_under_sqnr=20.0)
    assert d.report.status == "fail"
    layers = {b.layer for b in d.report.gate.breaches}
    assert layers == {"dw"}


def test_diagnose_model_in_process_matches_the_file(healthy_x86, tmp_path):  # noqa: ANN001
    f, q, x, _bundle, d = healthy_x86
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qconvdiag.diagnose_model(f, q, x, top=1)
    assert report.ranking == d.report.ranking
    assert [r.own for r in report.layers] == [r.own for r in d.report.layers]


def test_capture_subsamples_within_max_elements():
    f, q = models.eager("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, [models.inputs(2, 4, 1), models.inputs(2, 4, 2)],
                                         max_elements=16 * 16 * 16 * 3)
    assert all(lay.case.input.shape[0] == 3 for lay in bundle.layers)
    assert any("first 3 of 8 samples" in n for n in bundle.notes)


def test_capture_refuses_mismatched_models():
    f, q = models.eager("x86")
    with pytest.raises(QconvdiagError, match="training mode"):
        qconvdiag.capture_model(f.train(), q, models.inputs(2, 2, 1))
    f.eval()
    other, _ = models.eager("x86", dims=1)
    with pytest.raises(QconvdiagError, match="no module"):
        qconvdiag.capture_model(other, q, models.inputs(2, 2, 1))


@pytest.fixture(scope="module")
def made(tmp_path_factory):  # noqa: ANN001, ANN201
    """The digits samples as their scripts make them on this CPU (train on scikit-learn's
    digits, quantize with the eager flow and break conv2's output qparams by hand, capture;
    quantize the same trained model with torchao's PT2E flow, capture): a directory."""
    out = tmp_path_factory.mktemp("digits")
    make_digits = _sample_script("make_digits")
    make_pt2e = _sample_script("make_digits_pt2e")
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(make_digits, "HERE", out)
        mp.setattr(make_pt2e, "HERE", out)
        mp.setattr(make_pt2e, "digits_script", lambda: make_digits)
        if not vnni():  # NO_VNNI_DIGESTS' bundles were made before the folded BatchNorms'
            # statistics were kept (QCD027): they are left out there, as those bytes hold them
            from qconvdiag.model import capture

            mp.setattr(capture, "folded_batchnorm", lambda _name, _bn: None)
        try:
            net = make_digits.main()
            make_pt2e.main(trained=net)
        finally:  # the scripts set both: they leave the module's other tests alone
            torch.set_num_threads(threads)
            torch.backends.quantized.engine = engine
    return out


def test_digits_sample_blames_the_broken_conv(made):  # noqa: ANN001
    """The sample as captured on this CPU (the committed one where the CPU is the one it was
    made on: test_digits_samples_are_what_their_scripts_make), every conv torch-checked."""
    bundle = qconvdiag.load_bundle(made / "digits.pt")
    r = walk_model(bundle, WalkOptions(top=1, torch_check="all")).report
    assert r.ranking[0] == "conv2"
    assert r.layer("conv2").findings[0].code == "QCD051"
    row = r.layer("conv1")
    assert row.verdict == "at_floor" and not [x for x in row.findings if x.severity != "info"]
    # conv2's saturated outputs (code 255) are conv3's input: 8 bits, which saturate int16
    # pairs where x86 sums them (no VNNI), and QCD040 names that; elsewhere conv3 is healthy
    from tests.cpu import pairs_here

    row = r.layer("conv3")
    loud = [x.code for x in row.findings if x.severity != "info"]
    if pairs_here("x86"):
        assert row.verdict != "broken" and loud == ["QCD040"]
    else:
        assert row.verdict == "at_floor" and loud == []
    assert all(row.torch_mismatches == 0 for row in r.layers)


# --- the command line -------------------------------------------------------------------------

def _cli(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from qconvdiag.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_explains_a_bundle_with_top_and_layer():
    r = _cli("explain", str(SAMPLE), "--top", "1", "--layer", "conv1", "--json")
    assert r.exit_code == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["kind"] == "model"
    assert [d["layer"] for d in data["details"]] == ["conv2", "conv1"]
    r = _cli("explain", str(SAMPLE), "--top", "0", "--width", "100")
    assert r.exit_code == 0
    assert "conv2: QCD051 outputs saturated" in r.stdout
    assert "1 of 3 quantized convs are above their rounding floor (conv2)" in r.stdout


def test_cli_gate_names_the_layer():
    r = _cli("explain", str(SAMPLE), "--top", "0", "--fail-under-sqnr", "20", "--json")
    assert r.exit_code == 1
    data = json.loads(r.stdout)
    breach = f"own SQNR {data['layers'][1]['own']['sqnr_db']:.2f} dB < 20.0 dB"
    assert data["gate"]["breaches"] == [{"layer": "conv2", "breach": breach}]
    assert r.stderr.strip() == f"qconvdiag: gate: conv2: {breach}"


@pytest.mark.parametrize("args, fragment", [
    (["--save-outputs", "OUT.npz"], "--save-outputs applies to one conv's case"),
    (["--engine", "qnnpack"], "captured on engine x86"),
    (["--engine", "all"], "--engine all compares engines on one conv's case"),
    (["--layer", "nope"], "no conv named 'nope'"),
    (["--top", "-1"], "--top must be 0 or more"),
])
def test_cli_refuses_what_a_bundle_cannot_do(tmp_path, args, fragment):  # noqa: ANN001
    args = [a.replace("OUT.npz", str(tmp_path / "out.npz")) for a in args]
    r = _cli("explain", str(SAMPLE), *args)
    assert r.exit_code == 2
    assert fragment in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


def test_cli_top_applies_to_bundles_only():
    forum = str(SAMPLE.parent.parent / "forum_conv.pt")
    r = _cli("explain", forum, "--top", "1")
    assert r.exit_code == 2 and "--top applies to a model bundle" in r.stderr


def test_cli_traces_a_layer_of_a_bundle():
    r = _cli("trace", str(SAMPLE), "--layer", "conv2", "--json")
    assert r.exit_code == 0, r.stderr
    tr = json.loads(r.stdout)
    assert tr["engine"] == "x86" and tr["torch_agrees"] is True
    assert tr["output_int"] == 255 and tr["unclamped"] > 255  # the saturation QCD051 names
    r = _cli("trace", str(SAMPLE))
    assert r.exit_code == 2 and "give --layer NAME" in r.stderr


def _sample_script(name: str):  # noqa: ANN202
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, SAMPLE.parent / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: sha256 of the samples as their scripts make them on a CPU without VNNI (an AVX2 AMD EPYC,
#: torch 2.13.0+cpu, torchao 0.18.0), before bundles recorded the capture CPU's flags and the
#: ops between convs (``_without_cpu``), and the folded BatchNorms' statistics (``made``).
#: The committed samples were made on an AVX512-VNNI CPU, where x86 runs symmetric-weight
#: convs on oneDNN, exactly; without VNNI it runs them on fbgemm, which requantizes one of
#: conv2's near-tie outputs differently, and oneDNN's PT2E kernels sum int16 pairs.
NO_VNNI_DIGESTS = {
    "digits.pt": "34b65ac7ae50f705327ea7f34d24c47239df05842e166a4b2006fd146e7e04e3",
    "digits_pt2e.pt": "172351e531d268b4c08bfcb894a88f2224d40198766699864a62de45986657f8",
}
#: The ops' float ranges and scales on another CPU: its float convs may round differently.
OPS_TOL = 1e-5


def _without_cpu(path, ops: bool = True) -> bytes:  # noqa: ANN001
    """The bundle's bytes as written without the capture CPU's flags (and, without ``ops``,
    the ops' record): as a bundle of another CPU, or of an earlier version, holds them. A
    bundle that records neither: its bytes as they are."""
    import dataclasses

    from qconvdiag.io import encode_case
    from qconvdiag.model.bundle import bundle_to_mapping, load_bundle

    bundle = load_bundle(path)
    if bundle.cpu_flags is None and not bundle.ops:
        return Path(path).read_bytes()
    bundle = dataclasses.replace(bundle, cpu_flags=None, ops=bundle.ops if ops else ())
    return encode_case(bundle_to_mapping(bundle), ".pt")


def test_digits_samples_are_what_their_scripts_make(made):  # noqa: ANN001
    """The bundled samples are real: their scripts write the same bundles again on a CPU like
    the one they were made on (tests/cpu.py: with VNNI), and known bytes without VNNI; the
    capture CPU's flags are this CPU's."""
    import hashlib

    from qconvdiag.arithmetic.cpu import isa_flags
    from qconvdiag.model.bundle import load_bundle

    assert load_bundle(made / "digits.pt").cpu_flags == isa_flags()
    for name in ("digits.pt", "digits_pt2e.pt"):
        if vnni():
            assert _without_cpu(made / name) == _without_cpu(SAMPLE.parent / name), name
        else:
            got = _without_cpu(made / name, ops=False)
            assert hashlib.sha256(got).hexdigest() == NO_VNNI_DIGESTS[name], name
            ours, shipped = load_bundle(made / name).ops, load_bundle(SAMPLE.parent / name).ops
            assert [(o.name, o.kind, o.after) for o in ours] == [
                (o.name, o.kind, o.after) for o in shipped]
            for o, s in zip(ours, shipped):
                assert (o.scale, o.float_low, o.float_high) == pytest.approx(
                    (s.scale, s.float_low, s.float_high), rel=OPS_TOL), o.name


@pytest.mark.parametrize("factor", [50.0, 1.0])
def test_inputs_unlike_the_calibration_batches_are_told_to_be_prepared_alike(factor: float):
    """A model calibrated on its batches and run on inputs ``factor`` times them (helper-65's:
    calibrated on [0, 1], run on [0, 255]): the stub loses them, and QCD065 said "calibrate
    on inputs scaled as at inference", which left that model at the float model's own 10.6%
    on such inputs where normalizing them gave 99.7%. It says the inputs are not like the
    calibration batches, with the factor at the first conv, and its fix normalizes first. On
    inputs like the batches with a stub cut by hand, it says neither."""
    f, q = models.eager("x86")
    if factor == 1.0:
        q.quant.scale = q.quant.scale * 12
    calibration = [models.inputs(2, 8, 100 + i) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qconvdiag.diagnose_model(f, q, models.inputs(2, 8, 7) * factor, top=0,
                                          calibration=calibration)
    (lost,) = [x for x in report.findings if x.code == "QCD065"]
    unlike = "The inputs here are not like those batches: at stem the float model's output"
    assert (unlike in lost.message) == (factor > 1), lost.message
    assert ("normalize these as those were" in lost.fix) == (factor > 1), lost.fix
    assert "calibration_batches" in lost.fix
    assert max(len(line) for line in lost.fix.splitlines()) <= 80
    if factor > 1:
        ratio = float(lost.message.split("reaches ")[1].split("x")[0])
        assert 25 <= ratio <= 100, ratio  # the stem's output, bias and all, about 50x


def test_no_factor_is_told_where_one_side_is_all_zeros() -> None:
    """A first conv whose fused ReLU zeroes every captured output (or every calibration one)
    has no factor to tell (review: 1/0 in the sentence's 'spans 1/... of')."""
    import dataclasses

    from qconvdiag.model.lost import inputs_unlike, unlike_inputs_sentence

    f, q = models.eager("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, models.inputs(2, 8, 7),
                                         calibration=[models.inputs(2, 8, 100)])
    stem = bundle.layer("stem")
    assert inputs_unlike(stem) is None  # alike
    zero = dataclasses.replace(stem, float_output=stem.float_output * 0)
    assert inputs_unlike(zero) is None
    assert inputs_unlike(dataclasses.replace(stem, calibration_range=(0.0, 0.0))) is None
    narrow = dataclasses.replace(stem, float_output=stem.float_output / 20)
    ratio = inputs_unlike(narrow)
    assert ratio is not None and ratio < 1 / 8
    assert "spans 1/" in unlike_inputs_sentence(ratio, "stem")
    assert "255" not in unlike_inputs_sentence(ratio, "stem")


def test_a_loss_before_the_convs_is_named_not_blamed_on_them():
    """A QuantStub whose scale is 12x too coarse: every conv is at its floor on the input it
    received, and the report says the first conv's input was lost before it."""
    f, q = models.eager("x86")
    q.quant.scale = q.quant.scale * 12
    _b, d = walk(f, q, models.inputs(2, 8, 7))
    r = d.report
    assert all(row.verdict == "at_floor" for row in r.layers)
    (loss,) = r.upstream
    assert loss.layer == "stem" and loss.floor_ratio >= 4 and "QuantStub" in loss.message
    # the capture saw the QuantStub's (Quantize's) scale against the float model's input range
    assert loss.op == "quant" and "quant: its output scale" in loss.message
    # QCD065 names it, so a gate sees it though every conv is at its floor
    (lost,) = [f for f in r.findings if f.code == "QCD065"]
    assert lost.severity in ("warning", "error") and "input quantization" in lost.title
    assert lost.evidence["layer"] == "stem" and "calibration_batches" in lost.fix
    assert [b.layer for b in r.gate.breaches] == [] and r.status == "ok"  # --fail-on never
    # the fix, run on the float model fused and given its qconfig as eager() does, calibrates
    # the QuantStub again: its scale is the healthy model's, not 12x
    import copy

    from torch.ao.quantization import fuse_modules

    from tests.cpu import healthy_qconfig

    model = copy.deepcopy(f)
    fuse_modules(model, models.FUSE_2D, inplace=True)
    model.qconfig = healthy_qconfig("x86")
    scope = {"model": model,
             "calibration_batches": [models.inputs(2, 8, 100 + i) for i in range(4)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(lost.fix, "QCD065 fix", "exec"), scope)
    healthy_f, healthy_q = models.eager("x86")
    assert float(scope["quantized"].quant.scale) == pytest.approx(float(healthy_q.quant.scale))
    _b, d = walk(healthy_f, healthy_q, models.inputs(2, 8, 7))
    assert d.report.upstream == () and d.report.findings == ()


def test_a_loss_between_convs_is_named_at_the_conv_that_receives_it():
    f, q = models.eager("x86", dims=0)
    _b, d = walk(f, q, models.inputs(0, 8, 7))
    assert d.report.upstream == () and d.report.findings == ()  # the near miss: silent
    q.add.scale = q.add.scale * 30  # the quantized add's output scale, 30x too coarse
    _b, d = walk(f, q, models.inputs(0, 8, 7))
    (loss,) = d.report.upstream
    assert loss.layer == "c" and loss.worst_before in ("a", "b")
    assert d.report.layer("c").verdict == "at_floor"
    # the capture recorded the add's output qparams and the float model's range there: the
    # add is named, with the step its range needs
    assert loss.op == "add" and "add (QFunctional) loses it: its output scale" in loss.message
    (lost,) = d.report.findings
    assert lost.code == "QCD065" and "by add's output qparams" in lost.title
    # without the ops' record (a bundle of an FX or older capture) it says "an op between",
    # and its fix prints each quantized module's output qparams: the add's among them
    import contextlib
    import dataclasses
    import io

    from qconvdiag.model.walk import WalkOptions as Options_

    generic = walk_model(dataclasses.replace(_b, ops=()), Options_(top=0)).report
    (unnamed,) = generic.findings
    assert "an op between" in unnamed.title and generic.upstream[0].op is None
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(unnamed.fix, "QCD065 fix", "exec"), {"quantized": q})
    (line,) = [x for x in printed.getvalue().splitlines() if x.startswith("add ")]
    assert float(line.split()[2]) == pytest.approx(float(q.add.scale))

    gated = walk_model(_b, Options_(top=0, fail_on="warning")).report
    assert [b.layer for b in gated.gate.breaches] == ["(model)"]
    assert walk_model(_b, Options_(top=0, fail_on="warning", ignore=("QCD065",))
                      ).report.gate.breaches == ()
    # the named op's fix sets its qparams from the float model's range: the loss is gone
    exec(compile(lost.fix, "QCD065 fix", "exec"), {"quantized": q})
    _b, d = walk(f, q, models.inputs(0, 8, 7))
    assert d.report.upstream == () and d.report.findings == ()


def test_capture_keeps_every_batch_within_the_limit():
    f, q = models.eager("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, [models.inputs(2, 2, i) for i in range(5)])
    assert all(lay.case.input.shape[0] == 10 for lay in bundle.layers)
    assert not any("max-elements" in n for n in bundle.notes)


def test_labels_in_batches_are_dropped_and_padding_modes_refused():
    f, q = models.eager("x86")
    x = models.inputs(2, 2, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pairs = qconvdiag.capture_model(f, q, [(x, torch.zeros(2)), (x, torch.ones(2))])
        assert all(lay.case.input.shape[0] == 4 for lay in pairs.layers)
        f.stem.padding_mode = "replicate"  # torch's quantized convs take zeros and reflect
        with pytest.raises(QconvdiagError, match="padding_mode='replicate'"):
            qconvdiag.capture_model(f, q, x)
        f.stem.padding_mode = "reflect"  # the quantized stem pads with zeros
        with pytest.raises(QconvdiagError, match="'reflect' in the float model, 'zeros'"):
            qconvdiag.capture_model(f, q, x)


def test_a_residual_plus_on_quantized_tensors_is_refused_naming_floatfunctional() -> None:
    """x + y on two quantized tensors (a residual add without FloatFunctional): one line that
    names FloatFunctional (helper-65: it named a missing DeQuantStub alone)."""
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.dequant = QuantStub_(), DeQuantStub_()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            return self.dequant(self.conv(x) + x)

    torch.backends.quantized.engine = "x86"
    f = Block().eval()
    f.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = torch.ao.quantization.prepare(copy.deepcopy(f))
        prepared(models.inputs(2, 2, 1))
        q = torch.ao.quantization.convert(prepared)
        with pytest.raises(QconvdiagError, match="FloatFunctional") as e:
            qconvdiag.capture_model(f, q, models.inputs(2, 2, 7))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("bad", ["unbatched", "other_channels", "uint8"])
def test_calibration_batches_the_float_model_cannot_run_are_refused_in_one_line(
        bad: str, tmp_path) -> None:  # noqa: ANN001
    """calibration= batches the float model refuses (one image without its batch dimension,
    too few channels, uint8) get the one line inputs= gets, naming calibration=; no
    traceback, no bundle written (helper-65: torch's exception came through before)."""
    f, q = models.eager("x86")
    good = models.inputs(2, 8, 100)
    calibration = {"unbatched": good[0], "other_channels": good[:, :2],
                   "uint8": (good * 50).to(torch.uint8)}[bad]
    path = tmp_path / "b.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(QconvdiagError, match="the float model fails on calibration=") as e:
            qconvdiag.capture_model(f, q, models.inputs(2, 2, 7), path,
                                    calibration=[calibration])
    assert "\n" not in str(e.value) and not path.exists()


def test_calibration_ranges_judge_output_scales_the_samples_cannot():
    """An output scale 3x too coarse: with the calibration batches the walk names it; from two
    samples alone their range is too uncertain to, and the bundle says so. A healthy model
    stays quiet either way."""
    f, q = models.eager("x86")
    calibration = [models.inputs(2, 8, 100 + i) for i in range(4)]  # what eager() calibrated on
    x = models.inputs(2, 2, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        healthy = qconvdiag.capture_model(f, q, x, calibration=calibration)
        assert all(lay.calibration_range is not None for lay in healthy.layers)
        assert all(r.verdict == "at_floor" for r in walk_model(healthy).report.layers)
        q.pw.scale = q.pw.scale * 3
        with_cal = qconvdiag.capture_model(f, q, x, calibration=calibration)
        sampled = qconvdiag.capture_model(f, q, x)
    row = walk_model(with_cal).report.layer("pw")
    assert row.verdict != "at_floor" and row.findings[0].code == "QCD052"
    assert walk_model(sampled).report.layer("pw").verdict == "at_floor"
    assert any("not given the batches the model was calibrated on" in n
               for n in sampled.notes)


def test_an_uncalibrated_quantstub_is_named_as_such():
    f, q = models.eager("x86")
    q.quant.scale, q.quant.zero_point = torch.tensor([1.0]), torch.tensor([0])
    _b, d = walk(f, q, models.inputs(2, 8, 7))
    (loss,) = d.report.upstream
    assert loss.layer == "stem" and "was never calibrated (scale 1.0, zero point 0" in loss.message
    assert loss.input.sqnr_db < 10  # the signal mostly gone: an error
    assert [(f.code, f.severity) for f in d.report.findings] == [("QCD065", "error")]
    from qconvdiag.render.terminal import render_terminal

    text = render_terminal(d.report, width=100)
    assert "but the signal is lost before stem" in " ".join(text.split())


def test_a_quantstub_calibrated_to_7_bits_is_at_its_floor():
    """x86's default qconfig quantizes activations to 7 bits (reduce_range): a QuantStub
    calibrated on batches like the inputs puts them on codes 0..127, 2x the 8-bit floor by
    design. A healthy sweep's conv1d model was 4.2x the 8-bit floor and got QCD065 ('a scale
    that does not fit the inputs'); against the 7-bit floor its codes show, 2.1x: quiet. A
    stub 8x coarser is still named."""
    from torch.ao.quantization import convert, fuse_modules, get_default_qconfig, prepare

    class Net1d(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = torch.ao.quantization.QuantStub()
            self.c1 = torch.nn.Conv1d(4, 16, 5, padding=2)
            self.r1 = torch.nn.ReLU()
            self.c2 = torch.nn.Conv1d(16, 8, 1)
            self.dequant = torch.ao.quantization.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.c2(self.r1(self.c1(self.quant(x)))))

    g = torch.Generator().manual_seed(0)
    torch.backends.quantized.engine = "x86"
    f = Net1d().eval()
    calibration = [torch.randn(2, 4, 64, generator=g) for _ in range(4)]
    inputs = [torch.randn(2, 4, 64, generator=g) for _ in range(2)]
    q = fuse_modules(copy.deepcopy(f), [["c1", "r1"]])
    q.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(q)
        for b in calibration:
            prepared(b)
        q = convert(prepared)
        report = qconvdiag.diagnose_model(f, q, inputs, top=0, calibration=calibration)
        assert int(q.quant(torch.cat(inputs)).int_repr().max()) <= 127
        assert report.findings == () and report.upstream == ()
        q.quant.scale = q.quant.scale * 8
        report = qconvdiag.diagnose_model(f, q, inputs, top=0, calibration=calibration)
    assert [x.code for x in report.findings] == ["QCD065"]

    # qnnpack's default is 8-bit: a stub calibrated on inputs 4.5x as wide puts them on codes
    # 0..127 too, and is named (a review found the 7-bit floor applied on every engine)
    torch.backends.quantized.engine = "qnnpack"
    q = fuse_modules(copy.deepcopy(f), [["c1", "r1"]])
    q.qconfig = get_default_qconfig("qnnpack")
    positive = [b.abs() for b in inputs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare(q)
        for b in calibration:
            prepared(b.abs() * 4.5)
        q = convert(prepared)
        assert int(q.quant(torch.cat(positive)).int_repr().max()) <= 127
        report = qconvdiag.diagnose_model(f, q, positive, top=0)
    assert "QCD065" in [x.code for x in report.findings]


def test_a_conv_called_twice_per_forward_is_refused():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = torch.ao.quantization.QuantStub()
            self.c = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.dequant = torch.ao.quantization.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.c(self.c(self.quant(x))))

    from torch.ao.quantization import convert, get_default_qconfig, prepare

    torch.backends.quantized.engine = "x86"
    f = Twice().eval()
    q = Twice().eval()
    q.load_state_dict(f.state_dict())
    q.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        q(models.inputs(2, 4, 1))
        convert(q, inplace=True)
        with pytest.raises(QconvdiagError, match="ran 2 times .* once per forward"):
            qconvdiag.capture_model(f, q, models.inputs(2, 2, 2))


def test_a_model_converted_without_calibration_is_named_once(tmp_path):  # noqa: ANN001
    from torch.ao.quantization import convert, fuse_modules, get_default_qconfig, prepare

    torch.backends.quantized.engine = "x86"
    f, _ = models.eager("x86")
    import copy

    q = copy.deepcopy(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuse_modules(q, models.FUSE_2D, inplace=True)
        q.qconfig = get_default_qconfig("x86")
        prepare(q, inplace=True)
        convert(q, inplace=True)  # no calibration batches
    _b, d = walk(f, q, models.inputs(2, 4, 7), top=1)
    f_shared, n = d.report.shared_cause()
    assert f_shared.code == "QCD050" and n == len(d.report.layers)  # every conv: all at 1.0, 0
    # the explained conv's fix: its qparams, or the model's own flow (not a one-conv model
    # fed that conv's input, which a model's script does not have); the flow runs
    detail = d.report.details[0]
    fix = next(x.fix for x in detail.report.findings if x.code == "QCD050")
    flow = fix[:fix.index("# or this conv's output qparams alone")]  # calibrating comes first
    assert "torch.nn.Sequential(QuantStub(), conv" not in fix
    assert f"qm = quantized.get_submodule({detail.layer!r})" in flow
    model = fuse_modules(copy.deepcopy(f), models.FUSE_2D)
    scope = {"torch": torch, "model": model,
             "calibration_batches": [models.inputs(2, 8, 100 + i) for i in range(4)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(flow, "QCD050 fix", "exec"), scope)  # noqa: S102
    _b, fixed = walk(f, scope["quantized"], models.inputs(2, 4, 7))
    assert fixed.report.layer(detail.layer).verdict == "at_floor"
    # a bundle read from its file names its layers '<path>:<layer>': the fix names the layer
    path = tmp_path / "uncalibrated.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconvdiag.capture_model(f, q, models.inputs(2, 4, 7), path=path)
    loaded = walk_model(qconvdiag.load_bundle(path), WalkOptions(top=1))
    detail = loaded.report.details[0]
    fix = next(x.fix for x in detail.report.findings if x.code == "QCD050")
    assert f"qm = quantized.get_submodule({detail.layer!r})" in fix
    assert not [x for r in fixed.report.layers for x in r.findings if x.code == "QCD050"]
    from qconvdiag.render.terminal import render_terminal

    text = " ".join(render_terminal(d.report, width=100).split())
    assert "A model-wide cause:" in text and "converted without calibration" in text
    healthy_f, healthy_q = models.eager("x86")
    _b, d = walk(healthy_f, healthy_q, models.inputs(2, 4, 7))
    assert d.report.shared_cause() is None


ENGINE_AFTER_WALK = """
import warnings
warnings.simplefilter("ignore")
import copy
import torch, qconvdiag
from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare
from qconvdiag.model.walk import WalkOptions, walk_model
torch.manual_seed(0)
torch.backends.quantized.engine = "x86"
model = torch.nn.Sequential(QuantStub(), torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3),
                            torch.nn.Conv2d(8, 4, 1), DeQuantStub()).eval()
q = copy.deepcopy(model)
q.qconfig = get_default_qconfig("x86")
prepare(q, inplace=True)
x = torch.randn(2, 3, 16, 16)
q(x)
convert(q, inplace=True)
bundle = qconvdiag.capture_model(model, q, x)  # nothing has probed the engines yet
before = torch.backends.quantized.engine
walk_model(bundle, WalkOptions(top=0))  # the first walk of the process: the probes run in it
print(before, torch.backends.quantized.engine)
"""


def test_a_walk_leaves_torch_s_quantized_engine_as_it_was():
    """The probes switch torch's quantized engine (one setting per process) while they run;
    the walk screens layers on two threads, so the probes run before them, and each switch
    holds a lock until it puts the engine back. Before, the first walk of a process left
    qnnpack set: the user's next model was packed for it (4x slower convs, measured)."""
    import subprocess
    import sys

    from tests.repo import ROOT

    out = subprocess.run([sys.executable, "-c", ENGINE_AFTER_WALK], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True)
    assert out.stdout.split()[-2:] == ["x86", "x86"], out.stdout


def _rescale_weight(m: torch.nn.Module, factor: float) -> None:
    """The module's weight codes kept, their scale multiplied (written by hand after convert)."""
    w, b = m.weight(), m.bias()
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        w = torch._make_per_channel_quantized_tensor(
            w.int_repr(), w.q_per_channel_scales() * factor, w.q_per_channel_zero_points(),
            w.q_per_channel_axis())
    else:
        w = torch._make_per_tensor_quantized_tensor(w.int_repr(), w.q_scale() * factor,
                                                    w.q_zero_point())
    m.set_weight_bias(w, b)


def test_saturation_downstream_of_a_broken_conv_is_blamed_on_that_conv():
    """A weight scale written 10x after convert (the stem's) sends every later conv inputs the
    float model never gives it: their outputs saturate beyond the float model's own reach
    there. The stem gets QCD024 (the codes at 10x their scale, not a BatchNorm fold: one
    factor for every channel), the convs after it QCD051 as info only (their output qparams
    fit the float model), no error nor warning."""
    f, q = models.eager("x86")
    _rescale_weight(q.stem, 10.0)
    _b, d = walk(f, q, models.inputs(2, 8, 7))
    rows = {r.name: r for r in d.report.layers}
    stem = rows["stem"]
    assert stem.findings[0].code == "QCD024" and stem.findings[0].severity == "error"
    assert "QCD027" not in {x.code for x in stem.findings}
    assert "codes at 10x their scale" in d.diagnoses["stem"].report.findings[0].message
    for name in ("dw", "pw", "head"):
        assert rows[name].verdict != "at_floor", name  # they do saturate
        assert {(x.code, x.severity) for x in rows[name].findings} >= {("QCD051", "info")}
        assert all(x.severity == "info" for x in rows[name].findings), name
    assert d.report.shared_cause() is None


def test_a_channel_far_beyond_the_others_is_named_and_equalization_restores_it():
    """One channel between pw and head 100x the others (same float function): one output scale
    for pw leaves the others a few steps, every conv is at its floor on what it received, and
    head's output is noise. QCD066 names head's input channels; its fix (cross-layer
    equalization of pw and head on the fused float model, run here) brings head back."""
    import copy

    from torch.ao.quantization import fuse_modules

    f, _q = models.eager("x86")
    f = models.with_outlier_channel(f)
    x = models.inputs(2, 8, 7)
    fused = fuse_modules(copy.deepcopy(f), models.FUSE_2D)
    q = models.quantize_fused(copy.deepcopy(fused), "x86")
    _b, d = walk(f, q, x)
    assert all(r.verdict == "at_floor" for r in d.report.layers)
    (found,) = [x for x in d.report.findings if x.code == "QCD066"]
    assert found.severity == "error" and found.evidence["layer"] == "head"
    assert found.evidence["conv_before"] == "pw" and found.evidence["reach_ratio"] > 30
    data = json.loads(json.dumps(d.report.to_dict(), allow_nan=False))
    schema = json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())
    jsonschema.validate(data, schema)
    before = d.report.layer("head").propagated.sqnr_db
    assert before is not None and before < 10
    scope = {"model": fused}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD066 fix", "exec"), scope)
    _b, fixed = walk(f, models.quantize_fused(scope["model"], "x86"), x)
    assert "QCD066" not in {x.code for x in fixed.report.findings}
    after = fixed.report.layer("head").propagated.sqnr_db
    assert after is not None and after > before + 10


def test_qcd066_equalizes_only_a_conv_pair_with_nothing_but_a_relu_between():
    """One channel of a's output 100x the others (the same float function: the convs reading
    it divide by 100): b reads it straight from a (a fused ReLU between), c through the add.
    QCD066 names both; b's fix equalizes a with b, and runs; c's names no pair (before, it
    equalized b with c, across the add)."""
    import copy

    from torch.ao.quantization import fuse_modules

    f, _q = models.eager("x86", dims=0)
    with torch.no_grad():
        f.a.weight[3] *= 100
        f.a.bias[3] *= 100
        f.b.weight[:, 3] /= 100
        f.c.weight[:, 3] /= 100
    x = models.inputs(2, 8, 7)
    fused = fuse_modules(copy.deepcopy(f), models.FUSE_ADD)
    _b, d = walk(f, models.quantize_fused(copy.deepcopy(fused), "x86", 0), x)
    found = {x.evidence["layer"]: x for x in d.report.findings if x.code == "QCD066"}
    assert set(found) == {"b", "c"}
    assert found["b"].evidence["conv_before"] == "a" and 'equalize(model, [["a", "b"]]' \
        in found["b"].fix
    assert found["c"].evidence["conv_before"] is None and "equalize(" not in found["c"].fix
    assert max(len(line) for x in found.values() for line in x.fix.splitlines()) <= 80
    scope = {"model": fused}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found["b"].fix, "QCD066 fix", "exec"), scope)
    _b, fixed = walk(f, models.quantize_fused(scope["model"], "x86", 0), x)
    before, after = (r.report.layer("b").propagated.sqnr_db for r in (d, fixed))
    assert before is not None and after is not None and after > before + 10


def test_healthy_models_have_no_channel_finding(healthy_x86):  # noqa: ANN001
    assert not [f for f in healthy_x86[4].report.findings if f.code == "QCD066"]


def test_a_channel_10x_the_others_is_a_near_miss():
    """One channel 10x the others costs head some dB (measured: 35.0 dB input, 27.2 dB
    output), less than DROP_DB below its input and its own error: no QCD066, and no conv
    warns."""
    import copy

    from torch.ao.quantization import fuse_modules

    f, _q = models.eager("x86")
    f = models.with_outlier_channel(f, factor=10.0)
    q = models.quantize_fused(fuse_modules(copy.deepcopy(f), models.FUSE_2D), "x86")
    _b, d = walk(f, q, models.inputs(2, 8, 7))
    head = d.report.layer("head")
    assert head.propagated.sqnr_db < head.input.sqnr_db - 3  # the spread costs something
    assert not [x for x in d.report.findings if x.code == "QCD066"]
    assert all(x.severity == "info" for r in d.report.layers for x in r.findings)


def test_a_narrow_table_keeps_long_layer_names_whole(healthy_x86):  # noqa: ANN001
    """A DenseNet-like name fills an 80-column table: the dominant stage goes, the name and
    the numbers stay whole (before, rich cut every column down to a few letters)."""
    import dataclasses

    from qconvdiag.render.terminal import render_terminal

    *_, d = healthy_x86
    long = {row.name: f"features.denseblock4.denselayer16.{row.name}" for row in d.report.layers}
    report = dataclasses.replace(
        d.report, layers=tuple(dataclasses.replace(r, name=long[r.name]) for r in d.report.layers),
        ranking=tuple(long[n] for n in d.report.ranking), details=())
    narrow = render_terminal(report, width=80)
    header = next(line for line in narrow.splitlines() if "prop dB" in line)
    assert "stage" not in header and "finding" in header
    for row in report.layers:
        assert row.name in narrow and f"{row.own.sqnr_db:.1f}" in narrow
    assert all(len(line) <= 80 for line in narrow.splitlines())
    wide = render_terminal(report, width=160)
    assert "stage" in next(line for line in wide.splitlines() if "prop dB" in line)


def test_a_model_that_fails_to_run_is_refused_in_one_line():
    """torch's error inside a forward becomes one line naming the module and what the error
    usually means (it was a traceback)."""
    import copy

    from qconvdiag.errors import CaseError

    f, q = models.eager("x86")
    q.quant = torch.nn.Identity()  # the QuantStub not called: a float tensor reaches stem
    with pytest.raises(CaseError, match=r"the quantized model fails at stem \(ConvReLU2d\): "
                                        r"Could not run .*QuantStub missing"):
        walk(f, q, models.inputs(2, 8, 7))
    f, q = models.eager("x86")
    q.head = copy.deepcopy(f.head)  # left in float, no DeQuantStub before it
    with pytest.raises(CaseError, match=r"fails at head \(Conv2d\): .*DeQuantStub missing"):
        walk(f, q, models.inputs(2, 8, 7))
    with pytest.raises(CaseError, match=r"fails at stem \(ConvReLU2d\): Input shape must be"):
        walk(f, models.eager("x86")[1], models.inputs(1, 8, 7))  # a 1-d input for a 2-d model


def test_an_output_fix_takes_effect_on_qnnpack_after_the_model_ran():
    """qnnpack keeps the requantization of a conv's first run, so a scale set afterwards
    changes nothing: the output qparams fix packs the weight again, and torch's own output
    then follows it (before, pasting the fix left the conv as broken as it was)."""
    f, q = models.eager("qnnpack")
    x = models.inputs(2, 8, 7)
    _break_output(q, "dw", 1 / 255, 0)  # "the activations are in [0, 1]"
    _b, d = walk(f, q, x, top=1)  # the capture ran the model: qnnpack keeps dw's requantization
    fix = next(x.fix for x in d.report.detail("dw").findings if x.code == "QCD051")
    assert "set_weight_bias" in fix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(fix, "QCD051 fix", "exec"), {"qm": q.dw, "torch": torch})  # noqa: S102
    _b, d = walk(f, q, x)
    dw = d.report.layer("dw")
    assert dw.verdict == "at_floor" and dw.torch_mismatches == 0


def _unfused_bn3(calibrate_in_train_mode: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Net2d quantized with pw's BatchNorm left unfused (a quantized BatchNorm2d), calibrated
    in train mode (BatchNorm updates its running statistics) or, the near miss, in eval."""
    import copy

    from torch.ao.quantization import convert, fuse_modules, prepare

    from tests.cpu import healthy_qconfig

    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    f = models.Net2d().eval()
    models._randomize_bn(f, 0)
    q = copy.deepcopy(f)
    fuse_modules(q, models.FUSE_2D[:2], inplace=True)
    q.qconfig = healthy_qconfig("x86")
    q.train(calibrate_in_train_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        with torch.no_grad():
            for i in range(4):
                q(models.inputs(2, 8, 100 + i))
        convert(q.eval(), inplace=True)
    return f, q


def test_batchnorm_statistics_moved_in_calibration_are_named():
    """Calibrated without .eval(): an unfused BatchNorm's running statistics move, and the
    conv after it receives its input 20 dB worse. QCD065 names the BatchNorm and why; its fix
    calibrates again in eval mode (before, "an op between them: its output scale")."""
    f, q = _unfused_bn3(True)
    _b, d = walk(f, q, models.inputs(2, 8, 7))
    (lost,) = d.report.findings
    assert lost.code == "QCD065" and lost.title.endswith("by bn3's running statistics")
    assert d.report.upstream[0].op == "bn3" and "calibrated without .eval()" in lost.message
    # its fix, run on the float model fused and given its qconfig as before, in train mode as
    # it was, calibrates in eval mode: the conv gets its input back
    import copy

    from torch.ao.quantization import fuse_modules

    from tests.cpu import healthy_qconfig

    model = copy.deepcopy(f)
    fuse_modules(model, models.FUSE_2D[:2], inplace=True)
    model.qconfig = healthy_qconfig("x86")
    scope = {"model": model.train(),
             "calibration_batches": [models.inputs(2, 8, 100 + i) for i in range(4)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(lost.fix, "QCD065 fix", "exec"), scope)  # noqa: S102
    _b, d = walk(f, scope["quantized"], models.inputs(2, 8, 7))
    assert d.report.findings == () and d.report.upstream == ()
    f, q = _unfused_bn3(False)  # the near miss: calibrated in eval mode, statistics unmoved
    bundle, d = walk(f, q, models.inputs(2, 8, 7))
    assert d.report.findings == ()
    assert [o.stats for o in bundle.ops if o.name == "bn3"] == [(0.0, 1.0, 1.0)]


def _eager_quantized(model: torch.nn.Module, x: torch.Tensor,
                     fuse: list[list[str]] | None = None) -> torch.nn.Module:
    """``model`` quantized with x86's default qconfig in the eager flow (``fuse`` first),
    calibrated on ``x``."""
    import copy

    import torch.ao.quantization as tq

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = copy.deepcopy(model)
        if fuse:
            q = tq.fuse_modules(q, fuse)
        q.qconfig = tq.get_default_qconfig("x86")
        prepared = tq.prepare(q)
        prepared(x)
        return tq.convert(prepared)


class _ConvLinearReLU(torch.nn.Module):
    """A conv1d, a Linear over its last axis with a ReLU fused into it, a conv1d."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.a = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.fc, self.relu = torch.nn.Linear(16, 16), torch.nn.ReLU()
        self.b = torch.nn.Conv1d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.b(self.relu(self.fc(self.a(self.quant(x))))))


def test_the_ops_record_is_the_float_model_s_at_the_op_and_always_readable(tmp_path):
    """A LinearReLU's float twin is the Linear, before the ReLU: its range is taken after it
    (before, a healthy fused Linear 'left out 50%' of it). An op whose scale torch runs but is
    not a scale (nan) is not recorded: the bundle reads back."""
    from qconvdiag.model.bundle import load_bundle

    model, x = _ConvLinearReLU().eval(), torch.randn(8, 4, 16)
    q = _eager_quantized(model, x, [["fc", "relu"]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, q, [x], calibration=[x])
    (fc,) = [o for o in bundle.ops if o.name == "fc"]
    assert fc.kind == "LinearReLU" and fc.float_low == 0.0 and fc.misfit() is None
    assert fc.packed and "set_weight_bias" in fc.fix("qnnpack") and "set_weight" not in fc.fix()
    model, x = _ConvThenAdd().eval(), torch.randn(8, 4, 16)
    q = _eager_quantized(model, x)
    q.ff.scale = float("nan")  # after the last conv: no conv receives it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconvdiag.capture_model(model, q, [x], tmp_path / "nan.pt")
    assert [o.name for o in load_bundle(tmp_path / "nan.pt").ops] == ["quant"]


class _ConvThenAdd(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.a = torch.nn.Conv1d(4, 8, 3, padding=1)
        self.ff = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(self.quant(x))
        return self.dequant(self.ff.add(y, y))


def test_a_bug_in_a_hook_is_not_reported_as_the_model_s(monkeypatch):
    """An error raised in qconvdiag's own hook (its float range: torch.aminmax made to fail
    there) keeps its traceback: it is not the model's."""
    import math

    f, q = models.eager("x86", dims=0)
    monkeypatch.setattr(torch, "aminmax", math.sqrt)  # raises on a tensor of several values
    with pytest.raises((TypeError, RuntimeError, ValueError)) as raised:
        walk(f, q, models.inputs(0, 8, 7))
    assert not isinstance(raised.value, QconvdiagError)


def test_an_op_s_misfit_is_a_coarse_step_or_a_range_left_out():
    """OpRange.misfit's thresholds: a step 4x what the float range needs (8x on the samples'
    range alone), or qparams that leave out half of it; within them, nothing."""
    from qconvdiag.model.ops import OpRange

    def op(scale: float, zero_point: int, sampled: bool = False) -> OpRange:
        return OpRange("add", "QFunctional", scale, zero_point, "quint8", -1.0, 4.1, ("b",),
                       sampled, False)

    ideal = 5.1 / 255
    assert op(ideal, 50).misfit() is None and op(3.9 * ideal, 13).misfit() is None
    assert "4.0x the step" in (op(4.0 * ideal, 13).misfit() or "")
    assert op(5 * ideal, 10, sampled=True).misfit() is None  # 8x on the samples' range
    left = op(1 / 255, 0).misfit() or ""  # represents [0, 1] of [-1, 4.1]
    assert "leaves out 80%" in left and "saturate" in left


def test_a_model_wide_coarse_step_names_both_of_its_causes(healthy_x86):  # noqa: ANN001
    """Most convs with QCD052: calibration data scaled otherwise, or 7-bit observers on an
    engine that does not need them (a sweep's models on qnnpack with the fbgemm qconfig got
    only the first, which was not theirs)."""
    import dataclasses

    from qconvdiag.model_report import LayerFinding
    from qconvdiag.render.rich_model import shared_cause_sentence

    *_, d = healthy_x86
    coarse = LayerFinding("QCD052", "warning", "output step too coarse for the output's range")
    rows = tuple(dataclasses.replace(r, findings=(coarse,)) if i < 2 else r
                 for i, r in enumerate(d.report.layers))
    sentence = shared_cause_sentence(dataclasses.replace(d.report, layers=rows)) or ""
    assert "2 of 4 convs report QCD052" in sentence and "throughout" not in sentence
    assert "scaled differently" in sentence and "7-bit observers" in sentence


def test_a_worst_conv_with_info_only_says_so_in_the_summary(healthy_x86):  # noqa: ANN001
    """A conv above its floor whose only finding is info (a histogram observer's trim of one
    output, helper-64's SE squeeze conv): the summary names that finding and says no warning
    or error backs the verdict (it read 'broken' with nothing after it)."""
    import dataclasses

    from qconvdiag.model_report import ErrorSummary, LayerFinding
    from qconvdiag.render.rich_model import summary_sentence

    *_, d = healthy_x86
    trim = LayerFinding("QCD051", "info", "outputs saturated at the output dtype's limits")
    first = d.report.layers[0]
    worse = dataclasses.replace(first, verdict="broken", findings=(trim,),
                                own=ErrorSummary(5.0, first.own.rmse * 100, 1.0))
    report = dataclasses.replace(d.report, layers=(worse, *d.report.layers[1:]),
                                 ranking=(first.name, *d.report.ranking[1:]))
    sentence = summary_sentence(report)
    assert "(QCD051, said as info: outputs saturated" in sentence and "no warning" in sentence
    # helper-74: a deprecated API moves no number, and is no reason a conv is above its floor
    api = LayerFinding("QCD060", "info", "deprecated quantization API in use")
    for findings, said in (((api, trim), "(QCD051, said as info"),
                           ((api,), "(no finding names a cause)")):
        rows = (dataclasses.replace(worse, findings=findings), *d.report.layers[1:])
        sentence = summary_sentence(dataclasses.replace(report, layers=rows))
        assert said in sentence and "QCD060" not in sentence


def test_a_model_from_other_weights_is_the_model_wide_cause_not_their_bias(healthy_x86):  # noqa: ANN001
    """Convs that hold other float weights report QCD024 and, as those weights' bias differs
    too, QCD030, which may cost more and come first: the model-wide cause is QCD024's (a sweep
    got 'the module's bias is missing' for a checkpoint of another seed)."""
    import dataclasses

    from qconvdiag.model_report import LayerFinding
    from qconvdiag.render.rich_model import fix_names, shared_cause_sentence

    f, _q, _x, bundle, d = healthy_x86
    bias = LayerFinding("QCD030", "error", "the module's bias is missing or not the float bias")
    weight = LayerFinding("QCD024", "warning", "the module's weight is not the float weight")
    rows = tuple(dataclasses.replace(r, findings=(bias, weight)) if i < 3 else r
                 for i, r in enumerate(d.report.layers))
    report = dataclasses.replace(d.report, layers=rows)
    shared = report.shared_cause()
    assert shared is not None and shared[0].code == "QCD024" and shared[1] == 3
    assert "not made from this float model's weights" in (shared_cause_sentence(report) or "")
    # in a layer's fixes, conv is the float conv with the BatchNorm folded in: said as code
    folded = next(r for r in d.report.layers if r.bn_folded)
    _prose, code = fix_names(folded.name, folded)
    assert code is not None and max(len(line) for line in code.splitlines()) <= 80
    scope = {"torch": torch, "model": f}
    exec(code, scope)  # noqa: S102 - the code the report prints
    assert np.array_equal(scope["conv"].weight.detach().numpy(),
                          bundle.layer(folded.name).case.weight)


def test_a_model_made_from_another_checkpoint_is_quantized_again_conv_by_conv():
    """Each conv holding another checkpoint's weight gets QCD024 and QCD030, whose fix was to
    repack this conv's float weight and bias at its module's qparams: every output scale
    stayed the other checkpoint's, and applied to every conv, that fix took helper-65's
    digits CNN to 7.6% accuracy. Their fix quantizes the model again, which runs: the model it
    gives has no conv left with another weight."""
    import copy

    from torch.ao.quantization import fuse_modules

    from tests.cpu import healthy_qconfig

    _other, quantized = models.eager("x86", seed=0)
    f, _q = models.eager("x86", seed=1)  # the float model holds another seed's weights
    x = models.inputs(2, 8, 7)
    bundle, d = walk(f, quantized, x, top=4)
    fixes = {(detail.layer, finding.code): finding.fix for detail in d.report.details
             for finding in detail.report.findings
             if finding.code in ("QCD024", "QCD030") and finding.path == "as_given"}
    assert {code for _layer, code in fixes} == {"QCD024", "QCD030"}, list(fixes)
    assert all(fix.startswith("# quantize the model again from this float model")
               and "prepared = prepare(model)" in fix and "set_weight_bias" not in fix
               for fix in fixes.values()), fixes
    model = copy.deepcopy(f)
    fuse_modules(model, models.FUSE_2D, inplace=True)  # fused and its qconfig set as before
    model.qconfig = healthy_qconfig("x86")
    scope = {"model": model, "calibration_batches": [models.inputs(2, 8, 100 + i)
                                                     for i in range(4)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(next(iter(fixes.values())), "fix", "exec"), scope)  # noqa: S102
    _b, again = walk(f, scope["quantized"], x)
    assert not [(row.name, finding.code) for row in again.report.layers
                for finding in row.findings if finding.code in ("QCD024", "QCD030")]
    # a QAT model's weights are what training made: not thrown away by quantizing again
    import dataclasses

    from qconvdiag import Options, diagnose
    from qconvdiag.case import QAT_NOTE

    case = bundle.layer("head").case
    qat = dataclasses.replace(case, notes=(*case.notes, QAT_NOTE))
    fixes = [x.fix for x in diagnose(qat, Options(engine="x86")).findings
             if x.code == "QCD024" and x.path == "as_given"]
    assert fixes and not any("quantize the model again" in fix for fix in fixes)


class _SharedAdd(torch.nn.Module):
    """One FloatFunctional for two adds whose ranges differ ``scale``-fold (c scales the second
    branch down), or one per add (``shared=False``)."""

    def __init__(self, scale: float = 0.01, shared: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c, self.d = torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.e = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.c.weight *= scale
            self.c.bias *= scale
        self.shared = shared
        if shared:
            self.ff = torch.ao.nn.quantized.FloatFunctional()
        else:
            self.ff1 = torch.ao.nn.quantized.FloatFunctional()
            self.ff2 = torch.ao.nn.quantized.FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.ff, self.ff) if self.shared else (self.ff1, self.ff2)
        x = self.a(self.quant(x))
        y = self.c(first.add(x, self.b(x)))
        return self.dequant(self.e(second.add(y, self.d(y))))


def test_one_floatfunctional_for_two_adds_is_named():
    """One add module for two adds 100x apart in range: its one scale fits the wide one, and
    the conv after the narrow one gets its input 15 dB worse. QCD065 names the module shared
    by two calls (before: 'an op between them'); one module per add, as its fix says, is
    quiet, and so is a shared module whose calls span alike (the near miss)."""
    x = torch.randn(4, 3, 12, 12)
    model = _SharedAdd().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, _eager_quantized(model, x), [x], calibration=[x])
    report = walk_model(bundle, WalkOptions(top=0)).report
    (lost,) = report.findings
    assert lost.title.endswith("by ff, one module for 2 calls") and "self.ff2 = " in lost.fix
    assert "serves 2 calls per forward" in lost.message
    for other in (_SharedAdd(shared=False).eval(), _SharedAdd(scale=1.0).eval()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = qconvdiag.capture_model(other, _eager_quantized(other, x), [x],
                                             calibration=[x])
        assert walk_model(bundle, WalkOptions(top=0)).report.findings == ()


class _Holder(torch.nn.Module):
    def __init__(self, ff: torch.nn.Module) -> None:
        super().__init__()
        self.add = ff


class _AliasedAdd(_SharedAdd):
    """_SharedAdd's two adds, each its submodule's ``add``: one FloatFunctional assigned to
    both (``aliased``), or one each."""

    def __init__(self, aliased: bool = True) -> None:
        super().__init__(shared=False)
        self.p1 = _Holder(self.ff1)
        self.p2 = _Holder(self.ff1 if aliased else self.ff2)
        del self.ff1, self.ff2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(self.quant(x))
        y = self.c(self.p1.add.add(x, self.b(x)))
        return self.dequant(self.e(self.p2.add.add(y, self.d(y))))


def test_one_floatfunctional_assigned_to_two_paths_is_named(tmp_path):  # noqa: ANN001
    """One FloatFunctional assigned to two submodules' ``add`` (helper-65's ResNet: one for
    its three residual adds, 65% accuracy where one each gave 99.75%): convert gives each
    path a QFunctional of its own, with the one scale the shared observer fitted to both
    calls, so no module served two calls and QCD065 blamed "an op between them", its fix
    printing every module's qparams. It names the float module and its paths, and its fix,
    one module per path and the model quantized again, runs: the walk after it is quiet. The
    bundle keeps the paths."""
    import copy

    from qconvdiag.model.bundle import load_bundle

    x = torch.randn(4, 3, 12, 12)
    model = _AliasedAdd().eval()
    assert model.p1.add is model.p2.add
    quantized = _eager_quantized(model, x)
    assert quantized.p1.add is not quantized.p2.add
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconvdiag.capture_model(model, quantized, [x], tmp_path / "b.pt", calibration=[x])
    report = walk_model(load_bundle(tmp_path / "b.pt"), WalkOptions(top=0)).report
    (lost,) = report.findings
    assert lost.title.endswith("by p2.add, one float module for 2 paths"), lost.title
    assert "its float module serves p1.add, p2.add" in lost.message
    assert "model.get_submodule('p2').add = torch.ao.nn.quantized.FloatFunctional()" in lost.fix
    assert max(len(line) for line in lost.fix.splitlines()) <= 80
    scope = {"torch": torch, "model": copy.deepcopy(model), "calibration_batches": [x]}
    scope["model"].qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(lost.fix, "QCD065 fix", "exec"), scope)  # noqa: S102
        fixed = scope["model"]
        assert fixed.p1.add is not fixed.p2.add
        bundle = qconvdiag.capture_model(fixed, scope["quantized"], [x], calibration=[x])
    assert walk_model(bundle, WalkOptions(top=0)).report.findings == ()
    other = _AliasedAdd(aliased=False).eval()  # one module each: quiet, no paths shared
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(other, _eager_quantized(other, x), [x],
                                         calibration=[x])
    assert walk_model(bundle, WalkOptions(top=0)).report.findings == ()
    assert not any(op.aliases for op in bundle.ops)


def test_a_bundle_s_aliases_are_read_back_whole_or_refused():
    """Found by review: aliases without a call range each reached ``_shared_misfit``'s max()
    of nothing (a traceback), and a string was read as a tuple of its characters."""
    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.ops import OpRange

    entry = {"name": "p2.add", "kind": "QFunctional", "scale": 0.1, "zero_point": 0,
             "dtype": "quint8", "float_range": [-1.0, 1.0], "after": ["b"], "sampled": True,
             "tensor_qparams": False, "call_ranges": [[-5.0, 5.0], [-1.0, 1.0]],
             "aliases": ["p1.add", "p2.add"]}
    op = OpRange.from_mapping(entry, "b.pt")
    assert op.aliases == ("p1.add", "p2.add") and op.shared == 2 and op.misfit() is not None
    for bad in ({"call_ranges": []}, {"aliases": "p1.add"}, {"aliases": ["p1.add", "c"]},
                {"aliases": ["p2.add"], "call_ranges": [[-1.0, 1.0]]},
                {"kind": "Hardswish"}):  # a FloatFunctional's only: its fix builds one
        with pytest.raises(CaseFileError, match="'ops' is malformed"):
            OpRange.from_mapping({**entry, **bad}, "b.pt")


def test_batchnorm_statistics_moved_are_named_where_no_loss_shows():
    """QCD069: a BatchNorm whose statistics are not the float model's is named, graded by the
    error its move puts in its output (a sweep's digits CNN calibrated in train mode lost 1.5
    to 2.5 accuracy points with every conv at its floor and nothing said); not where QCD065
    names it with its loss, and never for unmoved statistics."""
    from qconvdiag.model.lost import qcd069
    from qconvdiag.model.ops import OpRange

    def bn(stats: tuple[float, float, float]) -> OpRange:
        return OpRange("bn2", "BatchNorm2d", 0.05, 10, "quint8", -1.0, 4.0, ("conv2",), False,
                       False, stats)

    found = qcd069((bn((0.0286, 0.869, 1.102)),), named=False)  # the sweep's numbers
    assert found is not None and found.code == "QCD069" and found.severity == "warning"
    assert "bn2" in found.title and "calibrate in eval mode" in found.fix
    small = qcd069((bn((0.012, 0.99, 1.01)),), named=False)  # moved: an error of 38 dB
    assert small is not None and small.severity == "info"
    assert qcd069((bn((0.0286, 0.869, 1.102)),), named=True) is None
    assert qcd069((bn((0.0, 1.0, 1.0)),), named=False) is None


def test_a_quantized_model_that_returns_a_quantized_tensor_is_noted():
    """No DeQuantStub at the end: the quantized model returns quint8, which float code after
    it refuses (argmax); the walk's numbers are fine, so a note says it (a sweep's report was
    healthy, with nothing about it)."""
    f, q = models.eager("x86", dims=1)
    q.dequant = torch.nn.Identity()
    bundle, _d = walk(f, q, models.inputs(1, 4, 3))
    assert any("DeQuantStub missing" in n for n in bundle.notes)
    f, q = models.eager("x86", dims=1)
    bundle, _d = walk(f, q, models.inputs(1, 4, 3))
    assert not any("DeQuantStub" in n for n in bundle.notes)


def test_a_batchnorm_calibrated_in_train_mode_is_named_end_to_end():
    """bn2 left unfused and calibrated in train mode with a small momentum: its statistics move
    (about 7% in variance), no conv's input shows a 10 dB loss, and QCD069 names it as a
    warning; its fix, calibration after .eval(), leaves nothing to say."""
    import copy

    from torch.ao.quantization import convert, fuse_modules, prepare

    from tests.cpu import healthy_qconfig

    fuse = [["stem", "bn1", "relu1"], ["pw", "bn3"]]
    batches = [models.inputs(2, 8, 100 + i) for i in range(4)]

    def quantized(train: bool) -> torch.nn.Module:
        torch.backends.quantized.engine = "x86"
        q = fuse_modules(copy.deepcopy(f), fuse)
        q.qconfig = healthy_qconfig("x86")
        q.train(train)
        q.bn2.momentum = 0.02
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare(q, inplace=True)
            with torch.no_grad():
                for batch in batches:
                    q(batch)
            return convert(q.eval())

    torch.manual_seed(0)
    f = models.Net2d().eval()
    models._randomize_bn(f, 0)
    _b, d = walk(f, quantized(True), models.inputs(2, 8, 7))
    assert [(x.code, x.severity) for x in d.report.findings] == [("QCD069", "warning")]
    assert "bn2" in d.report.findings[0].title and not d.report.upstream
    # bn2 ran unfused: the fix does not say "fused as before", it says fusing folds it away
    assert "fuse_modules, folds it in" in d.report.findings[0].fix
    assert "fused as before" not in d.report.findings[0].fix
    model = fuse_modules(copy.deepcopy(f), fuse)
    model.qconfig = healthy_qconfig("x86")
    scope = {"model": model.train(), "calibration_batches": batches}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(d.report.findings[0].fix, "QCD069 fix", "exec"), scope)  # noqa: S102
    _b, fixed = walk(f, scope["quantized"], models.inputs(2, 8, 7))
    assert fixed.report.findings == ()
    _b, near = walk(f, quantized(False), models.inputs(2, 8, 7))  # calibrated in eval mode
    assert near.report.findings == ()


class _ConvPoolConv(torch.nn.Module):
    """a, its ReLU and a max pool, then b: cross-layer equalization's pair across the pool."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.MaxPool2d(2)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.b(self.pool(self.relu(self.a(self.quant(x))))))


def test_qcd066_pairs_convs_across_a_relu_and_a_max_pool():
    """One channel of a's output 100x the others, b reading it after a ReLU and a 2x2 max pool:
    a positive per-channel scale passes both, so QCD066's fix equalizes a with b, and runs."""
    import copy

    from torch.ao.quantization import fuse_modules


    torch.manual_seed(0)
    f = _ConvPoolConv().eval()
    with torch.no_grad():
        f.a.weight[3] *= 100
        f.a.bias[3] *= 100
        f.b.weight[:, 3] /= 100
    fused = fuse_modules(copy.deepcopy(f), [["a", "relu"]])
    x = models.inputs(2, 8, 7)
    _b, d = walk(f, _calibrated(fused), x)
    (found,) = [x for x in d.report.findings if x.code == "QCD066"]
    assert found.evidence["layer"] == "b" and found.evidence["conv_before"] == "a"
    scope = {"model": fused}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD066 fix", "exec"), scope)  # noqa: S102
    _b, fixed = walk(f, _calibrated(scope["model"]), x)
    before, after = (r.report.layer("b").propagated.sqnr_db for r in (d, fixed))
    assert before is not None and after is not None and after > before + 10


def _calibrated(fused: torch.nn.Module) -> torch.nn.Module:
    """A fused float model quantized in the eager flow on x86 with this CPU's healthy qconfig
    (tests/cpu.py), calibrated on 4 batches."""
    import copy

    from torch.ao.quantization import convert, prepare

    from tests.cpu import healthy_qconfig

    torch.backends.quantized.engine = "x86"
    q = copy.deepcopy(fused)
    q.qconfig = healthy_qconfig("x86")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        for i in range(4):
            q(models.inputs(2, 8, 100 + i))
        return convert(q)


class _ConvThenLinear(torch.nn.Module):
    """A conv, then a classifier's Linear after a pool."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv(self.quant(x))))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def test_the_signal_lost_after_the_last_conv_is_named(tmp_path):  # noqa: ANN001
    """QCD071: the quantized Linear holds another checkpoint's weight, the conv is at its floor,
    and the model's output is noise (a sweep's digits CNN: 18% accuracy, a healthy report).
    The capture compares the models' outputs with the last conv's; the bundle keeps the loss
    (and only a loss: a healthy model's bundle holds nothing more); its fix shows the Linear's
    weight far from the float one."""
    import contextlib
    import copy
    import io

    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
    x = models.inputs(2, 8, 7)
    bundle, d = walk(f, q, x)
    assert bundle.lost_after is None and not d.report.findings  # healthy: nothing said
    other = torch.nn.Linear(16, 10).weight.detach()  # another checkpoint's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.fc.set_weight_bias(torch.quantize_per_tensor(other, float(other.abs().max() / 127),
                                                       0, torch.qint8), q.fc.bias())
    path = tmp_path / "fc.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconvdiag.capture_model(f, q, x, path=path)
    d = walk_model(qconvdiag.load_bundle(path), WalkOptions(top=0))
    (found,) = d.report.findings
    assert found.code == "QCD071" and found.severity == "error"
    assert found.evidence["last_conv"] == "conv" and found.evidence["after"] == ["fc"]
    assert all(r.verdict == "at_floor" for r in d.report.layers)
    # the modules after the last conv, read back from the file: the Linear's own error and
    # its weight name it (its weight far from the float one)
    assert [s["name"] for s in found.evidence["steps"]] == ["pool", "fc"]
    assert "The lowest own SQNR is fc's: its weight is" in found.message
    assert "another weight" in found.message
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(found.fix, {"quantized": q, "model": f})  # noqa: S102 - the finding's own fix
    assert printed.getvalue().startswith("fc Linear")
    assert float(printed.getvalue().split("max |w - float w|")[1]) > 0.1


def test_the_loss_after_the_last_conv_needs_enough_output_values():
    """helper-55: a Conv3d classifier, 4 logits per sample, every conv at its floor: one
    sample's logits fell 14 dB below the last conv (the float head amplifying its rounding),
    and QCD071 blamed a Linear's weights or an output scale. An SQNR on fewer than MIN_VALUES
    values is no evidence; no signal at all still is."""
    # one sample's 10 logits, a Linear holding another checkpoint's weight, are no evidence;
    # 8 samples' are (test_the_signal_lost_after_the_last_conv_...)
    import copy

    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
    other = torch.nn.Linear(16, 10).weight.detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.fc.set_weight_bias(torch.quantize_per_tensor(other, float(other.abs().max() / 127),
                                                       0, torch.qint8), q.fc.bias())
        x = models.inputs(2, 8, 7)
        assert qconvdiag.capture_model(f, q, x[:1]).lost_after is None
        assert qconvdiag.capture_model(f, q, x).lost_after is not None


class _TwoOutputs(torch.nn.Module):
    """_ConvThenLinear's logits and its pooled features, as a dict (a multi-task or a
    detection head's outputs)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feat": x.mean(dim=(2, 3)), "logits": self.inner(x)}


def test_the_signal_lost_after_the_last_conv_is_named_in_a_dict_of_outputs():
    """helper-50: a model returning a dict (or tuple) of outputs was not compared at all, so
    a Linear after its last conv holding another checkpoint's weight (0% accuracy) gave no
    finding and no note. Each output is compared with its twin; the worst names QCD071."""
    import copy

    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
    other = torch.nn.Linear(16, 10).weight.detach()  # another checkpoint's
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.fc.set_weight_bias(torch.quantize_per_tensor(other, float(other.abs().max() / 127),
                                                       0, torch.qint8), q.fc.bias())
    bundle, d = walk(_TwoOutputs(f).eval(), _TwoOutputs(q).eval(), models.inputs(2, 8, 7))
    (found,) = d.report.findings
    assert found.code == "QCD071" and found.severity == "error"
    assert bundle.lost_after is not None and bundle.lost_after.output == "logits"
    assert "output 'logits'" in found.message and found.evidence["output"] == "logits"

    class Few(torch.nn.Module):  # a leaf of 3 values beside the 80 logits
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            y = self.inner(x)
            return {"few": y[:1, :3], "logits": y}

    # too few values to judge on their own: the loss is judged on the logits, not hidden
    bundle, _d = walk(Few(f).eval(), Few(q).eval(), models.inputs(2, 8, 7))
    assert bundle.lost_after is not None and bundle.lost_after.output == "logits"
    # leaves with nothing a dB measures are left out, not the whole comparison (helper-52: a
    # 0-d score crashed the capture; None or an argmax dropped the comparison; a mask's six
    # flipped decisions read as a loss after the last conv on a healthy model)

    class Mixed(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> tuple:
            y = self.inner(x)
            return y, y.sum(), None, y.argmax(1), (y > 0).float()

    bundle, d = walk(Mixed(f).eval(), Mixed(q).eval(), models.inputs(2, 8, 7))
    assert [x.code for x in d.report.findings] == ["QCD071"] and bundle.lost_after.output == "0"
    healthy = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
    _bundle, d = walk(Mixed(f).eval(), Mixed(healthy).eval(), models.inputs(2, 64, 7))
    assert not d.report.findings


def test_a_layers_findings_lead_with_its_verdicts_causes() -> None:
    """The table's first finding and the gate's first breach of a layer are its verdict's
    first cause, in the verdict's order, then the other findings (a sweep's table named
    QCD030, whose fix alone cost accuracy, where the verdict named QCD024 for 100%)."""
    from qconvdiag.casefile.generate import forum_case
    from qconvdiag.model.walk import judged_findings

    report = qconvdiag.diagnose(forum_case(), qconvdiag.Options(engine="x86"))
    causes = [c.code for c in report.verdict.causes]
    codes = [f.code for f in judged_findings(report)]
    assert codes[:len(causes)] == causes and len(causes) == 3
    assert sorted(codes) == sorted(f.code for f in report.findings if f.path == "as_given")


def test_calibration_batches_unlike_the_inputs_are_named_with_the_saturation() -> None:
    """Calibrated on inputs a tenth of the scale of those diagnosed (another preprocessing),
    an explained conv whose outputs saturate says so: the float model's own output there
    reaches far beyond what it reached on the calibration batches, so the fix calibrates
    every observer on inputs like these first (a sweep's conv-level fix alone took accuracy
    from 11.3% to 11.8%; calibrating on real-scale inputs gave 98.7%). With calibration
    batches like the inputs, no such sentence."""
    import copy

    from torch.ao.quantization import convert, fuse_modules, prepare

    from tests.cpu import healthy_qconfig

    def quantized(scale: float):  # noqa: ANN202
        torch.manual_seed(0)
        f = models.Net2d().eval()
        models._randomize_bn(f, 0)
        q = fuse_modules(copy.deepcopy(f), models.FUSE_2D)
        q.qconfig = healthy_qconfig("x86")
        batches = [scale * models.inputs(2, 8, 100 + i) for i in range(4)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare(q, inplace=True)
            with torch.no_grad():
                for b in batches:
                    q(b)
            convert(q, inplace=True)
        return f, q, batches

    found = {}
    for scale in (0.1, 1.0):
        f, q, batches = quantized(scale)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = qconvdiag.capture_model(f, q, models.inputs(2, 8, 7),
                                             calibration=batches)
        d = walk_model(bundle, WalkOptions(top=len(bundle.layers)))
        found[scale] = [x for name in d.report.ranking
                        for x in d.report.detail(name).findings if x.code == "QCD051"
                        and x.path == "as_given"]
    unlike = [x for x in found[0.1] if "not like these inputs" in x.message]
    assert unlike, [x.message for x in found[0.1]]
    assert all("prepare(model)" in x.fix and "# or this conv's output qparams alone:" in x.fix
               for x in unlike)
    assert not any("not like these inputs" in x.message for x in found[1.0])


def test_an_fx_model_left_in_float_names_its_qconfig():
    """convert_fx quantizes only what the backend supports: with qint8 activations every conv
    stays float, and capture_model says why (it blamed a float graph or the PT2E quantizer)."""
    import warnings

    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU()).eval()
    x = torch.rand(2, 3, 10, 10)
    qconfig = QConfig(activation=MinMaxObserver.with_args(dtype=torch.qint8),
                      weight=PerChannelMinMaxObserver.with_args(
                          dtype=torch.qint8, qscheme=torch.per_channel_symmetric))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = prepare_fx(model, QConfigMapping().set_global(qconfig), (x,))
        prepared(x)
        quantized = convert_fx(prepared)
    with pytest.raises(QconvdiagError, match="convert_fx's graph with every conv left in float"
                                             ".*activations must be quint8"):
        qconvdiag.capture_model(model, quantized, x)


def test_a_reflect_padded_conv_in_a_model_is_walked_as_torch_runs_it():
    """A model with padding_mode='reflect' (the quantized conv pads its input itself): the
    layer holds the padded input, the torch check finds 0 mismatches, and it is at its floor
    (capture_model refused it, saying torch's quantized convs pad with zeros)."""
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.ao.quantization.QuantStub(), torch.nn.Conv2d(3, 6, 3, padding=1,
                                                           padding_mode="reflect"),
        torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3, padding=2, padding_mode="reflect"),
        torch.ao.quantization.DeQuantStub()).eval()
    x = torch.randn(2, 3, 12, 12)
    model.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        prepared = torch.ao.quantization.prepare(copy.deepcopy(model))
        prepared(x)
        quantized = torch.ao.quantization.convert(prepared)
    from qconvdiag.model.walk import WalkOptions, walk_model

    report = walk_model(qconvdiag.capture_model(model, quantized, x),
                        WalkOptions(top=0, torch_check="all")).report
    assert [r.torch_mismatches for r in report.layers] == [0, 0]
    assert all(r.verdict == "at_floor" for r in report.layers), report.layers


def test_qcd066_weighs_the_output_against_both_errors_added():
    """pytorch#90289's MobileNet-like net on qnnpack (its pointwise conv: input 32.0 dB, own
    error 16.2 dB, output 6.3 dB, median input channel 8.5 dB; accuracy 98.0% -> 82.1%, the
    fix's equalization 95.0%): the output is 9.8 dB below the two errors added, where errors
    that merely add cost at most 3 dB. The rule asked 10 dB below each, and missed it by 0.1.
    Here those numbers on head, whose input channels span 100x: QCD066 fires; with an output
    only 3 dB below them added, it does not."""
    import copy
    import dataclasses

    from torch.ao.quantization import fuse_modules

    from qconvdiag.model.channels import qcd066
    from qconvdiag.model.screen import screen_layer
    from qconvdiag.model_report import ErrorSummary

    f, _q = models.eager("x86")
    f = models.with_outlier_channel(f)
    q = models.quantize_fused(fuse_modules(copy.deepcopy(f), models.FUSE_2D), "x86")
    bundle, _d = walk(f, q, models.inputs(2, 8, 7))
    screens = {lay.name: screen_layer(lay, bundle.engine) for lay in bundle.layers}

    def at(prop: float) -> list[str]:
        head = screens["head"]
        seen = {**screens, "head": dataclasses.replace(
            head, input=ErrorSummary(32.0, head.input.rmse, head.input.max_abs),
            own=ErrorSummary(16.2, head.own.rmse, head.own.max_abs),
            propagated=ErrorSummary(prop, head.propagated.rmse, head.propagated.max_abs))}
        return [x.evidence["layer"] for x in qcd066(bundle.layers, seen, set(), False)]

    assert "head" in at(6.3)
    assert "head" not in at(13.1)


def test_a_batchnorm_before_the_first_conv_that_moved_is_blamed_not_the_stub():
    """A BatchNorm between the QuantStub and the first conv, calibrated in train mode on
    brighter batches (a forum report's model): its running statistics moved, and QCD065 blames
    it, with the eval-mode calibration as its fix (it blamed the QuantStub's scale, whose
    output is fine, and its fix calibrated again without .eval())."""

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.quant, self.dequant = torch.ao.quantization.QuantStub(), \
                torch.ao.quantization.DeQuantStub()
            self.bn1 = torch.nn.BatchNorm2d(1)
            self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
            self.relu = torch.nn.ReLU()
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn1(self.quant(x))
            return self.dequant(self.conv2(self.relu(self.conv1(x))))

    f = Net().eval()
    with torch.no_grad():
        f.bn1.running_mean.fill_(0.5)
        f.bn1.running_var.fill_(0.1)
    torch.manual_seed(4)
    q = copy.deepcopy(f).train()  # calibrated as it came out of training
    q.qconfig = torch.ao.quantization.get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.prepare(q, inplace=True)
        with torch.no_grad():
            for _ in range(8):
                q(torch.rand(4, 1, 12, 12) * 2.0)
        torch.ao.quantization.convert(q.eval(), inplace=True)
    _b, d = walk(f, q, torch.rand(4, 1, 12, 12))
    (lost,) = [x for x in d.report.findings if x.code == "QCD065"]
    assert lost.title.endswith("by bn1's running statistics"), lost.title
    assert "QuantStub" not in lost.message and "model.eval()" in lost.fix


def test_an_fx_model_s_fixes_are_fx_code(tmp_path):
    """A convert_fx model converted without calibration: QCD065 names the graph's input
    quantization (a quantize_per_tensor node, not a QuantStub), and its fix prepares,
    calibrates and converts with prepare_fx/convert_fx (it printed the eager flow's prepare and
    convert, which on the FX float model quantize nothing and raise nothing). Run, the fix
    gives the healthy FX model's walk. The bundle keeps the flow."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from qconvdiag.model.bundle import load_bundle
    from tests.cpu import healthy_qconfig

    f, _q = models.fx("x86")
    mapping = get_default_qconfig_mapping("x86").set_global(healthy_qconfig("x86"))
    example = (models.inputs(2, 1, 0),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        uncalibrated = convert_fx(prepare_fx(copy.deepcopy(f), mapping, example))
    path = tmp_path / "fx.pt"
    qconvdiag.capture_model(f, uncalibrated, models.inputs(2, 8, 7), path)
    bundle = load_bundle(path)
    assert bundle.flow == "fx"
    assert load_bundle(SAMPLE).flow == "eager"
    assert load_bundle(SAMPLE.parent / "digits_pt2e.pt").flow == "pt2e"
    d = walk_model(bundle, WalkOptions(top=0))
    lost = next(x for x in d.report.findings if x.code == "QCD065")
    assert "quantize_per_tensor of the model's input" in lost.message
    assert "prepare_fx(model, qconfig_mapping, example_inputs)" in lost.fix
    assert "convert_fx(prepared)" in lost.fix and "QuantStub" not in lost.fix
    scope = {"model": copy.deepcopy(f), "qconfig_mapping": mapping, "example_inputs": example,
             "calibration_batches": [models.inputs(2, 8, 100 + i) for i in range(4)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(lost.fix, "QCD065 fix", "exec"), scope)  # noqa: S102
    _b, fixed = walk(f, scope["quantized"], models.inputs(2, 8, 7))
    assert fixed.report.upstream == () and fixed.report.findings == ()
    assert all(row.verdict == "at_floor" for row in fixed.report.layers)


def test_an_fx_graph_s_op_qparams_are_printed_by_its_fix():
    """The fix of a loss between convs that names no op prints every op's output qparams: in
    a convert_fx graph an add's are the attributes its node reads, not a module's."""
    import contextlib
    import io

    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from qconvdiag.model.lost import _SCALES_FX

    class Residual(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 4, 3)
            self.c2 = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):  # noqa: ANN001, ANN202
            y = self.c1(x)
            return y + self.c2(y)

    x = models.inputs(2, 8, 7)[:, :3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(Residual().eval(), get_default_qconfig_mapping("x86"), (x,))
        prepared(x)
        q = convert_fx(prepared)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_SCALES_FX, "QCD065 fix", "exec"), {"quantized": q})  # noqa: S102
    printed = out.getvalue()
    adds = [n.name for n in q.graph.nodes
            if n.op == "call_function" and "quantized.add" in str(n.target)]
    assert adds and all(name in printed for name in adds)


def test_calibration_batches_unlike_the_inputs_do_not_raise_the_floor():
    """A model calibrated on inputs x255 (a PT2E user's fault), its batches given to
    capture_model as the README says: the output steps fit the batches' range, 255x the
    inputs', and judged on it every conv was 'at its floor' with a floor of 2.4 dB. Batches
    whose range spans UNLIKE_RANGE times the samples' are judged as no batches: QCD052 names
    the coarse steps and says the batches are unlike the inputs; its fix calibrates (no
    conv's qparams fitted to the few samples). Near misses keep every conv at its floor:
    batches like the inputs, and varied batches (0.25x to 4x contrast) captured on their
    dullest one, whose range is 13x below the batches' at some convs, not all (judged per
    conv, that raised false QCD052 warnings)."""
    from torch.ao.quantization import convert, fuse_modules, prepare

    from tests.cpu import healthy_qconfig

    def calibrated(batches: list) -> torch.nn.Module:  # noqa: ANN001
        q = copy.deepcopy(f)
        fuse_modules(q, models.FUSE_2D, inplace=True)
        q.qconfig = healthy_qconfig("x86")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepare(q, inplace=True)
            with torch.no_grad():
                for batch in batches:
                    q(batch)
            return convert(q, inplace=True)

    f, _q = models.eager("x86")
    bright = [models.inputs(2, 8, 100 + i) * 255 for i in range(4)]
    q = calibrated(bright)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, models.inputs(2, 8, 7), calibration=bright)
    report = walk_model(bundle, WalkOptions(top=0)).report
    assert all(lay.case.output_range_sampled for lay in bundle.layers)
    assert all(row.verdict != "at_floor" for row in report.layers)
    coarse = [x for row in report.layers for x in row.findings if x.code == "QCD052"]
    assert len(coarse) == len(report.layers)
    detail = walk_model(bundle, WalkOptions(top=1)).report.details[0].report
    (f052,) = [x for x in detail.findings if x.code == "QCD052" and x.path == "as_given"]
    assert "not like these inputs" in f052.message and "calibrate on inputs like" in f052.fix
    assert "qm.scale" not in f052.fix

    varied = [models.inputs(2, 1, 200 + i) * 0.25 * 16 ** (i / 19) for i in range(20)]
    q = calibrated(varied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, varied[0], calibration=varied)
    assert not any(lay.case.output_range_sampled for lay in bundle.layers)
    assert all(row.verdict == "at_floor"
               for row in walk_model(bundle, WalkOptions(top=0)).report.layers)

    f, q = models.eager("x86")  # calibrated on batches like the inputs
    like = [models.inputs(2, 8, 100 + i) for i in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, models.inputs(2, 8, 7), calibration=like)
    assert not any(lay.case.output_range_sampled for lay in bundle.layers)
    assert all(row.verdict == "at_floor"
               for row in walk_model(bundle, WalkOptions(top=0)).report.layers)


def test_the_torch_check_sentence_does_not_call_diagnosed_convs_at_their_floor(healthy_x86
                                                                               ):  # noqa: ANN001
    """With no conv checked, the sentence said 'none was diagnosed (all at their floor)' even
    where convs were diagnosed and broken, their setups with no emulation to check."""
    import dataclasses

    from qconvdiag.render.rich_model import torch_sentence

    report = healthy_x86[-1].report
    unchecked = tuple(dataclasses.replace(r, torch_mismatches=None) for r in report.layers)
    at_floor = dataclasses.replace(report, layers=tuple(
        dataclasses.replace(r, diagnosed=False) for r in unchecked))
    assert "all at their floor" in torch_sentence(at_floor)
    diagnosed = dataclasses.replace(report, layers=(
        dataclasses.replace(unchecked[0], diagnosed=True),) + at_floor.layers[1:])
    assert torch_sentence(diagnosed).startswith("torch check: none ran: the diagnosed convs")


def test_batchnorm_statistics_moved_after_convert_are_named_as_such():
    """The float model's BatchNorm ran in training mode after convert (its running statistics
    moved): the quantized conv folded the old ones. QCD027 said the float reference was the
    conv before its BatchNorm, which the capture had folded already; it names the moved
    statistics now, no eps explains them, and its fix (quantize again from this float model)
    runs and brings the conv back to its floor."""
    f, q = models.eager("x86")
    x = models.inputs(2, 8, 7)
    with torch.no_grad():
        f.train()
        f(models.inputs(2, 8, 11) * 3)  # one training-mode forward: bn1's statistics move
        f.eval()
    bundle, d = walk(f, q, x, top=0)
    (found,) = [x for x in d.diagnoses["stem"].report.findings if x.code == "QCD027"]
    assert found.title == "BatchNorm bn1 folded with other statistics than the float model's"
    assert found.severity == "error" and "folded_eps" not in found.evidence
    fused = copy.deepcopy(f)
    torch.ao.quantization.fuse_modules(fused, models.FUSE_2D, inplace=True)
    fused.qconfig = healthy_qconfig("x86")  # as the fix's comment asks: fused, qconfig set
    scope = {"model": fused, "calibration_batches": [models.inputs(2, 8, 100 + i)
                                                     for i in range(4)]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD027 fix", "exec"), scope)  # noqa: S102
    _bundle, after = walk(f, scope["quantized"], x, top=0)
    assert after.report.layer("stem").verdict == "at_floor"


def test_the_eps_of_a_fold_is_read_from_its_factors():
    """refolded_eps: factors sqrt((var + 1e-3) / (var + 1e-5)) give 1e-5 back; running
    variances that moved (no single eps) give None, and so do factors an eps cannot give."""
    from qconvdiag.case import FoldedBatchNorm
    from qconvdiag.findings.weight_rules import refolded_eps

    var = np.logspace(-5, 0, 16)
    bn = FoldedBatchNorm("bn", 1e-3, tuple(var))
    factors = np.sqrt((var + 1e-3) / (var + 1e-5)) * (1 + 0.003 * np.sin(np.arange(16)))
    assert refolded_eps(factors, bn) == pytest.approx(1e-5, rel=0.05)
    moved = np.sqrt((var + 1e-3) / (var * np.linspace(0.5, 2.0, 16) + 1e-3))
    assert refolded_eps(moved, bn) is None
    assert refolded_eps(np.full(16, 1.0), bn) is None  # nothing differs: no fold to explain
    assert refolded_eps(np.where(var < 1e-3, 0.5, 1.0), bn) is None  # eps' would be below 0


class _Uncalibrated(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.r = torch.nn.ReLU()
        self.b = torch.nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.b(self.r(self.a(self.quant(x)))))


def test_a_conv_at_its_floor_whose_output_qparams_are_the_defaults_is_diagnosed():
    """cxzhou95/XLSR#5: converted without calibration, the last conv received an input the
    QuantStub had lost and sat at 0.9x its floor on it, so it got no diagnosis and its row no
    finding (its scale 1.0 put every pixel at 0 or 1; '13 of 14 convs report QCD050'). Output
    qparams at the defaults are evidence of their own: such a conv is diagnosed."""
    from torch.ao.quantization import convert, fuse_modules, get_default_qconfig, prepare

    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    f = _Uncalibrated().eval()
    with torch.no_grad():
        f.a.weight.mul_(50)  # the float model's range there is wide; what a receives is not
    q = copy.deepcopy(f)
    fuse_modules(q, [["a", "r"]], inplace=True)
    q.qconfig = get_default_qconfig("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = convert(prepare(q))  # no calibration batches
    _b, d = walk(f, q, torch.rand(2, 3, 8, 8) * 1.2 - 0.6)
    a = d.report.layer("a")
    assert a.verdict == "at_floor" and a.diagnosed and "a" in d.diagnoses
    # named on the float model's range there (helper-52: diagnosed, it got QCD070's
    # all-clear, its error on the lost input being small)
    codes = {x.code: x.severity for x in a.findings}
    assert codes.get("QCD050") == "warning" and "QCD070" not in codes
    (found,) = [x for x in d.diagnoses["a"].report.findings if x.code == "QCD050"]
    assert "the float model's output at this conv spans 0..35" in found.message


def test_a_one_conv_model_s_sentence_speaks_of_one_conv():
    """helper-51: 'All 1 quantized convs are at their rounding floor'."""
    import copy

    from torch.ao.quantization import fuse_modules

    from qconvdiag.render.rich_model import summary_sentence

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
    _bundle, d = walk(f, q, models.inputs(2, 8, 7))
    assert summary_sentence(d.report).startswith(
        "The one quantized conv is at its rounding floor: no conv is misquantized")
    # helper-70: and the table's title, "1 quantized convs in model order"
    from rich.console import Console

    from qconvdiag.render.rich_model import layer_table

    console = Console(record=True, width=100)
    console.print(layer_table(d.report, 100))
    assert "1 quantized conv in model order" in console.export_text()


def test_diagnose_model_s_refusals_name_diagnose_model():
    """helper-70: diagnose_model's refusal began 'capture_model:', a function the user had
    not called."""
    from qconvdiag.errors import CaseError

    f = _ConvThenLinear().eval()
    with pytest.raises(CaseError, match=r"^diagnose_model: the quantized model holds no "):
        qconvdiag.diagnose_model(f, f, models.inputs(2, 8, 7))


def test_a_pool_that_keeps_a_coarse_step_is_where_the_loss_after_the_last_conv_is(tmp_path):
    """helper-70 (pytorch#95287): QCD071 blamed the Linear's weight or output scale, where the
    pool after the last conv kept that conv's step for its narrower average. The capture
    measures each module after the last conv against its float twin, on the model's input
    there and on the input it received (its own error): the pool's is the lowest, its output
    on 2 codes."""
    import copy

    from torch.ao.quantization import convert, default_qconfig, fuse_modules, prepare

    def inputs(n: int, seed: int) -> torch.Tensor:
        x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 0.05
        x[:, :, 8, 8] = 20.0  # one bright pixel sets every channel's range
        return x

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    with torch.no_grad():
        f.conv.weight.abs_()
        f.conv.bias.fill_(0.0)
    torch.backends.quantized.engine = "x86"
    q = fuse_modules(copy.deepcopy(f), [["conv", "relu"]])
    q.qconfig = default_qconfig
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prepare(q, inplace=True)
        for i in range(4):
            q(inputs(8, i))
        convert(q, inplace=True)
        qconvdiag.capture_model(f, q, inputs(16, 100), path=tmp_path / "pool.pt")
    bundle = qconvdiag.load_bundle(tmp_path / "pool.pt")
    assert bundle.lost_after is not None
    pool, fc = bundle.lost_after.steps
    assert (pool.name, pool.kind, pool.codes) == ("pool", "AdaptiveAvgPool2d", 2)
    assert pool.own and fc.own and pool.own_db is not None and fc.own_db is not None
    assert pool.own_db < 25 < fc.own_db and fc.weight_per_channel is False
    (found,) = walk_model(bundle, WalkOptions(top=0)).report.findings
    assert found.code == "QCD071"
    assert ("The lowest own SQNR is pool's: a quantized AdaptiveAvgPool2d keeps its input's "
            "scale and zero point, and its output spans only 2 codes") in found.message
    assert "A Linear holding other weights" not in found.message


def test_a_bundle_s_steps_after_the_last_conv_are_refused_when_malformed():
    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.after import LostAfter

    good = {"last_conv": "conv", "last_conv_sqnr_db": 30.0, "output_sqnr_db": 5.0,
            "after": ["fc"], "steps": [{"name": "fc", "kind": "Linear", "sqnr_db": 5.0,
                                        "own_db": 40.0, "codes": 100,
                                        "weight_sqnr_db": 45.0, "weight_per_channel": True}]}
    lost = LostAfter.from_mapping(good, "b.pt")
    assert lost.steps[0].own and lost.steps[0].weight_per_channel is True
    assert LostAfter.from_mapping(lost.to_dict(), "b.pt") == lost
    step = good["steps"][0]
    for bad in ({**step, "name": "a b"}, {**step, "kind": "x;y"}, {**step, "sqnr_db": "5"},
                {**step, "codes": True}, {**step, "weight_per_channel": 1},
                {k: v for k, v in step.items() if k != "sqnr_db"}):
        with pytest.raises(CaseFileError, match="'lost_after' is malformed"):
            LostAfter.from_mapping({**good, "steps": [bad]}, "b.pt")


def test_a_scripted_module_in_the_quantized_model_is_walked_and_no_hook_is_left():
    """helper-73: a TorchScript Flatten or Linear (torch.jit.script takes no hooks) made the
    capture raise torch's RuntimeError and leave 25 hooks on the user's models. Such a module
    is not hooked; every hook the capture registers comes off."""
    import copy

    from torch.ao.quantization import fuse_modules

    def hooks(*ms: torch.nn.Module) -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks)
                   for model in ms for m in model.modules())

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    for scripted in ("pool", "fc"):
        q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
        setattr(q, scripted, torch.jit.script(getattr(q, scripted)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            report = qconvdiag.diagnose_model(f, q, models.inputs(2, 8, 7), top=0)
        assert [r.name for r in report.layers] == ["conv"]
        assert hooks(f, q) == 0


class _TwoLinearHead(torch.nn.Module):
    """conv -> relu -> pool -> fc1 -> act -> fc2 -> act (one ReLU module called twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.quant, self.dequant = QuantStub_(), DeQuantStub_()
        self.conv, self.relu = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc1, self.relu_h = torch.nn.Linear(16, 16), torch.nn.ReLU()
        self.fc2, self.act = torch.nn.Linear(16, 16), torch.nn.ReLU()
        self.fc3 = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.pool(self.relu(self.conv(self.quant(x)))), 1)
        x = self.act(self.fc2(self.act(self.relu_h(self.fc1(x)))))
        return self.dequant(self.fc3(x))


def test_the_modules_after_the_last_conv_are_compared_call_for_call():
    """helper-73: a module called twice after the last conv (act) was compared with the float
    module's last call (0.25 dB where it was 32 dB), and a fused LinearReLU with the float
    Linear before its ReLU (2.5 dB where it was 28 dB). A module called twice is left out;
    a LinearReLU's twin is the float Linear's output after the ReLU."""
    import copy

    from torch.ao.quantization import fuse_modules

    torch.manual_seed(0)
    f = _TwoLinearHead().eval()
    q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"], ["fc1", "relu_h"]]))
    other = torch.nn.Linear(16, 10).weight.detach()  # another checkpoint's: a loss to record
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.fc3.set_weight_bias(torch.quantize_per_tensor(other, float(other.abs().max() / 127),
                                                        0, torch.qint8), q.fc3.bias())
        bundle = qconvdiag.capture_model(f, q, models.inputs(2, 8, 7))
    assert bundle.lost_after is not None
    steps = {s.name: s for s in bundle.lost_after.steps}
    assert "act" not in steps  # called twice
    fc1 = steps["fc1"]
    assert fc1.kind == "LinearReLU" and fc1.sqnr_db is not None and fc1.sqnr_db > 20
    assert fc1.own and fc1.own_db is not None and fc1.own_db > 20


def test_qcd071_names_a_module_only_well_below_the_last_conv_and_a_close_output_not_at_all():
    """helper-73: a healthy model whose output is 25 dB from the float model's (its last conv
    36.5 dB, two Linears and a softmax after it) was warned, the pool named among modules all
    within a few dB. An output 20 dB or closer is not named; a module only 6 dB or more below
    the last conv's SQNR."""
    from qconvdiag.model.after import HeadStep, LostAfter, qcd071

    near = (HeadStep("pool", "AdaptiveAvgPool2d", 33.0, 33.5, True, 30),
            HeadStep("fc", "Linear", 14.0, 34.0, True, 200, 40.0, False))
    assert qcd071(LostAfter("conv", 36.5, 25.0, ("fc",), "", near)) is None
    found = qcd071(LostAfter("conv", 36.5, 14.0, ("fc",), "", near))
    assert found is not None and found.severity == "warning"
    assert "within 6 dB of the last conv's" in found.message and "lowest" not in found.message
    low = (HeadStep("pool", "AdaptiveAvgPool2d", 18.0, 18.2, True, 2), near[1])
    found = qcd071(LostAfter("conv", 36.5, 14.0, ("fc",), "", low))
    assert found is not None and "The lowest own SQNR is pool's" in found.message


def test_a_bundle_s_head_steps_and_unfused_relus_are_refused_when_impossible(tmp_path):
    """helper-73: NaN SQNRs in 'lost_after.steps' loaded and printed 'own nan dB'; codes -7
    loaded; one ReLU named unfused after two convs printed it twice in a fuse list."""
    import dataclasses

    from qconvdiag.errors import CaseFileError
    from qconvdiag.model.after import LostAfter
    from qconvdiag.model.bundle import _check_writers

    step = {"name": "fc", "kind": "Linear", "sqnr_db": 5.0, "own_db": 40.0, "codes": 100}
    good = {"last_conv": "conv", "last_conv_sqnr_db": 30.0, "output_sqnr_db": 5.0,
            "after": ["fc"], "steps": [step]}
    for bad in ({**step, "own_db": float("nan")}, {**step, "sqnr_db": float("inf")},
                {**step, "codes": -7}, {**step, "codes": 0}):
        with pytest.raises(CaseFileError, match="'lost_after' is malformed"):
            LostAfter.from_mapping({**good, "steps": [bad]}, "b.pt")
    bundle, _d = walk(_ConvThenLinear().eval(), _calibrated(_ConvThenLinear().eval()),
                      models.inputs(2, 8, 7))
    lay = bundle.layers[0]
    _check_writers([dataclasses.replace(lay, unfused_relu="relu")], "b.pt")
    for layers in ([dataclasses.replace(lay, unfused_relu="relu"),
                    dataclasses.replace(lay, name="conv2", unfused_relu="relu")],
                   [dataclasses.replace(lay, unfused_relu="conv")]):
        with pytest.raises(CaseFileError, match="'unfused_relu' must name a module"):
            _check_writers(layers, "b.pt")


def test_a_torchscript_quantized_model_is_refused_as_such():
    """helper-74 (pytorch#46749): a torch.jit.load'ed quantized model was refused as holding
    no quantized conv, though it holds three; TorchScript is what capture_model cannot take."""
    import copy

    from torch.ao.quantization import fuse_modules

    from qconvdiag.errors import CaseError

    torch.manual_seed(0)
    f = _ConvThenLinear().eval()
    q = _calibrated(fuse_modules(copy.deepcopy(f), [["conv", "relu"]]))
    x = models.inputs(2, 8, 7)
    scripted = torch.jit.trace(q, x)
    with pytest.raises(CaseError, match="the quantized model is a TorchScript module"):
        qconvdiag.capture_model(f, scripted, x)
