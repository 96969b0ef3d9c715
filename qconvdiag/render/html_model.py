"""The HTML page of a model walk: the story (which conv is to blame), own and propagated SQNR
along the model, the ranked convs each linking to its details, and the explained convs' own
sections (``html.conv_sections``) on the same page."""

from __future__ import annotations

from html import escape
from pathlib import Path

from ..model.walk import ModelDiagnosis
from ..model_report import LayerRow, ModelReport
from ..numbers import table_number
from . import html_charts as charts
from .html import Page, _table, conv_sections, finding_block
from .rich_model import (
    conv_text,
    floor_ratio_text,
    shared_cause_sentence,
    sqnr_text,
    summary_sentence,
    torch_sentence,
)


def render_model_html(walk: ModelDiagnosis, *, bundle_file: str | Path | None = None) -> str:
    """The page of a model walk (a renderer: see ``render/__init__``); ``bundle_file``: the
    bundle's path, for the trace commands of the explained convs' error maps."""
    report = walk.report
    page = Page(f"qconvdiag model walk: {report.source or 'in-process'}")
    page.section("model", "Which conv is to blame", story(report))
    page.section("along", "Along the model", page.figure(
        charts.model_chart([r.name for r in report.layers],
                           [r.own.sqnr_db for r in report.layers],
                           [r.propagated.sqnr_db for r in report.layers],
                           "SQNR of each conv: its own error, and what the model carries there"),
        "own: the conv on the quantized input it received, against the float conv on that "
        "input; propagated: the quantized model against the float model at this conv (every "
        "conv before it included). A conv whose own line falls is at fault; one whose "
        "propagated line falls only inherited it."))
    page.section("layers", "The convs, worst first", layer_table(report))
    for detail in report.details:
        diagnosis = walk.diagnoses[detail.layer]
        page.sections.append(f'<h2 id="{escape(layer_anchor(detail.layer))}">'
                             f"Layer {escape(detail.layer)}</h2>")
        conv_sections(page, diagnosis, bundle_file, f"{layer_anchor(detail.layer)}-",
                      detail.layer)
    return page.html()


def layer_anchor(name: str) -> str:
    return "layer-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def story(report: ModelReport) -> str:
    parts = [f"<p>{escape(summary_sentence(report))}</p>"]
    shared = shared_cause_sentence(report)
    if shared is not None:
        parts.append(f'<p class="sev-error">{escape(shared)}</p>')
    parts += [f'<p class="sev-warning">{escape(u.message)}</p>' for u in report.upstream]
    parts += [finding_block(f, None, "model-") for f in report.findings]
    parts.append(f'<p class="note">{escape(torch_sentence(report))}</p>')
    parts += [f'<p class="note">note: {escape(n)}</p>' for n in report.notes]
    return "".join(parts)


def layer_table(report: ModelReport) -> str:
    explained = {d.layer for d in report.details}
    rows = []
    for rank, name in enumerate(report.ranking, 1):
        row = report.layer(name)
        assert row is not None
        link = (f'<a href="#{escape(layer_anchor(name))}">{escape(name)}</a>'
                if name in explained else escape(name))
        if row.output_dtype == "float32":  # judged on the kernel's float32 output
            link += ' <span class="note">(float32 output: screened only)</span>'
        rows.append((str(rank), link, escape(conv_text(row)), sqnr_text(row.own),
                     table_number(row.own.rmse, 3), floor_ratio_text(row),
                     sqnr_text(row.propagated),
                     escape(row.dominant_stage or "-"), escape(_finding(row))))
    return _table(("#", "conv", "weight", "own dB", "own RMSE", "x floor", "propagated dB",
                   "stage", "finding"), rows, escaped=True, numeric=(0, 3, 4, 5, 6))


def _finding(row: LayerRow) -> str:
    serious = [f for f in row.findings if f.severity != "info"]
    if serious:
        return f"{serious[0].code} {serious[0].title}"
    return "at its floor" if row.verdict == "at_floor" else "-"
