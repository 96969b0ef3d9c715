"""The HTML report in a real browser: Debian's Chromium, headless, opens each page from disk
with the network off (every host name unresolvable, every request sent to a closed proxy port)
and the DOM it leaves is read back. The page records on <html> its script errors, blocked
fetches and Vega warnings, how many figures it has and how many were drawn.

Never skipped: ``make test`` installs Chromium where it is missing (``make browser``)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qconvdiag.cli import app
from qconvdiag.render.html import shell
from tests.repo import ROOT

runner = CliRunner()
#: A page's scripts finish long before this (about 1 s for the forum sample).
BROWSER_TIMEOUT_S = 180


def chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        pytest.fail("Chromium is missing: `make browser` installs Debian's package "
                    "(apt-get install chromium)")
    return found


def open_in_browser(page: Path, profile: Path) -> str:
    """The DOM after the page's scripts ran, network off."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-extensions", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>", "--virtual-time-budget=30000", "--dump-dom",
        page.as_uri(),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert out.returncode == 0 and "<html" in out.stdout, out.stderr[-2000:]
    return out.stdout


def attributes(tag: str) -> dict[str, str]:
    return {k: unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}


def outcome(dom: str) -> dict[str, str]:
    return attributes(re.search(r"<html[^>]*>", dom).group(0))


def figures(dom: str) -> list[tuple[dict[str, str], str]]:
    return [(attributes(a), inner) for a, inner in
            re.findall(r'<figure class="qcd-figure"([^>]*)>(.*?)</figure>', dom, re.S)]


def assert_every_figure_drawn(page: Path, dom: str) -> list[dict[str, str]]:
    result = outcome(dom)
    assert result.get("data-qcd-status") == "done", result
    assert json.loads(result["data-qcd-errors"]) == []
    assert json.loads(result["data-qcd-warnings"]) == []
    expected = page.read_text().count('<figure class="qcd-figure"')
    assert expected > 0 and result["data-qcd-figures"] == str(expected)
    assert result["data-qcd-rendered"] == str(expected)
    drawn = figures(dom)
    assert len(drawn) == expected
    for attrs, inner in drawn:
        assert attrs.get("data-rendered") == "true", attrs
        assert "<svg" in inner and 'class="marks"' in inner, attrs
    return [attrs for attrs, _ in drawn]


@pytest.fixture(scope="module")
def forum_page(tmp_path_factory):
    """The forum sample under a name with a quote, markup and a space: the page and the trace
    commands it offers must survive it."""
    folder = tmp_path_factory.mktemp("forum")
    case = folder / "it's <b> \"forum\".pt"
    shutil.copyfile(ROOT / "samples" / "forum_conv.pt", case)
    page = folder / "forum.html"
    r = runner.invoke(app, ["explain", str(case), "--html", str(page)])
    assert r.exit_code == 0, r.output
    return case, page, open_in_browser(page, folder / "profile")


def test_the_forum_page_draws_every_figure_offline(forum_page):
    _, page, dom = forum_page
    assert_every_figure_drawn(page, dom)
    assert page.stat().st_size <= 5_000_000


def test_a_heatmap_cell_offers_a_trace_command_that_runs(forum_page):
    case, _, dom = forum_page
    traces = [a["data-first-trace"] for a, _ in figures(dom) if "data-first-trace" in a]
    assert traces == [
        f"qconvdiag trace {shlex.quote(str(case))} --at 0,0,0,0 --path as_given --engine x86",
        f"qconvdiag trace {shlex.quote(str(case))} --at 0,0,0,0 --path production --engine x86",
    ]
    r = runner.invoke(app, shlex.split(traces[0])[1:] + ["--width", "100"])
    assert r.exit_code == 0, r.output
    assert "output element [0,0,0,0] on the as_given path, engine x86" in r.stdout


#: Appended to a copy of a page: once it is drawn, move the pointer over the first heatmap's
#: first cell and click it, then note the tooltip's and the picked command's text on <html>.
HOVER_AND_CLICK = """<script>
(function wait() {
  var root = document.documentElement;
  if (root.getAttribute("data-qcd-status") !== "done") { setTimeout(wait, 50); return; }
  var figure = document.querySelector(".qcd-figure[data-first-trace]");
  var cell = figure.querySelector("svg .mark-rect path");
  var box = cell.getBoundingClientRect();
  var at = {bubbles: true, clientX: box.x + box.width / 2, clientY: box.y + box.height / 2};
  cell.dispatchEvent(new PointerEvent("pointermove", at));
  cell.dispatchEvent(new MouseEvent("click", at));
  setTimeout(function () {
    var tip = document.querySelector("#vg-tooltip-element");
    root.setAttribute("data-probe-tooltip", tip ? tip.innerText : "");
    root.setAttribute("data-probe-picked", figure.querySelector(".qcd-picked code").textContent);
  }, 300);
})();
</script>"""


def test_hovering_a_cell_shows_its_value_and_a_click_its_command(forum_page, tmp_path):
    case, page, _ = forum_page
    text = page.read_text()
    end = text.rindex("</body>")
    probe = tmp_path / "probe.html"
    probe.write_text(text[:end] + HOVER_AND_CLICK + text[end:])
    result = outcome(open_in_browser(probe, tmp_path / "profile"))
    command = f"qconvdiag trace {shlex.quote(str(case))} --at 0,0,0,0 --path as_given --engine x86"
    assert result["data-probe-picked"] == command
    tooltip = result["data-probe-tooltip"]
    for line in ("output index", "0,0,0,0", "error (quantized - float)", "\u2212803.69",  # minus
                 "float", "803.69", command):
        assert line in tooltip, tooltip


@pytest.mark.parametrize("args", [
    ("random", "--seed", "4", "--shape", "1,2,130,70", "--weight-shape", "3,2,1,1",
     "--stride", "1", "--padding", "0", "--dilation", "1", "--per-channel"),
    ("explain", str(ROOT / "samples" / "conv1d_handmade.pt")),
], ids=["downsampled-per-channel", "conv1d"])
def test_other_layers_draw_every_figure_offline(tmp_path, args):
    page = tmp_path / "page.html"
    r = runner.invoke(app, [*args, "--html", str(page)])
    assert r.exit_code == 0, r.output
    drawn = assert_every_figure_drawn(page, open_in_browser(page, tmp_path / "profile"))
    assert any("data-first-trace" in a for a in drawn)


def test_the_check_sees_a_fetch_and_a_broken_figure(tmp_path):
    """The harness itself: a figure that would fetch its data and one with a broken spec are
    caught (the page's policy blocks the fetch; the error is recorded, not lost)."""
    fetching = {"data": {"url": "https://example.com/data.json"}, "mark": "point",
                "encoding": {"x": {"field": "a", "type": "quantitative"}}}
    broken = {"data": {"values": [{"a": 1}]}, "mark": "no-such-mark"}
    body = "".join(f'<figure class="qcd-figure" data-spec="{k}"><div class="qcd-plot"></div>'
                   "</figure>" for k in ("fetching", "broken"))
    page = tmp_path / "bad.html"
    page.write_text(shell("bad", body, {"fetching": fetching, "broken": broken}))
    result = outcome(open_in_browser(page, tmp_path / "profile"))
    assert result["data-qcd-status"] == "done" and result["data-qcd-figures"] == "2"
    errors = " ".join(json.loads(result["data-qcd-errors"]))
    assert "blocked by the page's policy: connect-src https://example.com/data.json" in errors
    assert "figure broken" in errors
    assert result["data-qcd-rendered"] != "2"


def test_the_model_page_draws_the_model_and_its_explained_convs(tmp_path):
    """A model bundle's page: the SQNR along the model, the ranked convs linking to the
    explained ones, whose heatmaps offer `trace BUNDLE --layer NAME` commands that run."""
    bundle = ROOT / "samples" / "model" / "digits.pt"
    page = tmp_path / "model.html"
    r = runner.invoke(app, ["explain", str(bundle), "--top", "1", "--html", str(page)])
    assert r.exit_code == 0, r.output
    dom = open_in_browser(page, tmp_path / "profile")
    drawn = assert_every_figure_drawn(page, dom)
    text = page.read_text()
    assert 'href="#layer-conv2"' in text and 'id="layer-conv2"' in text
    assert "Along the model" in text and text.count("Layer conv") == 1
    traces = [a["data-first-trace"] for a in drawn if "data-first-trace" in a]
    assert traces and all(f"{shlex.quote(str(bundle))} --layer conv2 --at" in t for t in traces)
    r = runner.invoke(app, shlex.split(traces[0])[1:] + ["--width", "100"])
    assert r.exit_code == 0, r.output
    assert page.stat().st_size <= 5_000_000
