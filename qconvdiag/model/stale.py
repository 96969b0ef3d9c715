"""QCD068: a conv's output qparams set after its first run on qnnpack, which keeps the old ones.

qnnpack computes a conv's requantization (input scale x weight scale / output scale) on the
conv's first run and keeps it: a scale or zero point set afterwards is what the output tensor
says, not what the kernel computed with (measured with torch 2.13: the same codes as before
the change, until the weight is packed again). A user who edits a scale after looking at the
model's outputs, or a fix pasted into a session that ran the model, gets that; the walk would
then emulate the new qparams, and blame the conv's output step or saturation for what is an
old requantization (a sweep saw QCD052 on such a conv at 380x its floor, and a false QCD051
error on the conv after it).

The capture checks each conv of a model run on qnnpack: the module packed again (a deep copy
packs its weight anew) on the first captured sample gives the codes the model computed, or the
conv kept an old requantization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..report import Finding

CODE = "QCD068"


@dataclass(frozen=True)
class StaleRequantization:
    """A conv whose codes are not what its current qparams give, on its first sample."""

    layer: str
    differ: int
    """Output codes of the first sample that differ from the conv packed again."""
    total: int

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "differ": self.differ, "total": self.total}

    @staticmethod
    def from_mapping(m: Any, source: str) -> StaleRequantization:
        from ..errors import CaseFileError
        from .names import is_path

        try:
            stale = StaleRequantization(str(m["layer"]), int(m["differ"]), int(m["total"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            stale = None
        if stale is None or not is_path(stale.layer):
            raise CaseFileError(f"{source}: an entry of 'stale' is malformed; capture the model "
                                "again")
        return stale


def stale_requantization(name: str, qconv: Any, qinput: Any, qoutput: np.ndarray
                         ) -> StaleRequantization | None:
    """The check on one conv (``qinput``: the quantized tensor the model gave it for its first
    sample; ``qoutput``: the output codes it computed): packed again for qnnpack, then, where
    that differs, for each other engine torch has (a conv packed for fbgemm runs fbgemm's
    kernels whatever the engine says now: QCD067's case, not this one). None when some
    packing computes the same codes, or none can run."""
    import torch

    from ..arithmetic.engines import torch_engines

    engine = torch.backends.quantized.engine
    others = [e for e in torch_engines() if e != engine]
    first = None
    for e in [engine, *others]:
        differ = _differ_packed_on(e, qconv, qinput, qoutput)
        if differ == 0:
            return None
        if first is None:
            first = differ
    return None if first is None else StaleRequantization(name, first, int(qoutput.size))


def _differ_packed_on(engine: str, qconv: Any, qinput: Any, qoutput: np.ndarray) -> int | None:
    """Output codes where ``qconv`` packed again on ``engine`` (a deep copy packs its weight
    anew) differs from ``qoutput`` on ``qinput``; None where it cannot run."""
    import copy

    import torch

    from ..torch_calls import int_codes

    previous = torch.backends.quantized.engine
    try:
        torch.backends.quantized.engine = engine
        with torch.no_grad():
            fresh = copy.deepcopy(qconv)(qinput)
    except (RuntimeError, TypeError, IndexError, copy.Error):  # an engine that cannot pack
        # this conv (qnnpack's conv3d; a qnnpack-packed conv1d read back on another engine
        # raises IndexError), or a module that cannot be copied
        return None
    finally:
        torch.backends.quantized.engine = previous
    if not fresh.is_quantized or tuple(fresh.shape) != qoutput.shape:
        return None
    return int(np.count_nonzero(int_codes(fresh) != qoutput))


def qcd068(stale: tuple[StaleRequantization, ...]) -> Finding | None:
    """An error: the conv computes with qparams it no longer states, and every conv after it
    receives that."""
    if not stale:
        return None
    names = ", ".join(s.layer for s in stale)
    counts = "; ".join(f"{s.layer}: {s.differ} of {s.total}" for s in stale)
    message = (
        f"On qnnpack, {names} computed codes that {'its' if len(stale) == 1 else 'their'} "
        "current output scale and zero point do not give: packed again, the conv computes "
        f"other codes on the first captured sample ({counts}). qnnpack keeps the "
        "requantization of a conv's first run, so a scale or zero point set after the model "
        "ran is what the output tensor says, not what the kernel computed with. This "
        "report's numbers for that conv, and for the convs after it, come from the old "
        "requantization.")
    from ..findings.fixes import python_list

    names_list = python_list([s.layer for s in stale])
    fix = ("# pack each such conv again after setting its qparams: qnnpack then requantizes\n"
           f"for name in {names_list}:\n"
           "    qm = quantized.get_submodule(name)\n"
           "    qm.set_weight_bias(qm.weight(), qm.bias())")
    return Finding(CODE, "error", f"{names}: qparams set after the first run on qnnpack",
                   message, {"convs": [s.to_dict() for s in stale]}, fix)
