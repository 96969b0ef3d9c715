"""Plain-text helpers shared by the terminal views."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.text import Text

from ..numbers import table_number
from ..report import EngineRow


def hanging(console: Console, text: str, indent: int = 2, style: str = "") -> None:
    """Print prose wrapped to the console's width, continuation lines indented (a hanging
    indent); the wrapping is ours, so rich prints each line as it is."""
    lines = textwrap.wrap(text, width=max(console.width, indent + 20),
                          subsequent_indent=" " * indent, break_on_hyphens=False) or [""]
    for line in lines:
        console.print(Text(line, style=style), soft_wrap=True)


def engine_outputs(row: EngineRow) -> str:
    """An engine's outputs against the comparison's reference engine, in a few words."""
    if row.differing_elements is None:
        return "reference" if not row.causes else "refused"
    if row.differing_elements == 0:
        return f"same as {row.reference_engine}"
    n = row.differing_elements
    # counted in the reference engine's output steps, which says whose steps they are: an
    # engine with other qparams has steps of another size
    return (f"{n} output{'s' if n != 1 else ''} differ{'s' if n == 1 else ''} from "
            f"{row.reference_engine}, up to {table_number(row.max_diff_lsb, 3)} "
            f"{row.reference_engine} output step{'' if row.max_diff_lsb == 1 else 's'}")
