"""QCD076: calibration batches far wider than the inputs diagnosed, at every conv.

An observer fits each output step to the range it saw over the calibration batches: a MinMax
observer to the last value. A few batches unlike the inputs at inference (over-exposed images,
another preprocessing, another domain) widen every range, and every step with it, while each
conv stays at its floor on that range: no conv's finding names it (pytorch#45185: accuracy
falls as the calibration set grows, 0.879 with 20 images, 0.839 with 1400, float 0.882;
helper-70's repro, 24 of 1400 images over-exposed x4: the calibration ranges 3.65x to 5.3x the
test images' at every conv, each conv "at its floor", the head 17.7 dB where a step fitted to
the test images gives 32.4 dB; calibrating without those images gave 0.859).

Named where, with enough samples captured (MIN_SAMPLES), the calibration batches' range at
every conv is WIDER times the captured samples' or more. On healthy models calibrated on 200
images and captured on 1 to 64 of the test images (4 architectures, 72 captures), the
smallest ratio over the convs was 0.86x to 1.42x; helper sweeps' 25 healthy bundles, 0.57x
to 1.06x. From UNLIKE_RANGE (8x) the walk judges every conv on the samples' range instead
(bundle.calibration_unlike), and QCD065 speaks where a loss shows.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from ..findings.fixes import model_calibration
from ..report import Finding
from .bundle import UNLIKE_RANGE, LayerCapture, calibration_ratios
from .screen import Screen

CODE = "QCD076"
#: The calibration batches' range over the captured samples' at every conv, from which the
#: batches are named unlike the inputs.
WIDER = 3.0
#: Captured samples below this many are too few to stand for the inputs.
MIN_SAMPLES = 8


def qcd076(layers: Sequence[LayerCapture], screens: dict[str, Screen], flow: str
           ) -> Finding | None:
    """QCD076 where the calibration batches reach WIDER to UNLIKE_RANGE times the captured
    samples' range at every conv that has both (MIN_SAMPLES samples or more): a warning."""
    ratios = calibration_ratios(layers)
    if not ratios or not layers or layers[0].case.input.shape[0] < MIN_SAMPLES:
        return None
    low, high = min(ratios.values()), max(ratios.values())
    if not WIDER <= low < UNLIKE_RANGE:
        return None
    first = next(lay.name for lay in layers if lay.name in ratios)
    median = statistics.median(ratios.values())
    own = screens[first].own.sqnr_db if first in screens else None
    at_first = ("" if own is None else
                f" At {first}, the first, its own error is {own:.1f} dB, {ratios[first]:.3g}x "
                "the step these inputs need.")
    return Finding(
        CODE, "warning", "calibration batches far wider than the inputs, at every conv",
        f"At every conv ({len(ratios)}) the float model's range over the calibration batches "
        f"is {low:.3g}x to {high:.3g}x (median {median:.3g}x) its range on the "
        f"{layers[0].case.input.shape[0]} samples given here: each output step is that much "
        "coarser than these inputs need, while each conv is at its floor on the batches' "
        f"range.{at_first} Either the calibration batches hold inputs unlike these "
        "(over-exposed or unnormalized images, another domain), which a MinMax observer "
        "follows to the last value, or the inputs given here are unlike those at inference.",
        {"ratio_min": low, "ratio_median": median, "ratio_max": high,
         "samples": int(layers[0].case.input.shape[0]), "convs": len(ratios)},
        OUTLIERS_FIX + model_calibration(flow))


#: The fix's first lines: the calibration samples whose largest |value| is over twice the
#: batches' median left out (helper-73: the fix that only said so rebuilt the same model,
#: 0.8136; leaving them out gave 0.8917).
OUTLIERS_FIX = (
    "# calibrate on inputs like those at inference: leave out the samples unlike\n"
    "# the rest (here, any whose largest |value| is over twice the batches' median)\n"
    "import torch\n"
    "peaks = [b.flatten(1).abs().amax(1) for b in calibration_batches]\n"
    "limit = 2 * torch.cat(peaks).median()\n"
    "calibration_batches = [b[p <= limit]\n"
    "                       for b, p in zip(calibration_batches, peaks)]\n"
    "calibration_batches = [b for b in calibration_batches if len(b)]\n")
