"""Plain-text helpers shared by the terminal views."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.text import Text


def hanging(console: Console, text: str, indent: int = 2, style: str = "") -> None:
    """Print prose wrapped to the console's width, continuation lines indented (a hanging
    indent); the wrapping is ours, so rich prints each line as it is."""
    lines = textwrap.wrap(text, width=max(console.width, indent + 20),
                          subsequent_indent=" " * indent, break_on_hyphens=False) or [""]
    for line in lines:
        console.print(Text(line, style=style), soft_wrap=True)
