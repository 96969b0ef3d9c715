"""The fast HistogramObserver search returns exactly torch's qparams."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.ao.quantization.observer import HistogramObserver

from qconvdiag.quantization.observers import accelerate


@pytest.mark.parametrize("seed", range(16))
def test_fast_histogram_search_equals_torch(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    kind = seed % 5
    x = [rng.standard_normal(n), np.maximum(rng.standard_normal(n), 0),
         rng.integers(0, 20, n).astype(float), rng.standard_t(2, n) * 10, np.full(n, 3.0)][kind]
    x = torch.from_numpy(x.astype(np.float32))
    reduce_range = bool(seed % 2)
    slow = HistogramObserver(reduce_range=reduce_range)
    fast = accelerate(HistogramObserver(reduce_range=reduce_range))
    for k in range(1 + seed % 3):  # several calibration batches move the histogram range
        slow(x * (k + 1))
        fast(x * (k + 1))
    a, b = slow.calculate_qparams(), fast.calculate_qparams()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_fast_search_replaces_torchs_only_on_verified_releases(monkeypatch):
    from qconvdiag.versions import VERIFIED_TORCH

    major, minor = VERIFIED_TORCH[-1]
    for version, replaced in ((f"{major}.{minor}.0+cpu", True), (f"{major}.{minor}.5", True),
                              (f"{major}.{minor + 1}.0", False), ("2.12.1", False),
                              (f"{major + 1}.0.0.dev20260101", False)):
        monkeypatch.setattr(torch, "__version__", version)
        observer = accelerate(HistogramObserver())
        assert ("_non_linear_param_search" in vars(observer)) == replaced, version
