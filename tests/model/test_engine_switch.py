"""QCD067: the engine set after convert does not repack the convs' weights, so the walk finds
the engine whose kernels ran them (model/engine.py) and emulates that one."""

from __future__ import annotations

import warnings

import pytest
import torch

import qconvdiag
from qconvdiag.model.engine import layer_engine
from qconvdiag.model.walk import WalkOptions, walk_model
from tests import models


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


def _walk(f, q, torch_check="diagnosed"):  # noqa: ANN001, ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bundle = qconvdiag.capture_model(f, q, models.inputs(2, 8, 7))
    return bundle, walk_model(bundle, WalkOptions(top=1, torch_check=torch_check))


def _qcd067(d):  # noqa: ANN001, ANN202
    return [f for f in d.report.findings if f.code == "QCD067"]


@pytest.mark.parametrize(("packed", "set_after"), [("fbgemm", "qnnpack"),
                                                    ("qnnpack", "x86")])
def test_engine_set_after_convert_is_found_and_emulated(packed, set_after):  # noqa: ANN001
    f, q = models.eager(packed)
    torch.backends.quantized.engine = set_after
    bundle, d = _walk(f, q, torch_check="all")
    assert bundle.engine == set_after  # what torch said at capture
    (finding,) = _qcd067(d)
    ev = finding.evidence
    assert ev["recorded_engine"] == set_after and sum(ev["mismatches"].values()) > 0
    # graded by what the recorded engine's kernels would cost: these healthy convs compute
    # other codes there, at about the same error
    assert set(ev["extra_energy"]) == set(ev["mismatches"])
    assert finding.severity == ("warning" if ev["costly"] else "info")
    assert ev["convs_checked"] == len(bundle.layers)
    # the walk ran on an engine whose emulation reproduces every conv's codes
    ran = d.report.engine
    assert ran == ev["engine_that_ran"] != set_after
    assert (ran == "qnnpack") == (packed == "qnnpack")
    for row in d.report.layers:
        assert row.engine == ran and row.torch_mismatches == 0, row.name
        assert not [x for x in row.findings if x.severity != "info"], (row.name, row.findings)
    assert any("QCD067" in n for n in d.report.notes)
    # a conv packed for another engine is not a stale qnnpack requantization (QCD068), even
    # where no conv is checked and QCD067 cannot say which engine ran
    quiet = walk_model(bundle, WalkOptions(top=0)).report
    assert not [x for x in quiet.findings if x.code == "QCD068"] and not bundle.stale
    # trace on a layer of the bundle takes the engine that ran it too
    assert layer_engine(bundle, ev["mismatches"].popitem()[0]) == ran


def test_its_fix_packs_the_weights_for_the_engine_set():
    f, q = models.eager("fbgemm")
    torch.backends.quantized.engine = "qnnpack"
    _b, d = _walk(f, q)
    (finding,) = _qcd067(d)
    namespace = {"quantized": q}
    exec(finding.fix, namespace)  # noqa: S102 - the finding's own fix, as a user pastes it
    bundle, d = _walk(f, q, torch_check="all")
    assert not _qcd067(d)
    assert d.report.engine == bundle.engine == "qnnpack"
    assert all(row.torch_mismatches == 0 for row in d.report.layers)


def test_no_finding_where_the_engine_was_not_switched():
    f, q = models.eager("qnnpack")
    bundle, d = _walk(f, q, torch_check="all")
    assert not _qcd067(d) and d.report.engine == bundle.engine == "qnnpack"
    assert layer_engine(bundle, bundle.layers[0].name) == "qnnpack"


def test_a_bundle_from_another_cpu_keeps_its_mismatches(tmp_path):  # noqa: ANN001
    """Another CPU's kernels differ for that reason alone: no engine is inferred there (nor in
    a bundle that does not say which CPU captured it)."""
    import dataclasses

    from qconvdiag.arithmetic.cpu import isa_flags
    from qconvdiag.model.bundle import load_bundle

    f, q = models.eager("fbgemm")
    torch.backends.quantized.engine = "qnnpack"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qconvdiag.capture_model(f, q, models.inputs(2, 8, 7), tmp_path / "m.pt")
    bundle = load_bundle(tmp_path / "m.pt")
    assert bundle.cpu_flags == isa_flags()  # written and read back
    for flags in (("avx2", "fma"), None):
        other = dataclasses.replace(bundle, cpu_flags=flags)
        d = walk_model(other, WalkOptions(top=1, torch_check="all"))
        assert not _qcd067(d) and d.report.engine == "qnnpack"
        assert sum(row.torch_mismatches or 0 for row in d.report.layers) > 0


def test_qparams_set_after_the_first_run_on_qnnpack_are_named():
    """qnnpack keeps the requantization of a conv's first run: a scale set afterwards is not
    what the kernel computed with. QCD068 names the conv; its fix packs it again, after which
    the scale takes effect (and, 4x too coarse, is judged as such). Set before the first run
    (the near miss), the scale is what ran: no QCD068."""
    f, q = models.eager("qnnpack")
    x = models.inputs(2, 8, 7)
    with torch.no_grad():
        q(x)  # the model ran
    q.dw.scale = q.dw.scale * 4
    _b, d = _walk(f, q, torch_check="all")
    (stale,) = [x for x in d.report.findings if x.code == "QCD068"]
    assert stale.severity == "error" and stale.evidence["convs"][0]["layer"] == "dw"
    assert stale.evidence["convs"][0]["differ"] > 0 and not _qcd067(d)
    exec(stale.fix, {"quantized": q})  # noqa: S102 - the finding's own fix
    _b, d = _walk(f, q, torch_check="all")
    assert not [x for x in d.report.findings if x.code == "QCD068"]
    assert all(row.torch_mismatches == 0 for row in d.report.layers)
    f, q = models.eager("qnnpack")
    q.dw.scale = q.dw.scale * 4  # before any run: what qnnpack computes with
    _b, d = _walk(f, q, torch_check="all")
    assert not [x for x in d.report.findings if x.code == "QCD068"]
    assert all(row.torch_mismatches == 0 for row in d.report.layers)


def test_qcd068_s_fix_for_many_convs_stays_within_80_columns_and_runs() -> None:
    from qconvdiag.model.stale import StaleRequantization, qcd068

    names = [f"backbone.stage{i}.block{j}.conv{k}" for i in range(2) for j in range(2)
             for k in (1, 2)]
    finding = qcd068(tuple(StaleRequantization(n, 3, 100) for n in names))
    assert finding is not None and max(map(len, finding.fix.splitlines())) <= 80

    class Conv:
        repacked = 0

        def weight(self) -> str:
            return "w"

        def bias(self) -> str:
            return "b"

        def set_weight_bias(self, w: str, b: str) -> None:
            assert (w, b) == ("w", "b")
            Conv.repacked += 1

    class Model:
        def get_submodule(self, name: str) -> Conv:
            assert name in names
            return Conv()

    exec(finding.fix, {"quantized": Model()})  # noqa: S102 - the finding's own fix
    assert Conv.repacked == len(names)


def test_an_engine_switch_that_would_cost_is_a_warning():
    """A model packed for qnnpack (8-bit activations) captured with the engine set to fbgemm:
    fbgemm's depthwise kernel sums int16 pairs on every CPU, and this depthwise conv's
    inputs near code 255 with every tap near 127 saturate them. Repacked for fbgemm (as
    load_state_dict in an fbgemm process does), dw would lose most of its SQNR: a warning
    that names it; where the recorded engine computes other codes at no cost, info."""
    import copy

    from torch.ao.quantization import fuse_modules

    from qconvdiag.measure.budget import MATERIAL

    torch.manual_seed(0)
    torch.backends.quantized.engine = "qnnpack"
    f = models.Net2d().eval()
    models._randomize_bn(f, 0)
    with torch.no_grad():
        f.dw.weight.copy_(torch.rand_like(f.dw.weight) * 0.2 + 0.8)  # every tap alike
        f.stem.weight.mul_(0.05)  # the stem's outputs near its bias: dw's input codes high
        f.bn1.bias.add_(2.0)
    q = copy.deepcopy(f)
    fuse_modules(q, models.FUSE_2D, inplace=True)
    q = models.quantize_fused(q, "qnnpack")
    torch.backends.quantized.engine = "fbgemm"
    bundle, d = _walk(f, q, torch_check="all")
    (finding,) = _qcd067(d)
    ev = finding.evidence
    assert finding.severity == "warning" and ev["costly"] == ["dw"], ev
    floor = next(row for row in d.report.layers if row.name == "dw").floor_rmse
    assert ev["extra_energy"]["dw"] >= MATERIAL * floor ** 2
    assert "with fbgemm's kernels dw would lose" in finding.message
    assert d.report.engine == "qnnpack"  # the walk still emulates the kernels that ran


def test_a_stale_qnnpack_conv1d_is_refused_not_raised():
    """A qnnpack Conv1d whose scale was set after its first run: the stale-requantization
    check repacks a copy on another engine, where torch reads a qnnpack-packed conv1d back
    with an IndexError, which leaked through capture (helper-49). It is refused as the Conv2d
    is, in one line."""
    from torch.ao.quantization import DeQuantStub, QuantStub, convert, get_default_qconfig, prepare

    from qconvdiag.errors import QconvdiagError

    torch.manual_seed(0)
    torch.backends.quantized.engine = "qnnpack"
    conv, x = torch.nn.Conv1d(4, 8, 1), torch.randn(1, 4, 7)
    m = torch.nn.Sequential(QuantStub(), conv, DeQuantStub()).eval()
    m.qconfig = get_default_qconfig("qnnpack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = prepare(m)
        p(x)
        q = convert(p)
    qm, qx = q[1], q[0](x)
    qm(qx)  # the first run keeps its requantization
    qm.scale = float(qm.scale) / 8
    with pytest.raises(QconvdiagError, match="computes other codes than its own state"):
        qconvdiag.capture(conv, x, qconv=qm, qinput=qx)
