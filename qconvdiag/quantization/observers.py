"""A faster, exact ``HistogramObserver._non_linear_param_search``.

torch's version walks the cumulative histogram with tensor indexing inside a Python loop (up
to 100,000 steps of 1e-5): about 130 ms per observer even for a 9-element tensor, the largest
single cost of ``qconvdiag explain`` on a small case. This version runs the same loop on
Python floats with the same float32 comparisons (a float32 tensor compared with a Python float
compares in float32) and calls torch's own ``_compute_quantization_error`` at the same points,
so it returns the very same min/max. ``tests/quantization/test_observers.py`` checks that on
many inputs; it is used only on the torch releases those tests ran on (``versions.VERIFIED_TORCH``).
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np


def _fast_search(self: Any) -> tuple[Any, Any]:
    if self.histogram.size()[0] != self.bins:
        raise AssertionError("bins mismatch")
    bin_width = (self.max_val - self.min_val) / self.bins
    total = float(self.histogram.sum().item())
    import torch

    # torch's own cumulative sum (float32), read once instead of indexed per step
    values = [float(v) for v in torch.cumsum(self.histogram, dim=0).tolist()]
    f32 = np.float32
    stepsize = 1e-5
    alpha, beta = 0.0, 1.0
    start_bin, end_bin = 0, self.bins - 1
    norm_min = float("inf")
    while alpha < beta:
        next_alpha = alpha + stepsize
        next_beta = beta - stepsize
        lo_bound = float(f32(next_alpha * total))
        hi_bound = float(f32(next_beta * total))
        l, r = start_bin, end_bin
        while l < end_bin and values[l] < lo_bound:
            l += 1
        while r > start_bin and values[r] > hi_bound:
            r -= 1
        next_start_bin, next_end_bin = start_bin, end_bin
        if (l - start_bin) > (end_bin - r):
            next_start_bin = l
            alpha = next_alpha
        else:
            next_end_bin = r
            beta = next_beta
        if next_start_bin == start_bin and next_end_bin == end_bin:
            continue
        norm = self._compute_quantization_error(next_start_bin, next_end_bin)
        if norm > norm_min:
            break
        norm_min = norm
        start_bin, end_bin = next_start_bin, next_end_bin
    new_min = self.min_val + bin_width * start_bin
    new_max = self.min_val + bin_width * (end_bin + 1)
    return new_min, new_max


def accelerate(observer: Any) -> Any:
    """Give a HistogramObserver the fast exact search (other observers are returned as is),
    on the torch releases where the tests proved it equal to torch's (``versions.py``):
    elsewhere torch's private method may have changed, and torch's own search runs."""
    from torch.ao.quantization.observer import HistogramObserver

    from ..versions import torch_verified

    if isinstance(observer, HistogramObserver) and torch_verified() and hasattr(
            observer, "_non_linear_param_search"):
        observer._non_linear_param_search = types.MethodType(  # type: ignore[method-assign]
            _fast_search, observer)
    return observer
