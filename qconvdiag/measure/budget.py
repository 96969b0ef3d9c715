"""The error budget of a path: per stage, what it measured next to what it would add at the
*floor* (good qparams for the dtype and the data's range), and the path's verdict.

The floor models every rounding as uniform noise of the ideal step (variance step^2 / 12),
propagated through the conv:

* input: step ``dx = (max(x, 0) - min(x, 0)) / 255`` (quint8, the range always holds 0); an
  output element receives ``dx^2 / 12 * sum(w^2)`` over the taps that read real (not padded)
  inputs, scaled by the fraction of nonzero inputs (an exact 0 rounds to itself);
* weight: per output channel ``dw = max|w_o| / 127.5`` (symmetric per-channel qint8, the finest
  grid torch offers); an output element receives ``dw^2 / 12 * sum(x^2)`` over its window;
* output: ``dy = (max(y, 0) - min(y, 0)) / 255``, i.e. ``dy^2 / 12`` per element;
* clipping, accumulation, the module's state and torch's residual: 0.

With 7-bit activations (``reduce_range``, the x86/fbgemm default that keeps int16 pair sums
from saturating on CPUs without AVX512-VNNI) an activation's floor is that of 127 levels: the
configuration's floor. Measured on the healthy corpus (tests/corpus.py: 200 layers quantized by
torch's eager flow with each engine's default qconfig), a layer's RMSE is 0.9x-1.1x its floor.

Worked example, the forum case's production path (x86): one output 803.69, so
``dy = 803.69 / 255 = 3.152`` and the output floor is ``3.152 / sqrt(12) = 0.91``; with 7-bit
activations the configuration's floor is twice that. Its measured error is 7e-6: at the floor.

Stage deltas within the float reference's own noise (``REFERENCE_NOISE`` of the output's
magnitude) count as exact. Thresholds, stated once:
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from ..arithmetic.emulate import Emulation, Kernel
from ..case import ConvCase
from ..parallel import CHUNK
from ..quantization.paths import PathSpec
from ..quantization.qparams import QParams, dequantize32
from ..report import Budget, StageBudget
from .metrics import Span
from .stages import StageResult

#: A path whose RMSE is within this factor of its floor is at the floor: nothing to fix.
AT_FLOOR = 1.5
#: A path whose RMSE is at least this factor above its floor (12 dB of SQNR lost) is broken.
FAR = 4.0
#: A cause costs measurably when its excess error energy reaches this fraction of the floor's
#: energy: alone it lifts the RMSE 12% above the floor (1 dB of SQNR).
MATERIAL = 0.25
#: "Explains most of the excess".
MOST = 0.5
#: Small samples: a stage's measured energy scatters around its floor by about
#: 1.4 / sqrt(n) for n independent errors (outputs; for the input and the weight, their
#: elements when fewer); floors are widened by (1 + SLACK / sqrt(n)) before excess counts.
SLACK = 4.0
#: Activations on 128 levels (reduce_range) have about twice the ideal 8-bit step of the data
#: seen; calibrated on more data than that (a model's calibration set against one batch), up
#: to this factor of it: twice, times the 1.5x that QCD012 and QCD052 let an 8-bit step exceed
#: what the data seen needs (at 2.6, 9.6% of healthy 7-bit layers calibrated on other batches
#: warned against 0.6% of 8-bit ones). Beyond it, codes on 128 levels are an 8-bit step too
#: coarse (a claim that the qparams are reduce_range's, QCD052's on qnnpack, needs it).
SEVEN_BIT_RATIO = 3.0
#: On an engine whose default qconfig takes 7-bit activations (x86, fbgemm), up to this
#: factor: twice, times the 4x wider range heavy-tailed calibration batches reach. At 3.0, a
#: healthy x86 layer whose batches reached 2x the diagnosed one's range read as an 8-bit step
#: 4x too coarse, a QCD012 error where qnnpack's 8-bit one gave a warning (helper-49: 9-11 of
#: 220 healthy layers per engine); on engines whose default keeps 8 bits (onednn, qnnpack),
#: 8.0 read a calibration on 6x the data as 7-bit, half its cost (helper-53: 35 onednn runs).
DEFAULT_SEVEN_BIT_RATIO = 8.0


@functools.cache
def seven_bit_bound(engine: str) -> float:
    """How far above the data's 8-bit step codes on 128 levels read as 7-bit activations on
    ``engine`` (``DEFAULT_SEVEN_BIT_RATIO`` where its default qconfig takes 7 bits)."""
    from ..quantization.paths import default_reduces_range

    return DEFAULT_SEVEN_BIT_RATIO if default_reduces_range(engine) else SEVEN_BIT_RATIO


#: Calibration batches given with a case (``--calib``) are like its input when their range and
#: the input's together span at most this many times the input's own: heavy-tailed data's
#: batches reach that (helper-49: three batches of outlier data, 1.97x one batch's range);
#: calibration on data scaled otherwise (6x) does not. The input's step is then judged
#: against that range (the observer saw it), else against the input's.
CALIBRATION_LIKE = 3.0
#: A model walk captured without calibration batches knows its outputs' range from a few
#: samples, narrower than what the observers saw (by up to 5x measured on healthy models with
#: heavy-tailed activations and 2-8 samples): an output step up to this many times the ideal
#: step of the sampled range counts as the floor, so that only coarser scales are named.
SAMPLE_RANGE = 8.0
#: The float reference is accurate to ~1e-8 of the output's magnitude (docs/stages.md); deltas
#: below this fraction of it are exact.
REFERENCE_NOISE = 1e-7

GROUPS = {
    "input_clipping": "input", "input_rounding": "input",
    "weight_clipping": "weight", "weight_rounding": "weight",
    "output_rounding": "output", "output_clipping": "output",
}
#: Output steps by which the integer kernel may differ from the eager Q/DQ graph at a near tie
#: (one step) and still be at the floor (float noise in the measured step).
TIE_SLACK = 1e-6
#: Kernel families that sum int16 pairs on CPUs without VNNI: 7-bit activations are their
#: deliberate trade-off. qnnpack accumulates exactly, so 7 bits there only cost precision.
PAIRING_KERNELS = ("fbgemm", "onednn")


def ideal_step(t: np.ndarray, levels: int = 255) -> float:
    """Step of minmax affine qparams over ``levels`` steps, the range extended to hold 0."""
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    return (hi - lo) / levels


def output_span(case: ConvCase, y: np.ndarray) -> tuple[float, float]:
    """The output range good output qparams cover: the float output's, 0 included, and in a
    model walk the float model's output range at this conv (``ConvCase.output_range``)."""
    return output_span_of(case, *(Span.of(y)[:2]))


def output_span_of(case: ConvCase, low: float, high: float) -> tuple[float, float]:
    """``output_span`` of an output whose smallest and largest value are ``low`` and
    ``high``; widened to the calibration batches' output range where it is like it (at most
    ``CALIBRATION_LIKE`` times its span, as the input's: ``calibrated_span``)."""
    lo, hi = min(low, 0.0), max(high, 0.0)
    calibrated = case.output_calibration_range
    if calibrated is not None and span_times(lo, hi, calibrated) <= CALIBRATION_LIKE:
        lo, hi = min(lo, calibrated[0]), max(hi, calibrated[1])
    if case.output_range is not None:
        lo, hi = min(lo, case.output_range[0]), max(hi, case.output_range[1])
    return lo, hi


def per_channel_steps(w: np.ndarray) -> np.ndarray:
    """Symmetric per-output-channel qint8 steps ``max|w_o| / 127.5`` (1.0 for a zero channel,
    as torch's observers give)."""
    rows = w.reshape(w.shape[0], -1)
    # max|w| as max(max w, -min w): a max is exact, and no |w|-sized temporary is made
    m = np.maximum(rows.max(axis=1), -rows.min(axis=1)).astype(np.float64)
    return np.where(m > 0, m / 127.5, 1.0)


def _valid_positions(case: ConvCase, d: int, tap: int) -> slice | None:
    """Input positions (along spatial dim d) that tap ``tap`` reads over all outputs, as a
    strided slice; None when it only reads padding."""
    g = case.geometry
    length = case.input.shape[2 + d]
    out = case.output_shape[2 + d]
    s, offset = g.stride[d], tap * g.dilation[d] - g.padding[d]
    first = max(0, -(offset // s))  # smallest p with p * s + offset >= 0
    last = min(out - 1, (length - 1 - offset) // s)  # largest p with p * s + offset < length
    if last < first:
        return None
    return slice(first * s + offset, last * s + offset + 1, s)


def _tap_counts(case: ConvCase) -> np.ndarray:
    """How many output positions each tap reads a real input at (kernel-shaped)."""
    counts = np.ones((), dtype=np.float64)
    for d, k in enumerate(case.kernel_size):
        per = []
        for t in range(k):
            sl = _valid_positions(case, d, t)
            per.append(0 if sl is None else len(range(*sl.indices(case.input.shape[2 + d]))))
        counts = np.multiply.outer(counts, np.asarray(per, dtype=np.float64))
    return counts


def input_noise_gain(case: ConvCase) -> float:
    """Mean over output elements of sum(w^2) over the taps that read real inputs: the output
    variance per unit of input variance."""
    w2 = np.square(case.weight, dtype=np.float64)
    per_tap = w2.sum(axis=1)  # (O, *kernel)
    positions = math.prod(case.output_shape[2:])
    return float((per_tap * _tap_counts(case)).sum() / (w2.shape[0] * max(positions, 1)))


def _squares_over_batch(x: np.ndarray) -> np.ndarray:
    """sum over the batch of x^2 in float64, sample by sample in order at each position
    (sum(axis=0)'s numbers), a cache-sized block of positions at a time: the input is read
    once, and no batch-sized float64 temporary is made."""
    flat = x.reshape(x.shape[0], math.prod(x.shape[1:]))
    out = np.zeros(flat.shape[1], dtype=np.float64)
    square = np.empty(min(CHUNK, flat.shape[1]), dtype=np.float64)
    for start in range(0, flat.shape[1], CHUNK):
        acc = out[start:start + CHUNK]
        sq = square[:acc.size]
        for sample in flat:
            np.square(sample[start:start + CHUNK], out=sq, dtype=np.float64)
            acc += sq
    return out.reshape(x.shape[1:])


def weight_noise_gains(case: ConvCase) -> np.ndarray:
    """Per output channel, the mean over its outputs of sum(x^2) over the window: the output
    variance per unit of weight variance. Window sums are linear, so x^2 is summed over the
    batch and the group's channels first."""
    g = case.geometry
    n = case.input.shape[0]
    x2 = _squares_over_batch(case.input)
    cin_g = case.weight.shape[1]
    a = x2.reshape(g.groups, cin_g, *x2.shape[1:]).sum(axis=1)  # (G, *spatial)
    for d in range(case.spatial_dims - 1, -1, -1):  # window sums, last spatial dim first
        axis = 1 + d
        parts = []
        for t in range(case.kernel_size[d]):
            sl = _valid_positions(case, d, t)
            if sl is None:
                parts.append(np.zeros(a.shape[:axis] + a.shape[axis + 1:]))
            else:
                parts.append(np.take(a, range(*sl.indices(a.shape[axis])), axis=axis)
                             .sum(axis=axis))
        a = np.stack(parts, axis=-1)
    per_group = a.reshape(g.groups, -1).sum(axis=1)
    positions = math.prod(case.output_shape[2:])
    out_g = case.weight.shape[0] // g.groups
    return np.repeat(per_group / (n * max(positions, 1)), out_g)


def weight_noise(case: ConvCase, steps: np.ndarray, gains: np.ndarray | None = None) -> float:
    """Expected output error energy (mean square) of rounding the weight with per-channel
    ``steps`` (exact zeros excluded)."""
    w = case.weight.reshape(case.weight.shape[0], -1)
    nonzero = np.count_nonzero(w, axis=1) / max(w.shape[1], 1)
    gains = weight_noise_gains(case) if gains is None else gains
    return float(np.mean(np.asarray(steps, dtype=np.float64) ** 2 / 12 * gains * nonzero))


def uses_seven_bits(codes: np.ndarray, step_ratio: float, low: float = 1.3,
                    high: float = SEVEN_BIT_RATIO) -> bool:
    """Activations quantized to 128 levels, as ``reduce_range`` gives: the step is about twice
    the 8-bit step (at least ``low`` times it) and the codes span at most 128 levels, but for
    0.5% of values (a histogram observer's trimmed outliers, or extremes that round up by one
    code) or a few codes (data up to 10% beyond the range the observer saw)."""
    if codes.size == 0 or not low <= step_ratio <= high:
        return False
    if _on_128_levels(codes):
        return True
    # or a few beyond the 8-bit codes (unclamped: a model's inputs beyond its calibration
    # batches), the rest on 128 levels; codes within 0..255 spread wider are 8-bit ones
    inside = codes[(codes >= 0) & (codes <= 255)]
    if inside.size == 0 or codes.size - inside.size > 0.01 * codes.size:
        return False
    return _on_128_levels(inside)


def beyond_seven_bits(codes: np.ndarray, qp: QParams, step_ratio: float, low: float = 1.3,
                      saturated: bool | None = None) -> bool:
    """7-bit qparams on data wider than the range their observer saw: the step is about twice
    the 8-bit step of a range (at least ``low`` times this data's 8-bit step, at most
    SEVEN_BIT_RATIO), and the codes (before clamping) reach beyond the dtype's. Those codes
    spread over more than 128 levels and cannot show the 7 bits (``uses_seven_bits``), but
    8-bit qparams this coarse would cover the data: they saturate nothing (a healthy x86 layer
    run on data wider than its calibration batches was judged against the 8-bit floor, with a
    QCD052 warning for the default qconfig's step). Not for qparams a user wrote (misplaced
    8-bit ones saturate too)."""
    if codes.size == 0 or not low <= step_ratio <= SEVEN_BIT_RATIO or qp.source == "user":
        return False  # qparams a user wrote: no observer reduced them
    if saturated is not None:  # clamped codes: told from the float output
        return saturated
    return int(codes.max()) > qp.dtype_max or int(codes.min()) < qp.dtype_min


def _on_128_levels(codes: np.ndarray) -> bool:
    """The codes span at most 128 levels, but for 0.5% of them or a few codes (data up to 10%
    beyond the range the observer saw reaches a few codes past 128 levels)."""
    lo, hi = int(codes.min()), int(codes.max())
    return hi <= lo + 140 or int(np.count_nonzero(codes > lo + 128)) <= 0.005 * codes.size


def input_error(x: np.ndarray, spec: PathSpec) -> float:
    """Mean square of dequant(input codes) - x, on the input itself (float units^2)."""
    from ..quantization.qparams import dequantize

    if spec.input_qparams.per_channel or x.size == 0:
        return float("inf")
    d = dequantize(spec.input_codes, spec.input_qparams).reshape(-1)
    d -= x.reshape(-1)
    return float(np.dot(d, d) / d.size)


def _step(qp: QParams) -> float:
    return float(np.max(qp.scales()))


def stage_energy(s: StageResult) -> float:
    return 0.0 if not s.applies or s.delta is None else s.delta.rmse ** 2


def isolated_energy(s: StageResult, noise: float) -> float:
    """Mean square of the stage's effect alone on the float path (0 within the reference's
    noise); its delta where the effect has no isolated view (accumulation, module state,
    torch's residual: the ladder reports their delta as their isolated effect)."""
    m = s.isolated if s.isolated is not None else s.delta
    if s.id == "module_state" and m is not None and s.delta is not None \
            and s.delta.rmse > m.rmse:
        m = s.delta  # its own output qparams: they show in the chain only (ladder_plan)
    if not s.applies or m is None or m.max_abs <= noise:
        return 0.0
    return m.rmse ** 2


@dataclass(frozen=True)
class Floors:
    """What each rounding stage would add at the floor (mean squares, float units^2)."""

    stages: dict[str, float]
    """input_rounding, weight_rounding, bias_quantization, output_rounding."""
    input_8bit: float
    output_8bit: float
    input_itself: float
    """The input's own rounding floor, on the input itself (not through the conv), at the
    input's bits."""
    input_bits: int
    output_bits: int
    input_step_ratio: float
    """The input's scale over the ideal 8-bit step."""
    output_step_ratio: float

    @property
    def energy(self) -> float:
        return sum(self.stages.values())

    @property
    def energy_8bit(self) -> float:
        s = self.stages
        return self.input_8bit + s["weight_rounding"] + self.output_8bit + s["bias_quantization"]


def floors(case: ConvCase, spec: PathSpec, kernel: Kernel, y0: np.ndarray,
           emulation: Emulation | None, out_codes: np.ndarray | None = None,
           input_floor: bool = True, spans: tuple[Span, Span] | None = None,
           saturated: bool | None = None) -> Floors:
    """The floor of every rounding stage; 7-bit activations where the engine pairs int16. With
    a fused ReLU the output is relu(y0): noise passes, and rounding happens, only where it is
    active (its zeros are exact). The output's codes (is it on 128 levels?) come from the
    emulation, or are given (``out_codes``: a model's own output codes, clamped: then
    ``saturated`` says whether any output saturated, told from the float output). Without
    ``input_floor`` the input's floor is 0 (a model walk's conv: its input is the one it
    received, not rounded again). ``spans``: the input's and ``y0``'s, when known already."""
    x = case.input
    relu = case.activation == "relu"
    x_span, y_span = spans if spans is not None else (Span.of(x), Span.of(y0))
    x_span = calibrated_span(case, x_span)
    active = y_span.positive / max(y0.size, 1) if relu else 1.0
    lo, hi = (max(y_span.low, 0.0), max(y_span.high, 0.0)) if relu else y_span[:2]
    lo, hi = output_span_of(case, lo, hi)
    dx8, dy8 = x_span.ideal_step(), (hi - lo) / 255
    in_ratio = _step(spec.input_qparams) / dx8 if dx8 > 0 else 1.0
    out_qp = spec.output_qparams
    out_ratio = _step(out_qp) / dy8 if dy8 > 0 else 1.0
    pairing = kernel.kernel in PAIRING_KERNELS
    observed_7 = any("reduce_range" in n for n in spec.input_qparams.notes)
    bound = seven_bit_bound(kernel.engine)
    in_bits = 7 if pairing and (observed_7 or uses_seven_bits(spec.input_codes, in_ratio,
                                                              high=bound)) else 8
    if out_codes is None:
        out_codes = np.empty(0) if emulation is None else (
            emulation.output_codes if relu else emulation.unclamped)  # relu: what it lets through
    # in a model walk the output's ideal step comes from the calibration range, whose
    # outliers a histogram observer trims: its 7-bit step may be under 1.3x that ideal step
    low = 1.0 if case.output_range is not None else 1.3
    out_7 = (any("reduce_range" in n for n in out_qp.notes)
             or uses_seven_bits(out_codes, out_ratio, low, bound)
             or beyond_seven_bits(out_codes, out_qp, out_ratio, low, saturated))
    out_bits = 7 if pairing and out_7 else 8
    on_input = dx8 ** 2 / 12 * (np.count_nonzero(x) / max(x.size, 1)) if input_floor else 0.0
    f_in8 = on_input * input_noise_gain(case) * active if input_floor else 0.0
    f_out8 = dy8 ** 2 / 12 * active  # a ReLU's zeros are exact
    f_bias = 0.0
    if kernel.kernel == "qnnpack" and case.bias is not None:  # bias rounded to int32
        f_bias = (_step(spec.input_qparams) * _step(spec.weight_qparams)) ** 2 / 12
    f_out = f_out8 * (4 if out_bits == 7 else 1)
    if case.output_range_sampled:  # a sampled range: its ideal step may be too fine
        f_out = max(f_out, min(_step(out_qp), SAMPLE_RANGE * dy8) ** 2 / 12 * active)
    stages = {"input_rounding": f_in8 * (4 if in_bits == 7 else 1),
              "weight_rounding": weight_noise(case, per_channel_steps(case.weight)) * active,
              "bias_quantization": f_bias,
              "output_rounding": f_out}
    return Floors(stages, f_in8, f_out8, on_input * (4 if in_bits == 7 else 1), in_bits,
                  out_bits, in_ratio, out_ratio)


def calibrated_span(case: ConvCase, x_span: Span) -> Span:
    """The input's span (``x_span``), widened to the range of the calibration batches given
    with it (``case.input_calibration_range``) where they are like it (``CALIBRATION_LIKE``)."""
    times = calibration_times(case, x_span)
    if times is None or times > CALIBRATION_LIKE:
        return x_span
    assert case.input_calibration_range is not None
    lo, hi = case.input_calibration_range
    return Span(min(x_span.low, lo), max(x_span.high, hi), x_span.positive)


def calibration_times(case: ConvCase, x_span: Span | None = None) -> float | None:
    """How many times the input's own range (0 included) the calibration batches given with
    it and the input span together (1.0 where they add nothing; inf for an input of one
    value); None without them."""
    if case.input_calibration_range is None:
        return None
    span = x_span if x_span is not None else Span.of(case.input)
    return span_times(span.low, span.high, case.input_calibration_range)


def span_times(low: float, high: float, calibrated: tuple[float, float]) -> float:
    """How many times the span of ``low..high`` (0 included) it and ``calibrated`` span
    together (inf for a span of 0): calibration batches are like the data at most
    ``CALIBRATION_LIKE`` times."""
    own = max(high, 0.0) - min(low, 0.0)
    together = max(calibrated[1], high, 0.0) - min(calibrated[0], low, 0.0)
    return together / own if own > 0 else math.inf


def compute_budget(case: ConvCase, spec: PathSpec, kernel: Kernel, stages: tuple[StageResult, ...],
                   total_rmse: float, y0: np.ndarray, emulation: Emulation | None) -> Budget:
    """The path's budget: per stage measured vs floor, excess, and the verdict."""
    n_out = max(int(y0.size), 1)
    y = np.maximum(y0, 0.0) if case.activation == "relu" else y0
    y_abs = float(np.abs(y).max()) if y.size else 0.0
    f = floors(case, spec, kernel, y0, emulation, input_floor=not on_input_grid(case, spec))
    # Each effect is judged by what it costs on its own, applied to the float path (the
    # ladder's isolated view): order-free, so an earlier stage's damage neither hides nor
    # inflates a later one's (a clip that pulls an overshoot back costs what the clip alone
    # costs).
    alone = {st.id: isolated_energy(st, REFERENCE_NOISE * y_abs) for st in stages}
    judged = f
    compiled = next((st for st in stages if st.id == "integer_kernel" and st.applies), None)
    if compiled is not None and (compiled.delta is None
                                 or (compiled.delta.max_abs_lsb or 0.0) <= 1 + TIE_SLACK):
        # the integer kernel and the eager Q/DQ graph round differently near .5 ties (one
        # step, either way): the fp32 reference's rounding, at the floor (not added to the
        # path's floor energy, which it does not raise); more than a step is a fault
        judged = dataclasses.replace(f, stages={**f.stages, compiled.id: alone[compiled.id]})
    excess = _excess(case, spec, judged, alone, n_out, (REFERENCE_NOISE * y_abs) ** 2)
    candidates: dict[str, float] = {}
    weight_excess = excess["weight_clipping"] + excess["weight_rounding"]
    if not spec.weight_qparams.per_channel and weight_excess >= MATERIAL * f.energy / 2:
        candidates = weight_candidates(case, spec)
    floor_rmse = math.sqrt(f.energy)
    ratio = total_rmse / floor_rmse if floor_rmse > 0 else (0.0 if total_rmse == 0 else math.inf)
    at_floor = AT_FLOOR + SLACK / math.sqrt(n_out) / 2
    verdict = ("at_floor" if ratio <= at_floor else "broken" if ratio >= FAR else "above_floor")
    exact = {st.id: st.applies and st.delta is not None
             and st.delta.max_abs <= REFERENCE_NOISE * y_abs for st in stages}
    # effects that show only in the chain, not alone (a scale applied to the wrong channel):
    # when the stages' excess misses most of the path's, the path's whole excess counts,
    # credited to no stage (effects that compound, like the forum's, stay the stages')
    whole = max(0.0, total_rmse ** 2 - f.energy * (1 + SLACK / math.sqrt(n_out)))
    stage_sum = sum(excess.values())
    return Budget(
        stages=tuple(StageBudget(
            id=st.id, measured=0.0 if exact[st.id] else math.sqrt(stage_energy(st)),
            alone=math.sqrt(alone[st.id]), floor=math.sqrt(judged.stages.get(st.id, 0.0)),
            excess=excess[st.id], exact=exact[st.id]) for st in stages),
        rmse=total_rmse, floor_rmse=floor_rmse, floor_rmse_8bit=math.sqrt(f.energy_8bit),
        ratio=ratio, excess=stage_sum if stage_sum >= whole / 2 else whole,
        floor_energy=f.energy,
        verdict=verdict, input_bits=f.input_bits, output_bits=f.output_bits,
        input_step_ratio=f.input_step_ratio, output_step_ratio=f.output_step_ratio,
        weight_step_ratio=float(np.max(_weight_step_ratios(spec.weight_qparams, case.weight))),
        outputs=n_out, weight_candidates=candidates,
    )


def on_input_grid(case: ConvCase, spec: PathSpec) -> bool:
    """The case's input is exactly the path's input codes dequantized: already 8-bit values on
    this path's grid (a model walk's conv: the quantized input it received), so quantizing it
    again rounds nothing, and the path's floor has no input rounding in it (the screen's floor,
    ``screen.screen_layer``, is the same)."""
    x = case.input
    codes = spec.input_codes
    if codes is None or codes.shape != x.shape:
        return False
    # a path that rounds the input again differs at once: its first codes settle it cheaply
    if not spec.input_qparams.per_channel:
        head = slice(0, min(x.size, 4096))
        flat = dequantize32(codes.reshape(-1)[head], spec.input_qparams)
        if not np.array_equal(flat, x.reshape(-1)[head]):
            return False
    return bool(np.array_equal(dequantize32(codes, spec.input_qparams), x))


def _excess(case: ConvCase, spec: PathSpec, f: Floors, alone: dict[str, float], n_out: int,
            noise: float) -> dict[str, float]:
    """Per stage, the error energy above its floor (groups judged together, then split over
    their stages by how far each exceeds its own floor)."""
    x, w = case.input, case.weight
    slack = 1 + SLACK / math.sqrt(n_out)
    # the measured energy of a group scatters with the fewest independent errors behind it:
    # the outputs, or the input's or the weight's elements when there are fewer of those
    group_slack = {"input": 1 + SLACK / math.sqrt(max(1, min(n_out, x.size))),
                   "weight": 1 + SLACK / math.sqrt(max(1, min(n_out, w.size))),
                   "output": slack}

    def over(sid: str) -> float:
        factor = group_slack.get(GROUPS.get(sid, ""), slack)
        return max(0.0, alone[sid] - (f.stages.get(sid, 0.0) + noise) * factor)

    # An observer may clip the input's outliers on purpose for a finer step; judged on the
    # input itself, clipping and rounding together are then no worse than minmax's rounding
    # (a sound trade-off, not a misuse), whatever the conv makes of the few clipped values.
    input_sound = input_error(x, spec) <= f.input_itself * (1 + SLACK / math.sqrt(max(x.size, 1)))
    excess: dict[str, float] = {}
    for group in ("input", "weight", "output"):
        ids = [sid for sid, grp in GROUPS.items() if grp == group]
        group_floor = sum(f.stages.get(sid, 0.0) + noise for sid in ids) * group_slack[group]
        group_excess = max(0.0, sum(alone[sid] for sid in ids) - group_floor)
        if group == "input" and input_sound:
            group_excess = 0.0
        parts = {sid: over(sid) for sid in ids}
        if not sum(parts.values()):
            parts = {sid: alone[sid] for sid in ids}
        total = sum(parts.values())
        for sid in ids:
            excess[sid] = group_excess * parts[sid] / total if total > 0 else 0.0
    for sid in alone:
        if sid not in excess:
            excess[sid] = over(sid)
    return excess


def _weight_step_ratios(qp: QParams, w: np.ndarray) -> np.ndarray:
    """The weight's steps over the ideal per-channel steps, per output channel."""
    ideal = per_channel_steps(w)
    steps = qp.scales()
    if qp.per_channel and (qp.axis or 0) % w.ndim == 0 and steps.size == ideal.size:
        return steps / ideal
    return np.full(ideal.size, float(steps.max())) / ideal


def weight_candidates(case: ConvCase, spec: PathSpec) -> dict[str, float]:
    """Output RMSE of the weight's quantization error alone (applied to the float input) for the
    two ways to fix a per-tensor weight: a good per-tensor scale (symmetric, max|w| / 127.5) and
    per-channel symmetric weights. Each is one float32 conv of the weight difference."""
    from ..arithmetic.float_conv import conv_diff
    from ..quantization.qparams import dequantize, quantize

    w = case.weight
    out: dict[str, float] = {}
    m = float(np.abs(w).max())
    per_tensor = QParams((m / 127.5 if m > 0 else 1.0,), (0,), "qint8", None, "candidate")
    steps = per_channel_steps(w)
    per_channel = QParams(tuple(float(s) for s in steps), (0,) * w.shape[0], "qint8", 0,
                          "candidate")
    for name, qp in (("per_tensor_symmetric", per_tensor), ("per_channel_symmetric", per_channel)):
        diff = conv_diff(case.input, dequantize(quantize(w, qp), qp) - w.astype(np.float64),
                         case.geometry).reshape(-1)
        out[name] = float(np.sqrt(np.dot(diff.astype(np.float64), diff) / max(diff.size, 1)))
    return out
