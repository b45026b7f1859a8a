"""The LeakyReLU op pair against torch.nn.functional.leaky_relu."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_fast import _ops, ops

from .conftest import FUZZ_EXAMPLES, requires_extension

pytestmark = requires_extension


def layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values in contiguous, channels_last and non-contiguous layouts."""
    return {
        "contiguous": x.contiguous(),
        "channels_last": x.contiguous(memory_format=torch.channels_last),
        "non_contiguous": x.transpose(2, 3).contiguous().transpose(2, 3),
        "sliced": torch.cat([x, x], dim=3)[..., ::2],
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous", "sliced"])
def test_forward_backward_match_torch(dtype, layout):
    torch.manual_seed(0)
    x = layouts(torch.randn(2, 3, 7, 9, dtype=dtype))[layout]
    x[0, 0, 0, 0] = 0.0  # the derivative at 0 must match torch's (slope)
    x.requires_grad_(True)
    y = ops.leaky_relu(x, 0.2)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)

    xr = x.detach().clone().requires_grad_(True)
    yr = F.leaky_relu(xr, 0.2)
    (gr,) = torch.autograd.grad(yr, xr, g)
    torch.testing.assert_close(y, yr, rtol=0, atol=0)
    torch.testing.assert_close(gx, gr, rtol=0, atol=0)
    assert not torch.isnan(y).any()


@pytest.mark.slow
def test_fuzz_against_torch():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @hypothesis.given(
        n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 13), w=st.integers(1, 13),
        layout=st.sampled_from(["contiguous", "channels_last", "non_contiguous", "sliced"]),
        dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
        slope=st.floats(-2.0, 2.0), seed=st.integers(0, 2**31 - 1),
    )
    def check(n, c, h, w, layout, dtype, slope, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w, generator=g)
        x = torch.where(torch.rand(x.shape, generator=g) < 0.1, 0.0, x)  # the kink, where torch's slope applies
        x = layouts(x.to(dtype))[layout].requires_grad_(True)
        grad = torch.randn(n, c, h, w, generator=g).to(dtype)
        (gx,) = torch.autograd.grad(y := ops.leaky_relu(x, slope), x, grad)
        xr = x.detach().clone().requires_grad_(True)
        (gr,) = torch.autograd.grad(yr := F.leaky_relu(xr, slope), xr, grad)
        torch.testing.assert_close(y, yr, rtol=0, atol=0)
        torch.testing.assert_close(gx, gr, rtol=0, atol=0)

    check()


def test_channels_last_output_stays_channels_last():
    x = torch.randn(1, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    assert ops.leaky_relu(x).is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x).requires_grad_(True)  # away from the kink
    assert torch.autograd.gradcheck(lambda t: ops.leaky_relu(t, 0.3), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.leaky_relu(t, 0.3), (x,))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck(memory_format):
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=memory_format).requires_grad_(True)
    torch.library.opcheck(torch.ops.dip_fast.leaky_relu_forward.default, (x, 0.2))
    torch.library.opcheck(torch.ops.dip_fast.leaky_relu_backward.default, (torch.randn(2, 3, 5, 7), x.detach(), 0.2))


def test_poison_mode_is_on_in_tests():
    assert _ops._C.poison_outputs()


def test_empty_input():
    assert ops.leaky_relu(torch.empty(0, 3)).shape == (0, 3)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.leaky_relu([1.0, 2.0])
    with pytest.raises(TypeError, match="floating-point"):
        ops.leaky_relu(torch.arange(4))
    # The compiled op checks too, when called directly.
    with pytest.raises(RuntimeError, match="floating-point"):
        torch.ops.dip_fast.leaky_relu_forward(torch.arange(4), 0.2)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.dip_fast.leaky_relu_backward(torch.randn(3), torch.randn(4), 0.2)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
def test_cuda_matches_cpu(dtype, layout):
    torch.manual_seed(0)
    x = layouts(torch.randn(2, 3, 33, 17, dtype=dtype))[layout]
    g = torch.randn(2, 3, 33, 17, dtype=dtype)
    xc = x.cuda().requires_grad_(True)
    y = ops.leaky_relu(xc, 0.2)
    (gx,) = torch.autograd.grad(y, xc, g.cuda())
    x = x.clone().requires_grad_(True)
    y_cpu = ops.leaky_relu(x, 0.2)
    (gx_cpu,) = torch.autograd.grad(y_cpu, x, g)
    torch.testing.assert_close(y.cpu(), y_cpu)
    torch.testing.assert_close(gx.cpu(), gx_cpu)
