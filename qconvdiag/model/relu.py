"""QCD075: a ReLU module left unfused after a conv (an eager model).

``fuse_modules(model, [["conv", "relu"]])`` makes the conv a ConvReLU: its output is quantized
after the ReLU, over ``[0, max]``. Left out of the fusion, the conv's output is quantized first,
over its signed range, and the ReLU then drops every code below the zero point: the values
that pass keep a step ``(max - min) / max`` times coarser than a fused conv's, and every op
after it that keeps its input's qparams (a pool) inherits that step. pytorch#95287: a 3-conv
net with ``default_qconfig`` and no fusion, 0.8388 against the fused model's 0.8715 (logits
13.3 dB against 20.2 dB), where every conv is at its floor on its signed range; the last
conv's range -175.5..146.4 gives a step 2.2x a fused conv's.

The capture records, for each conv of an eager model that fused no activation, the ReLU module
the float model calls on the conv's own output, when it is called there alone (a module called
elsewhere too is QCD064's: fusing it would remove it there). The screen measures the ReLU's
output on the conv's own input twice: from the quantized conv's codes, and with the rounding
of the values that pass at a fused conv's step (the float output's range over the calibration
batches, or the captured samples, with its negative side cut).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..findings.fixes import CALIBRATE_EAGER, comment
from ..report import Finding
from .batchnorm import LOST_DB, db_text, energy_db

CODE = "QCD075"
#: A fused conv would leave the ReLU's output this many dB closer to the float model's, or
#: more: its rounding error energy half or less. Named: a fusion costs nothing.
COST_DB = 3.0


@dataclass(frozen=True)
class ReluCost:
    """An unfused ReLU's output on the conv's own input: from the quantized conv's codes, and
    at a fused conv's step."""

    relu: str
    """The ReLU module's path."""
    sqnr_db: float | None
    """relu(the quantized conv's output) against relu(the float conv's) (None: exact)."""
    fused_db: float | None
    """The same with the values that pass rounded at a fused conv's step instead (None:
    exact)."""
    step_ratio: float
    """The conv's output step over a fused conv's."""
    bn: str = ""
    """The BatchNorm between them that the quantized conv folded ("" for none)."""

    @property
    def cost_db(self) -> float:
        if self.sqnr_db is None:
            return 0.0
        return (math.inf if self.fused_db is None else self.fused_db) - self.sqnr_db


def relu_cost(relu: str, quantized: np.ndarray, y: np.ndarray, step: float,
              float_range: tuple[float, float], bn: str = "") -> ReluCost:
    """``ReluCost`` of the ReLU ``relu`` after a conv whose dequantized output is ``quantized``
    (at ``step``) and whose float output on the same input is ``y``; ``float_range``: the float
    output's range the conv's observer saw (or the samples'), from which a fused conv's step
    is that range's positive side over as many steps. The values that pass lose their
    rounding error at ``step`` (step^2 / 12 each) and take a fused conv's."""
    low, high = min(float_range[0], 0.0), max(float_range[1], 0.0)
    ratio = (high - low) / high if high > 0 else 1.0
    z = np.maximum(y.astype(np.float64), 0.0)
    error = np.maximum(quantized.astype(np.float64), 0.0) - z
    signal, noise = float(np.vdot(z, z)), float(np.vdot(error, error))
    passed = int(np.count_nonzero(z))
    fused_step = step / ratio
    fused = max(noise - passed * (step * step - fused_step * fused_step) / 12,
                passed * fused_step * fused_step / 12)
    return ReluCost(relu, energy_db(signal, noise), energy_db(signal, fused), ratio, bn)


def qcd075(layers: list[tuple[str, ReluCost]], qat: bool = False) -> Finding | None:
    """QCD075 for the convs whose unfused ReLU's output is COST_DB or more below what a fused
    conv gives, in one finding whose fix fuses every pair in ``layers`` (the cheaper ones add
    up along the model too): an error where one's output is below LOST_DB, else a warning.
    ``qat``: the model was trained through its fake quantization (prepare_qat): the fix says
    to fuse in that flow and train again (PTQ's prepare and convert would drop the training,
    and refuse its fused QAT modules)."""
    costly = [(conv, cost) for conv, cost in layers if cost.cost_db >= COST_DB]
    if not costly:
        return None
    conv, cost = max(costly, key=lambda c: c[1].cost_db)
    lowest = min((-math.inf if c.sqnr_db is None else c.sqnr_db for _n, c in costly))
    level = "error" if lowest < LOST_DB else "warning"
    others = [c for c in costly if c[0] != conv]
    more = "".join(f" {c.relu} after {n}: {db_text(c.sqnr_db)} against {db_text(c.fused_db)}."
                   for n, c in others[:4])
    if len(others) > 4:
        more += f" And {len(others) - 4} more."
    cheaper = [c.relu for _n, c in layers if c.cost_db < COST_DB]
    if cheaper:
        more += (f" The fix fuses the {len(cheaper)} other ReLU(s) left after a conv too "
                 f"({', '.join(cheaper[:4])}{', ...' if len(cheaper) > 4 else ''}), which "
                 f"cost less here (under {COST_DB:.0f} dB each).")
    listed = "".join(f"\n    {[n, c.relu]!r}," for n, c in layers)
    return Finding(
        CODE, level,
        f"ReLU {cost.relu} not fused into {conv}" if not others else
        f"{len(costly)} ReLUs not fused into the convs before them",
        f"{cost.relu} reads {conv}'s output"
        + (f" (through {cost.bn}, folded into it)" if cost.bn else "")
        + f" and stays a module of its own: {conv}'s output "
        f"is quantized over its signed range first, and {cost.relu} then drops the codes "
        f"below the zero point, so the values that pass keep a step {cost.step_ratio:.2f}x a "
        f"fused conv's (ops after it that keep their input's qparams, a pool, inherit it). "
        f"Its output is {db_text(cost.sqnr_db)} from the float model's on {conv}'s own input, "
        f"where a conv fused with it gives about {db_text(cost.fused_db)}.{more}",
        {"relus": [{"conv": n, "relu": c.relu, "sqnr_db": c.sqnr_db,
                    "fused_sqnr_db": c.fused_db, "step_ratio": c.step_ratio}
                   for n, c in costly]},
        _qat_fix(layers) if qat else
        "from torch.ao.quantization import fuse_modules\n"
        "# the float model in eval mode, fused as before, and each conv with the ReLU\n"
        "# after it too:\n"
        f"model = fuse_modules(model.eval(), [{listed}\n])\n" + CALIBRATE_EAGER)


def _qat_fix(layers: list[tuple[str, ReluCost]]) -> str:
    """Fusing in the QAT flow, in words: the fuse list the model was prepared with gains each
    ReLU (a group with its BatchNorm where one is folded), then prepare_qat, training and
    convert again."""
    groups = "; ".join(str([n, *([c.bn] if c.bn else []), c.relu]) for n, c in layers)
    return comment(
        "A QAT model: put each ReLU in the fuse_modules_qat list the model was prepared with "
        f"({groups}), then prepare_qat, train again and convert; calibrating again with "
        "prepare and convert would drop the training.")
