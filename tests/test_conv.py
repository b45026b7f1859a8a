"""The layout-aware strided convolution matches F.conv2d, forward and backward."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_fast.core import conv
from dip_fast.core.conv import conv2d


@pytest.fixture(params=[True, False], ids=["nchw-weight-grad", "oneDNN-as-is"])
def detour(request, monkeypatch):
    """Both backward paths on small float64 shapes: the NCHW detour forced on, and forced off."""
    monkeypatch.setattr(conv, "_nchw_weight_grad_wins", lambda x, w: request.param)
    return request.param


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_conv2d(stride, bias, channels_last, detour):
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64, generator=g).contiguous(memory_format=fmt).requires_grad_(True)
    w = torch.randn(5, 6, 3, 3, dtype=torch.float64, generator=g).contiguous(memory_format=fmt).requires_grad_(True)
    b = torch.randn(5, dtype=torch.float64, generator=g).requires_grad_(True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    y = conv2d(x, w, b, stride, 0)
    took_detour = type(y.grad_fn).__name__ == "_StridedConvNCHWWeightGradBackward"
    assert took_detour == (detour and stride > 1 and channels_last)
    grad = torch.randn(y.shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad(y, inputs, grad)
    y_ref = F.conv2d(x, w, b, stride)
    want = torch.autograd.grad(y_ref, inputs, grad)
    torch.testing.assert_close(y, y_ref)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e)
        assert a.shape == e.shape and a.stride() == e.stride()  # the weight gradient keeps the weight's layout


def test_gradcheck_channels_last_strided(detour):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 7, 8, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randn(4, dtype=torch.float64, generator=g)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, b: conv2d(x, w, b, 2, 0), inputs)


@pytest.mark.parametrize("channels, side, dtype, wins", [
    (128, 130, torch.float32, True),    # measured 0.86x (2 threads), 0.58x (1 thread)
    (128, 258, torch.float32, True),    # about even
    (128, 66, torch.float32, False),    # measured 1.42x
    (64, 130, torch.float32, False),    # measured 1.56x
    (32, 258, torch.float32, False),    # measured 1.75x
    (128, 130, torch.bfloat16, False),  # bf16 loses everywhere (1.40x to 2.13x)
    (128, 130, torch.float64, False),   # not measured: oneDNN as is
])
def test_detour_only_where_measured_to_win(channels, side, dtype, wins):
    x = torch.empty(1, channels, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.empty(128, channels, 3, 3, dtype=dtype)
    assert conv._nchw_weight_grad_wins(x, w) == wins


def test_autocast_never_takes_the_detour():
    x = torch.randn(1, 128, 130, 130).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    w = torch.randn(8, 128, 3, 3).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv2d(x, w, None, 2, 0)
    assert y.dtype == torch.bfloat16 and type(y.grad_fn).__name__ != "_StridedConvNCHWWeightGradBackward"
    assert type(conv2d(x, w, None, 2, 0).grad_fn).__name__ == "_StridedConvNCHWWeightGradBackward"
