"""Every fix works: pasted into the user's script (tests/fix_harness.py) and run with torch on
the case's engine, the cause it was printed for is gone, or its excess error is smaller."""

from __future__ import annotations

import pytest

from qconvdiag import Options, diagnose
from tests.corpus_faults import faults
from tests.fix_harness import apply_fix

#: Codes whose fix is not a change to the layer: a float reference taken before BatchNorm (the
#: reference changes; tests/findings/test_pt2e_findings.py runs that fix), the floor (nothing
#: to fix), the deprecation (a migration, run there too), a torch/emulation mismatch (a bug
#: report) and a layer torch's fbgemm kernel cannot run (another engine).
NOT_A_LAYER_FIX = ("QCD027", "QCD060", "QCD061", "QCD062", "QCD070")
TRIGGERS = [f for f in faults() if f.expect and not f.expect & set(NOT_A_LAYER_FIX)]


def _finding(report, code):  # type: ignore[no-untyped-def]
    judged = report.verdict.path
    return next((f for f in report.findings if f.code == code and f.path == judged), None)


@pytest.mark.parametrize("labeled", TRIGGERS, ids=[f.label for f in TRIGGERS])
def test_the_fix_removes_or_shrinks_its_cause(labeled):
    case = labeled.build()
    (code,) = labeled.expect
    before = _finding(diagnose(case, Options(engine=labeled.engine)), code)
    assert before is not None
    if before.fix.startswith("# nothing to fix"):
        return  # a trade-off this layer's kernel needs (QCD042 on fbgemm's depthwise kernel)
    after_report = diagnose(apply_fix(case, labeled.engine, before.fix),
                            Options(engine=labeled.engine))
    after = _finding(after_report, code)
    if after is not None:
        assert after.evidence["excess"] < before.evidence["excess"], (before.fix, after.message)
    assert after_report.verdict.status != "refused", before.fix


def test_fix_lines_name_only_the_script_s_objects():
    """Fixes are written against conv, x, qx, qm, calibration_batches (and torch)."""
    import ast
    import builtins

    allowed = {"torch", "conv", "x", "qx", "qm", "calibration_batches"}
    for labeled in TRIGGERS[::3]:
        report = diagnose(labeled.build(), Options(engine=labeled.engine))
        for f in report.findings:
            tree = ast.parse(f.fix)
            assigned = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                        and isinstance(n.ctx, ast.Store)}
            imported = {a.asname or a.name.split(".")[0] for n in ast.walk(tree)
                        if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)
                    and isinstance(n.ctx, ast.Load)}
            unknown = used - assigned - imported - allowed - set(dir(builtins))
            assert not unknown, (f.code, unknown, f.fix)


def test_the_eager_flow_keeps_a_fused_relu():
    """The eager flow a fix prints for a conv with a fused ReLU quantizes conv and ReLU
    together (before, a plain conv: the ReLU was gone, RMSE 0.20 -> 0.71 on a sweep's layer)."""
    import dataclasses
    import warnings

    from qconvdiag.findings.fixes import eager_flow
    from tests.fix_harness import user_script

    case = dataclasses.replace(TRIGGERS[0].build(), activation="relu")
    namespace = user_script(case, "x86")
    namespace["calibration_batches"] = [namespace["x"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notices
        exec(compile(eager_flow(case, "x86"), "<fix>", "exec"), namespace)  # noqa: S102
    qm = namespace["qm"]
    assert type(qm).__name__ == "ConvReLU" + f"{case.spatial_dims}d"
    assert float(qm(namespace["qx"]).dequantize().min()) >= 0
    assert "ConvReLU" not in eager_flow(dataclasses.replace(case, activation=None), "x86")


def test_an_input_fix_on_a_kernel_that_sums_int16_pairs_keeps_7_bits():
    """fbgemm's depthwise kernel sums int16 pairs on any CPU: an input fix there takes 128
    levels (reduce_range's), as the engine's default qconfig does; 8-bit inputs would saturate
    the pairs (a sweep's layer went from 25.2 to 9.4 dB with the 8-bit fix)."""
    from tests.corpus_faults import layer

    lay = layer(14, "depthwise", "normal")
    case = lay.case(lay.setup(input_qparams=lay.input_qp(1 / 3)))  # a third of the range
    before = diagnose(case, Options(engine="fbgemm"))
    found = _finding(before, "QCD010")
    assert found is not None and "(7 bits): this kernel sums int16 pairs" in found.fix
    assert max(len(line) for line in found.fix.splitlines()) <= 80
    after = diagnose(apply_fix(case, "fbgemm", found.fix), Options(engine="fbgemm"))
    assert after.verdict.rmse is not None and before.verdict.rmse is not None
    assert after.verdict.rmse < before.verdict.rmse
    assert not [f for f in after.findings if f.code == "QCD040" and f.severity != "info"]
