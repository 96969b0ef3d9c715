"""A PT2E residual model: X86InductorQuantizer annotates conv + add (+ ReLU) so the conv before
each add keeps a float32 output (inductor fuses the add into qconv_pointwise as a binary
post-op). capture_model keeps those convs too, judged on the kernel's float32 output."""

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
from qconvdiag.arithmetic.torch_ref import run_inductor_conv
from qconvdiag.errors import UsageError
from qconvdiag.model.walk import WalkOptions, walk_model
from tests.cpu import pairs_here


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class ResNet(nn.Module):
    """A stem, then two residual blocks (conv-BN-ReLU, conv-BN, add, ReLU)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = Block(8)
        self.layer2 = Block(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(self.layer1(self.relu(self.bn(self.stem(x)))))


CONVS = ["stem", "layer1.conv1", "layer1.conv2", "layer2.conv1", "layer2.conv2"]
FLOAT32 = {"layer1.conv2", "layer2.conv2"}


@pytest.fixture(scope="module")
def walked(tmp_path_factory):  # noqa: ANN001, ANN201
    """The float model, its convert_pt2e twin (X86InductorQuantizer's default config,
    calibrated on every batch: a healthy model), the bundle as read back, and its walk.
    Healthy on every CPU: where oneDNN sums u8*s8 products in saturating int16 pairs (no VNNI)
    the config takes 7-bit activations (reduce_range), as torchao's docstring advises there;
    8-bit ones saturate those sums (QCD040 on the stem, and the convs before an add leave
    their weight's floor)."""
    pt2e.require_torchao()
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    torch.manual_seed(0)
    model = ResNet().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(4, 3, 8, 8, generator=gen) for _ in range(2)]
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(
        reduce_range=pairs_here("x86_inductor")))
    exported = torch.export.export(model, (batches[0],), strict=True).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for b in batches:
            prepared(b)
    converted = convert_pt2e(prepared)
    path = tmp_path_factory.mktemp("res") / "res.safetensors"
    qconvdiag.capture_model(model, converted, batches, path, calibration=batches)
    bundle = qconvdiag.load_bundle(path)
    return model, batches, bundle, walk_model(bundle, WalkOptions(top=2, torch_check="all"))


def test_every_conv_is_captured_the_ones_before_an_add_as_float32(walked):  # noqa: ANN001
    _model, _batches, bundle, _walk = walked
    assert [lay.name for lay in bundle.layers] == CONVS
    assert {lay.name for lay in bundle.layers if lay.output_float32} == FLOAT32
    assert not any("left out" in n for n in bundle.notes)
    for name in FLOAT32:
        lay = bundle.layer(name)
        assert lay.quantized_output.dtype == np.float32
        assert lay.bn_folded == name.replace("conv", "bn")
        assert "float32" in lay.notes[0] and "add is not modelled" in lay.notes[0]


def test_float32_output_is_the_kernels_on_the_codes_received(walked):  # noqa: ANN001
    """The captured float32 output is qconv_pointwise's with output dtype float32, on the input
    codes the conv received; the float conv on those codes dequantized is within the weight's
    rounding of it."""
    _model, _batches, bundle, _walk = walked
    for name in FLOAT32:
        lay = bundle.layer(name)
        s = lay.case.setup
        r = run_inductor_conv(s.input_codes, s.input_qparams, s.module.weight_codes,
                              s.module.weight_qparams, s.module.bias, 1.0, 0,
                              lay.case.geometry, float_output=True)
        assert r.ran and r.output_float is not None
        assert np.array_equal(r.output_float, lay.quantized_output), name


def test_torch_check_is_bit_exact_and_the_screen_has_no_output_stage(walked):  # noqa: ANN001
    _model, _batches, bundle, walk = walked
    report = walk.report
    for row in report.layers:
        assert row.torch_mismatches == 0, row.name
        assert row.torch_total == bundle.layer(row.name).quantized_output.size
        fp32 = row.name in FLOAT32
        assert row.output_dtype == ("float32" if fp32 else "quint8")
        if fp32:
            assert row.dominant_stage in ("weight_rounding", "weight_clipping")
            assert not row.diagnosed and row.findings == ()
            assert 0 < row.own.rmse <= 1.5 * row.floor_rmse
            # propagated: the float model's own output at that conv (its folded BatchNorm)
            assert row.propagated.rmse > row.own.rmse
    # the explained layers are the worst quantized-output ones
    assert len(report.details) == 2
    assert not {d.layer for d in report.details} & FLOAT32
    # the HTML page's table marks the float32 convs
    from qconvdiag.render.html_model import layer_table

    assert layer_table(report).count("(float32 output: screened only)") == len(FLOAT32)
    # the report's sentence says what was compared: codes, and the float32 outputs bit for bit
    from qconvdiag.render.rich_model import torch_sentence

    assert torch_sentence(report) == (
        "torch check: the emulation gives the codes, and float32 outputs bit for bit "
        f"({len(FLOAT32)} of those convs), the quantized model computed on every conv: "
        f"{sum(r.torch_total for r in report.layers):,} outputs, 0 differ.")


def test_a_healthy_residual_model_stays_quiet_and_validates(walked):  # noqa: ANN001
    _model, _batches, _bundle, walk = walked
    report = walk.report
    assert report.status == "ok"
    for row in report.layers:
        assert all(f.severity == "info" for f in row.findings), (row.name, row.findings)
    data = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    schema = json.loads(resources.files("qconvdiag").joinpath("report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert [lay["output_dtype"] for lay in data["layers"]] == [
        "float32" if n in FLOAT32 else "quint8" for n in CONVS]


def test_a_float32_layer_is_screened_only(walked):  # noqa: ANN001
    _model, _batches, bundle, _walk = walked
    with pytest.raises(UsageError, match="float32"):
        walk_model(bundle, WalkOptions(top=0, layers=("layer1.conv2",)))
