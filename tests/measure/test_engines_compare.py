"""--engine all: every engine side by side, and the cause of every difference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

from qconvdiag.casefile.generate import forum_case
from qconvdiag.io import save_case
from qconvdiag.quantization.qparams import per_tensor
from tests.repo import ROOT


def test_engine_all_explains_saturation_refusal_and_qconfig(tmp_path):
    case = forum_case()
    # The user's setup with a sensible output scale and no module: the int16 pair saturation
    # of pre-VNNI fbgemm/x86 now shows in the outputs.
    setup = replace(case.setup, output_qparams=per_tensor(4.0, 0, "quint8", "user"), module=None)
    path = save_case(replace(case, setup=setup), tmp_path / "c.pt")
    env = dict(os.environ, FBGEMM_ENABLE_INSTRUCTIONS="AVX2", ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run([sys.executable, "-m", "qconvdiag", "explain", str(path), "--engine",
                          "all", "--json"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    rows = {(r["path"], r["engine"]): r for r in json.loads(out.stdout)["engine_comparison"]}
    qnnpack = rows[("as_given", "qnnpack")]
    assert qnnpack["reference_engine"] == "x86" and qnnpack["differing_elements"] == 1
    assert "int16 pair saturation" in qnnpack["causes"][0]
    assert "x86: 1 saturated pairs" in qnnpack["causes"][0]
    assert rows[("as_given", "fbgemm")]["differing_elements"] == 0
    assert "ONEDNN only supports symmetric" in rows[("as_given", "onednn")]["causes"][0]
    assert any("default qconfig" in c for c in rows[("production", "qnnpack")]["causes"])


def test_engines_share_work_without_changing_results():
    """--engine all reuses engine-independent results; each engine's report is the one a
    single-engine run gives."""
    from qconvdiag import Options, diagnose
    from qconvdiag.casefile.generate import RandomSpec, generate

    case = generate(RandomSpec(seed=4, recipe="handmade"))
    every = diagnose(case, Options(engine="all"))
    for engine in ("x86", "qnnpack"):
        alone = diagnose(case, Options(engine=engine))
        for p in alone.paths:
            q = every.path(p.name, engine)
            assert q is not None and q.to_dict() == p.to_dict(), (engine, p.name)


def test_engines_are_compared_by_values_in_the_reference_s_steps():
    """The forum's production paths: x86 writes code 127 at scale 6.33 (7-bit), qnnpack code
    255 at 3.15 (8-bit on every CPU); the same 803.69, so no output differs, and the qparams
    are named as a note. onednn takes 8 bits as qnnpack where VNNI sums exactly, and 7 bits
    as x86 where its int16 pair sums need them (paths.advises_reduce_range)."""
    from qconvdiag import Options, diagnose
    from tests.cpu import pairs_here

    rows = {(r["path"], r["engine"]): r for r in
            diagnose(forum_case(), Options(engine="all")).to_dict()["engine_comparison"]}
    for engine in ("qnnpack",) if pairs_here("onednn") else ("qnnpack", "onednn"):
        row = rows[("production", engine)]
        assert row["differing_elements"] == 0 and row["max_diff_lsb"] < 0.01
        assert row["causes"][0].startswith(f"same outputs, though {engine}'s default qconfig")
    if pairs_here("onednn"):
        assert rows[("production", "onednn")]["causes"] == []
        assert rows[("production", "onednn")]["differing_elements"] == 0


def test_the_report_says_which_kernel_ran_which_part():
    """x86 hands the forum's asymmetric weight (zero point -14) to fbgemm; its module's weight
    (zero point 0) goes to onednn where the CPU has VNNI."""
    from qconvdiag import Options, diagnose
    from qconvdiag.arithmetic.engines import probe

    report = diagnose(forum_case(), Options(engine="x86"))
    p = report.path("as_given").to_dict()
    assert p["setup_kernel"] == "fbgemm"
    assert p["kernel"] == ("onednn" if probe()["x86"].x86_uses_onednn else "fbgemm")
