"""What this CPU's quantized kernels do, for tests whose expectations depend on it.

Without VNNI (AVX2-only CPUs), oneDNN and fbgemm sum int16 pairs of products, which saturate
with 8-bit activations: the error is real (torch warns so for oneDNN's default qconfig, whose
activations keep 8 bits), and QCD040 names it. A healthy layer on such a CPU is quantized
with 7-bit activations (``reduce_range``), as torch advises there and as x86's and fbgemm's
defaults always are. Tests build healthy layers with ``healthy_qconfig`` and take each
kernel's accumulation from the probe (``accumulation``), so they hold on every CPU.
"""

from __future__ import annotations

from typing import Any

from qconvdiag.arithmetic.accumulate import EXACT, PAIRS_CHANNELS, PAIRS_K
from qconvdiag.arithmetic.engines import probe, probe_pt2e


def accumulation(engine: str, layer: str = "dense") -> str:
    """How ``engine``'s convs of this layer class accumulate on this CPU (the probe's
    answer)."""
    profiles = probe_pt2e() if engine == "x86_inductor" else probe()
    return profiles[engine].accumulation.get(layer, EXACT)


def pairs_here(engine: str, layer: str = "dense") -> bool:
    """``engine``'s convs of this class sum int16 pairs on this CPU: 8-bit activations can
    saturate them."""
    return accumulation(engine, layer) in (PAIRS_K, PAIRS_CHANNELS)


def healthy_qconfig(engine: str) -> Any:
    """The engine's default qconfig, with 7-bit activations where its kernels sum int16 pairs
    on this CPU and the default keeps 8 bits (oneDNN without VNNI)."""
    import warnings

    from torch.ao.quantization import QConfig, get_default_qconfig
    from torch.ao.quantization.observer import HistogramObserver

    with warnings.catch_warnings():  # oneDNN's "may have accuracy issues" without VNNI
        warnings.simplefilter("ignore")
        qconfig = get_default_qconfig(engine)
    if not pairs_here(engine) or qconfig.activation.p.keywords.get("reduce_range", False):
        return qconfig
    return QConfig(activation=HistogramObserver.with_args(reduce_range=True),
                   weight=qconfig.weight)


def vnni() -> bool:
    """This CPU runs x86's and oneDNN's int8 convs with exact accumulation, x86 handing
    symmetric weights to oneDNN (AVX512-VNNI), as on the CPU the samples and README examples
    were made on."""
    return probe()["x86"].x86_uses_onednn and not pairs_here("onednn")
