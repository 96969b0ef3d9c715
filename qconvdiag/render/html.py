"""``--html FILE``: one self-contained page (scripts, styles and data inline; nothing fetched
when it is viewed, works from file:// with the network off).

The page is built from sections, one small function each, on a ``Page`` that collects the
figures' Vega-Lite specs: the conv page is the header, the verdict and the findings (as in the
terminal, story first), then per path its stage waterfall, the input and weight values against
their quantization grid, and where in the output the error sits. A page of another kind (a
model's) is another list of sections on the same ``Page``.

Reads a finished diagnosis (the report and the arrays it kept) and the case's tensors; runs
nothing, prints nothing. Needs the ``html`` extra (altair and vl-convert-python).
"""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from ..case import ConvCase
from ..diagnosis import Diagnosis
from ..measure.evidence import PathRun
from ..numbers import table_number
from ..report import Finding, PathReport, Report
from . import html_charts as charts
from . import html_data as data
from .rich_report import (
    _sqnr,
    _values,
    cause_share,
    engine_line,
    first_fix_sentence,
    main_fix,
    other_sentence,
    verdict_sentence,
)
from .text import engine_outputs

#: Nothing but the page itself: no fetch, no image, font or script from anywhere else.
CONTENT_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                  "img-src data: blob:; font-src data:")


@dataclass
class Page:
    """A page under construction: its sections' HTML and its figures' specs."""

    title: str
    sections: list[str] = field(default_factory=list)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    toc: list[tuple[str, str]] = field(default_factory=list)
    """(anchor, label) of the sections listed at the top."""

    def figure(self, spec: dict[str, Any], caption: str = "", pickable: bool = False) -> str:
        """A figure's HTML (drawn by page.js from ``spec``); ``pickable``: clicking a cell
        shows its trace command under it."""
        fid = f"fig-{len(self.specs) + 1}"
        self.specs[fid] = spec
        picked = ('<p class="qcd-picked" hidden>trace this element: <code></code></p>'
                  if pickable else "")
        cap = f"<figcaption>{caption}</figcaption>" if caption else ""
        return (f'<figure class="qcd-figure" data-spec="{fid}"><div class="qcd-plot"></div>'
                f"{picked}{cap}</figure>")

    def section(self, anchor: str, label: str, body: str, level: int = 2) -> None:
        self.toc.append((anchor, label))
        self.sections.append(f'<section id="{escape(anchor)}"><h{level}>{escape(label)}'
                             f"</h{level}>{body}</section>")

    def html(self) -> str:
        return shell(self.title, _toc(self.toc) + "".join(self.sections), self.specs)


def render_html(diagnosis: Diagnosis, *, case_file: str | Path | None = None) -> str:
    """The page of one conv's diagnosis (a renderer: see ``render/__init__``). ``case_file``:
    the case's path, for the ``qconvdiag trace`` commands the error maps offer (None: a
    generated case not saved)."""
    return conv_page(diagnosis, case_file).html()


def conv_page(diagnosis: Diagnosis, case_file: str | Path | None = None) -> Page:
    c = diagnosis.report.case
    page = Page(f"qconvdiag: {c.op} input {c.input_shape} weight {c.weight_shape}")
    conv_sections(page, diagnosis, case_file)
    return page


def conv_sections(page: Page, diagnosis: Diagnosis, case_file: str | Path | None = None,
                  anchor: str = "", layer: str | None = None) -> None:
    """One conv's sections, added to ``page``: header, verdict, findings, each path, the
    engines. ``anchor`` prefixes their ids, so that several convs (a model's layers) can
    share a page; ``layer``: the conv's name in the model bundle ``case_file`` (for the trace
    commands)."""
    report = diagnosis.report
    page.sections.append(header_section(report))
    page.section(f"{anchor}verdict", "Verdict", verdict_section(report))
    page.section(f"{anchor}findings", "Findings", findings_section(report, anchor))
    runs = {(r.report.name, r.report.engine): r for r in diagnosis.runs}
    for p in ordered_paths(report):
        run = runs.get((p.name, p.engine))
        if run is not None:
            path_sections(page, run, diagnosis.case, case_file, anchor, layer)
    if report.engine_comparison:
        page.section(f"{anchor}engines", "Engines side by side", engines_section(report))
    page.sections.append(footer(report))


def ordered_paths(report: Report) -> list[PathReport]:
    """The judged path first, then the others in the report's order."""
    judged = report.verdict
    key = None if judged is None else (judged.path, judged.engine)
    return sorted(report.paths, key=lambda p: (p.name, p.engine) != key)


def path_label(p: PathReport) -> str:
    return f"{p.name} on {p.engine}"


def path_anchor(p: PathReport, anchor: str = "") -> str:
    return f"{anchor}path-{p.name}-{p.engine}"


# --- the story: header, verdict, findings -------------------------------------------------


def header_section(report: Report) -> str:
    c = report.case
    notes = "".join(f'<p class="note">note: {escape(n)}</p>' for n in c.notes)
    rows = [("float output", _values(report.float_output, 3), "", "")]
    for p in report.paths:
        if p.refused and not p.torch_check.ran:
            rows.append((f"{p.name} ({p.engine})", f"refused by torch: {p.refused}", "", ""))
            continue
        rows.append((f"{p.name} ({p.engine})", _values(p.output_summary, 3),
                     table_number(p.total.max_abs), _sqnr(p.total)))
    table = _table(("", "output", "max error", "SQNR"), rows, numeric=(1, 2, 3))
    engines = list(dict.fromkeys(p.engine for p in report.paths))
    lines = "".join(f"<p>{escape(engine_line(e, [p for p in report.paths if p.engine == e]))}"
                    "</p>" for e in engines)
    geometry = (f"stride {c.stride}, padding {c.padding}, dilation {c.dilation}, groups "
                f"{c.groups}" + (f", fused {c.activation}" if c.activation else ""))
    return (f"<header><h1>qconvdiag: {escape(c.op)} input {c.input_shape} weight "
            f"{c.weight_shape}</h1><p class=\"muted\">output {c.output_shape}; "
            f"{escape(geometry)}; source: {escape(c.source)}</p>{notes}{table}{lines}</header>")


def verdict_section(report: Report) -> str:
    judged = report.verdict
    if judged is None:
        return "<p>No verdict: no path could be judged.</p>"
    parts = [f'<p class="verdict">{escape(verdict_sentence(judged))}</p>']
    if judged.causes:
        parts.append(_table(("cause", "severity", "", "share of the excess"), [
            (f"{i}. {c.code}", _severity(c.severity), escape(c.title),
             cause_share(judged, i, c.share))
            for i, c in enumerate(judged.causes, 1)], escaped=True, numeric=(3,)))
    if judged.causes and judged.unexplained >= 0.05:
        parts.append(f"<p>{judged.unexplained:.0%} of the excess has no named cause.</p>")
    leaves = first_fix_sentence(judged)
    if leaves is not None:
        parts.append(f"<p>{escape(leaves)}</p>")
    if judged.first_fix and not judged.healthy:
        parts.append(f"<p>First fix ({escape(judged.causes[0].code)}):</p>"
                     + code_block(main_fix(judged.first_fix)))
    for v in report.verdicts:
        if v is not judged:
            parts.append(f"<p>{escape(other_sentence(v))}</p>")
    parts.append(gate_block(report))
    return "".join(parts)


def gate_block(report: Report) -> str:
    if not report.gate.breaches:
        return ""
    items = "".join(f"<li>{escape(b)}</li>" for b in report.gate.breaches)
    return f'<p class="sev-error">CI gate failed:</p><ul>{items}</ul>'


def findings_section(report: Report, anchor: str = "") -> str:
    if not report.findings:
        return "<p>No findings.</p>"
    judged = report.verdict
    judged_path = None if judged is None else judged.path
    shown = [finding_block(f, judged_path, anchor) for f in report.findings
             if f.severity != "info"]
    info = [finding_block(f, judged_path, anchor) for f in report.findings
            if f.severity == "info"]
    if info:
        shown.append(f"<details><summary>{len(info)} info finding(s): true but harmless, or "
                     f"advice</summary>{''.join(info)}</details>")
    return "".join(shown)


def finding_block(f: Finding, judged_path: str | None, anchor: str = "") -> str:
    """One finding; its id (``QCD050-as_given-x86``) is unique on the page, every engine's."""
    where = "" if f.path in (None, judged_path) else f" ({f.path})"
    fix = code_block(f.fix) if f.fix else ""
    fid = "-".join(str(x) for x in (f.code, f.path, f.engine) if x is not None)
    return (f'<article class="finding" id="{escape(anchor + fid)}">'
            f"<h3>{escape(f.code)} {_severity(f.severity)} {escape(f.title + where)}</h3>"
            f"<p>{escape(f.message)}</p>{fix}</article>")


def code_block(code: str) -> str:
    """Code the user can paste, with a copy button."""
    return (f'<div class="code"><button type="button" data-copy>copy</button>'
            f"<pre><code>{escape(code)}</code></pre></div>")


def _severity(severity: str) -> str:
    return f'<span class="sev sev-{escape(severity)}">{escape(severity)}</span>'


# --- one path: stages, values against the grid, where the error sits -----------------------


def path_sections(page: Page, run: PathRun, case: ConvCase | None,
                  case_file: str | Path | None, anchor: str = "",
                  layer: str | None = None) -> None:
    """One path: how its stages move the error, its input and weight values against their
    grids, and where in the output its error sits."""
    p = run.report
    body = stages_block(page, p) + values_block(page, run, case) + error_block(
        page, run, case_file, layer)
    page.section(path_anchor(p, anchor), path_label(p), body)


def stages_block(page: Page, p: PathReport) -> str:
    rows = data.waterfall(p)
    if not any(r.applies for r in rows):
        return f"<p>No stage ran: {escape(p.refused or 'the path could not run')}.</p>"
    figure = page.figure(charts.waterfall_chart(rows, f"{path_label(p)}: how each stage moves "
                                                      "the error"),
                         "Each bar runs from the error before the stage to the error after "
                         "it (cumulative RMSE against the float output), so the bars build up "
                         "to the total (dashed). A diamond marks the stage's isolated effect: "
                         "the same effect alone on the float output. Hover for the numbers.")
    return "<h3>Stages</h3>" + figure + stage_table(p) + f"<p>{escape(stage_caption(p))}</p>"


def stage_table(p: PathReport) -> str:
    """The terminal's stage table: what each stage adds (max |error|), the cumulative
    max |error|, the stage's RMSE, its floor and its share of the excess."""
    b = p.budget
    rows = []
    for s in p.stages:
        if not s.applies or s.delta is None or s.cumulative is None:
            rows.append((escape(s.id), f'<span title="{escape(s.reason or "")}">n/a</span>',
                         "", "", "", "", ""))
            continue
        sb = b.stage(s.id) if b is not None else None
        if sb is not None and sb.exact:
            rows.append((s.id, "exact", table_number(s.cumulative.max_abs), "", "", "", ""))
            continue
        share = None if b is None or sb is None else b.excess_share(sb)
        rows.append((s.id, table_number(s.delta.max_abs), table_number(s.cumulative.max_abs),
                     table_number(s.delta.rmse, 3), "" if sb is None else table_number(sb.floor, 3),
                     f"{share:.0%}" if share else "", _share_bar(share)))
    return _table(("stage", "max adds", "max so far", "RMSE adds", "floor", "excess", ""), rows,
                  escaped=True, numeric=(1, 2, 3, 4, 5))


def stage_caption(p: PathReport) -> str:
    b = p.budget
    check = (f"{p.torch_check.mismatched_elements} mismatches" if p.torch_check.ran
             else "not run")
    floor = "" if b is None else f" (floor {table_number(b.floor_rmse, 3)})"
    return (f"total RMSE {table_number(p.total.rmse, 3)}{floor}, SQNR {_sqnr(p.total)}; torch vs "
            f"emulation: {check}")


def _share_bar(share: float | None) -> str:
    if not share:
        return ""
    return f'<span class="bar" style="width:{max(1, round(share * 80))}px"></span>'


def values_block(page: Page, run: PathRun, case: ConvCase | None) -> str:
    spec, p = run.spec, run.report
    parts = ["<h3>Values against the quantization grid</h3>"]
    if case is None:
        return parts[0] + "<p>The diagnosis kept no case: its values are not drawn.</p>"
    for name, values, qp in (("input", case.input, spec.input_qparams),
                             ("weight", case.weight, spec.weight_qparams)):
        h = data.value_histogram(values, qp)
        parts.append(page.figure(charts.histogram_chart(
            h, f"{path_label(p)}: {name} values, {qp.report().describe()}", histogram_notes(h)),
            histogram_caption(name, h)))
        ranges = data.channel_ranges(values, qp)
        if ranges is not None:
            parts.append(page.figure(charts.channel_ranges_chart(
                ranges, f"{path_label(p)}: {name} range per channel against its clipping range")))
    return "".join(parts)


def histogram_notes(h: data.Histogram) -> list[str]:
    """The histogram's subtitle: clipped mass, and what the grid lines show."""
    clipped = h.below + h.above
    share = clipped / h.total if h.total else 0.0
    notes = [f"{clipped} of {h.total} values clipped ({share:.2%}): {h.below} below "
             f"{h.low:.5g}, {h.above} above {h.high:.5g}"]
    lo, hi = float(h.edges[0]), float(h.edges[-1])
    if h.low < lo or h.high > hi:
        notes.append(f"the representable range [{h.low:.5g}, {h.high:.5g}] reaches beyond "
                     "the view")
    if h.grid_every > 1:
        notes.append(f"grid: every {h.grid_every}th quantization level")
    return notes


def histogram_caption(name: str, h: data.Histogram) -> str:
    unit = ("in quantization steps of each channel (value / scale + zero point), so every "
            "channel shares one grid" if h.codes else "in float units")
    return (f"The {name} values {unit}. Faint lines: the quantization levels; dashed red: "
            "the clipping bounds, the shaded range beyond them is clipped and its bins are "
            "red; black: the zero point.")


def error_block(page: Page, run: PathRun, case_file: str | Path | None,
                layer: str | None = None) -> str:
    errors = data.path_errors(run)
    if errors is None:
        return "<h3>Where the error sits</h3><p>The path did not run: no output to map.</p>"
    p = run.report
    ce = data.channel_errors(errors.error)
    worst = ce.worst()
    parts = ["<h3>Where the error sits</h3>", page.figure(charts.channel_error_chart(
        ce, worst, f"{path_label(p)}: error per output channel"),
        "RMSE and largest |error| of each output channel over every batch element and "
        "position; the orange channels are mapped below.")]
    if not worst:
        parts.append("<p>The output has no error anywhere: no map to draw.</p>")
    trace = trace_command(p, case_file, layer)
    peak = float(ce.max_abs.max()) if ce.max_abs.size else 0.0
    for channel in worst:
        parts.append(heatmap_figure(page, errors, channel, p, trace, peak))
    if case_file is None:
        parts.append('<p class="note">This case was generated and not saved: save it with '
                     "<code>--save CASE.pt</code> and put its name in place of CASE in the "
                     "trace commands.</p>")
    return "".join(parts)


def heatmap_figure(page: Page, errors: data.PathErrors, channel: int, p: PathReport,
                   trace: tuple[str, str], peak: float) -> str:
    hm = data.heatmap(errors, channel)
    return page.figure(
        charts.heatmap_chart(hm, trace, peak, f"{path_label(p)}: error of output channel {channel}",
                             heatmap_notes(hm)),
        "quantized - float at each output position (red: above the float output, blue: "
        "below). Hover a cell for its value and the qconvdiag trace command of that element; "
        "click it to show the command here.", pickable=True)


def heatmap_notes(hm: data.Heatmap) -> list[str]:
    where = [f"batch element {hm.batch}"] + ([] if hm.depth is None else [f"depth {hm.depth}"])
    notes = [", ".join(where) + " (the one holding the channel's largest |error|)"]
    if hm.downsampled:
        bh, bw = hm.block
        rows, cols = hm.cells
        notes.append(f"downsampled from {hm.shape[0]} x {hm.shape[1]} to {rows} x {cols} "
                     f"cells: each cell shows the element with the largest |error| of its "
                     f"{bh} x {bw} block")
    return notes


def trace_command(p: PathReport, case_file: str | Path | None,
                  layer: str | None = None) -> tuple[str, str]:
    """``qconvdiag trace CASE --at `` and `` --path P --engine E``: the text around the
    indices (with ``--layer NAME`` for a conv of a model bundle)."""
    case = "CASE" if case_file is None else shlex.quote(str(case_file))
    of = "" if layer is None else f" --layer {shlex.quote(layer)}"
    return f"qconvdiag trace {case}{of} --at ", f" --path {p.name} --engine {p.engine}"


# --- the rest: engines, footer, table, shell ------------------------------------------------


def engines_section(report: Report) -> str:
    rows = []
    for row in report.engine_comparison:
        rows.append((str(row.path), row.engine, str(row.kernel), engine_outputs(row),
                     "; ".join(row.causes)))
    return _table(("path", "engine", "kernel", "outputs", "why"), rows)


def footer(report: Report) -> str:
    isa = ", ".join(report.cpu.isa) or "no ISA flags detected"
    return (f'<footer class="note"><p>qconvdiag {escape(report.qconvdiag_version)}, torch '
            f"{escape(report.torch_version)}, CPU: {escape(isa)}. The same numbers as JSON: "
            "<code>--json</code>.</p></footer>")


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], escaped: bool = False,
           numeric: Sequence[int] = ()) -> str:
    """``escaped``: the cells are HTML already (the head is always text); ``numeric``: the
    columns aligned right."""
    cell = (lambda x: x) if escaped else escape

    def attr(i: int) -> str:
        return ' class="num"' if i in numeric else ""

    th = "".join(f"<th{attr(i)}>{escape(h)}</th>" for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{attr(i)}>{cell(str(v))}</td>" for i, v in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _toc(entries: Sequence[tuple[str, str]]) -> str:
    links = "".join(f'<li><a href="#{escape(a)}">{escape(label)}</a></li>' for a, label in entries)
    return f"<nav><ul>{links}</ul></nav>"


@functools.lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one script that defines ``window.vegaEmbed``
    (vl-convert bundles them: ~0.9 MB, 2-3 s once per process), for altair's Vega-Lite
    version."""
    import altair
    import vl_convert

    major, minor = altair.SCHEMA_VERSION.lstrip("v").split(".")[:2]  # v6.4.1 -> v6_4
    return str(vl_convert.javascript_bundle("window.vegaEmbed = vegaEmbed;",
                                            vl_version=f"v{major}_{minor}"))


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("html_assets", name).read_text("utf-8")


def _inline_script(code: str) -> str:
    """A script's text made safe inside <script>: no ``</script`` can end it early."""
    return code.replace("</script", "<\\/script").replace("</SCRIPT", "<\\/SCRIPT")


def shell(title: str, body: str, specs: dict[str, dict[str, Any]]) -> str:
    """The whole page: policy, styles, error recording, the Vega bundle, the specs, page.js."""
    spec_json = json.dumps(specs, allow_nan=False, separators=(",", ":")).replace("</", "<\\/")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_asset('page.css')}</style>"
        f"<script>{_inline_script(_asset('head.js'))}</script>"
        f"<script>{_inline_script(vega_bundle())}</script></head><body>{body}"
        f'<script type="application/json" id="qcd-specs">{spec_json}</script>'
        f"<script>{_inline_script(_asset('page.js'))}</script></body></html>\n"
    )
