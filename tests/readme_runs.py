"""README's example commands, run on this CPU at 80 columns.

README's examples were run on an AVX512-VNNI CPU. Without VNNI, x86 and oneDNN run other
kernels (int16 pair sums; x86 keeps symmetric weights on fbgemm), and a few lines differ:
tests/readme_no_vnni.md holds the same commands run on such a CPU (an AVX2 AMD EPYC), and
tests/test_readme.py checks each CPU against its own runs (tests/cpu.py: ``vnni``). Written
with ``python -m tests.readme_runs --write`` on a CPU without VNNI.
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from tests.repo import ROOT

README = ROOT / "README.md"
NO_VNNI = ROOT / "tests" / "readme_no_vnni.md"
BLOCK = re.compile(r"```\n\$ (qconvdiag [^\n]+)\n(.*?)```", re.S)


def blocks(path: Path) -> dict[str, str]:
    """Each ``$ qconvdiag ...`` block of a markdown file: command -> the lines shown."""
    return dict(BLOCK.findall(path.read_text(encoding="utf-8")))


def run(command: str) -> tuple[int, str]:
    """The command's exit code and what it prints at 80 columns (run from the repo root)."""
    import os

    from typer.testing import CliRunner

    from qconvdiag.cli import app

    here = os.getcwd()
    os.chdir(ROOT)
    try:
        result = CliRunner().invoke(app, shlex.split(command)[1:] + ["--width", "80"])
    finally:
        os.chdir(here)
    return result.exit_code, "\n".join(line.rstrip() for line in result.stdout.splitlines())


def main() -> None:
    from tests.cpu import vnni

    if vnni():
        sys.exit("this CPU has VNNI: README's own examples are its runs")
    out = [NO_VNNI.read_text(encoding="utf-8").split("```", 1)[0].rstrip() + "\n"]
    for command in blocks(README):
        code, printed = run(command)
        if code != 0:
            sys.exit(f"{command}: exit code {code}")
        out.append(f"```\n$ {command}\n{printed}\n```\n")
    if "--write" in sys.argv:
        NO_VNNI.write_text("\n".join(out), encoding="utf-8")
    print("\n".join(out))


if __name__ == "__main__":
    main()
