"""torch_calls: the codes read from a quantized tensor's storage are int_repr()'s."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from qconvdiag.errors import CaseError
from qconvdiag.torch_calls import int_codes


def _quantized(dtype: torch.dtype, per_channel: bool) -> torch.Tensor:
    x = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(0)) * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.13 deprecates the quantized dtypes
        if per_channel:
            return torch.quantize_per_channel(x, torch.rand(5) + 0.01,
                                              torch.zeros(5, dtype=torch.long), 1, dtype)
        zp = 0 if dtype != torch.quint8 else 100
        return torch.quantize_per_tensor(x, 0.003 if dtype == torch.qint32 else 0.05, zp,
                                         dtype)


# torch quantizes qint32 per tensor only
@pytest.mark.parametrize(("dtype", "per_channel"), [
    (torch.quint8, False), (torch.qint8, False), (torch.qint32, False),
    (torch.quint8, True), (torch.qint8, True)])
def test_int_codes_are_int_repr_for_every_layout(dtype: torch.dtype, per_channel: bool) -> None:
    q = _quantized(dtype, per_channel)
    layouts = {"contiguous": q, "sliced": q[1:]}
    if not per_channel:  # torch sets no strides on a per-channel quantized tensor
        layouts["channels_last"] = q.contiguous(memory_format=torch.channels_last)
        layouts["transposed"] = q.transpose(2, 3)
    for name, t in layouts.items():
        got = int_codes(t)
        want = t.int_repr().numpy()
        assert got.flags["C_CONTIGUOUS"], name
        assert got.dtype == want.dtype, name  # the storage's: uint8, int8 or int32
        np.testing.assert_array_equal(got, want, err_msg=name)
        got.reshape(-1)[0] += 1  # a copy: the tensor's storage is not the array's
        np.testing.assert_array_equal(t.int_repr().numpy(), want, err_msg=name)


def test_int_codes_of_a_scalar_and_of_packed_dtypes() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scalar = torch.quantize_per_tensor(torch.tensor(1.0), 0.1, 3, torch.quint8)
        packed = torch.quantize_per_tensor(torch.rand(4, 4), 0.1, 0, torch.quint4x2)
    assert int_codes(scalar).shape == ()
    assert int(int_codes(scalar)) == 13
    with pytest.raises(CaseError, match="quint4x2"):
        int_codes(packed)
