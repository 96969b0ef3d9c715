"""The terminal renderer: the rich report (``rich_report.render_rich``, or a model walk's
``rich_model.render_model``) as text, with the terminal's colour codes when stdout is a
terminal."""

from __future__ import annotations

from rich.console import Console

from ..model_report import ModelReport
from ..report import Report
from .rich_model import render_model
from .rich_report import render_rich


def render_terminal(report: Report | ModelReport, *, verbose: bool = False,
                    width: int | None = None) -> str:
    """The report as the terminal shows it (``verbose``: every finding in full, both paths'
    stage tables; ``width``: columns, else the terminal's)."""
    console = Console(width=width) if width else Console()
    with console.capture() as captured:
        if isinstance(report, ModelReport):
            render_model(report, console, verbose)
        else:
            render_rich(report, console, verbose)
    return captured.get()
