"""The stage ladder: one effect at a time, in data-flow order, from the float output to what
torch really returned. Each stage's ``delta`` is the difference of two consecutive states, so
the deltas add up (telescope) exactly to the total error.

The plan (each stage's state, as a list of rungs) is ``ladder_plan.py``'s; here it is walked
block by block and every stage measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arithmetic.float_conv import ChannelSparse, conv64
from ..case import ConvCase
from ..report import Metrics, OutputSummary, StageResult
from .blocks import Block, as_rows, blocks, reader
from .ladder_plan import (
    DELTA,
    SAME,
    Elementwise,
    LadderInputs,
    PerChannel,
    Plan,
    plan_ladder,
    stage_ids,
)
from .metrics import (
    ErrorAccumulator,
    SummaryAccumulator,
    dot,
    merged,
    over_groups,
    shares_from_energies,
)
from .reference import qsig


@dataclass(frozen=True, eq=False)
class Ladder:
    stages: tuple[StageResult, ...]
    float_output: np.ndarray
    """float64 reference output."""
    states: dict[str, np.ndarray]
    """Cumulative output after each applicable stage (float64); empty unless kept."""
    deltas: dict[str, np.ndarray]
    """Each stage's delta (float64); empty unless kept."""
    final: np.ndarray | None
    """The quantized output the ladder ends at (torch's when it ran, else the emulation);
    kept only with the states (``keep``)."""
    final_summary: OutputSummary
    """min / max / mean / abs_max and the first values of ``final``."""
    total: Metrics
    output_scale: float
    weight_error_rmse: float | None = None
    """RMSE of conv(x, dequant(w_codes) - w): the weight's whole quantization error alone."""


ENGINE_FREE_STAGES = ("input_clipping", "input_rounding", "weight_clipping")
"""Stages whose states depend on the codes and qparams only, not on the engine (weight
rounding already uses the engine's exact accumulator: qnnpack wraps zero points)."""

Triple = tuple[ErrorAccumulator, ErrorAccumulator, ErrorAccumulator]
MetricTriple = tuple[Metrics, Metrics, Metrics | None]


def run_ladder(case: ConvCase, li: LadderInputs, y0: np.ndarray | None = None,
               keep: bool = False) -> Ladder:
    """The ladder for one path; ``y0`` is the float reference when already computed.

    The output is walked in cache-sized blocks (on two threads): in each block every stage's
    state is written and measured (delta, cumulative, isolated) while it is in cache, so no
    full-size state exists but the final one, unless ``keep`` (for --save-outputs and the
    tests) keeps every state and delta.
    """
    if y0 is None:
        y0 = conv64(case.input, case.weight, case.bias, case.geometry)
    plan = plan_ladder(case, li, y0)
    walk = _Walk(plan, li, y0, keep)
    accs, final_summary = walk.run()
    metrics, energies = walk.measure(accs)
    shares = shares_from_energies(energies)
    results = []
    ids = stage_ids(li.eager_unclamped is not None)
    for sid in ids:
        if sid not in metrics:
            results.append(StageResult(sid, False, plan.reasons.get(sid, "does not apply"),
                                       None, None, None, None))
            continue
        d, c, i = metrics[sid]
        results.append(StageResult(sid, True, None, d, c, i, shares[sid]))
    total = metrics[[s for s in ids if s in metrics][-1]][1]
    shape = y0.shape
    states = {sid: st.reshape(shape) for sid, (st, _) in walk.kept.items()}
    deltas = {sid: dl.reshape(shape) for sid, (_, dl) in walk.kept.items()}
    return Ladder(tuple(results), y0, states, deltas, walk.final, final_summary.result(), total,
                  walk.final_step, plan.weight_error_rmse)


class _Walk:
    """The plan's states and metrics, walked block by block."""

    def __init__(self, plan: Plan, li: LadderInputs, y0: np.ndarray, keep: bool) -> None:
        from ..memo import by_content, memoized

        self.plan, self.y0, self.keep = plan, y0, keep
        self.relu = li.relu
        self.out_step = float(li.output_qparams.scale[0])
        self.final_step = float((li.module_output_qparams if li.module_emulation is not None
                                 and li.module_output_qparams is not None
                                 else li.output_qparams).scale[0])
        self.y0r = as_rows(y0)
        # The stages before weight rounding do not depend on the engine: with several engines
        # their metrics are measured once per grid and output step (memo; nothing to share
        # otherwise).
        self.shared: dict[str, tuple[MetricTriple, float]] = {}
        if by_content() and not keep and not self.relu:
            self.shared = memoized("ladder_prefix", (li.input_codes, li.weight_codes, y0),
                                   (qsig(li.input_qparams), qsig(li.weight_qparams),
                                    self.out_step), dict)
        self.prefix_known = all(sid in self.shared for sid in ENGINE_FREE_STAGES)
        rungs = plan.rungs
        # A stage that changes nothing (SAME) after a measured one, at the same output step,
        # has a zero delta and the previous cumulative error: no pass over its state.
        self.unchanged = {r.id for pos, r in enumerate(rungs)
                          if r.fill is SAME and pos > 0 and self.lsb(r.id) == self.out_step}
        self.skip = set(ENGINE_FREE_STAGES) if self.prefix_known else set()
        # up to the first stage that changes anything the previous state is the reference
        # itself, so that stage's cumulative error is its delta: measured once
        self.first_change = next((r.id for r in rungs if r.fill is not SAME), None)
        self.kept: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.final: np.ndarray | None = None
        if keep:
            self.kept = {r.id: (np.empty(self.y0r.shape), np.empty(self.y0r.shape))
                         for r in rungs}
            self.final = np.empty(y0.shape, dtype=np.float64)
        self.isos = {r.id: (reader(r.isolated) if isinstance(r.isolated, (np.ndarray,
                                                                          ChannelSparse))
                            else None) for r in rungs}

    def lsb(self, sid: str) -> float:
        return self.final_step if sid in ("module_state", "backend_residual") else self.out_step

    def run(self) -> tuple[list[dict[str, Triple]], SummaryAccumulator]:
        results = over_groups(blocks(self.y0.shape), self._blocks)
        final_summary = results[0][1]
        for _, other in results[1:]:
            final_summary.merge(other)
        return [accs for accs, _ in results], final_summary

    def _blocks(self, group: list[Block]) -> tuple[dict[str, Triple], SummaryAccumulator]:
        """One thread's blocks: every stage's state written and measured per block."""
        accs = {r.id: (ErrorAccumulator(), ErrorAccumulator(), ErrorAccumulator())
                for r in self.plan.rungs}
        final_acc = SummaryAccumulator()
        size = max((k.of(self.y0r).size for k in group), default=0)
        bufs = [np.empty(size), np.empty(size)]
        scratch = (np.empty(size), np.empty(size))
        post = [np.empty(size), np.empty(size), np.empty(size)] if self.relu else []
        for k in group:
            prev2 = (self._block_relu(k, accs, bufs, post, scratch) if self.relu
                     else self._block(k, accs, bufs, scratch))
            final_acc.add(prev2.reshape(-1))
            if self.final is not None:
                np.copyto(k.of(self.final.reshape(self.y0r.shape)), prev2)
        return accs, final_acc

    def _block(self, k: Block, accs: dict[str, Triple], bufs: list[np.ndarray],
               scratch: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        ref2 = k.of(self.y0r)
        shape2, n = ref2.shape, ref2.size
        r = ref2.reshape(-1)
        d_buf, c_buf = scratch
        prev2, turn = ref2, 0
        for rung in self.plan.rungs:
            sid, fill, iso = rung.id, rung.fill, rung.isolated
            d_acc, c_acc, i_acc = accs[sid]
            if fill is SAME:
                cur2 = prev2
            else:
                cur2 = bufs[turn][:n].reshape(shape2)
                turn ^= 1
                fill(cur2, prev2, k)
            if self.keep:
                np.copyto(k.of(self.kept[sid][0]), cur2)
                np.subtract(cur2, prev2, out=k.of(self.kept[sid][1]))
            lazy = iso.error if isinstance(iso, Elementwise) else None
            if sid in self.unchanged:
                if lazy is not None:
                    i_acc.add(lazy(r), r)
            elif sid not in self.skip:
                cur = cur2.reshape(-1)
                if fill is SAME:
                    d_acc.n += n  # a zero delta
                else:
                    d_acc.add(np.subtract(cur, prev2.reshape(-1), out=d_buf[:n]), r)
                if sid != self.first_change:
                    c_acc.add(np.subtract(cur, r, out=c_buf[:n]), r)
                iso_at = self.isos[sid]
                if iso_at is not None:
                    i_acc.add(iso_at(k).reshape(-1), r)
                elif lazy is not None:
                    i_acc.add(lazy(r), r)
            prev2 = cur2
        return prev2

    def _block_relu(self, k: Block, accs: dict[str, Triple], bufs: list[np.ndarray],
                    post: list[np.ndarray], scratch: tuple[np.ndarray, np.ndarray]
                    ) -> np.ndarray:
        """``_block`` with a fused ReLU: the states chain before the activation and are
        measured after it, against relu(float output); an effect alone is
        relu(float + effect) - relu(float)."""
        ref2 = k.of(self.y0r)
        shape2, n = ref2.shape, ref2.size
        r_post = np.maximum(ref2, 0.0, out=post[2][:n].reshape(shape2))
        r = r_post.reshape(-1)
        d_buf, c_buf = scratch
        prev2, prev_post, turn = ref2, r_post, 0
        for rung in self.plan.rungs:
            sid, fill, iso = rung.id, rung.fill, rung.isolated
            d_acc, c_acc, i_acc = accs[sid]
            if fill is SAME:
                cur2, cur_post = prev2, prev_post
            else:
                cur2 = bufs[turn][:n].reshape(shape2)
                fill(cur2, prev2, k)
                cur_post = np.maximum(cur2, 0.0, out=post[turn][:n].reshape(shape2))
                turn ^= 1
            if self.keep:
                np.copyto(k.of(self.kept[sid][0]), cur_post)
                np.subtract(cur_post, prev_post, out=k.of(self.kept[sid][1]))
            cur = cur_post.reshape(-1)
            d_acc.add(np.subtract(cur, prev_post.reshape(-1), out=d_buf[:n]), r)
            c_acc.add(np.subtract(cur, r, out=c_buf[:n]), r)
            alone = self._alone_relu(sid, iso, k, ref2, r_post)
            if alone is not None:
                i_acc.add(alone.reshape(-1), r)
            prev2, prev_post = cur2, cur_post
        return prev_post

    def _alone_relu(self, sid: str, iso: object, k: Block, ref2: np.ndarray,
                    r_post: np.ndarray) -> np.ndarray | None:
        iso_at = self.isos[sid]
        if isinstance(iso, Elementwise):
            return iso.error(r_post.reshape(-1))
        if isinstance(iso, PerChannel):
            effect = ref2 + k.per_channel(iso.values)
        elif iso_at is not None:
            effect = ref2 + iso_at(k)
        else:
            return None  # DELTA: the delta is the effect
        np.maximum(effect, 0.0, out=effect)
        effect -= r_post
        return effect

    def measure(self, groups: list[dict[str, Triple]]
                ) -> tuple[dict[str, MetricTriple], dict[str, float]]:
        """Every stage's (delta, cumulative, isolated) metrics and delta energy."""
        y0 = np.maximum(self.y0, 0.0) if self.relu else self.y0
        rr = dot(y0.reshape(-1), y0.reshape(-1))
        channel_sums: np.ndarray | None = None
        energies: dict[str, float] = {}
        metrics: dict[str, MetricTriple] = {}
        cumulative_prev: Metrics | None = None
        for rung in self.plan.rungs:
            sid, iso = rung.id, rung.isolated
            lsb = self.lsb(sid)
            d_acc, c_acc, i_acc = (merged([grp[sid][j] for grp in groups]) for j in range(3))
            if self.relu:  # every stage measured in the block walk
                energies[sid] = d_acc.energy
                delta = d_acc.metrics(rr, lsb)
                metrics[sid] = (delta, c_acc.metrics(rr, lsb),
                                delta if iso is DELTA else i_acc.metrics(rr, lsb))
            elif sid in self.skip:
                metrics[sid], energies[sid] = self.shared[sid]
            elif sid in self.unchanged:
                assert cumulative_prev is not None
                zero = ErrorAccumulator().metrics(rr, lsb)
                alone = i_acc.metrics(rr, lsb) if isinstance(iso, Elementwise) else zero
                metrics[sid], energies[sid] = (zero, cumulative_prev, alone), 0.0
            else:
                if isinstance(iso, PerChannel):
                    if channel_sums is None:
                        channel_sums = y0.sum(axis=tuple(i for i in range(y0.ndim) if i != 1))
                    i_acc.add_per_channel(iso.values, channel_sums, y0.size // y0.shape[1])
                energies[sid] = d_acc.energy
                delta = d_acc.metrics(rr, lsb)
                metrics[sid] = (delta, delta if sid == self.first_change else
                                c_acc.metrics(rr, lsb),
                                delta if iso is DELTA else i_acc.metrics(rr, lsb))
                if sid in ENGINE_FREE_STAGES and not self.prefix_known:
                    self.shared[sid] = (metrics[sid], energies[sid])
            cumulative_prev = metrics[sid][1]
        return metrics, energies
