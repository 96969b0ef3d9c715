"""The terminal report (rich), story first: the header, the verdict in plain words, the judged
path's stage table with its floor, then the findings with their fixes. ``verbose`` adds the
other path's table, the qparams side by side, and every info finding in full.

Readable at 80 columns; rich turns colour off when stdout is not a TTY or NO_COLOR is set. Code
is never wrapped: every line of a fix is printed whole (soft-wrapped by the terminal at most),
so it pastes as it is; prose wraps with a hanging indent.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from ..measure.budget import AT_FLOOR, SLACK
from ..numbers import table_number as _num
from ..report import Finding, Metrics, OutputSummary, PathReport, Report, Verdict
from .text import engine_outputs, hanging

SEVERITY_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
ACCUMULATION_WORDS = {
    "exact": "exact int32 accumulation",
    "int16_pairs_k": "int16 pair sums along K (saturating)",
    "int16_pairs_channels": "int16 pair sums of adjacent channels (saturating)",
    "unknown": "accumulation not identified by the probe",
}
STATUS_WORDS = {
    "at_floor": "at its floor",
    "above_floor": "above its floor",
    "broken": "broken",
    "refused": "refused by torch",
}
INDENT = 2


def _values(summary: OutputSummary | None, n: int = 4) -> str:
    if summary is None or not summary.values:
        return "-"
    head = ", ".join(_num(v) for v in summary.values[:n])
    return head if len(summary.values) <= n else head + ", ..."


def _sqnr(m: Metrics) -> str:
    if m.sqnr_db is None:
        return "inf" if m.max_abs == 0 else "-"
    return f"{m.sqnr_db:.1f} dB"


def _bar(share: float | None, width: int = 8) -> str:
    if share is None:
        return ""
    n = int(round(max(0.0, min(1.0, share)) * width))
    return "█" * n + "·" * (width - n)


def _prose(text: str, style: str = "") -> Padding:
    """A paragraph that wraps with the report's hanging indent."""
    return Padding(Text(text, style=style), (0, 0, 0, INDENT))


def _print_code(console: Console, code: str, indent: int = INDENT) -> None:
    """Every line whole: soft wrap (the terminal's, not rich's) keeps it pasteable."""
    highlighted = Syntax(code, "python", theme="ansi_dark", background_color="default")
    for line in highlighted.highlight(code).split("\n"):
        if line.plain == "" and not code.endswith("\n"):
            continue
        console.print(Text(" " * indent) + line, soft_wrap=True)


def main_fix(fix: str) -> str:
    """A fix without its alternatives (the lines from the first ``# or ...`` on)."""
    lines = fix.split("\n")
    cut = next((i for i, line in enumerate(lines) if i and line.startswith("# or ")), len(lines))
    return "\n".join(lines[:cut])


def engine_line(engine: str, paths: list[PathReport]) -> str:
    """Which kernel ran which part: x86 hands symmetric weights to onednn and the others to
    fbgemm, so the setup and a quantized module holding another weight can differ."""
    p = paths[0]
    words = ACCUMULATION_WORDS.get(p.accumulation, p.accumulation)
    split = [x for x in paths if x.setup_kernel and x.setup_kernel != x.kernel]
    if not split:
        return f"engine {engine}: kernel {p.kernel}, {words} on this CPU"
    x = split[0]
    if x.setup_accumulation == x.accumulation:
        return (f"engine {engine}: kernel {x.setup_kernel} for the {x.name} setup, "
                f"{x.kernel} for its module; {words} on this CPU")
    setup_words = ACCUMULATION_WORDS.get(x.setup_accumulation, x.setup_accumulation)
    return (f"engine {engine}: kernel {x.setup_kernel} for the {x.name} setup ({setup_words}), "
            f"{x.kernel} for its module ({words}) on this CPU")


def header(report: Report) -> Panel:
    case = report.case
    lines = Text()
    lines.append(f"{case.op}  input {case.input_shape}  weight {case.weight_shape}  groups "
                 f"{case.groups}\n", style="bold")
    lines.append(f"source: {case.source}\n")
    for note in case.notes:
        lines.append(f"note: {note}\n", style="dim")
    width = max([len(f"{p.name} ({p.engine})") for p in report.paths] + [len("float output")])
    lines.append("float output".ljust(width + 2), style="bold")
    lines.append(f"{_values(report.float_output, 3)}\n")
    for p in report.paths:
        lines.append(f"{p.name} ({p.engine})".ljust(width + 2), style="bold")
        if p.refused and p.torch_check.ran is False:
            lines.append(f"refused by torch: {p.refused}\n", style="red")
            continue
        lines.append(f"{_values(p.output_summary, 3)}  max error "
                     f"{_num(p.total.max_abs)}, SQNR {_sqnr(p.total)}\n")
    engines = list(dict.fromkeys(p.engine for p in report.paths))
    for e in engines:
        lines.append(engine_line(e, [x for x in report.paths if x.engine == e]))
        if e != engines[-1]:
            lines.append("\n")
    return Panel(lines, title="qconvdiag", box=box.ROUNDED)


def verdict_sentence(v: Verdict) -> str:
    where = f"{v.path} on {v.engine}"
    if v.status == "refused":
        return f"{where}: refused by torch, so it cannot run as written."
    sqnr = "" if v.sqnr_db is None else f"SQNR {v.sqnr_db:.1f} dB"
    floor = "" if v.floor_sqnr_db is None else f"{v.floor_sqnr_db:.1f} dB at the floor"
    db = ", ".join(x for x in (sqnr, floor) if x)
    ratio = "" if v.ratio is None else f"RMSE {_num(v.rmse)} is {_num(v.ratio, 2)}x its floor"
    if ratio and v.status == "at_floor" and v.ratio is not None and v.ratio > AT_FLOOR:
        ratio += (", within the wider band a small output allows "
                  f"({AT_FLOOR:g}x + {SLACK / 2:g}/√outputs)")
    detail = "; ".join(x for x in (ratio, db) if x)
    text = f"{where} is {STATUS_WORDS[v.status]}" + (f" ({detail})" if detail else "") + "."
    if v.healthy and v.causes:  # info findings only
        text += (" Nothing is misconfigured; worth knowing:" if v.status == "at_floor" else
                 " No misuse found; what lifts it above its floor is advice:")
    elif v.healthy:
        text += (" Nothing is misconfigured." if v.status == "at_floor" else
                 " No misuse found, and no cause explains the rest.")
    return text


def other_sentence(v: Verdict) -> str:
    """The advice path's verdict, in one line."""
    if v.status == "refused":
        return f"{v.path} on {v.engine}: refused by torch."
    sqnr = "" if v.sqnr_db is None else f", SQNR {v.sqnr_db:.1f} dB"
    return f"{v.path} on {v.engine}: {STATUS_WORDS[v.status]}{sqnr}."


def cause_share(v: Verdict, i: int, share: float) -> str:
    """A cause's share of the excess; on a refused path, what stops it, then what would
    remain once it runs; after the named causes, the errors their fixes leave ('then')."""
    if v.status == "refused":
        return "refused" if i == 1 else "then"
    return f"{share:.0%}" if share > 0 else "then"


def verdict_block(console: Console, report: Report) -> None:
    if not report.verdicts:
        return
    console.print(Text("verdict", style="bold underline"))
    judged = report.verdict
    for v in report.verdicts:
        if v is not judged and v.engine != (judged.engine if judged else v.engine):
            continue
        if v is not judged:
            console.print(_prose(other_sentence(v)))
            continue
        console.print(_prose(verdict_sentence(v), "bold"))
        if v.causes:
            rows = Table.grid(padding=(0, 1), expand=True)
            rows.add_column(no_wrap=True)
            rows.add_column(no_wrap=True)
            rows.add_column(ratio=1)
            rows.add_column(no_wrap=True, justify="right")
            for i, c in enumerate(v.causes, 1):
                rows.add_row(f"{i}. {c.code}", Text(f"{c.severity:<7}",
                                                    SEVERITY_STYLE[c.severity]),
                             c.title, cause_share(v, i, c.share))
            console.print(Padding(rows, (0, 0, 0, INDENT * 2)))
        if v.causes and v.unexplained >= 0.05:
            console.print(_prose(f"  {v.unexplained:.0%} of the excess has no named cause."))
        leaves = first_fix_sentence(v)
        if leaves is not None:
            console.print(_prose(f"  {leaves}"))
        if v.first_fix and not v.healthy:
            console.print(_prose(f"first fix ({v.causes[0].code}):"))
            _print_code(console, main_fix(v.first_fix), INDENT * 2)


def first_fix_leaves(v: Verdict) -> float | None:
    """Where a verdict names several causes and its first one's fix alone leaves the path
    broken (FAR times its floor or more: the excess the other causes explain stays), the
    ratio to its floor that fix leaves; else None. A user who ran the first fix alone saw
    0.6 dB become 2.0 dB (three causes, none with most of the excess)."""
    from ..measure.budget import FAR

    if v.healthy or v.ratio is None or len(v.causes) < 2 or v.causes[0].share >= 1:
        return None
    excess = v.ratio ** 2 - 1
    left = (1 + (1 - v.causes[0].share) * excess) ** 0.5
    return left if left >= FAR else None


def first_fix_sentence(v: Verdict) -> str | None:
    """What the verdict says where its first cause's fix alone leaves the path broken."""
    left = first_fix_leaves(v)
    return None if left is None else (f"The first cause's fix alone leaves about {left:.0f}x "
                                      "the floor: each cause listed needs its own.")


def stage_table(p: PathReport) -> Table:
    b = p.budget
    t = Table(title=f"{p.name} on {p.engine}: where the error comes from", box=None,
              title_justify="left", pad_edge=False, show_edge=False, padding=(0, 1))
    t.add_column("stage", no_wrap=True, min_width=17)
    t.add_column("max adds", justify="right", no_wrap=True)
    t.add_column("max so far", justify="right", no_wrap=True)
    t.add_column("RMSE adds", justify="right", no_wrap=True)
    t.add_column("floor", justify="right", no_wrap=True)
    t.add_column("excess", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    for s in p.stages:
        if not s.applies:  # the reason is in the JSON and --verbose
            t.add_row(Text(s.id, style="dim"), Text("n/a", style="dim"), "", "", "", "", "")
            continue
        assert s.delta is not None and s.cumulative is not None
        sb = b.stage(s.id) if b is not None else None
        if sb is not None and sb.exact:
            t.add_row(s.id, "exact", _num(s.cumulative.max_abs), "", "", "", "")
            continue
        share = None if b is None or sb is None else b.excess_share(sb)
        t.add_row(s.id, _num(s.delta.max_abs), _num(s.cumulative.max_abs),
                  _num(s.delta.rmse, 3), "" if sb is None else _num(sb.floor, 3),
                  "" if not share else f"{share:.0%}", _bar(share) if share else "")
    return t


def stage_caption(p: PathReport) -> Text:
    b = p.budget
    check = (f"{p.torch_check.mismatched_elements} mismatches" if p.torch_check.ran
             else "not run")
    floor = "" if b is None else f" (floor {_num(b.floor_rmse, 3)})"
    return Text(f"total RMSE {_num(p.total.rmse, 3)}{floor}, SQNR {_sqnr(p.total)}; "
                f"torch vs emulation: {check}")


def finding_block(console: Console, f: Finding, full: bool = True, judged: str | None = None
                  ) -> None:
    head = Table.grid(padding=(0, 1))
    head.add_column(no_wrap=True)
    head.add_column(no_wrap=True)
    head.add_column(ratio=1)
    where = "" if f.path in (None, judged) else f" ({f.path})"
    head.add_row(Text(f.code, style="bold"), Text(f"{f.severity:<7}", SEVERITY_STYLE[f.severity]),
                 Text(f.title + where, style="bold"))
    console.print(head)
    if not full:
        return
    console.print(_prose(f.message))
    if f.fix:
        _print_code(console, f.fix)


def qparams_table(report: Report) -> Table:
    engine = report.paths[0].engine
    paths = [p for p in report.paths if p.engine == engine]
    t = Table(title="the paths side by side", box=box.SIMPLE, title_justify="left")
    t.add_column("")
    for p in paths:
        t.add_column(p.name)

    def qp_text(p: PathReport, key: str) -> str:
        qp = p.qparams.get(key)
        return "-" if qp is None else f"{qp.describe()} ({qp.source})"

    for key in ("input", "weight", "output", "module_weight", "module_output"):
        if any(key in p.qparams for p in paths):
            t.add_row(key, *[qp_text(p, key) for p in paths])
    t.add_row("output", *[_values(p.output_summary) for p in paths])
    t.add_row("max error", *[_num(p.total.max_abs) for p in paths])
    t.add_row("SQNR", *[_sqnr(p.total) for p in paths])
    return t


def engines_block(console: Console, report: Report) -> None:
    """Every engine's output against the path's first engine (values, in that engine's output
    steps), one row each; the causes of a difference below it, with a hanging indent."""
    if not report.engine_comparison:
        return
    console.print()
    console.print(Text("engines side by side", style="bold underline"))
    by_key = {(p.name, p.engine): p for p in report.paths}
    for row in report.engine_comparison:
        p = by_key.get((str(row.path), row.engine))
        if p is None:
            hanging(console, f"{row.engine}: " + "; ".join(row.causes), 4)
            continue
        vs = engine_outputs(row)
        if p.torch_check.ran and p.torch_check.mismatched_elements:
            vs += f"; torch differs in {p.torch_check.mismatched_elements} outputs"
        hanging(console, f"{p.name:<11}{p.engine:<8}{_values(p.output_summary, 2):<12} "
                f"max error {_num(p.total.max_abs):<10} {vs}", 4)
        for cause in row.causes:
            hanging(console, f"    {cause}", 6, style="dim")


def render_rich(report: Report, console: Console | None = None, verbose: bool = False) -> None:
    console = console or Console()
    console.print(header(report))
    verdict_block(console, report)
    judged = report.verdict
    first = report.paths[0].engine
    for p in report.paths:
        is_judged = judged is not None and (p.name, p.engine) == (judged.path, judged.engine)
        if is_judged or (verbose and p.engine == first):
            console.print()
            if not any(s.applies for s in p.stages):  # no kernel defines its arithmetic
                console.print(Text(f"{p.name} on {p.engine}: no stage ran: "
                                   f"{p.refused or 'the path could not run'}."))
                continue
            console.print(stage_table(p))
            console.print(stage_caption(p))
    if any(verbose or f.code != "QCD070" for f in report.findings):
        console.print()
        heading = Text("findings", style="bold underline")
        if not verbose and any(f.severity == "info" for f in report.findings):
            heading.append(" (--verbose: info findings in full, both paths' stages)",
                           style="dim")
        console.print(heading)
        for f in report.findings:
            if f.code == "QCD070" and not verbose:
                continue  # the verdict says it
            full = verbose or f.severity != "info"
            finding_block(console, f, full, None if judged is None else judged.path)
            if full:
                console.print()
    if verbose:
        for p in report.paths:
            for s in p.stages:
                if not s.applies and p.engine == first:
                    console.print(Text(f"{p.name}: {s.id} n/a: {s.reason}", style="dim"))
        console.print(qparams_table(report))
    engines_block(console, report)
    if report.gate.breaches:
        console.print(Text("CI gate failed:", style="bold red"))
        for b in report.gate.breaches:
            console.print(f"  - {b}")
