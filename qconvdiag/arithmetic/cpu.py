"""What this CPU does: the ISA flags that decide the kernels' arithmetic, and each engine's
accumulation as the run-time probe (engines.probe) found it."""

from __future__ import annotations

from ..report import CpuInfo, EngineOnCpu
from .engines import probe

#: Flags that change the quantized kernels' arithmetic (VNNI: exact int32 accumulation).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def isa_flags() -> tuple[str, ...]:
    """This CPU's flags among ISA_FLAGS, in that order."""
    flags = cpu_flags()
    return tuple(f for f in ISA_FLAGS if f in flags)


def cpu_info() -> CpuInfo:
    import torch

    engines = {
        name: EngineOnCpu(p.available, dict(p.accumulation),
                          p.x86_uses_onednn if name == "x86" else None)
        for name, p in probe().items()
    }
    return CpuInfo(isa_flags(), torch.backends.cpu.get_cpu_capability(), engines)
