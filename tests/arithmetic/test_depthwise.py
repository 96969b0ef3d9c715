"""fbgemm's specialised depthwise kernel sums int16 pairs of taps even on AVX512-VNNI CPUs;
the probe finds it and the emulator follows, bit for bit, across the shapes that select it."""

from __future__ import annotations

import numpy as np
import pytest

from qconvdiag.arithmetic.emulate import emulate
from qconvdiag.arithmetic.engines import (
    DEPTHWISE,
    DEPTHWISE_FAST,
    layer_class,
    probe,
    select_kernel,
)
from qconvdiag.arithmetic.torch_ref import run_conv
from qconvdiag.case import Geometry
from qconvdiag.quantization.qparams import per_tensor


def test_fast_path_shapes_are_classified():
    g = Geometry((1, 1), (1, 1), (1, 1), 8)
    assert layer_class(8, 1, 1, g, (3, 3)) == DEPTHWISE_FAST
    assert layer_class(12, 1, 1, Geometry((1, 1), (1, 1), (1, 1), 12), (3, 3)) == DEPTHWISE
    assert layer_class(8, 1, 1, Geometry((1, 1), (0, 0), (1, 1), 8), (3, 3)) == DEPTHWISE
    assert layer_class(8, 1, 1, Geometry((1, 1), (1, 1), (2, 2), 8), (3, 3)) == DEPTHWISE
    assert layer_class(8, 1, 3, g, (3, 3)) == DEPTHWISE


@pytest.mark.parametrize("seed", range(6))
def test_depthwise_bit_exact_on_every_engine(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        groups = int(rng.choice([2, 4, 8, 12, 16, 24]))
        og = int(rng.choice([1, 2, 3]))
        k = int(rng.choice([3, 5]))
        pad = int(rng.choice([0, (k - 1) // 2, (k - 1) // 2]))
        stride = int(rng.choice([1, 2]))
        g = Geometry((stride, stride), (pad, pad), (1, 1), groups)
        x = rng.integers(0, 256, (1, groups, 8, 8))
        if rng.random() < 0.5:
            x = np.where(rng.random(x.shape) < 0.7, 255, x)
        w = rng.integers(-128, 128, (groups * og, 1, k, k))
        wzp = int(rng.choice([0, 0, 7]))
        xq = per_tensor(0.05, int(rng.integers(0, 256)), "quint8", "t")
        wq = per_tensor(0.02, wzp, "qint8", "t")
        oq = per_tensor(float(rng.uniform(0.5, 4)), 128, "quint8", "t")
        for engine, prof in probe().items():
            if not prof.available:
                continue
            kernel = select_kernel(engine, wq, groups, 1, og, g, (k, k))
            r = run_conv(engine, x, xq, w, wq, None, oq.scale[0], 128, g)
            if not r.ran:
                continue
            em = emulate(kernel, x, xq, w, wq, None, oq, g)
            assert np.array_equal(em.output_codes, r.output_codes), (
                engine, kernel, groups, og, k, pad, stride, wzp)
