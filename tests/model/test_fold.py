"""The capture folds a BatchNorm into the float conv's weight and bias exactly as torch's fusion
does (``fuse_conv_bn_weights``, which the eager, FX and PT2E flows fold with), bit for bit, and
copies an unfolded conv's parameters."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.fusion import fuse_conv_bn_weights

from qconvdiag.model.capture import _folded


def _bn(channels: int, dims: int, affine: bool, dtype: torch.dtype) -> torch.nn.Module:
    bn = getattr(torch.nn, f"BatchNorm{dims}d")(channels, affine=affine).to(dtype).eval()
    with torch.no_grad():  # statistics a trained model has: no factor of exactly 1
        bn.running_mean.uniform_(-2, 2)
        bn.running_var.uniform_(0.01, 4)
        if affine:
            bn.weight.uniform_(-3, 3)
            bn.bias.uniform_(-1, 1)
    return bn


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_fold_is_torch_s_bit_for_bit(dims: int, bias: bool, affine: bool,
                                         dtype: torch.dtype) -> None:
    torch.manual_seed(dims)
    conv = getattr(torch.nn, f"Conv{dims}d")(6, 8, 3, bias=bias).to(dtype)
    bn = _bn(8, dims, affine, dtype)
    w, b = _folded(conv, bn)
    want_w, want_b = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                          bn.running_var, bn.eps, bn.weight, bn.bias)
    assert w.dtype == want_w.dtype and torch.equal(w, want_w.detach())
    assert torch.equal(b, want_b.detach())


def test_unfolded_parameters_are_copies() -> None:
    conv = torch.nn.Conv2d(3, 4, 3)
    w, b = _folded(conv, None)
    assert torch.equal(w, conv.weight) and torch.equal(b, conv.bias)
    with torch.no_grad():  # the float model's parameters change after the capture
        conv.weight.add_(1.0)
        conv.bias.add_(1.0)
    assert not torch.equal(w, conv.weight) and not torch.equal(b, conv.bias)
