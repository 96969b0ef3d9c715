"""QCD060, QCD061, QCD070: the API, the backend, and the rounding floor."""

from __future__ import annotations

import math
from collections.abc import Iterator

from ..measure.evidence import PathRun
from ..report import Finding
from .base import Context, excess, finding, fmt
from .weight_rules import per_tensor_cost

DEFAULT_CONFIG = "quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())"
#: Without VNNI oneDNN's int16 pair sums saturate on 8-bit activations (paths.py,
#: ``advises_reduce_range``): the config torchao's docstring advises there.
SEVEN_BIT_CONFIG = (
    "# reduce_range: 7-bit activations, as torchao advises on CPUs without VNNI\n"
    "# (8 bits saturate their int16 pair sums)\n"
    "quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(\n"
    "    reduce_range=True))")
ALTERNATIVE = (
    "# torch 2.13 deprecates the quantized dtypes and torch.ao.quantization; today's\n"
    "# route is torchao's PT2E flow (pip install torchao): export, prepare,\n"
    "# calibrate, convert, compile\n"
    "from torchao.quantization.pt2e.quantize_pt2e import (\n"
    "    convert_pt2e, prepare_pt2e)\n"
    "from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq\n"
    "quantizer = xiq.X86InductorQuantizer()\n"
    f"{DEFAULT_CONFIG}\n"
    "# strict=True: a non-strict export of a module called twice (one ReLU\n"
    "# reused) fails in prepare_pt2e with 'Input partition has more than one\n"
    "# output node'\n"
    "exported = torch.export.export(conv.eval(), (x,), strict=True).module()\n"
    "prepared = prepare_pt2e(exported, quantizer)\n"
    "with torch.no_grad():\n"
    "    for batch in calibration_batches:  # of x's shape (export fixed it)\n"
    "        prepared(batch)\n"
    "converted = convert_pt2e(prepared)\n"
    "# without freezing, inductor runs an fp32 conv on dequantized values, not\n"
    "# the int8 kernel\n"
    "torch._inductor.config.freezing = True\n"
    "with torch.no_grad():\n"
    "    compiled = torch.compile(converted)\n"
    "    y = compiled(x)\n"
    "# qconvdiag.capture_model(conv, converted, [x], ...) explains its convs"
)
"""QCD060's fix: the eager flow's replacement, written against the script's ``conv``, ``x`` and
``calibration_batches`` (for a whole model, pass the model where it says ``conv``);
tests/findings/test_pt2e_findings.py runs it with torchao. ``alternative()`` is what a report
gives on this CPU."""


def pt2e_flow(seven_bits: bool) -> str:
    """``ALTERNATIVE``, with the 7-bit quantizer config when ``seven_bits``."""
    return ALTERNATIVE.replace(DEFAULT_CONFIG, SEVEN_BIT_CONFIG) if seven_bits else ALTERNATIVE


def alternative() -> str:
    """``ALTERNATIVE`` with the quantizer config this CPU needs (7-bit activations where
    oneDNN sums int16 pairs)."""
    from ..quantization.paths import advises_reduce_range

    return pt2e_flow(advises_reduce_range("x86_inductor"))


def qcd060(ctx: Context) -> Iterator[Finding]:
    s = ctx.case.setup
    if s is None or not (s.used_quantized_dtypes or s.apis):
        return
    apis = ", ".join(s.apis) if s.apis else "quantized tensors (quint8/qint8)"
    deprecations = [w for w in ctx.torch_warnings if "deprecated" in w.lower()]
    yield finding(
        "QCD060", "info", "deprecated quantization API in use",
        f"This case was built with {apis}, deprecated since torch 2.13 (torch warns on every "
        "quantized tensor it creates). The eager kernels still run and are what this report "
        "explains; new code should use the current alternative.",
        {"apis": list(s.apis), "torch_warnings": deprecations[:3]},
        alternative(), ctx.as_given)


def qcd061(ctx: Context) -> Iterator[Finding]:
    for run in ctx.runs:
        check = run.report.torch_check
        if not check.ran or not check.mismatched_elements:
            continue
        grouped = ctx.case.geometry.groups > 1
        padding_only = _in_padding_only(ctx, run)
        # oneDNN without VNNI (it sums int16 pairs there): README 'Limits'' classes
        known = (run.report.kernel == "onednn" and grouped and not padding_only
                 and run.report.accumulation != "exact")
        energy = excess(run, "backend_residual")
        g = ctx.case.geometry
        yield finding(
            "QCD061", "warning",
            f"torch's output differs from the emulation on {run.report.engine}",
            f"{check.mismatched_elements} output elements of the {run.report.name} path differ "
            f"from the integer-exact emulation by up to {fmt(check.max_abs_lsb or 0)} steps; "
            "the stage table attributes that difference to backend_residual."
            + (f" Every one is an output whose window reads padding only (padding "
               f"{tuple(g.padding)}, at least the kernel's reach), where the conv gives its "
               f"bias alone, as the emulation does; torch's {run.report.kernel} kernel does "
               "not there (oneDNN's depthwise kernel leaves such outputs undefined: measured, "
               "their codes change from run to run of the same call). A fault of torch's "
               "kernel, not of this layer's qparams; a padding under the kernel's size avoids "
               "it." if padding_only else
               " This is a known unmatched class (oneDNN's grouped and depthwise convs "
               "without VNNI; README 'Limits')." if known else
               " Please report this case: qconvdiag.capture(...) writes it."),
            {"mismatched_elements": check.mismatched_elements,
             "max_abs_lsb": check.max_abs_lsb, "kernel": run.report.kernel,
             "accumulation": run.report.accumulation, "known_limit": known,
             "padding_only": padding_only, "excess": energy},
            "qconvdiag.capture(conv, x, qconv=qm, qinput=qx, path='report_me.pt')"
            if not padding_only else
            "# the padding reaches past the kernel: outputs that read padding only are the\n"
            "# bias alone; drop them (a smaller padding) or run on another engine\n"
            "torch.backends.quantized.engine = "
            + ('"qnnpack"' if run.report.engine == "fbgemm" else '"fbgemm"'),
            run, energy, ("backend_residual",))


def _in_padding_only(ctx: Context, run: PathRun) -> bool:
    """Every output where torch's codes differ from the emulation's reads padding only: its
    window lies wholly before or after the input in some spatial dim (padding at least the
    kernel's reach: outputs a kernel may leave unwritten)."""
    import numpy as np

    em = run.module_emulation or run.emulation
    if run.torch_codes is None or em is None or em.output_codes.shape != run.torch_codes.shape:
        return False
    where = np.argwhere(run.torch_codes != em.output_codes)
    if not where.size:
        return False
    case, g = ctx.case, ctx.case.geometry
    outside = np.zeros(len(where), dtype=bool)
    for d, k in enumerate(case.kernel_size):
        o = where[:, 2 + d]
        first = o * g.stride[d] - g.padding[d]  # the window's first input position
        last = first + (k - 1) * g.dilation[d]
        outside |= (last < 0) | (first >= case.input.shape[2 + d])
    return bool(outside.all())


def qcd062(ctx: Context) -> Iterator[Finding]:
    """torch's own kernel would corrupt memory on this layer: it is not run, and says so."""
    from ..arithmetic.engines import fbgemm_groupwise_overrun

    case = ctx.case
    g = case.geometry
    o, cin_g = case.weight.shape[0], case.weight.shape[1]
    for run in ctx.runs:
        hazard = fbgemm_groupwise_overrun(run.report.engine, run.spec.run_weight_qparams,
                                          g.groups, cin_g, o // g.groups, g, case.kernel_size)
        if hazard is None:
            continue
        yield finding(
            "QCD062", "error" if run.report.name == "as_given" else "warning",
            f"torch's fbgemm kernel overruns its buffers on this layer ({run.report.engine})",
            f"On this CPU torch's fbgemm groupwise kernel {hazard.split(': ', 1)[1]}. "
            "qconvdiag did not run torch on it; the emulation shows what the kernel computes "
            "for the groups it handles correctly.",
            {"groups": g.groups, "channels_per_group": cin_g, "engine": run.report.engine},
            "# run this layer on another engine (onednn takes symmetric weights):\n"
            'torch.backends.quantized.engine = "qnnpack"', run)


def qcd070(ctx: Context, others: list[Finding]) -> Iterator[Finding]:
    """Runs last: a path at its floor with no warning or error gets the all-clear."""
    for run in ctx.paths():
        b = run.report.budget
        if b is None or run.report.refused or b.verdict != "at_floor":
            continue
        if any(f.severity in ("error", "warning") and f.path == run.report.name
               and f.engine in (None, run.report.engine) for f in others):
            continue
        if per_tensor_cost(run) is not None:  # QCD023 says what the floor does not show
            continue
        sqnr = run.report.total.sqnr_db
        floor_sqnr = None if sqnr is None or b.ratio <= 0 else sqnr + 20 * math.log10(b.ratio)
        bits = ("7-bit" if 7 in (b.input_bits, b.output_bits) else "8-bit") + " activations"
        yield finding(
            "QCD070", "info", "the error is at the rounding floor: nothing is misconfigured",
            f"The {run.report.name} path's RMSE {fmt(b.rmse)} is {fmt(b.ratio)}x the floor of "
            f"rounding this layer with good qparams ({fmt(b.floor_rmse)}: {bits}, per-channel "
            "weights)"
            + (f"; SQNR {sqnr:.1f} dB" if sqnr is not None else "")
            + (f", {floor_sqnr:.1f} dB at the floor" if floor_sqnr is not None else "")
            + ". 8-bit quantization of this layer cannot do much better.",
            {"rmse": b.rmse, "floor_rmse": b.floor_rmse, "ratio": b.ratio, "sqnr_db": sqnr},
            "# nothing to fix", run)
