"""The quantized paths: the user's setup as torch runs it (issue 17, item 14: output qparams
that say qint8)."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag.case import QuantSetup, build_case
from qconvdiag.diagnosis import Options, diagnose
from qconvdiag.quantization.paths import conv_output_qparams
from qconvdiag.quantization.qparams import per_tensor


def test_output_qparams_of_another_dtype_run_as_quint8():
    qp = per_tensor(0.05, 64, "qint8", "user")
    run = conv_output_qparams(qp)
    assert (run.dtype, run.scale, run.zero_point, run.dtype_given) == ("quint8", (0.05,), (64,),
                                                                       "qint8")
    assert "writes quint8" in run.notes[-1] and "-3.2 to 9.55" in run.notes[-1]
    assert conv_output_qparams(per_tensor(0.05, 64, "quint8", "user")).dtype_given is None


@pytest.mark.parametrize("zero_point", [0, 64, -10])
def test_qint8_output_qparams_match_torch_on_every_engine(zero_point):
    """Before: torch wrote quint8 codes while the emulation clamped to -128..127, and QCD061
    blamed the backend: of 392 outputs, zero point 0: 92 off by up to 117 steps, 64: 16 by up
    to 53, -10: 121 by up to 127 (qnnpack, which wraps the zero point: 200 by up to 128)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 7, 7)).astype(np.float32)
    w = (rng.standard_normal((8, 4, 3, 3)) * 0.3).astype(np.float32)
    setup = QuantSetup(per_tensor(0.03, 128, "quint8", "user"),
                       per_tensor(0.01, 0, "qint8", "user"),
                       per_tensor(0.05, zero_point, "qint8", "user"))
    report = diagnose(build_case(x, w, None, setup=setup), Options(engine="all"))
    ran = [p for p in report.paths if p.name == "as_given" and p.torch_check.ran]
    assert len(ran) >= 2
    for p in ran:
        assert p.torch_check.mismatched_elements == 0, (p.engine, p.torch_check)
        out = p.qparams["output"]
        assert out.dtype == "quint8" and any("say qint8" in n for n in out.notes)
    assert "QCD061" not in {f.code for f in report.findings}


@pytest.mark.parametrize("observer", [None, "minmax", "histogram"])
def test_production_activations_take_7_bits_where_this_cpu_needs_them(observer):
    """Where oneDNN sums int16 pairs (no VNNI) the production path follows torch's and
    torchao's advice: 7-bit activations on onednn and x86_inductor, whichever observer is
    chosen, and x86_inductor's input codes stay within the graph's 0..127. Where it sums
    exactly, they keep the defaults' 8 bits. x86 takes 7 bits on every CPU (its default)."""
    from qconvdiag.casefile.generate import forum_case
    from qconvdiag.quantization.paths import ProductionOptions, build_production
    from tests.cpu import pairs_here

    case = forum_case()
    options = ProductionOptions(observer=observer)
    for engine in ("onednn", "x86_inductor", "x86"):
        spec = build_production(case, engine, options)
        seven = engine == "x86" or pairs_here(engine)
        assert ("reduce_range: 7-bit activations" in spec.input_qparams.notes) == seven, engine
        assert (int(spec.input_codes.max()) <= 127) == seven, engine
