"""Fix code the user can paste, filled in with this case's shapes and numbers."""

from __future__ import annotations

from ..case import ConvCase
from ..evidence import PathRun
from .base import conv_name, fmt


def conv_ctor(case: ConvCase) -> str:
    w = case.weight.shape
    g = case.geometry
    return (
        f"torch.nn.{conv_name(case)}({w[1] * g.groups}, {w[0]}, kernel_size={tuple(w[2:])}, "
        f"stride={g.stride}, padding={g.padding}, dilation={g.dilation}, groups={g.groups}, "
        f"bias={case.bias is not None})"
    )


def production_snippet(case: ConvCase, engine: str, prod: PathRun | None) -> str:
    """The forum answer's route, done: observers, calibration, from_float."""
    lines = [
        "import torch",
        "from torch.ao.quantization import get_default_qconfig",
        f'torch.backends.quantized.engine = "{engine}"',
        f"m = {conv_ctor(case)}  # your float conv, weights loaded",
        f'm.qconfig = get_default_qconfig("{engine}")',
        "m.activation_post_process = m.qconfig.activation()  # observes the conv's output",
        "in_obs = m.qconfig.activation()                      # observes its input",
        "for x in calibration_batches:  # a few real inputs, shape "
        f"{tuple(['N'] + list(case.input.shape[1:]))}".replace("'", ""),
        "    in_obs(x)",
        "    m.activation_post_process(m(x))",
        f"qm = torch.ao.nn.quantized.{conv_name(case)}.from_float(m)"
        "  # weight, bias, scale, zero_point set",
        "s, z = in_obs.calculate_qparams()",
        "y = qm(torch.quantize_per_tensor(x, float(s), int(z), torch.quint8)).dequantize()",
    ]
    if prod is not None:
        out = prod.report.qparams["output"]
        inp = prod.report.qparams["input"]
        lines.append(
            f"# on this case: input scale {fmt(inp.scale[0])} zero_point {inp.zero_point[0]}, "
            f"output scale {fmt(out.scale[0])} zero_point {out.zero_point[0]}"
        )
    return "\n".join(lines)


def set_output_snippet(case: ConvCase, prod: PathRun | None) -> str:
    if prod is None:
        return "qm.scale, qm.zero_point = <from an output observer>"
    out = prod.report.qparams["output"]
    return (
        f"qm.scale = {out.scale[0]!r}  # from an output observer on this case\n"
        f"qm.zero_point = {out.zero_point[0]}"
    )
