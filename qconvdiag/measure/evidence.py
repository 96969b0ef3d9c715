"""What the measurement hands the findings and the trace: each path's report plus the arrays
behind it. The rules read this; they never import the orchestrator (``diagnose``)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arithmetic.emulate import Emulation, Kernel
from ..case import Geometry
from ..quantization.paths import PathSpec
from ..quantization.qparams import QParams
from ..report import PathReport
from .stages import Ladder


@dataclass(frozen=True, eq=False)
class PathRun:
    """A path's report plus the arrays behind it (for findings, trace and --save-outputs)."""

    report: PathReport
    spec: PathSpec
    kernel: Kernel
    emulation: Emulation | None
    module_emulation: Emulation | None
    ladder: Ladder | None
    torch_codes: np.ndarray | None
    torch_warnings: tuple[str, ...] = ()
    geometry: Geometry | None = None
    """The case's conv geometry (for re-running torch on this path's setup)."""
    float_output: np.ndarray | None = None
    """The float reference the path was measured against (shared by every path)."""
    saturation_without_vnni: int | None = None
    """int16 pair sums this path's codes would saturate in fbgemm's pre-VNNI kernels (measured
    when this CPU accumulates exactly; None when not measured)."""
    activation: str | None = None
    """The case's fused activation (``relu``): the ladder measures after it."""

    @property
    def output_reference(self) -> np.ndarray | None:
        """The float output the quantized one is compared with: after the fused activation."""
        if self.float_output is None or self.activation != "relu":
            return self.float_output
        return np.maximum(self.float_output, 0.0)


@dataclass(frozen=True, eq=False)
class PathArrays:
    """One path's output arrays, for --save-outputs (render/npz.py names them)."""

    path: str
    engine: str
    quantized: np.ndarray | None
    """The dequantized output the ladder ends at (kept only with the stage states)."""
    quantized_int: np.ndarray | None
    """The emulated integer output codes of what ran."""
    torch_int: np.ndarray | None
    """torch's integer output codes (None when torch refused)."""
    stages: dict[str, np.ndarray]
    """Cumulative output after each stage (empty unless kept)."""


@dataclass(frozen=True, eq=False)
class OutputArrays:
    float_output: np.ndarray
    """The float reference (float64)."""
    paths: tuple[PathArrays, ...]


def exec_weight_qparams(qp: QParams) -> QParams:
    """torch applies per-channel weight scales per output channel, whatever the axis."""
    if qp.per_channel and qp.axis != 0:
        return QParams(qp.scale, qp.zero_point, qp.dtype, 0, qp.source, qp.zero_point_given)
    return qp


def saturation_without_vnni(spec: PathSpec, kernel: Kernel, g: Geometry) -> int | None:
    """How many int16 pair sums the path's codes would saturate on a CPU without AVX512-VNNI,
    where fbgemm/x86 sum raw u8 * s8 products pairwise along K (measured only when this CPU
    accumulates the path exactly; qnnpack never pairs)."""
    from ..arithmetic.accumulate import EXACT, PAIRS_K, pair_saturation

    if kernel.kernel == "qnnpack" or kernel.accumulation != EXACT:
        return None
    if spec.weight_qparams.dtype != "qint8" or spec.input_qparams.dtype != "quint8":
        return None
    zp = spec.input_qparams.zero_point[0]
    _, n = pair_saturation(spec.input_codes, zp, spec.weight_codes, g, PAIRS_K, zp,
                           count_only=True)
    return n
