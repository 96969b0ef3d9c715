"""Every renderer returns its payload (text or bytes) and prints nothing."""

from __future__ import annotations

import json

import pytest

from qconvdiag import Options
from qconvdiag.diagnosis import run_diagnosis
from qconvdiag.io import load_case
from qconvdiag.render.json_report import render_json
from qconvdiag.render.npz import render_npz
from qconvdiag.render.terminal import render_terminal
from qconvdiag.render.trace_view import render_trace
from qconvdiag.trace import trace
from tests.repo import SAMPLES

FORUM = SAMPLES / "forum_conv.pt"


def test_renderers_return_their_payload_and_print_nothing(capsys):
    case = load_case(FORUM)
    diagnosis = run_diagnosis(case, Options(keep_arrays=True))
    report = diagnosis.report
    text = render_terminal(report, width=80)
    assert "verdict" in text and len(text.splitlines()[0]) == 80  # the header panel
    assert render_terminal(report, width=80, verbose=True) != text
    assert json.loads(render_json(report))["schema_version"] == 2
    assert render_npz(diagnosis)[:2] == b"PK"
    tr = trace(case, None)
    assert "packed params" in render_trace(tr, width=80)
    assert json.loads(render_json(tr))["position"] == list(tr.position)
    assert capsys.readouterr().out == ""


def test_a_path_at_its_floor_shows_no_share_of_an_excess():
    """The stage table's excess shares name where a path's error above its floor comes from; at
    the floor what is left is rounding's scatter, and no stage gets a share (a healthy layer's
    tiny weight clipping showed 100%)."""
    import dataclasses

    from rich.console import Console

    from qconvdiag.render.rich_report import stage_table

    def console_text(table: object, width: int) -> str:
        console = Console(width=width)
        with console.capture() as captured:
            console.print(table)
        return captured.get()

    report = run_diagnosis(load_case(FORUM), Options()).report
    path = report.path("as_given")
    budget = path.budget
    assert budget is not None and budget.verdict == "broken" and budget.excess > 0
    shares = [budget.excess_share(sb) for sb in budget.stages]
    assert sum(s for s in shares if s) == pytest.approx(1.0)
    assert "%" in console_text(stage_table(path), 80)
    quiet = dataclasses.replace(path, budget=dataclasses.replace(budget, verdict="at_floor"))
    assert all(quiet.budget.excess_share(sb) is None for sb in budget.stages)
    assert "%" not in console_text(stage_table(quiet), 80)
    from qconvdiag.render import html

    assert "%<" in html.stage_table(path) and "%<" not in html.stage_table(quiet)
