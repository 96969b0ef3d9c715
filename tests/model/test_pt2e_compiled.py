"""A convert_pt2e model given to capture_model as torch.compile returned it: what it wraps is
captured, how it was compiled is kept in the bundle, and QCD063 names a compile that keeps the
int8 kernels from running (inductor without freezing, or another backend). Its fix runs, and
the claims it rests on are checked against torch.compile itself."""

from __future__ import annotations

import json
import warnings
from importlib import resources

import jsonschema
import pytest
import torch

import qconvdiag
from qconvdiag.errors import CaseFileError
from qconvdiag.findings import CODES, MODEL_CODES
from qconvdiag.io import BUNDLE_KEY
from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping, save_bundle
from qconvdiag.model.compiled import CODE, FIX, CompiledWith
from qconvdiag.model.walk import WalkOptions, walk_model
from tests import models as models_of_eager_flow
from tests.cpu import pairs_here
from tests.model.test_pt2e_model import build


def _saturated() -> list[str]:
    """The convs of build()'s model whose int16 pair sums saturate on this CPU: it keeps
    X86InductorQuantizer's default 8-bit activations, which saturate the stem's and the last
    conv's (whose output is float32) where oneDNN sums u8*s8 products in int16 pairs (no
    VNNI); QCD040 names that, an error (each layer's own gate breach, beside QCD063's
    model-wide one)."""
    return ["stem", "last"] if pairs_here("x86_inductor") else []


@pytest.fixture(scope="module")
def models():  # noqa: ANN201
    return build()


@pytest.fixture(autouse=True)
def _inductor_config():  # noqa: ANN202
    """Every test starts with freezing off and leaves it as it was, and no compiled code
    behind (torch's config module is assigned, not monkeypatched: monkeypatch's undo deletes
    an attribute the module serves through __getattr__)."""
    before = torch._inductor.config.freezing
    torch._inductor.config.freezing = False
    yield
    torch._inductor.config.freezing = before
    torch._dynamo.reset()


def _walk(models, compiled, **options):  # noqa: ANN001, ANN003, ANN202
    model, _converted, batches = models
    bundle = qconvdiag.capture_model(model, compiled, batches[:1])
    return bundle, walk_model(bundle, WalkOptions(top=0, **options)).report


def test_compiled_without_freezing_is_named_with_its_numbers(models):  # noqa: ANN001
    bundle, report = _walk(models, torch.compile(models[1]), fail_on="warning")
    c = bundle.compiled
    assert c is not None and (c.backend, c.freezing_option, c.freezing_config, c.conv_ops,
                              c.error) == ("inductor", None, False,
                                           ("aten::mkldnn_convolution",), None)
    assert c.qdq_outputs == sum(lay.quantized_output.size for lay in bundle.layers
                                if not lay.output_float32)
    (f,) = report.findings
    assert (f.code, f.severity) == (CODE, "warning")
    assert (f"{c.qdq_differ:,} of {c.qdq_outputs:,} output codes" if c.qdq_differ
            else f"none of the {c.qdq_outputs:,} output codes") in f.message
    assert "freezing off" in f.message and f.fix == FIX
    assert "it ran aten::mkldnn_convolution (torch's profiler)" in f.message
    assert [b.layer for b in report.gate.breaches] == ["(model)", *_saturated()]
    loud = {r.name: [(f.code, f.severity) for f in r.findings if f.severity != "info"]
            for r in report.layers}
    assert {n: v for n, v in loud.items() if v} == {
        n: [("QCD040", "error")] for n in _saturated()}
    from qconvdiag.render.rich_model import summary_sentence

    assert f"Beyond its convs, the model as a whole: {CODE} (warning" in summary_sentence(report)
    assert report.status == "fail"
    schema = json.loads(resources.files("qconvdiag").joinpath(
        "report.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(report.to_dict())), schema)
    # the same layers as the graph captured as it is: the wrapper changes nothing else
    plain = walk_model(qconvdiag.capture_model(models[0], models[1], models[2][:1]),
                       WalkOptions(top=0)).report
    assert [r.to_dict() for r in report.layers] == [r.to_dict() for r in plain.layers]
    assert plain.findings == ()
    from qconvdiag.render.html_model import render_model_html

    page = render_model_html(walk_model(bundle, WalkOptions(top=0)))
    assert f'id="model-{CODE}"' in page and "compiled without freezing" in page


def test_what_ran_decides_not_the_config_at_capture(models):  # noqa: ANN001
    """Frozen through the config: quiet. Compiled and run under config.patch(freezing=True),
    captured outside it: quiet too (the int8 kernel ran). Compiled and run without freezing,
    the config set only afterwards: named (the model still runs the float32 conv)."""
    converted, x = models[1], models[2][0]
    torch._inductor.config.freezing = True
    frozen = torch.compile(converted)
    assert _walk(models, frozen)[1].findings == ()
    assert _walk(models, frozen)[0].compiled.conv_ops == ("onednn::qconv_pointwise",)
    torch._dynamo.reset()
    torch._inductor.config.freezing = False
    patched = torch.compile(converted)
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        patched(x)
    assert _walk(models, patched)[1].findings == ()
    torch._dynamo.reset()
    early = torch.compile(converted)
    with torch.no_grad():
        early(x)
    torch._inductor.config.freezing = True
    (f,) = _walk(models, early)[1].findings
    assert f.severity == "warning" and "was compiled before, at its first call" in f.message
    assert _walk(models, early, ignore=(CODE,))[1].findings == ()


def test_the_freezing_option_fails_and_is_an_error(models):  # noqa: ANN001
    """options={'freezing': True} with the config off: the compiled model fails at its first
    call (torch 2.13); the capture goes on with the graph, and QCD063 is an error."""
    bundle, report = _walk(models, torch.compile(models[1], options={"freezing": True}))
    assert "qconv_prepack" in (bundle.compiled.error or "")
    (f,) = report.findings
    assert f.severity == "error" and "failed" in f.message and f.fix == FIX
    assert any("failed" in n and "captured is the graph" in n for n in bundle.notes)
    torch._dynamo.reset()
    torch._inductor.config.freezing = True  # the option off overrides the config on
    (f,) = _walk(models, torch.compile(models[1], options={"freezing": False}))[1].findings
    assert "options={'freezing': False}" in f.message


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch's, copying a GraphModule
def test_a_model_compiled_in_place_is_seen(models):  # noqa: ANN001
    model, converted, batches = models
    import copy

    in_place = copy.deepcopy(converted)
    in_place.compile()
    bundle, report = _walk(models, in_place)
    assert bundle.compiled is not None and bundle.compiled.backend == "inductor"
    assert [f.code for f in report.findings] == [CODE]
    assert in_place._compiled_call_impl is not None  # left compiled, as it was given


def test_a_compiled_float_model_keeps_its_module_names(models):  # noqa: ANN001
    model, converted, batches = models
    bundle = qconvdiag.capture_model(torch.compile(model), converted, batches[:1])
    assert [lay.bn_folded for lay in bundle.layers][0] == "bn"  # not '_orig_mod.bn'


def test_another_backend_is_named(models):  # noqa: ANN001
    (f,) = _walk(models, torch.compile(models[1], backend="aot_eager"))[1].findings
    assert "backend 'aot_eager'" in f.message


def test_a_compiled_eager_model_is_captured_without_a_finding():
    engine = torch.backends.quantized.engine
    model, quantized = models_of_eager_flow.eager("x86")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bundle = qconvdiag.capture_model(model, torch.compile(quantized),
                                             models_of_eager_flow.inputs(2, 8, 7))
    finally:
        torch.backends.quantized.engine = engine
    assert bundle.compiled is not None and bundle.compiled.backend == "inductor"
    assert any("torch.compile wraps" in n for n in bundle.notes)
    assert walk_model(bundle, WalkOptions(top=0)).report.findings == ()


def test_the_bundle_keeps_how_the_model_was_compiled(models, tmp_path):  # noqa: ANN001
    bundle, _report = _walk(models, torch.compile(models[1]))
    for suffix in (".pt", ".safetensors"):
        path = save_bundle(bundle, tmp_path / f"b{suffix}")
        assert qconvdiag.load_bundle(path).compiled == bundle.compiled
    mapping = bundle_to_mapping(bundle)
    mapping[BUNDLE_KEY]["compiled"] = {
        "backend": "inductor", "freezing_option": "yes", "freezing_config": False}
    with pytest.raises(CaseFileError, match="'compiled' must hold"):
        bundle_from_mapping(mapping, "b.pt")
    assert CompiledWith.from_mapping(bundle.compiled.to_dict(), "b") == bundle.compiled


def test_qcd063_is_a_code_ignore_accepts(tmp_path, models):  # noqa: ANN001
    from typer.testing import CliRunner

    from qconvdiag.cli import app

    assert CODE in MODEL_CODES and CODE in CODES
    path = tmp_path / "compiled.pt"
    qconvdiag.capture_model(models[0], torch.compile(models[1]), models[2][:1], path)
    runner = CliRunner()
    # the stem's QCD040, where 8-bit activations saturate (_saturated), is not this test's
    # subject: ignored there, QCD063 alone decides both exit codes
    args = ["explain", str(path), "--top", "0", "--fail-on", "warning",
            *(["--ignore", "QCD040"] if _saturated() else [])]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and CODE in r.stdout
    r = runner.invoke(app, [*args, "--ignore", CODE])
    assert r.exit_code == 0 and CODE not in r.stdout


# torch's and torchao's own deprecation notices are theirs, not the test's subject
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
def test_the_claims_and_the_fix(models):  # noqa: ANN001
    """Compiled without freezing, the model runs float32 convs (aten.mkldnn_convolution), no
    int8 kernel; QCD063's fix, pasted after it, compiles it with freezing: then it runs
    onednn.qconv_pointwise and computes, bit for bit, what torchao's lowering of the graph to
    that kernel computes."""
    from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

    _model, converted, batches = models
    x = batches[0]
    with torch.no_grad():
        kernel = lower_pt2e_quantized_to_x86(converted, (x,))(x)
    assert _convs_run(torch.compile(converted), x) == {"aten::mkldnn_convolution"}
    scope = {"torch": torch, "converted": converted, "x": x}
    exec(compile(FIX, "QCD063 fix", "exec"), scope)
    assert torch._inductor.config.freezing
    assert torch.equal(scope["y"], kernel)
    assert _convs_run(scope["compiled"], x) == {"onednn::qconv_pointwise"}


def _convs_run(compiled, x: torch.Tensor) -> set[str]:  # noqa: ANN001
    """The conv ops a (compiled) model runs on ``x``: torch's profiler's names."""
    with torch.no_grad():
        compiled(x)  # compiles, if not yet
        with torch.profiler.profile() as prof:
            compiled(x)
    names = {e.key for e in prof.key_averages() if "conv" in e.key.lower()}
    return {n for n in names if n not in ("aten::convolution", "aten::_convolution")}


def test_qcd063_fires_on_a_pt2e_model_whose_int8_kernels_do_not_run():
    from qconvdiag.model.compiled import qcd063

    f = qcd063(CompiledWith("inductor", None, False, 5, 100), pt2e=True)
    assert f is not None and "they differ on 5 of 100 output codes" in f.message
    assert qcd063(CompiledWith("inductor", None, False, 5, 100), pt2e=False) is None
    assert qcd063(CompiledWith("inductor", True, False), pt2e=True) is None
    assert qcd063(CompiledWith("inductor", None, True), pt2e=True) is None
    assert qcd063(CompiledWith("inductor", False, True), pt2e=True) is not None
    assert qcd063(CompiledWith("eager", None, True), pt2e=True) is not None


def test_running_the_compiled_model_prints_nothing(models, capfd):  # noqa: ANN001
    """The profiler's C++ side writes its start and stop to stderr; torch's compile logs: none
    of it reaches the terminal."""
    capfd.readouterr()
    _walk(models, torch.compile(models[1]))
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
