"""torchao's PT2E flow (issue 15): capture_model on a convert_pt2e GraphModule, the model walk
and the diagnosis on engine x86_inductor, PT2E case files, and the missing extra."""

from __future__ import annotations

import json
from importlib import resources

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn as nn

import qconvdiag
from qconvdiag import torchao_import as pt2e
from qconvdiag.case import build_case
from qconvdiag.diagnosis import Options, run_diagnosis
from qconvdiag.errors import CaseError, MissingExtraError
from qconvdiag.model.walk import WalkOptions, walk_model
from tests.cpu import pairs_here
from tests.repo import SAMPLES


class PT2ENet(nn.Module):
    """conv-BN-ReLU, a grouped conv with a ReLU module reused, a 1x1 conv before a pool (its
    output quantized for the pool), and a last conv whose output stays float32."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.pw = nn.Conv2d(8, 4, 1)
        self.pool = nn.MaxPool2d(2)
        self.last = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn(self.stem(x)))
        x = self.relu(self.grouped(x))
        return self.last(self.pool(self.pw(x)))


def build(seed: int = 0, batch: int = 4, calibration_scale: float = 1.0,
          reduce_range: bool = False, calibrate: bool = True
          ) -> tuple[nn.Module, torch.fx.GraphModule, list]:
    """The float model, its convert_pt2e twin (X86InductorQuantizer's default config, with
    ``reduce_range`` if asked, calibrated on one batch, times ``calibration_scale``, unless
    not ``calibrate``), and two batches of 8x8 images."""
    pt2e.require_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    torch.manual_seed(seed)
    model = PT2ENet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [torch.randn(batch, 3, 8, 8, generator=gen) for _ in range(2)]
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
        reduce_range=reduce_range))
    exported = torch.export.export(model, (batches[0],), strict=True).module()
    prepared = prepare_pt2e(exported, quantizer)
    if calibrate:
        with torch.no_grad():
            prepared(batches[0] * calibration_scale)
    return model, convert_pt2e(prepared), batches


def user_scope(model: nn.Module, batch: torch.Tensor) -> dict:
    """The names a model walk's PT2E fix runs against, as a user's script holds them after
    build(): the quantizer, the float model, its exported graph prepared already
    (prepare_pt2e changes the graph it is given), and the batch to calibrate on."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(model, (batch,), strict=True).module()
    prepare_pt2e(exported, quantizer)
    return {"torch": torch, "quantizer": quantizer, "calibration_batches": [batch],
            "exported": exported, "model": model}


@pytest.fixture(scope="module")
def captured(tmp_path_factory):  # noqa: ANN001, ANN201
    model, converted, batches = build()
    path = tmp_path_factory.mktemp("pt2e") / "pt2e.safetensors"
    bundle = qconvdiag.capture_model(model, converted, batches, path,
                                     calibration=batches[:1])
    walked = walk_model(qconvdiag.load_bundle(path), WalkOptions(top=1, torch_check="all"))
    return model, converted, batches, bundle, path, walked


def _graph_conv(converted: torch.fx.GraphModule, index: int):  # noqa: ANN202
    convs = [n for n in converted.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    return convs[index]


def test_capture_reads_each_pattern_from_the_graph(captured):  # noqa: ANN001
    model, converted, batches, bundle, _path, _walked = captured
    assert bundle.engine == "x86_inductor"
    assert [lay.name for lay in bundle.layers] == ["stem", "grouped", "pw", "last"]
    assert [lay.output_float32 for lay in bundle.layers] == [False, False, False, True]
    assert not any("left out" in n for n in bundle.notes)
    stem = bundle.layers[0]
    assert stem.case.flow == "pt2e" and stem.case.activation == "relu"
    assert stem.bn_folded == "bn" and "BatchNorm bn folded" in stem.notes[0]
    module = stem.case.setup.module
    conv = _graph_conv(converted, 0)
    dq_x, dq_w, bias = conv.args[:3]
    assert np.array_equal(module.weight_codes, converted._frozen_param0.numpy())
    assert module.weight_qparams.scale == tuple(converted._scale_0.double().tolist())
    assert set(module.weight_qparams.zero_point) == {0}
    assert np.array_equal(module.bias, getattr(converted, bias.target.split(".")[0]).bias
                          .detach().numpy())
    assert stem.case.setup.input_qparams.scale == (float(dq_x.args[1]),)
    assert stem.case.setup.input_qparams.zero_point == (int(dq_x.args[2]),)
    # the model's input codes are the graph's quantize of each batch
    x = torch.cat(batches)
    codes = torch.ops.quantized_decomposed.quantize_per_tensor(x, *dq_x.args[1:])
    assert np.array_equal(stem.case.setup.input_codes, codes.numpy())
    assert dq_w.args[0].target == "_frozen_param0"


def test_float_side_folds_batchnorm_as_the_float_model_computes(captured):  # noqa: ANN001
    model, _converted, batches, bundle, _path, _walked = captured
    with torch.no_grad():
        x = torch.cat(batches)
        after_bn = model.relu(model.bn(model.stem(x)))
        grouped_in = after_bn
    stem = bundle.layers[0]
    assert np.array_equal(stem.float_output, after_bn.numpy())
    assert np.array_equal(bundle.layers[1].float_input, grouped_in.numpy())
    # the folded float weight on the float input gives the float model's output
    case = stem.case
    with torch.no_grad():
        refolded = torch.relu(torch.nn.functional.conv2d(
            torch.from_numpy(stem.float_input), torch.from_numpy(case.weight),
            torch.from_numpy(case.bias), padding=1))
    assert float((refolded - after_bn).abs().max()) < 1e-5 * float(after_bn.abs().max())


def test_kernel_outputs_feed_the_next_conv(captured):  # noqa: ANN001
    """Each conv's output codes are the kernel's on the codes it received, and they are the
    next conv's input codes (the graph runs on as the lowered model would)."""
    _model, _converted, _batches, bundle, _path, _walked = captured
    stem, grouped = bundle.layers[:2]
    assert np.array_equal(stem.quantized_output, grouped.case.setup.input_codes)
    assert stem.quantized_output_qparams.scale == grouped.case.setup.input_qparams.scale
    note = next(n for n in bundle.notes if n.startswith("a PT2E model"))
    assert "torch.ops.onednn.qconv_pointwise" in note


def test_eager_reference_is_what_the_graph_computes(captured):  # noqa: ANN001
    """torch_ref.run_eager_qdq (the ladder's eager Q/DQ reference) gives the convert_pt2e
    graph's own output codes for each conv, on the input codes the graph fed it."""
    from qconvdiag.arithmetic.torch_ref import run_eager_qdq
    from qconvdiag.case import Geometry

    _model, converted, batches, bundle, _path, _walked = captured
    quantizes = {n.args[0]: n for n in converted.graph.nodes
                 if n.target == torch.ops.quantized_decomposed.quantize_per_tensor.default}
    convs = [n for n in converted.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    seen: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):  # noqa: ANN001, ANN202
            out = super().run_node(n)
            seen[n] = out
            return out

    with torch.no_grad():
        Recorder(converted).run(batches[0])
    for lay, conv in zip(bundle.layers, convs):
        if lay.output_float32:  # no quantize: the graph's float32 conv is what it hands on
            continue
        after = next(iter(conv.users))
        out_node = quantizes.get(after) or quantizes[conv]
        codes_in = seen[conv.args[0].args[0]].numpy()
        m = lay.case.setup.module
        g = lay.case.geometry
        eager = run_eager_qdq(codes_in, lay.case.setup.input_qparams, m.weight_codes,
                              m.weight_qparams, m.bias, m.output_qparams,
                              Geometry(g.stride, g.padding, g.dilation, g.groups))
        expected = seen[out_node].numpy()
        if lay.case.activation == "relu":
            eager = np.maximum(eager, m.output_qparams.zero_point[0])
        assert np.array_equal(np.clip(eager, 0, 255), expected), lay.name


def test_walk_is_torch_exact_on_x86_inductor(captured):  # noqa: ANN001
    _model, _converted, _batches, bundle, _path, walked = captured
    report = walked.report
    assert report.engine == "x86_inductor"
    for row in report.layers:
        assert row.engine == "x86_inductor"
        assert row.torch_mismatches == 0, row.name
        assert row.torch_total == bundle.layer(row.name).quantized_output.size
    (detail,) = report.details
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    schema = json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert "integer_kernel" in [s["id"] for s in data["details"][0]["paths"][0]["stages"]]
    names = [(p.name, p.engine) for p in detail.report.paths]
    assert names == [("as_given", "x86_inductor"), ("production", "x86_inductor")]
    for p in detail.report.paths:
        assert p.torch_check.ran and p.torch_check.mismatched_elements == 0
        assert p.kernel == "onednn"
    production = detail.report.path("production")
    assert production.observers == {"input": "HistogramObserver",
                                    "weight": "PerChannelMinMaxObserver",
                                    "output": "HistogramObserver"}
    assert production.qparams["weight"].axis == 0
    assert set(production.qparams["weight"].zero_point) == {0}


def test_production_is_x86_inductor_quantizers_default_config(captured):  # noqa: ANN001
    """On the batch the model was calibrated on, the production path's observers give the
    graph's own qparams (input and weight of the first conv): the graph of the config with
    reduce_range where this CPU's int16 pair sums need 7-bit activations, as torchao advises
    (paths.advises_reduce_range)."""
    _model, converted, batches, bundle, _path, _walked = captured
    seven = pairs_here("x86_inductor")
    reference = build(reduce_range=True)[1] if seven else converted
    dq = _graph_conv(reference, 0).args[0]  # the stem's input, dequantized: its literals
    from qconvdiag.quantization.paths import ProductionOptions, build_production

    stem = bundle.layers[0]
    n = batches[0].shape[0]
    case = build_case(batches[0].numpy(), stem.case.weight, stem.case.bias,
                                padding=1, activation="relu", flow="pt2e")
    spec = build_production(case, "x86_inductor", ProductionOptions())
    assert spec.input_qparams.scale == (float(dq.args[1]),)
    assert spec.input_qparams.zero_point == (int(dq.args[2]),)
    assert (dq.args[4] == 127) == seven
    assert np.allclose(spec.weight_qparams.scale, stem.case.setup.module.weight_qparams.scale,
                       rtol=1e-6)
    if not seven:  # the captured graph's own codes
        assert np.array_equal(spec.input_codes, stem.case.setup.input_codes[:n])


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_bundle_round_trip_keeps_the_flow(captured, tmp_path, suffix):  # noqa: ANN001
    bundle = captured[3]
    path = tmp_path / f"b{suffix}"
    from qconvdiag.model.bundle import save_bundle

    save_bundle(bundle, path)
    again = qconvdiag.load_bundle(path)
    assert again.engine == "x86_inductor"
    assert [lay.case.flow for lay in again.layers] == ["pt2e"] * 4
    for a, b in zip(bundle.layers, again.layers):
        assert a.output_float32 == b.output_float32
        assert a.quantized_output.dtype == b.quantized_output.dtype
        assert np.array_equal(a.quantized_output, b.quantized_output)
        assert np.array_equal(a.case.setup.module.weight_codes, b.case.setup.module.weight_codes)


def _cli(*args: str):  # noqa: ANN202
    from typer.testing import CliRunner

    from qconvdiag.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_explains_a_pt2e_bundle(captured):  # noqa: ANN001
    path = captured[4]
    r = _cli("explain", str(path), "--top", "0", "--torch-check", "all", "--width", "100")
    assert r.exit_code == 0, r.stderr
    assert "(engine x86_inductor," in r.stdout
    assert "0 differ" in r.stdout
    r = _cli("explain", str(path), "--top", "0", "--json")
    data = json.loads(r.stdout)
    assert {lay["engine"] for lay in data["layers"]} == {"x86_inductor"}
    r = _cli("explain", str(path), "--engine", "x86")
    assert r.exit_code == 2 and "PT2E model's" in r.stderr
    r = _cli("explain", str(path), "--top", "1", "--width", "100")
    assert r.exit_code == 0, r.stderr
    assert "qm stands for the conv's Q/DQ pattern in the convert_pt2e model" in r.stdout
    assert "qm is quantized.get_submodule" not in r.stdout


def test_a_layer_as_a_case_file_stays_pt2e(captured, tmp_path):  # noqa: ANN001
    case = captured[3].layers[1].case
    path = tmp_path / "grouped.npz"
    qconvdiag.save_case(case, path)
    report = run_diagnosis(qconvdiag.load_case(path), Options(production_path=False)).report
    assert [(p.name, p.engine) for p in report.paths] == [("as_given", "x86_inductor")]
    assert report.paths[0].torch_check.mismatched_elements == 0


def test_input_quantization_calibrated_on_other_inputs_is_named():
    """Calibrated on inputs 12x larger than at inference: the model's input quantize loses
    the input before the first conv, which is at its floor on what it received."""
    model, converted, batches = build(calibration_scale=12.0)
    bundle = qconvdiag.capture_model(model, converted, batches)
    report = walk_model(bundle, WalkOptions(top=0)).report
    assert report.layer("stem").verdict == "at_floor"
    (loss,) = report.upstream
    assert loss.layer == "stem" and loss.floor_ratio >= 4
    assert "the quantize_per_tensor of the model's input" in loss.message
    assert "QuantStub" not in loss.message
    (lost,) = report.findings
    assert lost.code == "QCD065" and "input quantization" in lost.title
    # its fix, run in the user's script as build() leaves it (its exported graph prepared
    # already: prepare_pt2e changes the graph it is given, and preparing it again raised a
    # KeyError), with the batch it meets at inference: the graph's input scale is the one
    # calibrated on that batch
    scope = user_scope(model, batches[0])
    exec(compile(lost.fix, "QCD065 fix", "exec"), scope)
    calibrated = build()[1]  # calibrated on batches[0] itself
    again = _graph_conv(scope["converted"], 0).args[0].args[1]
    assert again == _graph_conv(calibrated, 0).args[0].args[1]
    assert again < _graph_conv(converted, 0).args[0].args[1] / 4
    # an op between convs: the fix prints the graph's quantize nodes' scale and zero point
    import contextlib
    import dataclasses
    import io

    from qconvdiag.model.lost import qcd065

    (between,) = qcd065((dataclasses.replace(loss, floor_ratio=None, worst_before="stem"),),
                        pt2e=True)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(between.fix, "QCD065 fix", "exec"), {"converted": converted})
    assert "quantize_per_tensor" in printed.getvalue()


def test_a_static_batch_size_is_named():
    model, converted, batches = build(batch=4)
    with pytest.raises(CaseError, match="pass batches of the exported shape"):
        qconvdiag.capture_model(model, converted, [batches[0][:2]])


def test_without_torchao_one_line_names_the_extra(captured, monkeypatch):  # noqa: ANN001
    model, converted, batches, _bundle, path, _walked = captured
    monkeypatch.setattr(pt2e, "torchao_available", lambda: False)
    with pytest.raises(MissingExtraError, match=r"pip install -e .\.\[pt2e\]."):
        qconvdiag.capture_model(model, converted, batches)
    r = _cli("explain", str(path))
    assert r.exit_code == 2
    assert r.stderr.count("\n") == 1 and "pip install -e '.[pt2e]'" in r.stderr
    legacy = SAMPLES / "forum_conv.pt"
    assert _cli("explain", str(legacy), "--json").exit_code == 0


def _converted(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (x,), strict=True).module(), quantizer)
    with torch.no_grad():
        prepared(x)
    return convert_pt2e(prepared)


def test_conv1d_and_conv3d_pt2e_models():
    """X86InductorQuantizer quantizes a conv1d's input and weight and leaves its ReLU'd output
    float32 (the next conv1d, fed float, stays float: left out with a note); it quantizes no
    conv3d at all, which capture_model says in one line."""
    pt2e.require_torchao()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv1d(8, 4, 3)).eval()
    x = torch.randn(2, 3, 16)
    bundle = qconvdiag.capture_model(model, _converted(model, x), [x])
    assert [(lay.name, lay.output_float32) for lay in bundle.layers] == [("0", True)]
    assert any(n.startswith("2: not a quantized conv pattern") for n in bundle.notes)
    assert any("no conv outputs codes to compare" in n for n in bundle.notes)
    (row,) = walk_model(bundle, WalkOptions(top=0, torch_check="all")).report.layers
    assert (row.torch_mismatches, row.torch_total) == (0, 2 * 8 * 16)
    model3 = nn.Sequential(nn.Conv3d(3, 4, 3), nn.ReLU()).eval()
    x3 = torch.randn(1, 3, 6, 6, 6)
    with pytest.raises(CaseError, match="left every conv in float"):
        qconvdiag.capture_model(model3, _converted(model3, x3), [x3])


def test_a_prepared_model_not_converted_is_refused_as_such():
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    model, _converted, batches = build()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(torch.export.export(model, (batches[0],), strict=True).module(),
                            quantizer)
    with pytest.raises(CaseError, match="a prepared one, not converted yet"):
        qconvdiag.capture_model(model, prepared, batches)
    with pytest.raises(CaseError, match="a float graph"):
        qconvdiag.capture_model(model, torch.fx.symbolic_trace(model), batches)


FORCED_WALK = """
import json, warnings
warnings.simplefilter("ignore")
import qconvdiag
from qconvdiag.model.walk import WalkOptions, walk_model
from tests.model.test_pt2e_model import build
model, converted, batches = build()
report = walk_model(qconvdiag.capture_model(model, converted, batches[:1]), WalkOptions(top=0))
print(json.dumps({r.name: [r.output_dtype, r.verdict, r.dominant_stage, r.torch_mismatches,
                           [(f.code, f.severity) for f in r.findings]]
                  for r in report.report.layers}))
"""


def test_a_float32_output_s_saturation_is_named_not_blamed_on_the_weight():
    """ISA forced to AVX2 (oneDNN sums adjacent channels' u8*s8 products in saturating int16):
    the 8-bit model's last conv, whose kernel writes float32, is broken by its saturated pair
    sums. Its dominant stage is the accumulation (the weight's rounding alone is at the floor)
    and QCD040 names it, though a float32-output conv gets no diagnosis; the torch check
    stays exact."""
    import os
    import subprocess
    import sys

    from tests.repo import ROOT

    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2", FBGEMM_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", FORCED_WALK], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True)
    rows = json.loads(out.stdout.strip().splitlines()[-1])
    dtype, verdict, dominant, mismatches, findings = rows["last"]
    assert dtype == "float32" and verdict == "broken" and mismatches == 0
    assert dominant == "accumulation" and findings == [["QCD040", "error"]]
    for name in ("grouped", "pw"):  # the others stay at their floor
        assert rows[name][1] == "at_floor" and rows[name][4] == []


def test_a_model_converted_without_calibration_is_diagnosed_not_refused():
    """convert_pt2e without calibration: each weight observer never ran and left one scale,
    1.0, for all the conv's channels; the graph's dequantize_per_channel broadcasts it. The
    walk did not: it called every conv 'refused by torch' (per-channel qparams with one scale
    for 16 channels: quantize with axis=0), a cause and fix both wrong, and named no finding.
    Now the weight is read as the graph applies it: the emulation gives the model's codes, the
    convs are broken, with errors named (QCD026: the weight's step; QCD050: the output's
    defaults), and a note says why."""
    import warnings

    model, converted, batches = build(calibrate=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, converted, batches)
    (note,) = [n for n in bundle.notes if "never ran" in n]  # one note for every such conv
    assert "stem (1 for" in note and "hold one scale for all its output channels" in note
    report = walk_model(bundle, WalkOptions(top=0, torch_check="all")).report
    quantized = [r for r in report.layers if r.output_dtype != "float32"]
    assert quantized and all(r.torch_mismatches == 0 for r in report.layers)
    assert all(r.verdict == "broken" and any(f.severity == "error" for f in r.findings)
               for r in quantized)
    assert any(f.code == "QCD026" for f in quantized[0].findings)


def _refusal(model: nn.Module, quantizer: object, batches: list, calibrate: bool = True) -> str:
    """capture_model's one-line refusal of ``model`` exported, prepared with ``quantizer``,
    calibrated on the first batch (unless not ``calibrate``) and converted."""
    import warnings

    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from qconvdiag.errors import CaseError

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_pt2e(torch.export.export(model, (batches[0],), strict=True).module(),
                                quantizer)
        if calibrate:
            with torch.no_grad():
                prepared(batches[0])
        with pytest.raises(CaseError) as e:
            qconvdiag.capture_model(model, convert_pt2e(prepared), batches)
    return str(e.value)


@pytest.mark.parametrize("config, fragment", [
    ("dynamic", "its input is quantized at run time (is_dynamic=True)"),
    ("per_tensor", "its weight is quantized per tensor"),
])
def test_a_conv_torch_compile_runs_in_float32_is_named_as_such(config, fragment):
    """Per-tensor weights and dynamic activations give no int8 conv pattern (torch.compile
    runs those convs in float32): the refusal says which, not 'its input or weight is not
    dequantized from int codes' (its weight is int8 codes, per tensor)."""

    from torchao.quantization.pt2e import MinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq


    model, _converted, batches = build()
    default = xiq.get_default_x86_inductor_quantization_config(is_dynamic=config == "dynamic")
    if config == "per_tensor":
        weight = QuantizationSpec(dtype=torch.int8, quant_min=-128, quant_max=127,
                                  qscheme=torch.per_tensor_symmetric, is_dynamic=False,
                                  observer_or_fake_quant_ctr=MinMaxObserver)
        default = QuantizationConfig(default.input_activation, default.output_activation,
                                     weight, None, False)
    refusal = _refusal(model, xiq.X86InductorQuantizer().set_global(default), batches)
    assert fragment in refusal
    # helper-70 (pytorch/ao#3609): "holds no quantized conv pattern" read as if the graph's
    # Q/DQ convs were wrong; it says how many convs it saw, and that their form is normal
    assert refusal.startswith("capture_model: none of the convert_pt2e model's ")
    assert "themselves are convert_pt2e's form" in refusal and "left out" not in refusal


def test_a_pt2e_conv_s_output_qparams_fix_edits_the_converted_graph():
    """A PT2E model's output qparams live in its graph (the quantize after the conv and the
    dequantizes reading it), not in a module: the fix printed 'qm.scale = ...', which runs on
    nothing there. It now edits those nodes' arguments; run on the converted graph, the coarse
    step it names (its scale set 10x by hand) is gone."""
    import warnings

    model, converted, batches = build()

    def output_nodes(conv_name: str) -> list:
        conv = next(n for n in converted.graph.nodes if n.op == "call_function"
                    and "conv" in str(n.target)
                    and list(n.meta.get("nn_module_stack", {}).values())[-1][0] == conv_name)
        q = next(iter(conv.users))
        if "relu" in str(q.target):
            q = next(iter(q.users))
        return [q, *q.users]

    for node in output_nodes("grouped"):
        node.args = (node.args[0], node.args[1] * 10, *node.args[2:])
    converted.recompile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, converted, batches, calibration=batches[:1])
    report = walk_model(bundle, WalkOptions(top=0, layers=("grouped",))).report
    detail = next(d.report for d in report.details if d.layer == "grouped")
    coarse = next(f for f in detail.findings if f.code == "QCD052" and f.path == "as_given")
    assert "converted.recompile()" in coarse.fix and "qm.scale" not in coarse.fix
    exec(compile(coarse.fix, "QCD052 fix", "exec"), {"converted": converted})  # noqa: S102
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, converted, batches, calibration=batches[:1])
    row = walk_model(bundle, WalkOptions(top=0)).report.layer("grouped")
    assert row.verdict == "at_floor" and not [f for f in row.findings if f.code == "QCD052"]


def test_a_pt2e_layer_s_calibration_fix_quantizes_the_whole_model_again():
    """Calibrated on inputs x255, the batches given: QCD052 on the worst conv says the batches
    are unlike the inputs and its fix calibrates. In a PT2E model walk that fix was the
    single-conv recipe (torch.export.export(conv.eval(), (x,), ...): no 'x' in a model, and
    one conv quantized alone); it is the model's own flow now, and run in the user's script
    (its exported graph prepared already) it gives the model calibrated on the right batch."""
    model, converted, batches = build(calibration_scale=255.0)
    bundle = qconvdiag.capture_model(model, converted, batches, calibration=[batches[0] * 255])
    detail = walk_model(bundle, WalkOptions(top=1)).report.details[0].report
    (f052,) = [x for x in detail.findings if x.code == "QCD052" and x.path == "as_given"]
    assert "not like these inputs" in f052.message and "conv.eval()" not in f052.fix
    scope = user_scope(model, batches[0])
    exec(compile(f052.fix, "QCD052 fix", "exec"), scope)  # noqa: S102
    calibrated = build()[1]  # calibrated on batches[0] itself
    assert (_graph_conv(scope["converted"], 1).args[0].args[1]
            == _graph_conv(calibrated, 1).args[0].args[1])


def test_a_pt2e_weight_moved_after_convert_is_fixed_by_quantizing_again():
    """The float model trained on after convert_pt2e: QCD024 names the weight, and its fix
    (and QCD030's, for the bias) was the eager module's repack (qm.set_weight_bias: a PT2E
    model has no qm, its weights are constants of the graph). Now it quantizes the model
    again; run, the conv holds this float weight's codes and QCD024 is gone."""
    model, converted, batches = build()
    with torch.no_grad():
        # 3 steps: a weight that is not the one converted (a small move is read as moved)
        for conv, steps in ((model.grouped, 3.0), (model.last, 3.0)):
            w = conv.weight
            w.add_(w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127.5 * steps)
    bundle = qconvdiag.capture_model(model, converted, batches, calibration=[batches[0]])
    report = walk_model(bundle, WalkOptions(layers=("grouped",), top=0)).report
    # 'last' writes float32 (no diagnosis): its screen names the weight all the same (it was
    # broken with no finding)
    assert bundle.layer("last").output_float32
    assert report.layer("last").verdict == "above_floor"
    assert [(x.code, x.severity) for x in report.layer("last").findings] == [
        ("QCD024", "warning")]
    (moved,) = [x for d in report.details for x in d.report.findings
                if x.code == "QCD024" and x.path == "as_given"]
    assert "qm" not in moved.fix and "prepare_pt2e" in moved.fix
    assert all("qm." not in x.fix for d in report.details for x in d.report.findings
               if x.code in ("QCD024", "QCD030"))
    scope = user_scope(model, batches[0])
    exec(compile(moved.fix, "QCD024 fix", "exec"), scope)  # noqa: S102
    again = qconvdiag.capture_model(model, scope["converted"], batches,
                                    calibration=[batches[0]])
    report = walk_model(again, WalkOptions(layers=("grouped",), top=0)).report
    assert not [x for d in report.details for x in d.report.findings if x.code == "QCD024"]


def test_a_dynamic_pt2e_model_never_run_before_convert_says_its_weights_are_zero():
    """pytorch/ao#4292: is_dynamic=True, a ResNet-18 at 10% accuracy. The prepared model was
    never run before convert_pt2e, so its weight observers saw nothing: one scale, 1.0, puts
    every weight on code 0. The refusal said only that torch.compile runs the conv in float32
    (as if only int8 speed were lost); it now says the weights are all on code 0 and how to
    mend that. Run once before convert, the same refusal says nothing of the weights."""

    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq


    model, _converted, batches = build()
    config = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
    never, ran = (_refusal(model, xiq.X86InductorQuantizer().set_global(config), batches, run)
                  for run in (False, True))
    assert "its weight observer never ran: one scale, 1.0, for its" in never
    assert "run the prepared model on calibration batches before convert_pt2e" in never
    assert "weight observer never ran" not in ran and "is_dynamic=True" in ran


def test_an_xnnpack_quantized_model_is_refused_in_one_line_that_says_so():
    """XNNPACKQuantizer's symmetric weights run -127..127: the refusal said "-127..127;
    x86_inductor takes int8 -128..127", which reads as if the range fit (a sweep's
    pytorch/ao#4107). It now names the quantizer and the one qconvdiag models."""

    from torchao.testing.pt2e._xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )


    model, _converted, batches = build()
    message = _refusal(model, XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True)), batches)
    assert "quantized to -127..127" in message and "X86InductorQuantizer" in message


def _qat_prepared(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of ``model`` exported in training mode and prepared by torchao's QAT flow
    (X86InductorQuantizer's default QAT config), as users run it."""
    import copy

    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    config = xiq.get_default_x86_inductor_quantization_config(is_qat=True)
    return prepare_qat_pt2e(
        torch.export.export(copy.deepcopy(model).train(), (x,), strict=True).module(),
        xiq.X86InductorQuantizer().set_global(config))


class _StandaloneBn(nn.Module):
    """conv, ReLU, a BatchNorm no conv can fold (DenseNet's pre-activation), conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.r = nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()
        self.bn, self.c2 = nn.BatchNorm2d(8), nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.bn(self.r(self.c1(x))))


def test_a_pt2e_batchnorm_left_in_training_mode_is_named():
    """pytorch#114547: a QAT-prepared DenseNet converted without move_exported_model_to_eval
    keeps its standalone BatchNorms in training mode (each batch normalised with its own
    statistics: 1.7% top-1). Nothing named it; QCD069 does now, with the one call that mends
    it, and the same model moved to eval first has no such finding."""
    import warnings

    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    torch.manual_seed(0)
    model, x = _StandaloneBn(), torch.randn(8, 3, 12, 12)
    with torch.no_grad():
        model.bn.running_mean.uniform_(0, 1)
        model.bn.running_var.uniform_(0.5, 2)
    found = []
    for to_eval in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prepared = _qat_prepared(model, x)
            prepared(x)
            if to_eval:
                move_exported_model_to_eval(prepared)
            bundle = qconvdiag.capture_model(model.eval(), convert_pt2e(prepared), x)
        report = walk_model(bundle, WalkOptions(top=0)).report
        found.append([f for f in report.findings if f.code == "QCD069"])
        if not to_eval:
            assert bundle.bn_training == ("bn",)
            again = bundle_from_mapping(bundle_to_mapping(bundle), "b.pt")
            assert again.bn_training == ("bn",)
    (named,), after = found
    assert named.severity == "warning" and "training mode" in named.title
    assert "move_exported_model_to_eval(prepared)" in named.fix and after == []


class _YoloConv(nn.Module):
    """ultralytics' Conv (conv, BatchNorm with eps 1e-3 and momentum 0.03, activation), then a
    conv: pytorch/ao#4107's model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn, self.act = nn.BatchNorm2d(8, eps=1e-3, momentum=0.03), nn.ReLU()
        self.c2 = nn.Conv2d(8, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.act(self.bn(self.conv(x))))


def _qat_converted(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """``model`` through torchao's QAT flow as pytorch/ao#4107 runs it: prepare_qat_pt2e,
    move_exported_model_to_eval, calibration, convert_pt2e."""
    import warnings

    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = _qat_prepared(model, x)
        move_exported_model_to_eval(prepared)
        with torch.no_grad():
            prepared(x)
        return convert_pt2e(prepared)


def test_a_batchnorm_torchao_s_qat_folded_with_its_own_eps_is_named_and_the_fix_runs():
    """pytorch/ao#4107 (yolo11s, mAP 47 to 43): prepare_qat_pt2e writes eps 1e-05 on every
    batch_norm, and convert_pt2e folds with it; a channel whose running variance is near
    1e-3 is scaled up. QCD027 said the float reference was the conv before its BatchNorm (the
    capture had folded it already) with a fix that changed nothing. It names the eps now, and
    its fix (eps 1e-05 with the variance shifted, before export) brings the conv back to its
    floor."""
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    torch.manual_seed(0)
    model, x = _YoloConv(), torch.randn(8, 3, 12, 12)
    with torch.no_grad():  # small variances, as dark or low-contrast inputs give
        model.conv.weight.mul_(0.02)
        model.bn.running_var.copy_(torch.logspace(-5, -1, 8) * 0.04)
    model.eval()
    bundle = qconvdiag.capture_model(model, _qat_converted(model, x), x)
    assert bundle.layer("conv").case.folded_bn.eps == 1e-3
    again = bundle_from_mapping(bundle_to_mapping(bundle), "b.pt")
    assert again.layer("conv").case.folded_bn == bundle.layer("conv").case.folded_bn
    report = walk_model(again, WalkOptions(top=1)).report
    (named,) = [f for f in report.details[0].report.findings if f.code == "QCD027"]
    assert named.severity == "error"
    assert named.title == "BatchNorm bn folded with eps 1e-05, not its 0.001"
    assert named.evidence["folded_eps"] == 1e-5 and "pytorch/ao#4107" in named.message
    exec(compile(named.fix, "QCD027 fix", "exec"), {"model": model, "torch": torch})  # noqa: S102
    fixed = walk_model(qconvdiag.capture_model(model, _qat_converted(model, x), x),
                       WalkOptions(top=0)).report
    conv = fixed.layer("conv")
    assert conv.verdict == "at_floor" and conv.own.sqnr_db > 35
    assert report.layer("conv").own.sqnr_db < 0
