"""The user's script, rebuilt from a case, so a finding's fix can be pasted into it and run.

The names are the ones every fix is written against (qconvdiag/findings/fixes.py): ``conv``
(the float conv), ``x`` (its input), ``qx`` (the quantized input), ``qm`` (the quantized conv),
``calibration_batches``. After the fix runs, the script's state is captured as a new case
(``qconvdiag.capture``): what the user would now diagnose.
"""

from __future__ import annotations

import warnings
from typing import Any

from qconvdiag.case import ConvCase
from qconvdiag.quantization.paths import ProductionOptions, build_as_given, build_production


def user_script(case: ConvCase, engine: str) -> dict[str, Any]:
    """The objects a user's script holds for this case, built with torch."""
    import torch

    from qconvdiag.arithmetic.torch_ref import quantized_tensor
    from qconvdiag.measure.evidence import exec_weight_qparams

    g = case.geometry
    dims = case.spatial_dims
    w = torch.from_numpy(case.weight.copy())
    conv_cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[dims]
    conv = conv_cls(w.shape[1] * g.groups, w.shape[0], tuple(w.shape[2:]), stride=g.stride,
                    padding=g.padding, dilation=g.dilation, groups=g.groups,
                    bias=case.bias is not None).eval()
    with torch.no_grad():
        conv.weight.copy_(w)
        if case.bias is not None:
            conv.bias.copy_(torch.from_numpy(case.bias))  # type: ignore[union-attr]
    x = torch.from_numpy(case.input.copy())
    spec = build_as_given(case, build_production(case, engine, ProductionOptions()))
    assert spec is not None, "a fix is pasted into a user's setup"
    qmod = {1: torch.ao.nn.quantized.Conv1d, 2: torch.ao.nn.quantized.Conv2d,
            3: torch.ao.nn.quantized.Conv3d}[dims]
    m = spec.module
    w_codes = m.weight_codes if m else spec.weight_codes
    w_qp = exec_weight_qparams(m.weight_qparams if m else spec.weight_qparams)
    out_qp = m.output_qparams if m else spec.output_qparams
    bias = m.bias if m else spec.bias
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = qmod(w.shape[1] * g.groups, w.shape[0], tuple(w.shape[2:]), stride=g.stride,
                  padding=g.padding, dilation=g.dilation, groups=g.groups)
        qw = quantized_tensor(w_codes, w_qp)
        b = None if bias is None else torch.from_numpy(bias.copy())
        try:
            torch.backends.quantized.engine = engine
            qm.set_weight_bias(qw, b)
        except RuntimeError:  # the engine refuses it (e.g. onednn, weight zero point != 0)
            torch.backends.quantized.engine = "x86"
            try:
                qm.set_weight_bias(qw, b)
            except RuntimeError:  # every engine refuses it (quint8 weights): the user's
                pass  # set_weight_bias raised, and qm holds a fresh module's weight
        finally:
            torch.backends.quantized.engine = previous
        qm.scale, qm.zero_point = float(out_qp.scale[0]), int(out_qp.zero_point[0])
        qx = quantized_tensor(spec.input_codes, spec.input_qparams)
    return {"torch": torch, "conv": conv, "x": x, "qx": qx, "qm": qm,
            "calibration_batches": [x]}


def apply_fix(case: ConvCase, engine: str, fix: str) -> ConvCase:
    """Run ``fix`` in the user's script on ``engine``; the case the script then holds."""
    import torch

    import qconvdiag

    namespace = user_script(case, engine)
    previous = torch.backends.quantized.engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.quantized.engine = engine
        try:
            exec(compile(fix, "<fix>", "exec"), namespace)  # noqa: S102 - our own fix text
            return qconvdiag.capture(namespace["conv"], namespace["x"], qconv=namespace["qm"],
                                     qinput=namespace["qx"], path=None)
        finally:
            torch.backends.quantized.engine = previous

