"""Every renderer returns its payload (text or bytes) and prints nothing."""

from __future__ import annotations

import json

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
