"""--html: the page's content (render/html.py, render/html_charts.py) and the CLI option.
The page in a real browser: tests/render/test_html_browser.py."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from html import unescape
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from qconvdiag.cli import app
from qconvdiag.diagnosis import run_diagnosis
from qconvdiag.io import load_case
from qconvdiag.render.html import render_html
from qconvdiag.render.rich_report import main_fix, verdict_sentence
from tests.repo import ROOT

FORUM = ROOT / "samples" / "forum_conv.pt"
#: The issue's budget for the forum sample's page.
FORUM_PAGE_MAX_BYTES = 5_000_000
runner = CliRunner()


def specs_of(page: str) -> dict:
    text = re.search(r'<script type="application/json" id="qcd-specs">(.*?)</script>', page,
                     re.S).group(1)
    return json.loads(text)


def title_of(spec: dict) -> str:
    title = spec.get("title", "")
    return title if isinstance(title, str) else title["text"]


def figures_of(page: str) -> list[str]:
    return re.findall(r'<figure class="qcd-figure" data-spec="([^"]+)"', page)


@pytest.fixture(scope="module")
def forum():
    case = load_case(FORUM)
    diagnosis = run_diagnosis(case)
    return diagnosis, render_html(diagnosis, case_file="samples/forum_conv.pt")


def test_the_page_tells_the_story_first(forum):
    diagnosis, page = forum
    report = diagnosis.report
    body = unescape(page[page.index("<body>"):])
    verdict = verdict_sentence(report.verdict)
    assert verdict in body
    order = [body.index(x) for x in (verdict, "<h2>Findings</h2>",
                                     "as_given on x86: how each stage",
                                     "production on x86: how each stage")]
    assert order == sorted(order)
    for i, code in enumerate(("QCD024", "QCD050", "QCD021"), 1):
        assert f"{i}. {code}" in body
    assert report.verdict.first_fix is not None
    assert main_fix(report.verdict.first_fix) in body


def test_the_stage_table_says_which_numbers_are_maxima(forum):
    """The stage table's first two number columns are largest |changes| and errors, the third
    an RMSE: their headers say so (a user read 'adds 0.49' beside an RMSE as the RMSE)."""
    _, page = forum
    headers = re.findall(r"<th(?: [^>]*)?>(.*?)</th>", page)
    at = headers.index("stage")
    assert headers[at:at + 6] == ["stage", "max adds", "max so far", "RMSE adds", "floor",
                                  "excess"]


def test_every_fix_is_a_copyable_code_block(forum):
    diagnosis, page = forum
    blocks = [unescape(b) for b in re.findall(
        r'<div class="code"><button type="button" data-copy>copy</button><pre><code>(.*?)'
        r"</code></pre></div>", page, re.S)]
    fixes = [f.fix for f in diagnosis.report.findings if f.fix]
    assert all(fix in blocks for fix in fixes)
    assert len(blocks) == len(fixes) + 1  # and the verdict's first fix


def test_every_figure_has_its_spec_and_the_page_fetches_nothing(forum):
    _, page = forum
    specs = specs_of(page)
    figures = figures_of(page)
    assert figures and set(figures) == set(specs) and len(figures) == len(set(figures))
    # per path: waterfall, input and weight histograms, channel errors, one map (1 channel);
    # production's per-channel weights add their ranges per channel
    assert len(figures) == 5 + 6
    assert sum(title_of(s) == "production on x86: weight range per channel against its "
               "clipping range" for s in specs.values()) == 1
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", page, flags=re.S)
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=", markup)
    assert markup.count("<script") == 4  # head.js, the Vega bundle, the specs, page.js
    for spec in specs.values():
        assert "$schema" not in spec and "url" not in json.dumps(spec.get("data", {}))


def test_every_spec_is_valid_vega_lite(forum):
    import altair as alt

    for spec in specs_of(forum[1]).values():
        alt.TopLevelSpec.from_dict(spec, validate=True)  # raises on a schema violation


def test_the_waterfall_builds_up_to_the_total_with_isolated_marks(forum):
    diagnosis, page = forum
    specs = specs_of(page)
    waterfall = next(s for s in specs.values()
                     if title_of(s) == "as_given on x86: how each stage moves the error")
    rows = waterfall["layer"][0]["data"]["values"]
    assert [r["stage"] for r in rows] == [s.id for s in diagnosis.report.paths[0].stages]
    assert rows[-1]["end"] == pytest.approx(diagnosis.report.paths[0].total.rmse)
    assert all(a["end"] == b["start"] for a, b in zip(rows, rows[1:]))
    marks = {json.dumps(layer["mark"]) for layer in waterfall["layer"]}
    assert any('"point"' in m for m in marks)  # the isolated effects
    clipping = next(r for r in rows if r["stage"] == "weight_clipping")
    assert clipping["isolated"] > 0 and clipping["state"] == "raises the error"


def test_histograms_show_the_clipped_weights(forum):
    _, page = forum
    specs = specs_of(page)
    weight = next(s for s in specs.values()
                  if title_of(s).startswith("as_given on x86: weight values"))
    assert weight["title"]["subtitle"][0].startswith("5 of 9 values clipped (55.56%)")
    bins = next(layer["data"]["values"] for layer in weight["layer"]
                if layer.get("mark", {}).get("type") == "bar")
    assert sum(b["count"] for b in bins if b["where"] == "clipped") == 5


def test_the_error_map_offers_the_trace_command(forum):
    _, page = forum
    specs = specs_of(page)
    heat = next(s for s in specs.values() if title_of(s) == "as_given on x86: error of output "
                "channel 0")
    (record,) = heat["datasets"]["cells"]
    assert record["e"] == [pytest.approx(-803.69, abs=0.01)]
    trace = next(t["calculate"] for t in heat["transform"] if t.get("as") == "trace")
    assert trace == ("'qconvdiag trace samples/forum_conv.pt --at ' + datum.at + "
                     "' --path as_given --engine x86'")
    at = next(t["calculate"] for t in heat["transform"] if t.get("as") == "at")
    assert at == "datum.n + ',' + datum.c + ',' + datum.h + ',' + datum.w"


def test_the_forum_page_is_within_its_budget(forum):
    _, page = forum
    assert len(page.encode("utf-8")) <= FORUM_PAGE_MAX_BYTES


def test_a_large_layer_is_downsampled_and_says_so():
    from qconvdiag.casefile.generate import RandomSpec, generate

    case = generate(RandomSpec(seed=4, input_shape=(1, 2, 130, 70), weight_shape=(3, 2, 1, 1),
                               stride=1, padding=0, dilation=1))
    page = render_html(run_diagnosis(case))
    assert "downsampled from 130 x 70 to 44 x 35 cells" in page
    specs = specs_of(page)
    maps = [s for s in specs.values() if "cells" in s.get("datasets", {})]
    assert maps and all(len(s["datasets"]["cells"][0]["w"]) == 44 * 35 for s in maps)
    assert "save it with <code>--save CASE.pt</code>" in page  # no case file to trace
    trace = next(t["calculate"] for t in maps[0]["transform"] if t.get("as") == "trace")
    assert trace.startswith("'qconvdiag trace CASE --at '")


def test_names_and_text_are_escaped(tmp_path):
    """A case file named like markup or a quote cannot break the page or its scripts."""
    case = load_case(FORUM)
    page = render_html(run_diagnosis(case), case_file="it's </script><b>x.pt")
    assert "</script><b>" not in page
    specs = specs_of(page)  # still parses: '</' is escaped inside the JSON
    heat = next(s for s in specs.values() if "cells" in s.get("datasets", {}))
    trace = next(t["calculate"] for t in heat["transform"] if t.get("as") == "trace")
    assert "qconvdiag trace 'it'\"'\"'s </script><b>x.pt' --at " in trace.replace("\\'", "'")


# --- the command line ------------------------------------------------------------------


def test_explain_html_writes_the_page(tmp_path):
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["explain", str(FORUM), "--html", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["status"] == "ok"  # stdout stays the payload
    assert r.stderr.strip() == f"wrote {out}"
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert f"'qconvdiag trace {shlex.quote(str(FORUM))} --at ' + datum.at" in page


def test_random_html_traces_the_saved_case(tmp_path):
    out, case = tmp_path / "r.html", tmp_path / "case.npz"
    r = runner.invoke(app, ["random", "--seed", "0", "--recipe", "forum", "--save", str(case),
                            "--html", str(out)])
    assert r.exit_code == 0, r.output
    assert case.exists() and f"'qconvdiag trace {case} --at ' + datum.at" in out.read_text()


@pytest.mark.parametrize("args, fragment", [
    (["--html", "{tmp}/r.htm"], "--html {tmp}/r.htm: the HTML report needs a name ending in "
                                ".html"),
    (["--html", "{tmp}/r.html", "--html", "{tmp}/r.json"], "--html {tmp}/r.json: the HTML "
                                                         "report needs a name ending in .html"),
    (["--html", str(FORUM)], "is an input of this run"),
    (["--html", "{tmp}/nowhere/r.html"], "does not exist"),
])
def test_bad_html_destinations_are_one_line_and_nothing_is_written(tmp_path, args, fragment):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    before = FORUM.read_bytes()
    r = runner.invoke(app, ["explain", str(FORUM), *args])
    assert r.exit_code == 2, r.output
    assert fragment.replace("{tmp}", str(tmp_path)) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == [] and FORUM.read_bytes() == before


def test_html_and_another_option_naming_one_file_are_refused(tmp_path):
    (tmp_path / "same.html").symlink_to(tmp_path / "r.json")
    r = runner.invoke(app, ["explain", str(FORUM), "--output", str(tmp_path / "r.json"),
                            "--html", str(tmp_path / "same.html")])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == (f"qconvdiag: error: --html {tmp_path}/same.html names the same "
                                f"file as --output {tmp_path}/r.json: give each its own file")
    assert [p.name for p in tmp_path.iterdir()] == ["same.html"]


def test_a_model_page_ranks_the_convs_and_links_the_explained(tmp_path):
    import altair as alt

    bundle = ROOT / "samples" / "model" / "digits.pt"
    page = tmp_path / "m.html"
    r = runner.invoke(app, ["explain", str(bundle), "--top", "0", "--layer", "conv3",
                            "--html", str(page)])
    assert r.exit_code == 0, r.output
    text = page.read_text()
    rows = re.findall(r"<tr><td class=\"num\">(\d+)</td><td>(.*?)</td>", text)
    assert [(rank, re.sub("<[^>]+>", "", name)) for rank, name in rows[:3]] == [
        ("1", "conv2"), ("2", "conv3"), ("3", "conv1")]
    assert '<a href="#layer-conv3">conv3</a>' in text  # explained: linked
    assert '<a href="#layer-conv2">' not in text  # not explained (top 0): no link
    assert "QCD051 outputs saturated" in text
    for spec in specs_of(text).values():
        alt.TopLevelSpec.from_dict(spec, validate=True)


def test_without_the_extra_html_is_one_line_naming_the_install(tmp_path, monkeypatch):
    import qconvdiag.diagnosis as d

    monkeypatch.setitem(sys.modules, "altair", None)  # find_spec: not installed

    def no_work(*args, **kwargs):
        raise AssertionError("the diagnosis ran")

    monkeypatch.setattr(d, "run_diagnosis", no_work)
    out = tmp_path / "r.html"
    r = runner.invoke(app, ["explain", str(FORUM), "--html", str(out), "--output",
                            str(tmp_path / "r.json")])
    assert r.exit_code == 2, r.output
    assert r.stderr.strip() == ("qconvdiag: error: --html needs the html extra (altair not "
                                "installed): pip install -e '.[html]' in qconvdiag's checkout "
                                "(make demo installs it)")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_page_writes_no_file_at_all(tmp_path, monkeypatch):
    """All or nothing: the JSON report is not put in place when the page fails."""
    import qconvdiag.render.html as h

    def broken(*args, **kwargs):
        raise ValueError("no page")

    monkeypatch.setattr(h, "render_html", broken)
    r = runner.invoke(app, ["explain", str(FORUM), "--output", str(tmp_path / "r.json"),
                            "--html", str(tmp_path / "r.html")])
    assert r.exit_code == 2 and "internal error: ValueError: no page" in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_html_and_help_stay_lean():
    """--help and `import qconvdiag` import neither torch nor the plotting library."""
    code = ("import sys; sys.argv = ['qconvdiag', 'explain', '--help']\n"
            "import qconvdiag, qconvdiag.cli as c\n"
            "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'altair', 'vl_convert') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert "--html" in out.stdout
    assert out.stdout.strip().endswith("[]"), out.stdout + out.stderr


def test_the_readme_s_html_example_runs(tmp_path, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^(qconvdiag [^\n#]*--html [^\n#]*?)\s*(?:#.*)?$", readme, re.M)
    assert commands, "README shows no --html command"
    for command in commands:
        args = [str(ROOT / a) if a.startswith("samples/") else a
                for a in shlex.split(command)[1:]]
        monkeypatch.chdir(tmp_path)
        r = runner.invoke(app, args)
        assert r.exit_code == 0, (command, r.output)
        assert Path(args[args.index("--html") + 1]).read_text().startswith("<!DOCTYPE html>")


def test_the_page_is_deterministic_and_its_ids_unique(forum):
    diagnosis, page = forum
    assert render_html(diagnosis, case_file="samples/forum_conv.pt") == page
    markup = re.sub(r"(<script[^>]*>).*?</script>", r"\1", page, flags=re.S)
    ids = re.findall(r' id="([^"]+)"', markup)
    assert len(ids) == len(set(ids)) and "QCD050-as_given-x86" in ids


def test_a_path_torch_refuses_still_gets_its_page(tmp_path):
    """Per-channel weights on axis 1 (QCD025): torch refuses the as_given path; its page says
    so and still shows the values against the grid."""
    rng = np.random.default_rng(0)
    case_file = tmp_path / "axis1.npz"
    np.savez(case_file, input=rng.normal(size=(1, 4, 6, 6)).astype(np.float32),
             weight=(rng.normal(size=(8, 4, 3, 3)) * 0.1).astype(np.float32),
             input_qparams=np.array(json.dumps({"scale": 0.05, "zero_point": 128,
                                                "dtype": "quint8"})),
             weight_qparams=np.array(json.dumps({"scale": [0.002] * 4, "zero_point": [0] * 4,
                                                 "dtype": "qint8", "axis": 1})))
    case = load_case(case_file)
    diagnosis = run_diagnosis(case)
    assert diagnosis.report.paths[0].refused
    page = render_html(diagnosis, case_file=str(case_file))
    section = page[page.index('<section id="path-as_given-x86">'):
                   page.index('<section id="path-production-x86">')]
    assert "No stage ran: " in section and "The path did not run: no output to map." in section
    titles = {title_of(s) for s in specs_of(page).values()}
    assert "as_given on x86: weight range per channel against its clipping range" in titles


def test_render_html_is_a_renderer_that_prints_nothing(forum, capsys):
    diagnosis, page = forum
    assert diagnosis.case is not None  # the histograms' values come from the diagnosis
    assert render_html(diagnosis, case_file="samples/forum_conv.pt") == page
    assert capsys.readouterr() == ("", "")
