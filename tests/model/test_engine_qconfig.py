"""Another engine's qconfig: x86's default (reduce_range=True, 7-bit activations, which only
fbgemm's and x86's int16 pair sums on CPUs without VNNI need) on a model that runs on qnnpack,
whose kernels sum exactly. Every conv's output step is twice what its range needs; QCD052 said
only "output step too coarse" and fixed each conv's qparams by hand, one at a time. It now says
the outputs are on 128 levels where qnnpack takes 256, the model-wide sentence names the
qconfig, and the fix quantizes the model with qnnpack's default qconfig: run, the findings are
gone and every conv gains."""

from __future__ import annotations

import copy
import warnings

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402
from qconvdiag.findings.output_rules import REDUCED_TITLE  # noqa: E402
from qconvdiag.model.walk import WalkOptions, walk_model  # noqa: E402
from qconvdiag.render.rich_model import shared_cause_sentence  # noqa: E402
from tests import models  # noqa: E402

BATCHES = [models.inputs(2, 8, 100 + i) for i in range(4)]


def _quantized(fused: torch.nn.Module, qconfig_engine: str) -> torch.nn.Module:
    """``fused`` quantized with ``qconfig_engine``'s default qconfig, calibrated on BATCHES."""
    from torch.ao.quantization import get_default_qconfig

    return models.quantize_fused(copy.deepcopy(fused), torch.backends.quantized.engine,
                                 qconfig=get_default_qconfig(qconfig_engine))


def _walk(model: torch.nn.Module, quantized: torch.nn.Module, top: int = 0):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(model, quantized, models.inputs(2, 8, 7),
                                         calibration=BATCHES)
    return walk_model(bundle, WalkOptions(top=top)).report


def test_x86_s_qconfig_on_qnnpack_is_named_and_its_fix_runs():
    from torch.ao.quantization import fuse_modules

    torch.backends.quantized.engine = "qnnpack"
    torch.manual_seed(0)
    model = models.Net2d().eval()
    models._randomize_bn(model, 0)
    fused = fuse_modules(copy.deepcopy(model), models.FUSE_2D)
    report = _walk(model, _quantized(fused, "x86"), top=1)
    named = [r.name for r in report.layers for f in r.findings if f.title == REDUCED_TITLE]
    assert len(named) >= 2, [(r.name, r.findings) for r in report.layers]
    assert "get_default_qconfig('qnnpack')" in (shared_cause_sentence(report) or "")
    (detail,) = report.details
    (found,) = [f for f in detail.report.findings
                if f.code == "QCD052" and f.path == "as_given"]
    assert "Its codes span 128 levels" in found.message and found.evidence["reduce_range"]
    assert 'get_default_qconfig("qnnpack")' in found.fix
    scope = {"torch": torch, "model": copy.deepcopy(fused), "calibration_batches": BATCHES}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(found.fix, "QCD052 fix", "exec"), scope)  # noqa: S102
    # x86's per-channel weights are kept (qnnpack's default qconfig would make them per
    # tensor, which cost more than the 8 bits gained on a layer whose channels differ)
    assert "per_channel" in str(scope["quantized"].stem.weight().qscheme())
    fixed = _walk(model, scope["quantized"])
    assert not [f for r in fixed.layers for f in r.findings if f.code == "QCD052"]
    for before, after in zip(report.layers, fixed.layers):  # each named conv gains
        if before.name in named:
            assert after.own.sqnr_db > before.own.sqnr_db + 3, before.name
    # qnnpack's own qconfig, from the start: nothing of the kind
    healthy = _walk(model, _quantized(fused, "qnnpack"))
    assert not [f for r in healthy.layers for f in r.findings if f.code == "QCD052"]
