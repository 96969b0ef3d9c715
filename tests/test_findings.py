"""One case that triggers each finding code and one that must not."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag.case import ModuleState, QuantSetup, build_case
from qconvdiag.diagnose import Options, diagnose
from qconvdiag.findings import CODES
from qconvdiag.generate import forum_case
from qconvdiag.qparams import QParams, make_qparams, per_tensor, quantize

RNG = np.random.default_rng(0)
X = np.maximum(RNG.standard_normal((1, 4, 8, 8)), 0).astype(np.float32)
W = (RNG.standard_normal((6, 4, 3, 3)) * 0.2).astype(np.float32)
B = (RNG.standard_normal(6) * 0.1).astype(np.float32)


def qp(scale, zp, dtype="quint8", axis=None):
    if isinstance(scale, (list, tuple)):
        return make_qparams(list(scale), list(zp), dtype, axis, "t", "user")
    return make_qparams([scale], [zp], dtype, None, "t", "user")


def good_setup(**over):
    """A sound user setup for X, W, B: min/max input, symmetric weights, observed output."""
    from qconvdiag.stages import conv64

    y = conv64(X, W, B, build_case(X, W, B, padding=1).geometry)
    lo, hi = min(float(y.min()), 0), max(float(y.max()), 0)
    out_s = (hi - lo) / 255
    fields = dict(
        input_qparams=qp(float(X.max()) / 255, 0),
        weight_qparams=qp(float(np.abs(W).max()) / 127.5, 0, "qint8"),
        output_qparams=qp(out_s, round(-lo / out_s)),
    )
    fields.update(over)
    return QuantSetup(**fields)


def case_with(setup=None, x=X, w=W, b=B, **geo):
    geo.setdefault("padding", 1)
    return build_case(x, w, b, setup=setup, **geo)


def codes(case, **opts):
    return {f.code for f in diagnose(case, Options(**opts)).findings}


def healthy():
    return case_with(good_setup())


# Each entry: code -> (triggering case builder, options), (clean case builder, options)
def _module(weight_codes, weight_qp, bias, out=(1.0, 0)):
    return ModuleState(weight_codes, weight_qp, bias, per_tensor(out[0], out[1], "quint8", "m"))


def trig_qcd001():
    return case_with(good_setup(input_qparams=qp(float(X.max()) / 255, 2.7)))


def trig_qcd002():
    return case_with(good_setup(input_qparams=qp(float(X.max()) / 255, 300)))


def trig_qcd003():
    return case_with(good_setup(input_qparams=qp(float(X.max() - X.min()) / 254, 0)))


def trig_qcd010():
    return case_with(good_setup(input_qparams=qp(float(X.max()) / 255 / 3, 0)))


def trig_qcd011():
    return case_with(good_setup(input_qparams=qp(float(X.max()) / 127, 0, "qint8")))


def trig_qcd020():
    return case_with(good_setup(weight_qparams=qp(float(np.abs(W).max()) / 127.5 / 4, 0, "qint8")))


def trig_qcd021():
    s = float(W.max() - W.min()) / 254
    return case_with(good_setup(weight_qparams=qp(s, -float(W.min()) / s, "qint8")))


def trig_qcd022():
    return case_with(good_setup(weight_qparams=qp(float(np.abs(W).max()) / 127.5, 3, "qint8")))


def trig_qcd023():
    w = W.copy()
    w[0] *= 100
    return case_with(good_setup(weight_qparams=qp(float(np.abs(w).max()) / 127.5, 0, "qint8")),
                     w=w)


def trig_qcd024():
    s = good_setup()
    wq = s.weight_qparams
    module = _module(np.zeros(W.shape, np.int64), per_tensor(1.0, 0, "qint8", "m"), B)
    return case_with(QuantSetup(s.input_qparams, wq, s.output_qparams, module=module))


def clean_qcd024():
    s = good_setup()
    codes_ = quantize(W, s.weight_qparams)
    module = _module(codes_, s.weight_qparams, B,
                     (s.output_qparams.scale[0], s.output_qparams.zero_point[0]))
    return case_with(QuantSetup(s.input_qparams, s.weight_qparams, s.output_qparams,
                                module=module))


def trig_qcd025():
    w = (RNG.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32)
    scales = (np.abs(w).max(axis=(0, 2, 3)) / 127.5).tolist()
    return case_with(good_setup(weight_qparams=qp(scales, [0] * 4, "qint8", axis=1)), w=w,
                     b=B[:4])


def trig_qcd030():
    s = good_setup()
    codes_ = quantize(W, s.weight_qparams)
    module = _module(codes_, s.weight_qparams, np.zeros(6, np.float32),
                     (s.output_qparams.scale[0], s.output_qparams.zero_point[0]))
    return case_with(QuantSetup(s.input_qparams, s.weight_qparams, s.output_qparams,
                                module=module))


def trig_qcd031():
    # A coarse bias grid (input_scale * weight_scale = 0.5) against a fine output scale.
    setup = good_setup(input_qparams=qp(1.0, 0), weight_qparams=qp(0.5, 0, "qint8"),
                       output_qparams=qp(0.01, 128))
    b = np.full(6, 0.2, np.float32)
    return case_with(setup, b=b)


def trig_qcd012():
    return case_with(good_setup(input_qparams=qp(float(X.max()), 0)))


def trig_qcd026():
    # weights of 1e-30: the weight observer's scale stops at float32 eps and every weight
    # rounds to 0
    return build_case(np.full((1, 2, 5, 5), 1e30, np.float32),
                      np.full((3, 2, 3, 3), 1e-30, np.float32), None)


def trig_qcd041():
    x = np.full((1, 4000, 3, 3), 10.0, np.float32)
    w = np.full((1, 4000, 3, 3), 1.0, np.float32)
    return build_case(x, w, None, setup=QuantSetup(
        input_qparams=qp(10.0 / 255, 0), weight_qparams=qp(1.0 / 255, -128, "qint8"),
        output_qparams=qp(1000.0, 0)))


def clean_qcd041():
    return build_case(X, W, None, padding=1)


def trig_qcd050():
    return case_with(good_setup(output_qparams=None))


def trig_qcd051():
    s = good_setup()
    return case_with(good_setup(output_qparams=qp(s.output_qparams.scale[0] / 4,
                                                  s.output_qparams.zero_point[0])))


def trig_qcd052():
    s = good_setup()
    return case_with(good_setup(output_qparams=qp(s.output_qparams.scale[0] * 8,
                                                  round(s.output_qparams.zero_point[0] / 8))))


def trig_qcd053():
    s = good_setup()
    return case_with(good_setup(output_qparams=qp(s.output_qparams.scale[0], 300)))


def trig_qcd060():
    s = good_setup()
    return case_with(QuantSetup(s.input_qparams, s.weight_qparams, s.output_qparams,
                                used_quantized_dtypes=True, apis=("torch.quantize_per_tensor",)))


TRIGGERS = {
    "QCD001": (trig_qcd001, {}), "QCD002": (trig_qcd002, {}), "QCD003": (trig_qcd003, {}),
    "QCD010": (trig_qcd010, {}), "QCD011": (trig_qcd011, {}), "QCD012": (trig_qcd012, {}),
    "QCD026": (trig_qcd026, {}), "QCD020": (trig_qcd020, {}),
    "QCD021": (trig_qcd021, {}), "QCD022": (trig_qcd022, {"engine": "onednn"}),
    "QCD023": (trig_qcd023, {}), "QCD024": (trig_qcd024, {}), "QCD025": (trig_qcd025, {}),
    "QCD030": (trig_qcd030, {}), "QCD031": (trig_qcd031, {"engine": "qnnpack"}),
    "QCD040": (forum_case, {}), "QCD041": (trig_qcd041, {}), "QCD050": (trig_qcd050, {}),
    "QCD051": (trig_qcd051, {}), "QCD052": (trig_qcd052, {}), "QCD053": (trig_qcd053, {}),
    "QCD060": (trig_qcd060, {}), "QCD070": (healthy, {}),
}
CLEAN = {
    "QCD022": (trig_qcd022, {"engine": "x86"}),  # x86 accepts weight zero points
    "QCD024": (clean_qcd024, {}),
    "QCD041": (clean_qcd041, {}),
    "QCD070": (forum_case, {}),
}


def test_every_code_has_a_trigger():
    assert set(TRIGGERS) | {"QCD061"} == set(CODES)


@pytest.mark.parametrize("code", sorted(TRIGGERS))
def test_code_is_triggered(code):
    build, opts = TRIGGERS[code]
    found = diagnose(build(), Options(**opts)).findings
    hits = [f for f in found if f.code == code]
    assert hits, (code, [f.code for f in found])
    f = hits[0]
    assert f.message and f.fix and f.title and f.severity in ("error", "warning", "info")


@pytest.mark.parametrize("code", sorted(TRIGGERS))
def test_code_is_not_triggered_on_a_clean_case(code):
    build, opts = CLEAN.get(code, (healthy, {}))
    case = build()
    if code == "QCD040":
        # 7-bit activations (reduce_range) cannot saturate int16 pairs on any CPU.
        s = good_setup(input_qparams=qp(float(X.max()) / 127, 0))
        case = case_with(s)
    assert code not in codes(case, **opts)


def test_qcd061_when_torch_disagrees_with_the_emulation(monkeypatch):
    import qconvdiag.diagnose as d

    real = d.emulate

    def off_by_one(*args, **kwargs):
        em = real(*args, **kwargs)
        object.__setattr__(em, "output_codes", np.clip(em.output_codes + 1, 0, 255))
        return em

    assert "QCD061" not in codes(healthy())
    monkeypatch.setattr(d, "emulate", off_by_one)
    assert "QCD061" in codes(healthy())


def test_seed_case_leads_with_the_true_story():
    report = diagnose(forum_case(), Options(engine="x86"))
    order = [f.code for f in report.findings]
    assert order[:3] == ["QCD024", "QCD050", "QCD051"]
    for code in ("QCD020", "QCD021", "QCD001", "QCD040", "QCD060"):
        assert code in order
    f020 = next(f for f in report.findings if f.code == "QCD020")
    assert "5 of 9 weights" in f020.message and "9.9921" in f020.message


def test_ignore_skips_codes_and_rejects_unknown():
    from qconvdiag.errors import UsageError

    report = diagnose(forum_case(), Options(ignore=("QCD024", "QCD060")))
    assert {"QCD024", "QCD060"}.isdisjoint(f.code for f in report.findings)
    with pytest.raises(UsageError, match="unknown finding"):
        diagnose(forum_case(), Options(ignore=("QCD999",)))


def test_qparams_helper_is_consistent():
    assert isinstance(qp(0.1, 0), QParams)


@pytest.mark.parametrize("engine", ["x86", "qnnpack"])
def test_qcd023_per_channel_error_reused_from_production_equals_the_candidate(engine):
    """QCD023's per-channel error comes from the production ladder when that path quantized the
    weight per channel with the same recipe; it must be the candidate's error (scales equal up
    to float32 rounding), and computed afresh when production is per tensor (qnnpack)."""
    from qconvdiag.diagnose import diagnose_runs
    from qconvdiag.findings.base import Context
    from qconvdiag.findings.weight_rules import (
        _production_per_channel_rmse,
        _weight_error_rmse,
    )
    from qconvdiag.qparams import dequantize

    case = trig_qcd023()
    runs, warnings = diagnose_runs(case, Options(engine=engine))
    ctx = Context(case, tuple(runs), tuple(warnings))
    w = case.weight
    scales = np.abs(w.reshape(w.shape[0], -1)).max(axis=1) / 127.5
    pc = QParams(tuple(float(s) for s in scales), (0,) * w.shape[0], "qint8", 0, "x")
    fresh = _weight_error_rmse(ctx, dequantize(quantize(w, pc), pc))
    reused = _production_per_channel_rmse(ctx, ctx.as_given, scales)
    if engine == "qnnpack":
        assert reused is None
    else:
        assert reused is not None and reused == pytest.approx(fresh, rel=1e-6)
