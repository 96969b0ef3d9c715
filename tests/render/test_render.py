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


def test_an_engine_row_names_whose_output_steps_it_counts_in():
    """``--engine all`` counts a difference in the reference engine's output steps: the row
    says which engine's, since an engine with other qparams has steps of another size (a user
    read 'up to 0.498 steps' as onednn's when its output was a whole onednn step off)."""
    from qconvdiag.render.text import engine_outputs
    from qconvdiag.report import EngineRow

    one = EngineRow("production", "onednn", "onednn", "exact", "x86", 1, 0.498)
    assert engine_outputs(one) == "1 output differs from x86, up to 0.498 x86 output steps"
    two = EngineRow("production", "qnnpack", "qnnpack", "exact", "x86", 7, 1.0)
    assert engine_outputs(two) == "7 outputs differ from x86, up to 1 x86 output step"


def test_a_verdict_says_when_its_first_fix_alone_leaves_the_path_broken():
    """Three causes share the forum case's excess (47%, 44%, 8%): the first one's fix alone
    leaves it about 300x its floor, and the verdict says each cause needs its own fix (a user
    who ran the first fix of three saw 0.6 dB become 2.0 dB and read it as useless). Where the
    first cause carries nearly all of the excess the sentence is not printed."""
    import dataclasses

    from qconvdiag.render.rich_report import first_fix_leaves

    report = run_diagnosis(load_case(FORUM), Options()).report
    v = report.verdict
    assert v is not None and [c.code for c in v.causes] == ["QCD024", "QCD050", "QCD021"]
    assert first_fix_leaves(v) == pytest.approx(300, rel=0.05)
    assert "fix alone leaves about 300x the floor" in " ".join(
        render_terminal(report, width=80).split())
    from qconvdiag.render import html

    assert "fix alone leaves about 300x the floor" in html.verdict_section(report)
    most = (dataclasses.replace(v.causes[0], share=0.99995), *v.causes[1:])
    assert first_fix_leaves(dataclasses.replace(v, causes=most)) is None


def test_a_verdict_at_its_floor_above_1_5x_says_why():
    """helper-51: 'RMSE 0.0996 is 2.69x its floor ... at its floor' read as a contradiction; a
    small output's band is wider (1.5x + 2 / sqrt(outputs)), and the sentence says so."""
    from qconvdiag.render.rich_report import verdict_sentence
    from qconvdiag.report import Verdict

    def verdict(ratio: float) -> Verdict:
        return Verdict("as_given", "fbgemm", "at_floor", True, 0.1, 0.1 / ratio, ratio, 32.5,
                       41.1, (), 0.0, True, None)

    assert "within the wider band a small output allows (1.5x + 2/√outputs)" in \
        verdict_sentence(verdict(2.69))
    assert "band" not in verdict_sentence(verdict(1.2))
