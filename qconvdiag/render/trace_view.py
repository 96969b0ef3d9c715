"""Terminal view of a Trace: ``render_trace(trace, full=..., width=...) -> str``."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from ..trace import Trace
from .text import hanging

SUMMARY_TERMS = 10


def render_trace(tr: Trace, *, full: bool = False, width: int | None = None) -> str:
    """The arithmetic of one output element as terminal text (``full``: every term and pair;
    ``width``: columns, else the terminal's)."""
    console = Console(width=width) if width else Console()
    with console.capture() as captured:
        print_trace(tr, full, console)
    return captured.get()


def print_trace(tr: Trace, full: bool, console: Console) -> None:
    pos = ",".join(map(str, tr.position))
    console.print(Text(f"output element [{pos}] on the {tr.path} path, engine {tr.engine} "
                       f"(kernel {tr.kernel}, {tr.accumulation})", style="bold"))
    console.print(terms_table(tr, full))
    console.print(f"zero points: input {tr.input_zero_point}, weight {tr.weight_zero_point}")
    _pairs(tr, full, console)
    _accumulator(tr, console)
    _requantization(tr, console)
    _packed_params(tr, console)


def terms_table(tr: Trace, full: bool) -> Table:
    """The receptive field's products (the largest ones only, unless ``full``)."""
    t = Table(box=box.SIMPLE, title="receptive field: (x_code - x_zp) * (w_code - w_zp)",
              title_justify="left")
    for col in ("k", "tap", "ch", "x", "x_code", "w", "w_code", "product"):
        t.add_column(col, justify="right")
    terms = tr.terms
    shown = terms if full or len(terms) <= 24 else sorted(
        terms, key=lambda d: -abs(d["product"]))[:SUMMARY_TERMS]
    for d in shown:
        t.add_row(str(d["k"]), str(tuple(d["tap"])), str(d["channel"]),
                  "pad" if d["input_index"] is None else f"{d['x']:.4g}", str(d["x_code"]),
                  f"{d['w']:.4g}", str(d["w_code"]), str(d["product"]))
    if len(shown) < len(terms):
        t.caption = f"the {len(shown)} largest of {len(terms)} terms (--full shows all)"
    return t


def _pairs(tr: Trace, full: bool, console: Console) -> None:
    if not tr.pairs:
        return
    sat = [p for p in tr.pairs if p["saturated"]]
    console.print(Text(f"int16 pairs of raw codes: {len(tr.pairs)} pairs, "
                       f"{tr.saturated_pairs} saturated", style="bold"))
    for p in (tr.pairs if full else sat[:10]):
        mark = "  SATURATED" if p["saturated"] else ""
        console.print(f"  k={p['k']}: raw sum {p['sum']} -> {p['value']}{mark}")


def _accumulator(tr: Trace, console: Console) -> None:
    console.print(f"int32 accumulator: {tr.accumulator}"
                  + (f" (exact arithmetic: {tr.accumulator_exact})"
                     if tr.accumulator != tr.accumulator_exact else ""))
    if tr.bias_float is not None:
        line = f"bias: {tr.bias_float:.6g} float"
        if tr.bias_int32 is not None:
            line += f", int32 {tr.bias_int32} at scale input_scale * weight_scale"
        elif tr.bias_in_accumulator_units is not None:
            line += f" = {tr.bias_in_accumulator_units:.6g} accumulator steps"
        console.print(line)


def _requantization(tr: Trace, console: Console) -> None:
    hanging(console, f"requantization multiplier {tr.multiplier:.8g}; value before rounding "
            f"{tr.pre_round:.6g}; rint -> {tr.rounded}; + zero point {tr.output_zero_point}"
            f" = {tr.unclamped}; clamp -> {tr.output_int}")
    console.print(f"dequantized: ({tr.output_int} - {tr.output_zero_point}) * "
                  f"{tr.output_scale:.6g} = {tr.dequantized:.6g}   float reference "
                  f"{tr.float_reference:.6g}")
    if tr.torch_output_int is not None:
        verdict = "agrees" if tr.torch_agrees else "DIFFERS"
        console.print(f"torch's kernel returned code {tr.torch_output_int}: {verdict}")
    if tr.module_note:
        hanging(console, tr.module_note, style="yellow")


def _packed_params(tr: Trace, console: Console) -> None:
    pp = tr.packed_params
    console.print(Text("packed params", style="bold"))
    console.print(Padding(Text(pp.get("returns", "")), (0, 0, 0, 2)))
    if pp.get("opaque"):
        return
    if "error" in pp:
        console.print(f"  torch refused to pack it: {pp['error']}")
        return
    hanging(console, f"  weight (unpacked int values, first row): {pp['weight_int'][0]}", 4)
    hanging(console, f"  scale(s) {pp['scales']}, zero point(s) {pp['zero_points']}, "
            f"bias {pp['bias']}", 4)
    console.print(f"  stride {pp['stride']}, padding {pp['padding']}, dilation "
                  f"{pp['dilation']}, groups {pp['groups']}")
