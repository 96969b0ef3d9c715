"""A short summary of a case (shapes, geometry, the user's setup)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from ..case import ConvCase


def print_case_summary(case: ConvCase, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title=f"{case.op} case: {case.source}", show_header=False, box=None)
    s = case.summary()
    for key in ("input_shape", "weight_shape", "output_shape", "stride", "padding", "dilation",
                "groups", "bias"):
        t.add_row(key, str(s[key]))
    setup = case.setup
    if setup is not None:
        for name, qp in (("input_qparams", setup.input_qparams),
                         ("weight_qparams", setup.weight_qparams),
                         ("output_qparams", setup.output_qparams)):
            t.add_row(name, qp.describe() if qp is not None else "(not set)")
        if setup.module is not None:
            m = setup.module
            t.add_row("qconv module", f"weight {m.weight_qparams.describe()}, output "
                      f"{m.output_qparams.describe()}")
    for note in case.notes:
        t.add_row("note", note)
    console.print(t)
