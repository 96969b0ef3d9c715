"""The verdicts, calibrated: healthy layers stay quiet, planted faults are named, near misses
are not, and docs/findings.md shows the precision and recall this corpus measures."""

from __future__ import annotations

import pytest

from qconvdiag.findings import CODES, MODEL_CODES
from qconvdiag.report import SEVERITIES
from tests.corpus import Result, healthy_specs, markdown, precision_recall, run_corpus
from tests.corpus_faults import NOT_PLANTED, faults
from tests.repo import ROOT


@pytest.fixture(scope="module")
def results() -> list[Result]:
    return run_corpus()


def test_the_corpus_is_big_enough():
    assert len(healthy_specs()) >= 100
    planted = [f for f in faults() if f.expect]
    for code in CODES:
        if code in NOT_PLANTED or code in MODEL_CODES:  # a whole model's: not a conv's
            continue
        assert sum(code in f.expect for f in planted) >= 3, code
        assert any(code in f.forbid for f in faults()), code


def test_healthy_layers_get_no_warning_or_error(results):
    loud = [(r.label, {c: s for c, s in r.anywhere.items() if s != "info"})
            for r in results if r.healthy]
    loud = [x for x in loud if x[1]]
    assert not loud, loud


def test_planted_faults_are_named_and_near_misses_are_not(results):
    wrong = []
    for r in results:
        if r.healthy:
            continue
        for code in r.expect:
            sev = r.on_judged.get(code)
            if sev is None:
                wrong.append((r.label, "missed"))
            elif r.severity and SEVERITIES.index(sev) > SEVERITIES.index(r.severity):
                wrong.append((r.label, f"only {sev}"))
        wrong += [(r.label, f"{code} fired") for code in r.forbidden_fired()]
    assert not wrong, wrong


def test_docs_show_the_measured_precision_and_recall(results):
    table = precision_recall(results)
    assert all(t["recall"] == 1.0 for c, t in table.items() if c not in NOT_PLANTED)
    docs = (ROOT / "docs" / "findings.md").read_text()
    assert markdown(results) in docs, "regenerate the table: python -m tests.corpus"
