"""Where the repository is, for tests that read its files (samples, README, docs) or run
commands in it: one place, so a test module's depth in tests/ does not matter."""

from __future__ import annotations

from pathlib import Path

#: The repository's root: the folder holding pyproject.toml, samples/ and tests/.
ROOT = Path(__file__).resolve().parents[1]
#: The sample case files and the sample model bundle.
SAMPLES = ROOT / "samples"
