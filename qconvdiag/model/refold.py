"""QCD073: a BatchNorm folded into a conv whose output other ops read too (a PT2E model).

torchao's ``prepare_pt2e`` folds every ``conv -> batch_norm`` of the exported graph
(``_fuse_conv_bn_``): the BatchNorm's scale and shift go into the conv's weight and bias, and
the BatchNorm node is gone. It does not ask whether the BatchNorm is the conv's only reader.
Where the float model reads the conv's output elsewhere too (a pre-activation ResNet's
shortcut reads its stem conv's raw output, while the next block's BatchNorm normalizes it),
every reader now gets the output after the BatchNorm: the converted model computes another
function than the float one, before any rounding (helper-64's pre-activation ResNet: 99.7%
float, 11.7% converted, exactly the accuracy of the float model with its shortcut reading
bn1(stem(x))). Each conv is at its floor against its folded twin, so no conv's finding names
it; QCD065 saw the loss where the shortcut joins and blamed "an op between".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..report import Finding
from .hooks import Seen

CODE = "QCD073"
#: Where the other readers' input moves below QCD065's LOST_DB, the signal they carry is gone:
#: an error; a warning above it, down to this SQNR; info beyond. A loss after such a conv is
#: blamed on the fold only where the fold explains it (ops.EXPLAINS_DB): a harmless fold does
#: not take a loss it cannot explain from QCD065 (review).
SAID_DB = 30.0

#: The fix: a copy of the conv's output for the BatchNorm to read, which keeps it out of the
#: fold (it runs in float between the conv's dequantize and the next quantize); run, the
#: helper's model converts to its float accuracy (tests/model/test_pt2e_refold.py).
FIX = (
    "# prepare_pt2e folds a BatchNorm into the conv before it for every op that\n"
    "# reads the conv's output; where others read it too, give the BatchNorm a\n"
    "# copy to read, which keeps it out of the fold (it then runs in float)\n"
    "from torchao.quantization.pt2e.quantize_pt2e import (\n"
    "    convert_pt2e, prepare_pt2e)\n"
    "exported = torch.export.export(\n"
    "    model.eval(), (calibration_batches[0],), strict=True).module()\n"
    "for node in list(exported.graph.nodes):\n"
    "    readers = list(node.users)\n"
    "    if \"conv\" not in str(node.target) or len(readers) < 2:\n"
    "        continue\n"
    "    for bn in [r for r in readers if \"batch_norm\" in str(r.target)]:\n"
    "        with exported.graph.inserting_before(bn):\n"
    "            read = exported.graph.call_function(\n"
    "                torch.ops.aten.clone.default, (node,))\n"
    "        bn.replace_input_with(node, read)\n"
    "exported.recompile()\n"
    "prepared = prepare_pt2e(exported, quantizer)\n"
    "with torch.no_grad():\n"
    "    for batch in calibration_batches:  # inputs as at inference\n"
    "        prepared(batch)\n"
    "converted = convert_pt2e(prepared)")


@dataclass(frozen=True)
class SharedFold:
    """A conv whose BatchNorm the converted graph folded, while the float model reads the
    conv's output elsewhere too."""

    conv: str
    bn: str
    readers_sqnr_db: float
    """What the other readers now get (the BatchNorm's output) against what they read in the
    float model (the conv's), on the captured samples (inf: the same)."""

    def to_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "bn": self.bn, "readers_sqnr_db": self.readers_sqnr_db}

    @staticmethod
    def from_mapping(m: Any, source: str) -> SharedFold:
        from ..errors import CaseFileError
        from .names import is_path

        try:
            fold = SharedFold(str(m["conv"]), str(m["bn"]), float(m["readers_sqnr_db"]))
        except (KeyError, TypeError, ValueError, OverflowError):
            fold = None
        if fold is not None and math.isnan(fold.readers_sqnr_db):
            fold = None
        if fold is None or not (is_path(fold.conv) and is_path(fold.bn)):
            raise CaseFileError(f"{source}: an entry of 'shared_folds' is malformed; capture "
                                "the model again")
        return fold


def shared_folds(float_model: Any, folded: dict[str, tuple[Any, str]],
                 seen: dict[str, Seen], batch: Any) -> tuple[SharedFold, ...]:
    """The convs of ``folded`` (name -> the float model's conv and the BatchNorm the graph
    folded into it) whose output the float model reads elsewhere too (``sole_readers``, on
    ``batch``), each with what that costs the other readers: the BatchNorm's outputs the
    capture saw (``seen``) against the conv's own on the same inputs."""
    import torch

    from .batchnorm import sole_readers

    if not folded:
        return ()
    alone = sole_readers(float_model, {name: conv for name, (conv, _bn) in folded.items()},
                         batch)
    found = []
    for name, (conv, bn) in folded.items():
        s = seen[name]
        if alone[name] or not s.bn_output or len(s.bn_output) != len(s.float_input):
            continue
        error = signal = 0.0
        with torch.no_grad():
            for x, normed in zip(s.float_input, s.bn_output):
                raw = conv(torch.from_numpy(x).to(conv.weight.dtype)).double().numpy()
                error += float(np.sum((np.asarray(normed, dtype=np.float64) - raw) ** 2))
                signal += float(np.sum(raw ** 2))
        db = (math.inf if error == 0 else 10 * math.log10(signal / error) if signal > 0
              else -math.inf)
        found.append(SharedFold(name, bn, db))
    return tuple(found)


def qcd073(folds: tuple[SharedFold, ...]) -> Finding | None:
    """QCD073 for the convs ``shared_folds`` found, graded by the worst move of what their
    other readers get."""
    from .lost import LOST_DB  # (lost imports bundle, which imports this module)

    if not folds:
        return None
    worst = min(folds, key=lambda f: f.readers_sqnr_db)
    db = worst.readers_sqnr_db
    level = "error" if db < LOST_DB else "warning" if db < SAID_DB else "info"
    pairs = ", ".join(f"{f.bn} into {f.conv}" for f in folds)
    whose = "that conv's output" if len(folds) == 1 else "those convs' outputs"
    return Finding(
        CODE, level, f"BatchNorm folded into a conv whose output other ops read too ({pairs})",
        f"prepare_pt2e folded BatchNorm {pairs}, while the float model reads "
        f"{whose} elsewhere too (a "
        "shortcut, a second branch): torchao folds every conv -> batch_norm of the exported "
        "graph without asking whether the BatchNorm is the conv's only reader, so every "
        f"reader now gets the output after the BatchNorm. At {worst.conv} what they get is "
        f"{_db(db)} dB from what they read in the float model: the converted model computes "
        "another function than the float one before any rounding, while each conv is at its "
        "floor against its folded twin.",
        {"folds": [f.to_dict() for f in folds]}, FIX)


def _db(value: float) -> str:
    return "-inf" if value == -math.inf else f"{value:.1f}"
