"""The terminal report (rich): header, stage table, findings with fixes, paths side by side.

Readable at 80 columns; rich turns colour off when stdout is not a TTY or NO_COLOR is set.
"""

from __future__ import annotations

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from ..metrics import Metrics
from ..report import Finding, PathReport, Report

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
ACCUMULATION_WORDS = {
    "exact": "exact int32 accumulation",
    "int16_pairs_k": "int16 pair sums along K (saturating)",
    "int16_pairs_channels": "int16 pair sums of adjacent channels (saturating)",
    "unknown": "accumulation not identified by the probe",
}


def _num(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e5:
        return f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return f"{x:.{digits - 1}e}"


def _values(summary: dict[str, object] | object) -> str:
    if not isinstance(summary, dict) or "values" not in summary:
        return "-"
    vals = summary["values"]
    assert isinstance(vals, list)
    head = ", ".join(_num(v) for v in vals[:4])
    return head if len(vals) <= 4 else head + ", ..."


def _sqnr(m: Metrics) -> str:
    if m.sqnr_db is None:
        return "inf" if m.max_abs == 0 else "-"
    return f"{m.sqnr_db:.1f} dB"


def _bar(share: float | None, width: int = 10) -> str:
    if share is None:
        return ""
    n = int(round(max(0.0, min(1.0, share)) * width))
    return "█" * n + "·" * (width - n)


def header(report: Report) -> Panel:
    case = report.case
    lines = Text()
    lines.append(f"{case['op']}  input {tuple(case['input_shape'])}  weight "
                 f"{tuple(case['weight_shape'])}  groups {case['groups']}\n", style="bold")
    lines.append(f"source: {case['source']}\n")
    for note in case.get("notes", []):
        lines.append(f"note: {note}\n", style="dim")
    lines.append("float output      ", style="bold")
    lines.append(f"{_values(dict(report.float_output))}\n")
    for p in report.paths:
        label = f"{p.name} ({p.engine})".ljust(18)
        lines.append(label, style="bold")
        if p.refused and p.torch_check.ran is False:
            lines.append(f"refused by torch: {p.refused}\n", style="red")
            continue
        lines.append(f"{_values(dict(p.output_summary))}   max error {_num(p.total.max_abs)}, "
                     f"SQNR {_sqnr(p.total)}\n")
    engines = sorted({p.engine for p in report.paths})
    for e in engines:
        p = next(x for x in report.paths if x.engine == e)
        lines.append(f"engine {e}: kernel {p.kernel}, "
                     f"{ACCUMULATION_WORDS.get(p.accumulation, p.accumulation)} on this CPU")
        if e != engines[-1]:
            lines.append("\n")
    return Panel(lines, title="qconvdiag", box=box.ROUNDED)


def stage_table(p: PathReport) -> Table:
    t = Table(title=f"{p.name} path on {p.engine}: where the error comes from", box=box.SIMPLE,
              title_justify="left", pad_edge=False)
    t.add_column("stage", no_wrap=True, min_width=17)
    t.add_column("adds", justify="right", no_wrap=True, min_width=10)
    t.add_column("cumulative", justify="right", no_wrap=True, min_width=10)
    t.add_column("share", justify="right", no_wrap=True)
    t.add_column("", max_width=30)
    for s in p.stages:
        if not s.applies:
            t.add_row(Text(s.id, style="dim"), Text("n/a", style="dim"), "", "",
                      Text(s.reason or "", style="dim"))
            continue
        assert s.delta is not None and s.cumulative is not None
        share = "-" if s.share is None else f"{s.share:.0%}"
        t.add_row(s.id, _num(s.delta.max_abs), _num(s.cumulative.max_abs), share, _bar(s.share))
    t.caption = (f"max abs error per stage, float units; total {_num(p.total.max_abs)} "
                 f"(RMSE {_num(p.total.rmse)}, SQNR {_sqnr(p.total)}); torch vs emulation: "
                 + (f"{p.torch_check.mismatched_elements} mismatches" if p.torch_check.ran
                    else "not run"))
    return t


def finding_block(f: Finding) -> Group:
    head = Text()
    head.append(f"{f.code} ", style="bold")
    head.append(f"{f.severity:<7} ", style=SEVERITY_STYLE[f.severity])
    head.append(f.title, style="bold")
    parts: list[object] = [head, Text(f"  {f.message}")]
    if f.fix:
        parts.append(Syntax(f.fix, "python", theme="ansi_dark", word_wrap=True,
                            background_color="default", padding=(0, 2)))
    return Group(*parts)  # type: ignore[arg-type]


def qparams_table(report: Report) -> Table:
    engine = report.paths[0].engine
    paths = [p for p in report.paths if p.engine == engine]
    t = Table(title="the paths side by side", box=box.SIMPLE, title_justify="left")
    t.add_column("")
    for p in paths:
        t.add_column(p.name)

    def qp_text(p: PathReport, key: str) -> str:
        qp = p.qparams.get(key)
        if qp is None:
            return "-"
        if qp.per_channel:
            return f"{qp.dtype} per-channel {min(qp.scale):.4g}..{max(qp.scale):.4g}"
        return f"{qp.dtype} s={qp.scale[0]:.4g} zp={qp.zero_point[0]} ({qp.source})"

    for key in ("input", "weight", "output", "module_weight", "module_output"):
        if any(key in p.qparams for p in paths):
            t.add_row(key, *[qp_text(p, key) for p in paths])
    t.add_row("output", *[_values(dict(p.output_summary)) for p in paths])
    t.add_row("max error", *[_num(p.total.max_abs) for p in paths])
    t.add_row("SQNR", *[_sqnr(p.total) for p in paths])
    return t


def engines_table(report: Report) -> Table | None:
    if not report.engine_comparison:
        return None
    t = Table(title="engines side by side", box=box.SIMPLE, title_justify="left")
    for col in ("path", "engine", "output", "max error", "vs torch", "differs from ref"):
        t.add_column(col)
    by_key = {(p.name, p.engine): p for p in report.paths}
    for row in report.engine_comparison:
        p = by_key.get((str(row["path"]), str(row["engine"])))
        if p is None:
            t.add_row("-", str(row["engine"]), "-", "-", "-", "; ".join(row["causes"]))
            continue
        check = (f"{p.torch_check.mismatched_elements} mismatches" if p.torch_check.ran
                 else "not run")
        if row["differing_elements"] is None:
            vs = "; ".join(row["causes"]) or "reference"
        else:
            vs = f"{row['differing_elements']} outputs vs {row['reference_engine']}"
            if row["causes"]:
                vs += ": " + "; ".join(row["causes"])
        t.add_row(p.name, p.engine, _values(dict(p.output_summary)), _num(p.total.max_abs),
                  check, vs)
    return t


def render_rich(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    console.print(header(report))
    for p in report.paths:
        if p.engine == report.paths[0].engine:
            console.print(stage_table(p))
    if report.findings:
        console.print(Text("findings, by impact", style="bold underline"))
        for f in report.findings:
            console.print(finding_block(f))
            console.print()
    console.print(qparams_table(report))
    et = engines_table(report)
    if et is not None:
        console.print(et)
    if report.gate.get("breaches"):
        console.print(Text("CI gate failed:", style="bold red"))
        for b in report.gate["breaches"]:  # type: ignore[union-attr]
            console.print(f"  - {b}")
