"""README's example output comes from real runs: each ``$ qconvdiag ...`` block's lines (but
``...``) appear, in order, in what the command prints at 80 columns."""

from __future__ import annotations

import re
import shlex

import pytest
from typer.testing import CliRunner

from qconvdiag.cli import app
from tests.repo import ROOT

BLOCKS = re.findall(r"```\n\$ (qconvdiag [^\n]+)\n(.*?)```", (ROOT / "README.md").read_text(),
                    re.S)


def test_readme_has_examples():
    assert {cmd.split()[1] for cmd, _ in BLOCKS} >= {"explain", "trace"}


@pytest.mark.parametrize("command, shown", BLOCKS, ids=[c for c, _ in BLOCKS])
def test_readme_example_matches_a_real_run(command, shown, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = shlex.split(command)[1:] + ["--width", "80"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = [line.rstrip() for line in result.stdout.splitlines()]
    at = 0
    for line in shown.rstrip("\n").splitlines():
        if line.strip() == "...":
            continue
        assert line.rstrip() in printed[at:], (line, "\n".join(printed))
        at = printed.index(line.rstrip(), at) + 1
