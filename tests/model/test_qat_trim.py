"""A QAT model's output ranges come from its fake quantization's moving average of each
training batch's range, which leaves a batch's largest values out: the model trained with
that clip, and the layers after the conv learned on outputs clipped there. Such a trim
(TRIMMED_OUTLIERS of the outputs at most, the range keeping TRIM_KEEPS of the reach) is said
(QCD051 info), even where it lifts the conv far above its floor against its float twin; on a
post-training model, or past the trim's thresholds, it keeps its severity. (A PT2E QAT digits
CNN of a helper's: 97 of 65536 outputs clipped, 8.7x the floor, an error, with the quantized
model as accurate as the float one.)"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

import qconvdiag  # noqa: E402
from qconvdiag import torchao_import as pt2e  # noqa: E402
from qconvdiag.case import QAT_NOTE, QAT_PT2E_NOTE  # noqa: E402

#: The observers see batches growing this much over their passes (the EMA lags the last), and
#: the walk a batch this much larger than the first ones: a trim of the top outputs.
GROW = 0.6


@pytest.fixture(autouse=True)
def _engine_restored():  # noqa: ANN202
    engine = torch.backends.quantized.engine
    yield
    torch.backends.quantized.engine = engine


class _Net(torch.nn.Module):
    def __init__(self, eager: bool = False) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.stem, self.r1 = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU()
        self.mid, self.r2 = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.ReLU()
        self.last = torch.nn.Conv2d(16, 8, 1)
        self.eager = eager

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.eager:
            x = self.quant(x)
        x = self.last(self.r2(self.mid(self.r1(self.stem(x)))))
        return self.dequant(x) if self.eager else x


def _batches() -> list:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, 16, 16, generator=gen) for _ in range(4)]


def _observe(model: torch.nn.Module, batches: list) -> None:
    """The observers' passes, as training runs them: the batches grow by GROW over them."""
    with torch.no_grad():
        for i in range(40):
            model(batches[i % 3] * (1 + GROW * i / 39))


def _pt2e(qat: bool = True) -> tuple[torch.nn.Module, torch.fx.GraphModule, list]:
    pt2e.require_torchao()
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import (
        convert_pt2e,
        prepare_pt2e,
        prepare_qat_pt2e,
    )
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    torch.manual_seed(0)
    model, batches = _Net(), _batches()
    exported = torch.export.export(model.train() if qat else model.eval(), (batches[0],),
                                   strict=True).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=qat))
    prepared = (prepare_qat_pt2e if qat else prepare_pt2e)(exported, quantizer)
    _observe(prepared, batches)
    if qat:
        move_exported_model_to_eval(prepared)
    return model.eval(), convert_pt2e(prepared), [batches[3] * (1 + GROW)]


def _walk(model: torch.nn.Module, quantized: torch.nn.Module, batches: list):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qconvdiag.diagnose_model(model, quantized, batches, top=0)


def _qcd051(report) -> dict[str, str]:  # noqa: ANN001
    return {row.name: f.severity for row in report.layers for f in row.findings
            if f.code == "QCD051"}


def test_a_pt2e_qat_trim_is_said_even_where_it_breaks_the_conv() -> None:
    report = _walk(*_pt2e(qat=True))
    broken = [row.name for row in report.layers if row.verdict == "broken"]
    assert broken, [(row.name, row.verdict) for row in report.layers]
    assert all(_qcd051(report).get(name) == "info" for name in broken), _qcd051(report)
    assert not [(row.name, f.code) for row in report.layers for f in row.findings
                if f.severity != "info"]
    assert all(QAT_PT2E_NOTE in row.notes for row in report.layers)


def test_without_the_qat_annotation_the_same_trim_is_an_error() -> None:
    # the same converted graph, its quantizer's annotations dropped: nothing says QAT trained
    # through these ranges, and a trim that breaks a conv costs what it measures
    model, converted, batches = _pt2e(qat=True)
    for node in converted.graph.nodes:
        node.meta.pop("quantization_annotation", None)
    report = _walk(model, converted, batches)
    assert "error" in _qcd051(report).values(), _qcd051(report)
    assert not any(QAT_PT2E_NOTE in row.notes for row in report.layers)


def test_a_qat_range_cut_past_the_trim_stays_an_error() -> None:
    # the mid conv's output scale cut to a quarter by hand after convert: most of its outputs
    # clip, no trim
    model, converted, batches = _pt2e(qat=True)
    conv = [n for n in converted.graph.nodes if n.op == "call_function"
            and "conv" in str(n.target)][1]
    q = next(iter(next(iter(conv.users)).users))  # conv -> relu -> quantize
    for node in (q, *q.users):
        node.args = (node.args[0], node.args[1] / 4, *node.args[2:])
    converted.recompile()
    assert _qcd051(_walk(model, converted, batches)).get("mid") == "error"


def _prepared_eager(engine: str, edit: Callable[[torch.nn.Module], None] | None = None
                    ) -> torch.nn.Module:
    """_Net (eager, seed 0) with ``edit`` applied to its float weights, fused and prepared for
    QAT with ``engine``'s default QAT qconfig (the engine set), in train mode."""
    from torch.ao.quantization import fuse_modules_qat, get_default_qat_qconfig, prepare_qat

    torch.manual_seed(0)
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _Net(eager=True).train()
        if edit is not None:
            with torch.no_grad():
                edit(model)
        fuse_modules_qat(model, [["stem", "r1"], ["mid", "r2"]], inplace=True)
        model.qconfig = get_default_qat_qconfig(engine)
        prepare_qat(model, inplace=True)
    return model


def _converted(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` in eval mode, and convert's quantized copy of it."""
    from torch.ao.quantization import convert

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(copy.deepcopy(model))


def _eager_qat() -> tuple:
    """The eager QAT model (qnnpack: 8-bit activations, no reduce_range headroom) after the
    observers' passes, converted, and the batch they lag (GROW larger)."""
    batches = _batches()
    model = _prepared_eager("qnnpack")
    _observe(model, batches)
    return model, _converted(model), [batches[3] * (1 + GROW)]


def test_an_eager_qat_trim_is_said() -> None:
    report = _walk(*_eager_qat())
    broken = [row.name for row in report.layers if row.verdict != "at_floor"]
    assert broken, [(row.name, row.verdict) for row in report.layers]
    assert set(_qcd051(report).values()) == {"info"}, _qcd051(report)
    assert not [(row.name, f.code) for row in report.layers for f in row.findings
                if f.severity != "info"]


def test_a_qat_model_run_after_convert_keeps_its_note() -> None:
    # its fake quantizations observe in eval mode too: a few passes after convert move its
    # output scales (here 10 passes on a batch beyond its ranges: up to 7%) and a zero point by
    # 1 from what convert took (helper-62); many such passes move them past TRAINED_RTOL (50:
    # 30%), which the tutorial's disable_observer before evaluation avoids
    model, quantized, batches = _eager_qat()
    with torch.no_grad():
        for _ in range(10):
            model(batches[0])
    report = _walk(model, quantized, batches)
    assert all(QAT_NOTE in row.notes for row in report.layers)
    assert set(_qcd051(report).values()) == {"info"}, _qcd051(report)


def test_a_qat_output_scale_written_by_hand_is_graded() -> None:
    # the forum thread's edit, on a QAT model: the mid conv's output scale set after convert
    # to 0.8 of what its fake quantization applied, a trim-like clip: not what training saw
    model, quantized, batches = _eager_qat()
    quantized.mid.scale = float(quantized.mid.scale) * 0.8
    report = _walk(model, quantized, batches)
    assert QAT_NOTE not in report.layer("mid").notes
    assert _qcd051(report).get("mid") in ("warning", "error"), _qcd051(report)


def test_the_prepared_graph_as_float_model_is_refused_in_one_line() -> None:
    # users pass the graph they trained; it has no conv modules and refuses .eval(): the model
    # exported is the float model (export shares its parameters)
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    from qconvdiag.errors import CaseError

    model, converted, batches = _pt2e()
    exported = torch.export.export(_Net().train(), (batches[0],), strict=True).module()
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    prepared = prepare_qat_pt2e(exported, quantizer)
    with pytest.raises(CaseError, match="prepared PT2E graph") as caught:
        _walk(prepared, converted, batches)
    assert "\n" not in str(caught.value)
    assert "model you exported" in str(caught.value)


def _eager_qat_grown(grow: float, cut: float = 1.0) -> tuple:
    """The eager QAT model (x86, per-channel weights) after its observers' passes, then the
    weight observers frozen and two weights of the stem's first channel grown ``grow`` times
    (a weight that grows in training past the lagging moving average of its range), or its
    weight range (its observer's, which convert reads) cut ``cut`` times by hand; converted."""
    from torch.ao.quantization import disable_observer

    batches = _batches()
    model = _prepared_eager("x86")
    with torch.no_grad():
        for x in batches:
            model(x)
    model.apply(disable_observer)
    stem = model.stem
    with torch.no_grad():
        first = stem.weight[0].view(-1)
        top = first.abs().argsort(descending=True)[:2]
        first[top] *= grow
        observer = stem.weight_fake_quant.activation_post_process  # convert reads it
        observer.min_val /= cut
        observer.max_val /= cut
    return model, _converted(model), batches[:1]


def test_a_qat_weight_trim_is_said_even_where_it_breaks_the_conv() -> None:
    # helper-60's eager and PT2E QAT models: 2 and 4 of 144 stem weights clipped, 9.5x and 25x
    # the floor, an error whose fix cost the models 12 and 34 accuracy points
    report = _walk(*_eager_qat_grown(1.8))
    stem = report.layer("stem")
    assert stem.verdict == "broken", (stem.verdict, stem.own.rmse / stem.floor_rmse)
    (f020,) = [f for f in stem.findings if f.code == "QCD020"]
    assert f020.severity == "info"
    assert not [(row.name, f.code) for row in report.layers for f in row.findings
                if f.severity != "info"]


@pytest.mark.parametrize("cut", [1.5, 3.0])
def test_a_qat_weight_range_cut_by_hand_stays_an_error(cut) -> None:  # noqa: ANN001
    # the stem's weight range cut after training: convert's qparams are not the ones its fake
    # quantization applied, so no QAT note (a cut of 1.5x keeps two thirds of the reach, as a
    # lagging average may: only the fake quantization's own qparams tell them apart;
    # helper-61's review)
    report = _walk(*_eager_qat_grown(1.0, cut=cut))
    assert not any(QAT_NOTE in row.notes for row in report.layers if row.name == "stem")
    assert [f.severity for f in report.layer("stem").findings if f.code == "QCD020"] == [
        "error"]


def test_the_summary_says_a_qat_model_s_float_twin_is_not_what_training_fitted() -> None:
    from qconvdiag.render.rich_model import summary_sentence

    assert "QAT model's twin" in summary_sentence(_walk(*_pt2e()))
    assert "QAT model's twin" not in summary_sentence(_walk(*_pt2e(qat=False)))


@pytest.mark.parametrize("qat", [False, True])
def test_a_prepared_fx_model_is_still_taken_as_the_float_model(qat) -> None:  # noqa: ANN001
    # prepare_fx / prepare_qat_fx graphs call their conv modules: the model convert_fx was
    # called on is a float model capture hooks (the PT2E refusal left them alone)
    from torch.ao.quantization import (
        get_default_qat_qconfig_mapping,
        get_default_qconfig_mapping,
    )
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx

    torch.manual_seed(0)
    torch.backends.quantized.engine = "x86"
    x = _batches()[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _Net().train() if qat else _Net().eval()
        prepared = (prepare_qat_fx if qat else prepare_fx)(
            model, (get_default_qat_qconfig_mapping if qat else get_default_qconfig_mapping)(
                "x86"), (x,))
        prepared(x)
        prepared.eval()
        quantized = convert_fx(copy.deepcopy(prepared))
    report = _walk(prepared, quantized, [x])
    assert [row.name for row in report.layers] == ["stem", "mid", "last"]
    # prepare_qat_fx puts each conv's output fake quantization in the graph after its call:
    # the QAT note finds it there (it looked on the conv module only; helper-62)
    assert all((QAT_NOTE in row.notes) == qat for row in report.layers), [
        (row.name, row.notes) for row in report.layers]


def test_a_qat_trim_s_fix_changes_nothing() -> None:
    # its message says widening the range moves the conv toward a twin training did not fit:
    # its fix must not widen it (helper-61's review)
    from qconvdiag.findings.output_rules import QAT_TRIM_FIX

    model, converted, batches = _pt2e()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = qconvdiag.diagnose_model(model, converted, batches, top=3)
    fixes = [f.fix for d in report.details for f in d.report.findings
             if f.code == "QCD051" and f.path == "as_given"]
    assert fixes and all(fix == QAT_TRIM_FIX for fix in fixes)


def test_the_qat_trim_test_reads_bounds_on_any_axis() -> None:
    # per-channel bounds on axis 1: the channel cut to a third is no trim, whichever axis
    # holds the channels (it reduced over axes 1..n, the bounds' own axis included)
    import numpy as np

    from qconvdiag.findings.weight_rules import _qat_trim

    w = np.ones((4, 3, 2, 2), dtype=np.float32)
    w[0, 0, 0, 0] = 3.0  # channel 0's reach, clipped at 1: a third kept
    hi = np.array([1.0, 1.0, 3.0], dtype=np.float32).reshape(1, 3, 1, 1)  # channel 2 wide
    assert not _qat_trim(w, -hi, hi)
    assert _qat_trim(w, -hi, hi * np.array([1.6, 1, 1]).reshape(1, 3, 1, 1))  # over half kept


def test_a_one_sided_channel_keeps_the_qat_note() -> None:
    # torch's fused fake quantization applies a one-sided grid to a symmetric channel whose
    # weights all lie on one side (half convert's scale, zero point 127): one such channel
    # cost helper-63's QAT conv its note, and a trained clip came back as a warning
    def one_sided(net: torch.nn.Module) -> None:
        net.stem.weight[0] = -net.stem.weight[0].abs()

    batches = _batches()
    model = _prepared_eager("x86", one_sided)
    with torch.no_grad():
        for x in batches:
            model(x)
    quantized = _converted(model)
    applied = model.stem.weight_fake_quant
    assert int(applied.zero_point[0]) != 0  # the one-sided grid, as torch applies it
    report = _walk(model, quantized, batches[:1])
    assert QAT_NOTE in report.layer("stem").notes
