"""The command line: exit codes 0/1/2, JSON on stdout, chatter on stderr, files written whole."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from qconvdiag.cli import app
from tests.repo import ROOT

FORUM = str(ROOT / "samples" / "forum_conv.pt")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [*args, "--width", "80"] if args and args[0] in (
        "explain", "random") else list(args))


def _fix_lines(json_text: str) -> set[str]:
    return {line.strip() for f in json.loads(json_text)["findings"]
            for line in f["fix"].splitlines() if line.strip()}


def test_explain_forum_tells_the_story_first():
    r = invoke("explain", FORUM)
    assert r.exit_code == 0, r.output
    lines = [line.rstrip() for line in r.stdout.splitlines()]
    end_of_header = next(i for i, line in enumerate(lines) if line.startswith("╰"))
    assert lines[end_of_header + 1] == "verdict"
    story = "\n".join(lines[end_of_header + 2:end_of_header + 9])
    assert "as_given on x86 is broken" in story
    for i, code in enumerate(("QCD024", "QCD050", "QCD021"), 1):
        assert f"{i}. {code}" in story
    assert "first fix (QCD024):" in "\n".join(lines)
    for text in ("803.6908", "weight_clipping", "production"):
        assert text in r.stdout, text


@pytest.mark.parametrize("width", ["80", "40"])
def test_code_is_never_wrapped_and_prose_fits(width):
    """Piped (CliRunner) at any width, every line of every fix is printed whole; prose lines
    fit the width."""
    code = _fix_lines(runner.invoke(app, ["explain", FORUM, "--json"]).stdout)
    r = runner.invoke(app, ["explain", FORUM, "--width", width, "--verbose"])
    lines = [line.strip() for line in r.stdout.splitlines()]
    assert code <= set(lines), code - set(lines)
    prose = [line for line in r.stdout.splitlines() if line.strip() not in code]
    assert max(len(line.rstrip()) for line in prose) <= int(width)


@pytest.mark.parametrize("args", [("random", "--seed", "3"),
                                  ("explain", str(ROOT / "samples" / "relu_per_channel.npz"))])
def test_a_healthy_layer_s_report_is_short(args):
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert "Nothing is misconfigured" in r.stdout
    # a CPU without VNNI may add QCD040's info line (a few saturated pairs, at the floor)
    assert len(r.stdout.splitlines()) <= 31, r.stdout
    assert "first fix" not in r.stdout  # no finding worth a fix


def test_json_is_the_whole_stdout():
    r = invoke("explain", FORUM, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["kind"] == "conv" and data["schema_version"] == 2 and data["status"] == "ok"
    assert r.stderr == ""


def test_gates_exit_1():
    r = invoke("explain", FORUM, "--json", "--fail-under-sqnr", "30")
    assert r.exit_code == 1, r.output
    assert json.loads(r.stdout)["status"] == "fail"
    assert "gate" in r.stderr
    assert invoke("explain", FORUM, "--fail-on", "error").exit_code == 1
    assert invoke("explain", FORUM, "--max-abs-error", "1").exit_code == 1
    assert invoke("explain", FORUM, "--max-abs-error", "1000").exit_code == 0


def test_gate_passes_on_a_healthy_sample():
    r = invoke("explain", str(ROOT / "samples" / "relu_per_channel.npz"),
               "--fail-under-sqnr", "25", "--fail-on", "warning")
    assert r.exit_code == 0, r.output
    r = invoke("explain", str(ROOT / "samples" / "depthwise_outlier.safetensors"),
               "--fail-on", "warning")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("explain", "/no/such/file.pt"), "no such file"),
        (("explain", FORUM, "--engine", "tpu"), "unknown engine"),
        (("explain", FORUM, "--observer", "magic"), "unknown observer"),
        (("explain", FORUM, "--ignore", "QCD999"), "unknown finding"),
        (("random", "--seed", "1", "--distribution", "cauchy"), "unknown distribution"),
        (("random", "--seed", "1", "--shape", "1,a,3"), "comma-separated integers"),
        (("explain", FORUM, "--calib", "/no/calib.npz"), "no such file"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, fragment):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.output


def test_bad_files_exit_2_without_traceback(tmp_path):
    from tests.casefile.test_io import _bad_cases

    for label, (path, fragment) in _bad_cases(tmp_path).items():
        r = invoke("explain", str(path))
        assert r.exit_code == 2, (label, r.output)
        assert fragment in r.stderr, (label, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, label
        assert "Traceback" not in r.output, label


def test_output_and_save_outputs(tmp_path):
    out, npz = tmp_path / "r.json", tmp_path / "t.npz"
    r = invoke("explain", FORUM, "--output", str(out), "--save-outputs", str(npz))
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["paths"][0]["name"] == "as_given"
    with np.load(npz, allow_pickle=False) as z:
        keys = set(z.files)
        assert z["float_output"].item() == pytest.approx(803.6908, abs=1e-4)
        assert z["as_given.quantized"].item() == 0.0
    for key in ("as_given.quantized_int", "as_given.torch_int", "production.quantized",
                "as_given.stage.output_clipping", "as_given.stage.module_state"):
        assert key in keys, key


def test_engine_all_names_every_engine(tmp_path):
    npz = tmp_path / "t.npz"
    r = invoke("explain", FORUM, "--engine", "all", "--json", "--save-outputs", str(npz))
    assert r.exit_code == 0
    engines = {p["engine"] for p in json.loads(r.stdout)["paths"]}
    import torch

    assert engines == set(torch.backends.quantized.supported_engines) & {
        "x86", "fbgemm", "onednn", "qnnpack"}
    with np.load(npz) as z:
        assert any(k.startswith("as_given@qnnpack.") for k in z.files)
    # the terminal's rows: values longer than their column still stand apart from the error
    text = invoke("explain", str(ROOT / "samples" / "conv1d_handmade.pt"), "--engine",
                  "all").stdout
    side = text.split("engines side by side", 1)[1]
    rows = [line for line in side.split("\n") if line.startswith(("as_given ", "production "))]
    assert rows and all(" max error " in line for line in rows)


def test_random_forum_recipe_and_save(tmp_path):
    case = tmp_path / "f.pt"
    r = invoke("random", "--seed", "0", "--recipe", "forum", "--save", str(case), "--json")
    assert r.exit_code == 0, r.output
    assert case.read_bytes() == (ROOT / "samples" / "forum_conv.pt").read_bytes()
    assert json.loads(r.stdout)["case"]["source"] == "recipe forum"


def test_random_with_options():
    r = invoke("random", "--seed", "3", "--shape", "1,8,12,12", "--weight-shape", "8,1,3,3",
               "--groups", "8", "--padding", "1", "--distribution", "relu", "--json",
               "--engine", "qnnpack", "--per-tensor", "--observer", "minmax")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["case"]["groups"] == 8 and d["paths"][0]["engine"] == "qnnpack"
    assert d["paths"][0]["qparams"]["weight"]["scheme"] == "per_tensor_affine"
    assert d["paths"][0]["observers"]["input"] == "MinMaxObserver"


def test_calibration_file(tmp_path):
    calib = tmp_path / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(calib, calib=rng.integers(0, 20, (8, 1, 3, 3)).astype(np.float32))
    r = invoke("explain", FORUM, "--calib", str(calib), "--json")
    assert r.exit_code == 0, r.output
    prod = [p for p in json.loads(r.stdout)["paths"] if p["name"] == "production"][0]
    assert "calibrated on 8 inputs" in " ".join(prod["notes"])


def test_calibration_inputs_smaller_than_the_kernel_are_refused_in_one_line(tmp_path):
    """Calibration inputs of 2x2 for a 3x3 kernel gave 'internal error: RuntimeError'."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, calib=np.ones((2, 1, 2, 2), dtype=np.float32))
    r = invoke("explain", FORUM, "--calib", str(calib))
    assert r.exit_code == 2 and "does not fit the conv" in r.output
    assert "internal error" not in r.output


def test_version_and_help():
    assert "qconvdiag" in runner.invoke(app, ["--version"]).stdout
    assert runner.invoke(app, ["--help"]).exit_code == 0


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv = ['qconvdiag', '--help']\n"
        "import qconvdiag.cli as c\n"
        "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout + out.stderr


def test_import_qconvdiag_is_lean():
    code = "import sys, qconvdiag; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False False"


def test_json_is_deterministic():
    a = invoke("explain", FORUM, "--json").stdout
    b = invoke("explain", FORUM, "--json").stdout
    assert a == b


def test_terminal_report_says_integers_were_converted(tmp_path):
    np.savez(tmp_path / "i.npz", input=np.ones((1, 1, 4, 4), np.int64),
             weight=np.ones((1, 1, 3, 3), np.int32))
    r = invoke("explain", str(tmp_path / "i.npz"))
    assert r.exit_code == 0, r.output
    assert "holds integers (int64); converted to float32" in r.stdout


def test_an_internal_error_is_one_line_not_a_traceback(monkeypatch):
    import qconvdiag.diagnosis as d

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(d, "diagnose_runs", broken)
    r = invoke("explain", FORUM)
    assert r.exit_code == 2 and "internal error: ValueError: boom" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_public_api_is_lean_and_complete():
    code = ("import sys, qconvdiag; assert 'torch' not in sys.modules; "
            "assert set(qconvdiag.__all__) >= {'load_case', 'save_case', 'capture', 'diagnose', "
            "'Options', 'Report', 'QconvdiagError'}; "
            "r = qconvdiag.diagnose(qconvdiag.load_case(sys.argv[1])); "
            "assert isinstance(r, qconvdiag.Report) and callable(qconvdiag.diagnose); "
            "print(r.verdict.status, [c.code for c in r.verdict.causes])")
    out = subprocess.run([sys.executable, "-c", code, FORUM], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "broken ['QCD024', 'QCD050', 'QCD021']"


BAD_ARGUMENTS = [
    (["explain", FORUM, "--engine", "tpu"], "unknown engine"),
    (["explain", FORUM, "--observer", "magic"], "unknown observer"),
    (["explain", FORUM, "--ignore", "QCD999"], "unknown finding"),
    (["explain", FORUM, "--calib", "missing.npz"], "no such file"),
    (["explain", FORUM, "--calib", str(ROOT / "README.md")], "unknown extension"),
    (["random", "--seed", "1", "--distribution", "cauchy"], "unknown distribution"),
    (["random", "--seed", "1", "--recipe", "nope"], "unknown recipe"),
    (["random", "--seed", "1", "--engine", "tpu", "--recipe", "forum"], "unknown engine"),
    (["trace", FORUM, "--at", "a,b"], "--at must be comma-separated"),
    (["trace", FORUM, "--path", "bogus"], "--path bogus: use as_given or production"),
    (["trace", FORUM, "--engine", "all"], "trace runs one engine"),
    (["trace", FORUM, "--engine", "tpu"], "unknown engine"),
    (["explain", FORUM, "--fail-under-sqnr", "nan"], "--fail-under-sqnr must be a finite"),
    (["explain", FORUM, "--fail-under-sqnr", "inf"], "--fail-under-sqnr must be a finite"),
    (["explain", FORUM, "--max-abs-error", "nan"], "--max-abs-error must be a finite"),
    (["explain", FORUM, "--max-abs-error", "-1"], "--max-abs-error must be a finite number >= 0"),
    (["explain", FORUM, "--max-elements", "-1"], "--max-elements must be at least 1"),
    (["random", "--seed", "1", "--max-elements", "0"], "--max-elements must be at least 1"),
    (["trace", FORUM, "--max-elements", "0"], "--max-elements must be at least 1"),
    (["random", "--seed", "1", "--shape", "1,2,3,x"], "comma-separated integers"),
    (["random", "--seed", "1", "--shape", "1,2,,3"], "comma-separated integers"),
    (["random", "--seed", "1", "--groups", "0"], "--groups must be >= 1, got 0"),
    (["random", "--seed", "-1"], "--seed must be >= 0"),
    (["random", "--seed", "1", "--shape", "1,-2,5,5"], "--shape entries must be >= 1"),
    (["random", "--seed", "1", "--weight-shape", "4,0,3,3"], "--weight-shape entries must be"),
    (["random", "--seed", "1", "--shape", "1,2"], "--shape needs 3 to 5 entries"),
    (["random", "--seed", "1", "--dilation", "1,0"], "--dilation must be >= 1, got 1,0"),
    (["random", "--seed", "1", "--padding", "-1"], "--padding must be >= 0"),
]


@pytest.mark.parametrize("args, fragment", BAD_ARGUMENTS,
                         ids=[" ".join(x for x in a if x != FORUM) for a, _ in BAD_ARGUMENTS])
def test_bad_arguments_are_refused_before_any_work(monkeypatch, args, fragment):
    import qconvdiag.casefile.generate
    import qconvdiag.io

    def work(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(qconvdiag.io, "load_case", work)
    monkeypatch.setattr(qconvdiag.io, "read_mapping", work)  # case files and model bundles
    monkeypatch.setattr(qconvdiag.casefile.generate, "generate", work)
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_are_refused_without_importing_torch():
    code = (
        "import json, sys\n"
        "from qconvdiag.cli import main\n"
        f"for args in {json.dumps([a for a, _ in BAD_ARGUMENTS])}:\n"
        "    sys.argv = ['qconvdiag', *args]\n"
        "    try:\n        main()\n    except SystemExit as exc:\n        assert exc.code == 2\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "NO-TORCH", out.stdout + out.stderr
    assert len(out.stderr.strip().splitlines()) == len(BAD_ARGUMENTS), out.stderr


def test_trace_at_with_the_wrong_number_of_indices_says_how_many():
    r = runner.invoke(app, ["trace", FORUM, "--at", "0,0,0"])
    assert r.exit_code == 2, r.output
    assert "--at needs 4 indices N,C,H,W for this conv2d's output of shape (1, 1, 1, 1), got 3" \
        in r.stderr
    r = runner.invoke(app, ["trace", FORUM, "--at", "0,0,0,1"])
    assert r.exit_code == 2 and "is outside the output (1, 1, 1, 1)" in r.stderr


def test_trace_help_offers_only_the_engines_it_accepts():
    text = runner.invoke(app, ["trace", "--help"], terminal_width=200).stdout
    engine_line = next(line for line in text.splitlines() if "--engine" in line)
    assert "qnnpack" in engine_line and "all" not in engine_line


@pytest.mark.parametrize("args, fragment", [
    (["explain", FORUM, "--max-elements", "abc"], "'abc' is not a valid int"),
    (["explain", FORUM, "--bogus"], "No such option: --bogus"),
    (["explain"], "Missing argument"),
    (["explain", FORUM, "--fail-on", "bad"], "Invalid value for '--fail-on'"),
    (["trace", FORUM, "--at"], "requires an argument"),
    (["frobnicate"], "No such command"),
])
def test_click_usage_errors_are_one_line(args, fragment):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("qconvdiag: error: ") and fragment in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_float64_input_beyond_float32_is_one_line_naming_it(tmp_path):
    x = np.ones((1, 1, 4, 4))
    x[0, 0, 0, 0] = 1e39
    np.savez(tmp_path / "f64.npz", input=x, weight=np.ones((1, 1, 3, 3), np.float32))
    out = subprocess.run([sys.executable, "-m", "qconvdiag", "explain", str(tmp_path / "f64.npz")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        f"qconvdiag: error: {tmp_path / 'f64.npz'}: 'input' is float64 with values up to 1e+39, "
        "beyond float32's range (3.4e38) in which torch's conv runs: scale it down"]


def test_an_error_is_one_line_even_with_warnings_and_line_breaks(monkeypatch):
    import warnings

    import qconvdiag.model.bundle
    from qconvdiag.errors import CaseFileError

    def noisy(*args, **kwargs):
        warnings.warn("a library's warning\nover two lines", RuntimeWarning, stacklevel=1)
        raise CaseFileError("a message\nwith a line break and \x1b[1mescapes\x1b[0m")

    monkeypatch.setattr(qconvdiag.model.bundle, "load_case_or_bundle", noisy)
    r = runner.invoke(app, ["explain", FORUM])
    assert r.exit_code == 2
    assert r.stderr == "qconvdiag: error: a message with a line break and escapes\n"


def test_a_warning_of_a_run_that_succeeds_is_one_line(monkeypatch):
    import warnings

    import qconvdiag.render.json_report as json_report

    render = json_report.render_json

    def noisy(report):
        warnings.warn("something odd\nin two lines", RuntimeWarning, stacklevel=1)
        return render(report)

    monkeypatch.setattr(json_report, "render_json", noisy)
    r = runner.invoke(app, ["explain", FORUM, "--json"])
    assert r.exit_code == 0, r.output
    assert r.stderr == "qconvdiag: warning: RuntimeWarning: something odd in two lines\n"
    json.loads(r.stdout)


def test_engine_all_judges_the_engine_the_case_was_captured_on(tmp_path):
    """A qnnpack case whose input step is 2.3x what its range needs: a QCD012 warning on
    qnnpack (8-bit activations), within x86's 7-bit floor. --engine all judged it on x86, the
    first engine torch lists, and its gate passed where the case's own engine's failed; now
    the captured engine comes first, as without --engine."""
    import warnings

    import torch

    import qconvdiag

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(16, 32, 1).eval()
    x = torch.randn(2, 16, 8, 8, generator=g) * 2
    engine = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = "qnnpack"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = conv.weight.detach()
            qm = torch.ao.nn.quantized.Conv2d(16, 32, 1)
            qm.set_weight_bias(torch.quantize_per_tensor(w, float(w.abs().max()) / 127.5, 0,
                                                         torch.qint8), conv.bias.detach())
            y = conv(x).detach()
            qm.scale = float(y.max() - y.min()) / 255
            qm.zero_point = int(round(-float(y.min()) / qm.scale))
            step = float(x.max() - x.min()) / 255 * 2.3
            qx = torch.quantize_per_tensor(x, step, int(round(-float(x.min()) / step)),
                                           torch.quint8)
        qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path=tmp_path / "q.pt")
    finally:
        torch.backends.quantized.engine = engine
    own = invoke("explain", str(tmp_path / "q.pt"), "--fail-on", "warning", "--json")
    everyone = invoke("explain", str(tmp_path / "q.pt"), "--engine", "all", "--fail-on",
                      "warning", "--json")
    assert own.exit_code == everyone.exit_code == 1
    assert json.loads(everyone.stdout)["paths"][0]["engine"] == "qnnpack"
