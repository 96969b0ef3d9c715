"""Error metrics, in one place. The zero-error case is explicit: SQNR is ``None`` (infinite),
never a division by zero or a NaN.

Worked example (the seed case): float output 803.6908, quantized output 0.0: error -803.69,
max_abs 803.69, rmse 803.69, SQNR = 10*log10(803.69^2 / 803.69^2) = 0 dB, cosine 0 (the
quantized output is all zero), max_abs_lsb 803.69 (output scale 1.0), affected 1.0.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeVar

import numpy as np

from ..parallel import CHUNK, SPLIT, chunks, over_chunks, over_groups  # noqa: F401
from ..report import Metrics, OutputSummary

T = TypeVar("T")


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """sum(a * b) of two vectors, in float64. Two float64 vectors go through BLAS (3x faster than
    einsum); the diagnosis runs it on one thread (``runtime.single_threaded_blas``), since
    OpenBLAS's spinning workers steal the cores from torch's next conv."""
    if a.dtype == np.float64 and b.dtype == np.float64:
        return float(np.dot(a, b))
    return float(np.einsum("i,i->", a, b, dtype=np.float64))


def _finite(x: float) -> float:
    return float(x) if math.isfinite(x) else float(np.sign(x) * 1e308)


ZERO_LSB = 0.0


def error_metrics(
    error: np.ndarray, reference: np.ndarray, lsb: float | None, ref_energy: float | None = None
) -> Metrics:
    """Metrics of ``error`` (approximation - reference), against ``reference``.

    ``ref_energy`` (sum of reference^2) may be passed when many errors share one reference.
    """
    e = np.ascontiguousarray(error, dtype=np.float64).reshape(-1)
    r = np.ascontiguousarray(reference, dtype=np.float64).reshape(-1)
    rr = dot(r, r) if ref_energy is None else ref_energy
    return accumulate(lambda sl: e[sl], r).metrics(rr, lsb)


#: Elements per chunk of the model walk's screen (``difference``, ``fused_pass``): twice CHUNK.
#: Its passes make few numpy calls per element, so a chunk's fixed cost (its calls, the
#: threads' turns at the GIL) weighs more: measured on a ResNet-18 shape's 20 convs, 37M
#: elements, the screen's two passes took 65 ms at this size, 88 ms at CHUNK and 72 ms at
#: twice this.
SCREEN_CHUNK = 2 * CHUNK


class Difference(NamedTuple):
    """The three numbers a model walk's screen gives per comparison."""

    sqnr_db: float | None
    rmse: float
    max_abs: float


def difference(approximation: np.ndarray, reference: np.ndarray) -> Difference:
    """SQNR, RMSE and max |error| of ``approximation - reference`` (two float32 arrays of one
    shape, the difference taken in float32 as torch takes it; sums in float64): the numbers
    ``error_metrics`` gives, in one lean pass chunk by chunk (measured 2.7x faster on 20M
    elements), for the model walk's screen."""
    a = np.ascontiguousarray(approximation, dtype=np.float32).reshape(-1)
    r = np.ascontiguousarray(reference, dtype=np.float32).reshape(-1)

    def work(parts: list[slice]) -> DifferenceSums:
        sums = DifferenceSums()
        for sl in parts:
            sums.add(a[sl], r[sl])
        return sums

    return DifferenceSums.merged(over_chunks(r.size, work, SCREEN_CHUNK)).difference()


class Span(NamedTuple):
    """An array's smallest and largest value and how many of its values are positive."""

    low: float
    high: float
    positive: int

    def ideal_step(self, levels: int = 255) -> float:
        """``budget.ideal_step`` of the array: minmax affine qparams' step, 0 in the range."""
        return (max(self.high, 0.0) - min(self.low, 0.0)) / levels

    @staticmethod
    def of(a: np.ndarray) -> Span:
        if a.size == 0:
            return Span(0.0, 0.0, 0)
        return Span(float(a.min()), float(a.max()), int(np.count_nonzero(a > 0)))

    @staticmethod
    def joined(parts: list[Span]) -> Span:
        """The span of the parts' arrays together (``Span(0, 0, 0)`` for none)."""
        if not parts:
            return Span(0.0, 0.0, 0)
        return Span(min(p.low for p in parts), max(p.high for p in parts),
                    sum(p.positive for p in parts))


def fused_pass(approximation: Callable[[slice], np.ndarray], references: Sequence[np.ndarray],
               spans: Sequence[np.ndarray]) -> tuple[list[Difference], list[Span]]:
    """One pass over arrays of one shape, chunk by chunk: ``difference`` of the approximation
    (float32 values of the flat chunk ``approximation(slice)``) against each reference, and the
    ``Span`` of each array in ``spans``; the same numbers as those functions, each array read
    once (a model walk's screen: its passes go through memory once instead of five times).
    At least one reference."""
    refs = [np.ascontiguousarray(r, dtype=np.float32).reshape(-1) for r in references]
    flat = [np.ascontiguousarray(a).reshape(-1) for a in spans]

    def work(parts: list[slice]) -> tuple[list[DifferenceSums], list[list[Span]]]:
        sums = [DifferenceSums() for _ in refs]
        found: list[list[Span]] = [[] for _ in flat]
        for sl in parts:
            a = approximation(sl)
            for s, r in zip(sums, refs):
                s.add(a, r[sl])
            for f, v in zip(found, flat):
                f.append(Span.of(v[sl]))
        return sums, found

    parts = over_chunks(refs[0].size, work, SCREEN_CHUNK)
    diffs = [DifferenceSums.merged([p[0][i] for p in parts]).difference()
             for i in range(len(refs))]
    return diffs, [Span.joined([s for p in parts for s in p[1][i]]) for i in range(len(flat))]


class DifferenceSums:
    """``difference``'s sums, fed chunk by chunk (float32 chunks, on one thread per
    instance)."""

    __slots__ = ("n", "ee", "rr", "top")

    def __init__(self) -> None:
        self.n = 0
        self.ee = self.rr = self.top = 0.0

    def add(self, a: np.ndarray, r: np.ndarray) -> None:
        k = r.size
        e = np.subtract(a, r, out=_scratch(k, np.float32))
        self.n += k
        # a chunk's sums of squares in float32 (BLAS's dot: its partial sums in several
        # lanes; at most 3.2e-5 relative on a chunk measured, 1.4e-4 dB), the chunks' in
        # float64: 2.5x faster than widening each chunk to float64 first
        self.ee += float(np.dot(e, e))
        self.rr += float(np.dot(r, r))
        self.top = max(self.top, float(e.max()), -float(e.min()))

    @staticmethod
    def merged(parts: list[DifferenceSums]) -> DifferenceSums:
        out = DifferenceSums()
        out.n = sum(p.n for p in parts)
        out.ee, out.rr = sum(p.ee for p in parts), sum(p.rr for p in parts)
        out.top = max(p.top for p in parts)
        return out

    def difference(self) -> Difference:
        if self.ee == 0:
            return Difference(None, 0.0, 0.0)
        return Difference(10.0 * math.log10(self.rr / self.ee) if self.rr > 0 else None,
                          math.sqrt(self.ee / max(self.n, 1)), self.top)


def accumulate(error: Callable[[slice], np.ndarray], reference: np.ndarray
               ) -> ErrorAccumulator:
    """The error's metrics, produced chunk by chunk by ``error(slice)`` (1-d ``reference``;
    ``error`` is called from several threads)."""

    def work(parts: list[slice]) -> ErrorAccumulator:
        acc = ErrorAccumulator()
        for sl in parts:
            acc.add(error(sl), reference[sl])
        return acc

    return merged(over_chunks(reference.size, work))


def merged(accs: list[ErrorAccumulator]) -> ErrorAccumulator:
    """One accumulator holding the chunks of all of ``accs`` (in order)."""
    first = accs[0]
    for other in accs[1:]:
        first.merge(other)
    return first


_LOCAL = threading.local()


def _scratch(n: int, dtype: type = np.float64) -> np.ndarray:
    """A buffer of n elements of ``dtype`` owned by the calling thread (reused across calls:
    one per dtype; a chunked pass asks for one per chunk, so this stays cheap)."""
    bufs: dict[type, np.ndarray] = _LOCAL.__dict__.setdefault("buffers", {})
    buf = bufs.get(dtype)
    if buf is None or buf.size < n:
        buf = bufs[dtype] = np.empty(max(n, CHUNK), dtype=dtype)
    return buf[:n]


class ErrorAccumulator:
    """Metrics of an error tensor, fed chunk by chunk (same numbers as one pass)."""

    __slots__ = ("n", "nonzero", "max_abs", "sum_abs", "ee", "er")

    def __init__(self) -> None:
        self.n = self.nonzero = 0
        self.max_abs = self.sum_abs = self.ee = self.er = 0.0

    def add(self, e: np.ndarray, r: np.ndarray) -> None:
        """One chunk of the error and the matching chunk of the reference (1-d, float64)."""
        self.n += e.size
        a = np.abs(e, out=_scratch(e.size))
        # |e| has no -0.0, so its bit patterns are nonzero exactly where e is (3x faster)
        nz = int(np.count_nonzero(a.view(np.int64)))
        if nz == 0:
            return
        self.nonzero += nz
        m = float(a.max())
        self.max_abs = m if (m > self.max_abs or m != m) else self.max_abs
        self.sum_abs += float(a.sum())
        self.ee += dot(e, e)
        self.er += dot(e, r)

    def add_per_channel(self, values: np.ndarray, channel_sums: np.ndarray, count: int) -> None:
        """An error that is ``values[o]`` at every one of the ``count`` elements of output
        channel o; ``channel_sums[o]`` is the reference's sum over that channel."""
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        self.n += v.size * count
        nz = int(np.count_nonzero(v))
        if nz == 0:
            return
        self.nonzero += nz * count
        a = np.abs(v)
        self.max_abs = max(self.max_abs, float(a.max()))
        self.sum_abs += float(a.sum()) * count
        self.ee += dot(v, v) * count
        self.er += dot(v, channel_sums)

    def merge(self, other: ErrorAccumulator) -> None:
        """Add the chunks ``other`` saw."""
        self.n += other.n
        self.nonzero += other.nonzero
        m = other.max_abs
        self.max_abs = m if (m > self.max_abs or m != m) else self.max_abs
        self.sum_abs += other.sum_abs
        self.ee += other.ee
        self.er += other.er

    @property
    def energy(self) -> float:
        return self.ee

    def metrics(self, rr: float, lsb: float | None) -> Metrics:
        """The metrics, given the reference's energy sum(r^2) and the output step."""
        if self.nonzero == 0:
            return Metrics(0.0, 0.0, 0.0, None, 1.0, None if not lsb else ZERO_LSB, 0.0)
        ee, er, n = self.ee, self.er, self.n
        rmse = math.sqrt(ee / n)
        sqnr = 10.0 * math.log10(rr / ee) if ee > 0 and rr > 0 else None
        # cosine of (reference + error) with the reference, from the dot products above
        aa = max(rr + 2 * er + ee, 0.0)
        if aa == 0 and rr == 0:
            cosine = 1.0
        elif aa == 0 or rr == 0:
            cosine = 0.0
        else:
            cosine = float(np.clip((rr + er) / math.sqrt(aa * rr), -1.0, 1.0))
        max_lsb = None if not lsb else self.max_abs / lsb
        return Metrics(
            _finite(self.max_abs), _finite(self.sum_abs / n), _finite(rmse),
            None if sqnr is None else _finite(sqnr), cosine,
            None if max_lsb is None else _finite(max_lsb), self.nonzero / n,
        )


def chunked_energy(values: Callable[[slice], np.ndarray], n: int) -> float:
    """sum(v^2) of the n values ``values(slice)`` gives chunk by chunk (float64), on threads."""

    def work(parts: list[slice]) -> float:
        total = 0.0
        for sl in parts:
            v = values(sl)
            total += dot(v, v)
        return total

    return float(sum(over_chunks(n, work)))


def shares_from_energies(energies: dict[str, float]) -> dict[str, float | None]:
    """Each stage's share of the error energy the stages add: ||delta||^2 / sum ||delta_j||^2.

    Shares are >= 0 and add up to 1 (None for all when no stage adds any error). The deltas
    themselves add up exactly to the total error; their energies do not have to (a stage can
    undo another's error), which is why a share measures how much error a stage *adds*.
    Seed case: weight clipping 239.3, output clipping 310, module state 255 give shares
    0.26, 0.44 and 0.30.
    """
    total = sum(energies.values())
    if total == 0 or not math.isfinite(total):
        return {k: None for k in energies}
    return {k: e / total for k, e in energies.items()}


class SummaryAccumulator:
    """``summary`` of an array fed block by block (mean summed per block), plus its first
    values."""

    HEAD = 8

    def __init__(self) -> None:
        self.n = 0
        self.lo, self.hi, self.total = math.inf, -math.inf, 0.0
        self.head: list[float] = []

    def add(self, v: np.ndarray) -> None:
        """The next block of the array (1-d, in order)."""
        if not v.size:
            return
        self.n += v.size
        self.lo = min(self.lo, float(v.min()))
        self.hi = max(self.hi, float(v.max()))
        self.total += float(v.sum())
        if len(self.head) < self.HEAD:
            self.head += [float(x) for x in v[:self.HEAD - len(self.head)]]

    def merge(self, other: SummaryAccumulator) -> None:
        """Add the blocks ``other`` saw, which come after this one's."""
        self.n += other.n
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        self.total += other.total
        self.head = (self.head + other.head)[:self.HEAD]

    def result(self) -> OutputSummary:
        if not self.n:
            return OutputSummary(0.0, 0.0, 0.0, 0.0, ())
        return OutputSummary(_finite(self.lo), _finite(self.hi), _finite(self.total / self.n),
                             _finite(max(abs(self.lo), abs(self.hi))), tuple(self.head))


def summary(values: np.ndarray, head: int = 8) -> OutputSummary:
    """min / max / mean / absmax of an output tensor and its first ``head`` values."""
    v = np.asarray(values, dtype=np.float64)
    return OutputSummary(
        _finite(float(v.min())), _finite(float(v.max())), _finite(float(v.mean())),
        _finite(float(np.abs(v).max())), tuple(float(x) for x in v.reshape(-1)[:head]))
