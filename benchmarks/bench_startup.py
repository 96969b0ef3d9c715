"""Start-up and end-to-end cost as ratios to baselines measured in the same run.

1. ``qconvdiag --help`` and ``--version`` vs ``python -c "import typer, rich"`` (target 1.5x).
2. ``qconvdiag explain samples/forum_conv.pt --json`` vs ``python -c "import torch"``
   (target 1.3x).

Median of N interleaved runs of each command (interleaving spreads machine noise evenly).

    .venv/bin/python benchmarks/bench_startup.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).with_name("qconvdiag"))


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   check=False)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    commands = {
        "typer+rich": [sys.executable, "-c", "import typer, rich"],
        "--help": [EXE, "--help"],
        "--version": [EXE, "--version"],
        "torch": [sys.executable, "-c", "import torch"],
        "explain": [EXE, "explain", "samples/forum_conv.pt", "--json"],
    }
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(args.repeats):
        for name, cmd in commands.items():
            times[name].append(timed(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in commands:
        print(f"{name:12s} median {med[name] * 1e3:7.1f} ms")
    print(f"--help / import typer, rich    = {med['--help'] / med['typer+rich']:.2f}x "
          "(target <= 1.5x)")
    print(f"--version / import typer, rich = {med['--version'] / med['typer+rich']:.2f}x "
          "(target <= 1.5x)")
    print(f"explain forum --json / import torch = {med['explain'] / med['torch']:.2f}x "
          "(target <= 1.3x)")


if __name__ == "__main__":
    main()
