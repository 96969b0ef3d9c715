"""README's example output comes from real runs: each ``$ qconvdiag ...`` block's lines (but
``...``) appear, in order, in what the command prints at 80 columns. README's examples were
run on an AVX512-VNNI CPU; on a CPU without VNNI the same commands are checked against their
runs there, tests/readme_no_vnni.md (tests/readme_runs.py)."""

from __future__ import annotations

import pytest

from tests.readme_runs import NO_VNNI, README, blocks, run

COMMANDS = list(blocks(README))


def test_readme_has_examples():
    assert {cmd.split()[1] for cmd in COMMANDS} >= {"explain", "trace"}


def test_the_runs_without_vnni_are_readme_s_commands():
    assert list(blocks(NO_VNNI)) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_example_matches_a_real_run(command):
    from tests.cpu import vnni

    shown = blocks(README if vnni() else NO_VNNI)[command]
    code, output = run(command)
    assert code == 0, output
    printed = output.splitlines()
    at = 0
    for line in shown.rstrip("\n").splitlines():
        if line.strip() == "...":
            continue
        assert line.rstrip() in printed[at:], (line, output)
        at = printed.index(line.rstrip(), at) + 1
