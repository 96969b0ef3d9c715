"""Terminal rendering of a model walk: the story first (which conv is to blame), then every conv
in model order with its own and propagated error, then the explained layers in full."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from ..arithmetic.engines import PT2E_ENGINES
from ..case import trained_with_qat
from ..model_report import ErrorSummary, LayerRow, ModelReport
from ..numbers import table_number as _num
from .rich_report import SEVERITY_STYLE, STATUS_WORDS, _print_code, finding_block, render_rich
from .text import hanging


def sqnr_text(e: ErrorSummary) -> str:
    """SQNR in dB; ``inf`` for an exact output, ``-`` when the reference is all zero."""
    if e.sqnr_db is None:
        return "inf" if e.max_abs == 0 else "-"
    return f"{e.sqnr_db:.1f}"


def conv_text(row: LayerRow) -> str:
    """The conv's weight shape, ``relu`` when fused: ``32x16x3x3 relu``."""
    return "x".join(str(n) for n in row.weight_shape) + (" relu" if row.op.endswith("+relu")
                                                          else "")


def floor_ratio_text(row: LayerRow) -> str:
    if row.floor_rmse <= 0:
        return "-"
    return f"{row.own.rmse / row.floor_rmse:.1f}x"


def _first_finding(row: LayerRow) -> Text:
    serious = [f for f in row.findings if f.severity != "info"]
    if not serious:
        return Text("-" if row.verdict == "at_floor" else "(info only)", style="dim")
    f = serious[0]
    return Text(f.code, style=SEVERITY_STYLE[f.severity])


def fix_names(layer: str, row: LayerRow | None) -> tuple[str, str | None]:
    """What ``qm`` and ``conv`` stand for in a layer's fixes, and, with its BatchNorm folded,
    the code that builds that conv (the float model's own conv is the one before the fold),
    to print whole."""
    bn = None if row is None else row.bn_folded
    if bn is None:
        return (f"In the fixes, qm is quantized.get_submodule({layer!r}) and conv the float "
                f"model's {layer!r}.", None)
    return (f"In the fixes, qm is quantized.get_submodule({layer!r}) and conv the float "
            f"model's {layer!r} with its BatchNorm {bn!r} folded in, as the quantized model "
            "folded it (the fixes give the quantized conv that conv's weight and bias; model "
            "is the float model, in eval mode):",
            f"conv = torch.nn.utils.fusion.fuse_conv_bn_eval(\n"
            f"    model.get_submodule({layer!r}), model.get_submodule({bn!r}))")


#: What a finding shared by most convs says about the model as a whole.
MODEL_WIDE = {
    "QCD050": "the model was converted without calibration (its observers never ran): run "
              "calibration batches between prepare() and convert()",
    "QCD024": "the quantized model was not made from this float model's weights (or they "
              "changed since): quantize this float model again (prepare, calibrate, convert)",
    "QCD052": "their output scales are coarser than their outputs need: the model was "
              "calibrated on data scaled differently from the inputs it gets now, or with 7-bit "
              "observers (reduce_range=True, as the x86 and fbgemm qconfigs set) on an engine "
              "whose kernels do not need them (a step about 2x the range's: each conv's "
              "finding gives its ratio)",
    "QCD051": "their outputs saturate: the model was calibrated on data narrower than the "
              "inputs it gets now",
}


def shared_cause_sentence(report: ModelReport) -> str | None:
    from ..findings.output_rules import REDUCED_TITLE

    shared = report.shared_cause()
    if shared is None:
        return None
    f, n = shared
    why = ("the model was quantized with 7-bit activations (reduce_range=True, as x86's and "
           "fbgemm's default qconfig sets: only their int16 pair sums need it) and runs on "
           "qnnpack, whose kernels sum exactly: quantize it with qnnpack's 8-bit activations "
           "(get_default_qconfig('qnnpack').activation; per-channel weights may stay, "
           "default_per_channel_weight_observer, as the layers' fixes keep them)"
           if f.title == REDUCED_TITLE
           else MODEL_WIDE.get(f.code, "one cause for the whole model, and one fix"))
    return (f"A model-wide cause: {n} of {len(report.layers)} convs report {f.code} "
            f"({f.title}): {why}.")


#: Findings that name no cause of a conv's error: a deprecated API (QCD060).
NO_ERROR_CODES = frozenset({"QCD060"})


def summary_sentence(report: ModelReport) -> str:
    serious = [f for f in report.findings if f.severity != "info"]
    if not serious:
        return _convs_sentence(report)
    f = serious[0]
    return (_convs_sentence(report) + f" Beyond its convs, the model as a whole: {f.code} "
            f"({f.severity}: {f.title}), below.")


def _convs_sentence(report: ModelReport) -> str:
    rows = report.layers
    off = [r for r in rows if r.verdict != "at_floor"]
    worst = report.layer(report.ranking[0]) if report.ranking else None
    last = rows[-1]
    tail = (f" The last conv ({last.name}) is {sqnr_text(last.propagated)} dB from the float "
            "model: what the quantized model carries, all layers before it included.")
    if any(trained_with_qat(r.notes) for r in rows):
        # helper-60's PT2E QAT model: its float twin 57.7% accurate, the quantized model 98.3%
        tail += (" The float model here is a QAT model's twin, fake quantization off: QAT "
                 "fitted the quantized model, not it, and where training went through clips "
                 "the twin can do worse than the quantized model.")
    every, received = ((f"All {len(rows)} quantized convs are at their rounding floor",
                        "the inputs they received") if len(rows) > 1 else
                       ("The one quantized conv is at its rounding floor",
                        "the input it received"))
    if not off and report.upstream:
        return (f"{every} on {received}, but the signal is lost before "
                f"{report.upstream[0].layer}: the quantization outside the convs is at fault "
                "(below)." + tail)
    if not off:
        return (f"{every}: no conv is misquantized; what remains is what 8-bit rounding "
                "costs." + tail)
    names = ", ".join(r.name for r in off[:4]) + (", ..." if len(off) > 4 else "")
    lead = (f"{len(off)} of {len(rows)} quantized convs are above their rounding floor "
            f"({names}).")
    if worst is not None and worst.verdict != "at_floor":
        serious = [f for f in worst.findings if f.severity != "info"]
        # with no warning or error, what is said of it (a histogram observer's trim, QAT's):
        # a verdict alone read as an alarm nothing backs; not a note on the API it used, which
        # moves no number (helper-74: "above its floor (QCD060, said as info: deprecated
        # quantization API in use)")
        said = [f for f in worst.findings if f.code not in NO_ERROR_CODES]
        cause = (f" ({serious[0].code}: {serious[0].title})" if serious else
                 f" ({said[0].code}, said as info: {said[0].title}; no "
                 "warning or error)" if said else " (no finding names a cause)")
        lead += (f" The worst by its own error is {worst.name}: {sqnr_text(worst.own)} dB, "
                 f"{floor_ratio_text(worst)} its floor, {STATUS_WORDS[worst.verdict]}{cause}.")
    return lead + tail


def layer_table(report: ModelReport, width: int) -> Table:
    """Every conv in model order; narrow terminals drop the shapes and RMSEs (the JSON has
    them), the torch column shows only when a conv mismatches, and the dominant stage goes
    where every column would not fit."""
    rank = {name: i + 1 for i, name in enumerate(report.ranking)}
    wide, medium = width >= 110, width >= 90
    mismatch = any(row.torch_mismatches for row in report.layers)  # None or 0: no column
    columns = ["#", "layer", *(["conv"] if medium else []), "own dB", *(["RMSE"] if wide else []),
               "x floor", "prop dB", *(["RMSE "] if wide else []), "stage", "finding",
               *(["torch"] if mismatch else [])]
    rows = []
    for row in report.layers:
        style = "" if row.verdict == "at_floor" else SEVERITY_STYLE[
            "error" if row.verdict == "broken" else "warning"]
        cells: list[str | Text] = [str(rank[row.name]), Text(row.name, style=style)]
        if medium:
            cells.append(conv_text(row))
        cells.append(sqnr_text(row.own))
        if wide:
            cells.append(_num(row.own.rmse, 3))
        cells += [Text(floor_ratio_text(row), style=style), sqnr_text(row.propagated)]
        if wide:
            cells.append(_num(row.propagated.rmse, 3))
        cells += [row.dominant_stage or "-", _first_finding(row)]
        if mismatch:
            n = row.torch_mismatches
            cells.append(Text("-" if n is None else "ok" if n == 0 else
                              f"{n}/{row.torch_total} differ", style="bold red" if n else ""))
        rows.append(cells)
    t = _layer_table(len(report.layers), columns, rows)
    if Console(width=10_000).measure(t).maximum > width:
        # too narrow for every column: the dominant stage goes (the detail and the JSON have
        # it), before rich shortens the names and the numbers
        i = columns.index("stage")
        t = _layer_table(len(report.layers), columns[:i] + columns[i + 1:],
                         [cells[:i] + cells[i + 1:] for cells in rows])
    return t


def _layer_table(n: int, columns: list[str], rows: list[list[str | Text]]) -> Table:
    t = Table(box=box.SIMPLE_HEAD, title=f"{n} quantized conv{'s' if n != 1 else ''} in "
              "model order, "
              "# = rank by own error", title_justify="left", pad_edge=False,
              padding=(0, 1), collapse_padding=True)
    for col in columns:
        right = col not in ("layer", "conv", "stage", "finding")
        t.add_column(col, justify="right" if right else "left", no_wrap=True)
    for cells in rows:
        t.add_row(*cells)
    return t


def legend(width: int) -> str:
    shapes = " (conv: its weight's shape, relu when fused)" if width >= 90 else ""
    return ("own: the conv on the quantized input it received, against the float conv on that "
            f"input{shapes}; x floor: own RMSE over what good 8-bit qparams give; prop: the "
            "quantized model against the float model at this conv.")


def torch_sentence(report: ModelReport) -> str:
    checked = [r for r in report.layers if r.torch_mismatches is not None]
    bad = [r for r in checked if r.torch_mismatches]
    if not checked:
        if any(r.diagnosed for r in report.layers):  # diagnosed, with no emulation to check
            return ("torch check: none ran: the diagnosed convs' setups have no emulation "
                    "(their reports say why); --torch-check all checks every conv that has.")
        return ("torch check: none of the convs was diagnosed (all at their floor); "
                "--torch-check all checks every conv's emulation against the model's codes.")
    float32 = sum(r.output_dtype == "float32" for r in checked)
    what = "diagnosed" if not float32 else "checked"  # a float32 conv is checked, not diagnosed
    scope = ("every conv" if len(checked) == len(report.layers) else
             f"the {len(checked)} {what} conv{'s' if len(checked) > 1 else ''} "
             "(--torch-check all: every conv)")
    values = "codes" if not float32 else (
        f"codes, and float32 outputs bit for bit ({float32} of those convs),")
    if not bad:
        total = sum(r.torch_total for r in checked)
        return (f"torch check: the emulation gives the {values} the quantized model computed "
                f"on {scope}: {total:,} outputs, 0 differ.")
    return (f"torch check on {scope}: {len(bad)} convs differ from the quantized model's "
            "codes (" + ", ".join(r.name for r in bad[:4]) + "): was the bundle captured on "
            "another engine or CPU, or were a conv's scale or zero point changed after it ran "
            "(qnnpack keeps the requantization it computed on its first run)?")


def render_model(report: ModelReport, console: Console | None = None,
                 verbose: bool = False) -> None:
    console = console or Console()
    console.print(Text(f"qconvdiag model walk: {report.source or 'in-process'} "
                       f"(engine {report.engine}, torch {report.torch_version})", style="bold"))
    hanging(console, summary_sentence(report))
    shared = shared_cause_sentence(report)
    if shared is not None:
        hanging(console, shared, style=SEVERITY_STYLE["error"])
    for loss in report.upstream:
        hanging(console, loss.message, style=SEVERITY_STYLE["warning"])
    for f in report.findings:  # about the whole model
        console.print()
        finding_block(console, f)
    console.print()
    console.print(layer_table(report, console.width))
    hanging(console, legend(console.width), style="dim")
    hanging(console, torch_sentence(report),
            style="dim" if not any(r.torch_mismatches for r in report.layers) else "bold red")
    for row in report.layers:
        serious = [f for f in row.findings if f.severity != "info"]
        if serious:
            hanging(console, f"{row.name}: " + "; ".join(f"{f.code} {f.title}"
                                                         for f in serious),
                    style=SEVERITY_STYLE[serious[0].severity])
    folded = [r for r in report.layers if r.bn_folded]
    if folded:
        hanging(console, f"BatchNorm folded into the float weight and bias of {len(folded)} "
                f"conv{'s' if len(folded) > 1 else ''}, as the quantized model folded it.",
                style="dim")
    fp32 = [r.name for r in report.layers if r.output_dtype == "float32"]
    if fp32:
        hanging(console, "float32 output (a consumer takes float, e.g. a residual add): "
                + ", ".join(fp32) + "; judged on the kernel's float32 output, no output stages, "
                "screened only.", style="dim")
    for note in report.notes:
        hanging(console, f"note: {note}", style="dim")
    for detail in report.details:
        console.print()
        console.print(Rule(f"layer {detail.layer}", align="left"))
        if report.engine in PT2E_ENGINES:
            hanging(console, "In the fixes, qm stands for the conv's Q/DQ pattern in the "
                    "convert_pt2e model (no module holds it: its qparams come from the "
                    "quantizer's observers, so a fix there is a change to the quantizer's "
                    f"config or calibration) and conv the float model's {detail.layer!r} "
                    "(BatchNorm folded in, if any).", style="dim")
        else:
            names, code = fix_names(detail.layer, report.layer(detail.layer))
            hanging(console, names, style="dim")
            if code:
                _print_code(console, code)
        render_rich(detail.report, console, verbose)
    if report.gate.breaches:
        console.print(Text("CI gate failed:", style="bold red"))
        for b in report.gate.breaches:
            console.print(f"  - {b.layer}: {b.breach}")
