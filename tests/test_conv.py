"""The layout-aware strided convolution matches F.conv2d, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_fast.core.conv import conv2d


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_conv2d(stride, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64, generator=g).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=g).contiguous(memory_format=fmt).requires_grad_(True)
    b = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_(True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    y = conv2d(x, w, b, stride, 0)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(y, inputs, grad)
    y_ref = F.conv2d(x, w, b, stride)
    want = torch.autograd.grad(y_ref, inputs, grad)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e)


def test_gradcheck_channels_last_strided():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 7, 8, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d(x, w, b, 2, 0), inputs)
