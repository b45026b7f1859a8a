"""The fused BatchNorm + LeakyReLU + pad op against the PyTorch sequence it replaces."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_fast import _ops
from dip_fast.ops.bn_act import batch_norm_act

from .conftest import FUZZ_EXAMPLES, requires_extension

pytestmark = requires_extension


def expected(x, weight, bias, *, eps=1e-5, slope=0.2, pad=0, pad_mode="reflect"):
    """The unfused composition: batch_norm (training) -> leaky_relu -> pad."""
    y = F.leaky_relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps), slope)
    if pad:
        y = F.pad(y, (pad,) * 4, mode="reflect" if pad_mode == "reflect" else "constant")
    return y


def make_inputs(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=dtype, generator=g) * 2.0 + 0.5
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        x = torch.cat([x, x], dim=3)[..., ::2]
    c = shape[1]
    weight = torch.randn(c, dtype=dtype, generator=g)
    bias = torch.randn(c, dtype=dtype, generator=g)
    return x, weight, bias


def compare(shape, dtype, layout, pad, pad_mode, slope, atol, device="cpu"):
    x, w, b = make_inputs(shape, dtype, layout)
    x, w, b = (t.to(device).requires_grad_(True) for t in (x, w, b))
    y = batch_norm_act(x, w, b, slope=slope, pad=pad, pad_mode=pad_mode)
    assert not torch.isnan(y).any(), "unwritten output elements"
    grad = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    got = torch.autograd.grad(y, (x, w, b), grad)

    xr, wr, br = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    yr = expected(xr, wr, br, slope=slope, pad=pad, pad_mode=pad_mode)
    want = torch.autograd.grad(yr, (xr, wr, br), grad)
    torch.testing.assert_close(y, yr, atol=atol, rtol=atol)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        assert not torch.isnan(a).any(), f"unwritten gradient of {name}"
        torch.testing.assert_close(a, e, atol=atol * 10, rtol=atol * 10, msg=f"gradient of {name}")
    if _ops.working_memory_format(x) == torch.channels_last:
        # Not for a 1x1 image: its strides fit both layouts, and the rule (checks.h) reads it as NCHW.
        assert y.is_contiguous(memory_format=torch.channels_last)


SHAPES = [(2, 5, 7, 9), (1, 16, 8, 8), (1, 3, 2, 3), (3, 1, 5, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("pad,pad_mode", [(0, "reflect"), (1, "reflect"), (2, "reflect"), (1, "zeros"), (3, "zeros")])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_matches_pytorch(shape, layout, pad, pad_mode, dtype, atol):
    if pad_mode == "reflect" and pad >= min(shape[2:]):
        pytest.skip("reflection pad must be smaller than the image")
    compare(shape, dtype, layout, pad, pad_mode, 0.2, atol)


@pytest.mark.parametrize("slope", [1.0, 0.01, 0.5])
def test_other_slopes(slope):
    """slope=1 is plain BatchNorm (the paper's BatchNorm after a concatenation)."""
    compare((2, 6, 9, 11), torch.float64, "contiguous", 1, "reflect", slope, 1e-11)


def test_bfloat16_close_to_float32():
    x, w, b = make_inputs((1, 8, 16, 16), torch.float32, "channels_last")
    y = batch_norm_act(x.bfloat16(), w, b, pad=1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected(x, w, b, pad=1), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_bfloat16_rounds_exactly_like_torch(layout):
    """The kernels' branch-free bfloat16 store: bit-identical to computing in float and casting with torch."""
    x, w, b = make_inputs((1, 16, 9, 11), torch.float32, layout)
    xb = x.bfloat16()
    y = batch_norm_act(xb, w, b, pad=1)
    # The float kernel on the same (bfloat16-valued) input does the same float arithmetic; only the store differs.
    assert torch.equal(y, batch_norm_act(xb.float(), w, b, pad=1).bfloat16())
    g = torch.randn(y.shape).to(torch.bfloat16)
    _, mean, invstd = torch.ops.dip_fast.bn_act_forward(xb, w, b, 1e-5, 0.2, 1, 1)
    dx = torch.ops.dip_fast.bn_act_backward(g, xb, w, b, mean, invstd, 0.2, 1, 1)[0]
    dx32 = torch.ops.dip_fast.bn_act_backward(g.float(), xb.float(), w, b, mean, invstd, 0.2, 1, 1)[0]
    assert torch.equal(dx, dx32.bfloat16())
    # NaN stays NaN (a quiet NaN, as torch's cast gives).
    xn = xb.clone()
    xn[0, 3, 2, 2] = float("nan")
    assert torch.isnan(batch_norm_act(xn, w, b, pad=1)[0, 3]).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pad,pad_mode", [(0, "reflect"), (2, "reflect"), (1, "zeros")])
def test_gradcheck_float64(layout, pad, pad_mode):
    x, w, b = make_inputs((2, 3, 5, 6), torch.float64, layout)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda *a: batch_norm_act(*a, slope=0.2, pad=pad, pad_mode=pad_mode), inputs, eps=1e-6, atol=1e-5
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, w, b = make_inputs((2, 4, 6, 5), torch.float32, layout)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), 1e-5, 0.2, 1, 1)
    torch.library.opcheck(torch.ops.dip_fast.bn_act_forward.default, args)
    y, mean, invstd = torch.ops.dip_fast.bn_act_forward(*args)
    bwd_args = (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, invstd, 0.2, 1, 1)
    torch.library.opcheck(torch.ops.dip_fast.bn_act_backward.default, bwd_args)


def test_running_stats_follow_batchnorm():
    x, w, b = make_inputs((2, 4, 6, 5), torch.float64, "contiguous")
    bn = torch.nn.BatchNorm2d(4).double()
    bn(x)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    batch_norm_act(x, w, b, running_mean=rm, running_var=rv, momentum=0.1)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)


@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_running_stats_op_follows_batchnorm(stats_dtype, momentum, device="cpu"):
    """bn_running_stats_update on its own: the same running statistics as nn.BatchNorm2d, step after step."""
    x, w, b = make_inputs((2, 5, 4, 3), torch.float32, "contiguous")
    x = x.to(device)
    bn = torch.nn.BatchNorm2d(5, momentum=momentum).to(device, stats_dtype)
    rm = torch.zeros(5, dtype=stats_dtype, device=device)
    rv = torch.ones(5, dtype=stats_dtype, device=device)
    for k in range(3):
        xk = x.to(stats_dtype) * (k + 1) + k
        bn(xk)
        _, mean, invstd = torch.ops.dip_fast.bn_act_forward(xk, w.to(device, stats_dtype), b.to(device, stats_dtype),
                                                            1e-5, 1.0, 0, 1)
        torch.ops.dip_fast.bn_running_stats_update(rm, rv, mean, invstd, momentum, 1e-5, xk.numel() // 5)
    tol = 1e-12 if stats_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(rm, bn.running_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(rv, bn.running_var, atol=tol, rtol=tol)


def test_running_stats_op_checks_and_opcheck():
    rm, rv, mean, invstd = torch.zeros(4), torch.ones(4), torch.randn(4), torch.rand(4) + 0.5
    torch.library.opcheck(torch.ops.dip_fast.bn_running_stats_update.default, (rm, rv, mean, invstd, 0.1, 1e-5, 7))
    with pytest.raises(RuntimeError, match="momentum"):
        torch.ops.dip_fast.bn_running_stats_update(rm, rv, mean, invstd, 1.5, 1e-5, 7)
    with pytest.raises(RuntimeError, match=r"contiguous \[4\] tensors"):
        torch.ops.dip_fast.bn_running_stats_update(rm, torch.ones(5), mean, invstd, 0.1, 1e-5, 7)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.dip_fast.bn_running_stats_update(rm, rv.double(), mean, invstd, 0.1, 1e-5, 7)


def test_torch_compile_traces_the_op():
    x, w, b = make_inputs((1, 4, 8, 8), torch.float32, "contiguous")
    fn = torch.compile(lambda x, w, b: batch_norm_act(x, w, b, pad=1) * 2, backend="eager", fullgraph=True)
    torch.testing.assert_close(fn(x, w, b), expected(x, w, b, pad=1) * 2, atol=2e-5, rtol=2e-5)


def test_bad_arguments():
    x, w, b = make_inputs((1, 4, 6, 6), torch.float32, "contiguous")
    with pytest.raises(ValueError, match="x must be 4-D"):
        batch_norm_act(x[0], w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        batch_norm_act(x, w[:3], b)
    with pytest.raises(TypeError, match="floating-point"):
        batch_norm_act(x.long(), w, b)
    with pytest.raises(ValueError, match="pad_mode"):
        batch_norm_act(x, w, b, pad=1, pad_mode="circular")
    with pytest.raises(ValueError, match="smaller than the image"):
        batch_norm_act(x, w, b, pad=6)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        batch_norm_act(x[:, :, :1, :1], w, b)
    # The compiled op validates on its own too.
    with pytest.raises(RuntimeError, match="pad_mode"):
        torch.ops.dip_fast.bn_act_forward(x, w, b, 1e-5, 0.2, 1, 7)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        y, m, s = torch.ops.dip_fast.bn_act_forward(x, w, b, 1e-5, 0.2, 1, 1)
        torch.ops.dip_fast.bn_act_backward(y[..., 1:], x, w, b, m, s, 0.2, 1, 1)


@pytest.mark.slow
def test_fuzz_against_pytorch():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @hypothesis.given(
        n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 13), w=st.integers(1, 13),
        pad=st.integers(0, 3), mode=st.sampled_from(["reflect", "zeros"]),
        layout=st.sampled_from(["contiguous", "channels_last", "non_contiguous"]),
        dtype=st.sampled_from([torch.float32, torch.float64]), slope=st.sampled_from([0.2, 1.0, 0.0]),
    )
    def check(n, c, h, w, pad, mode, layout, dtype, slope):
        hypothesis.assume(n * h * w > 1)
        hypothesis.assume(mode == "zeros" or pad < min(h, w))
        compare((n, c, h, w), dtype, layout, pad, mode, slope, 1e-10 if dtype == torch.float64 else 5e-5)

    check()


@pytest.mark.slow
def test_fuzz_running_stats_against_batchnorm():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=FUZZ_EXAMPLES, deadline=None)
    @hypothesis.given(
        n=st.integers(1, 3), c=st.integers(1, 9), h=st.integers(1, 7), w=st.integers(1, 7),
        momentum=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(n, c, h, w, momentum, dtype, seed):
        hypothesis.assume(n * h * w > 1)  # BatchNorm's unbiased variance needs two values per channel
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w, dtype=dtype, generator=g) * 3.0 + 1.0
        bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(dtype)
        rm, rv = torch.randn(c, dtype=dtype, generator=g), torch.rand(c, dtype=dtype, generator=g) + 0.5
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn(x)
        _, mean, invstd = torch.ops.dip_fast.bn_act_forward(x, torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype),
                                                            1e-5, 1.0, 0, 1)
        torch.ops.dip_fast.bn_running_stats_update(rm, rv, mean, invstd, momentum, 1e-5, n * h * w)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(rm, bn.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(rv, bn.running_var, atol=tol, rtol=tol)

    check()


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(1, 128, 64, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pad,pad_mode", [(0, "reflect"), (1, "reflect"), (1, "zeros")])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_cuda_matches_pytorch(shape, layout, pad, pad_mode, dtype, atol):
    if pad_mode == "reflect" and pad >= min(shape[2:]):
        pytest.skip("reflection pad must be smaller than the image")
    compare(shape, dtype, layout, pad, pad_mode, 0.2, atol, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("stats_dtype", [torch.float32, torch.float64])
def test_cuda_running_stats_op_follows_batchnorm(stats_dtype):
    test_running_stats_op_follows_batchnorm(stats_dtype, 0.1, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    x, w, b = make_inputs((2, 32, 17, 23), torch.float32, "channels_last")
    g = torch.randn(2, 32, 19, 25)
    outs = []
    for device in ("cpu", "cuda"):
        xd = x.to(device, dtype).requires_grad_(True)
        wd, bd = (t.to(device).requires_grad_(True) for t in (w, b))
        y = batch_norm_act(xd, wd, bd, pad=1)
        grads = torch.autograd.grad(y, (xd, wd, bd), g.to(device, dtype))
        outs.append([t.float().cpu() for t in (y, *grads)])
    tol = 1e-5 if dtype == torch.float32 else 0.05
    for a, b_ in zip(*outs):
        torch.testing.assert_close(a, b_, atol=tol, rtol=tol)


# ---------------------------------------------------------------------------
# The CUDA kernels' per-thread code, run over their launch grid on the CPU.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 2, 3), (1, 16, 17, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "non_contiguous"])
@pytest.mark.parametrize("pad,pad_mode", [(0, "reflect"), (1, "reflect"), (2, "reflect"), (2, "zeros")])
def test_cuda_grid_emulation_matches_pytorch(shape, layout, pad, pad_mode):
    if pad_mode == "reflect" and pad >= min(shape[2:]):
        pytest.skip("reflection pad must be smaller than the image")
    x, w, b = make_inputs(shape, torch.float64, layout)
    mode = {"zeros": 0, "reflect": 1}[pad_mode]
    y, mean, invstd = torch.ops.dip_fast._bn_act_forward_emulated(x, w, b, 1e-5, 0.2, pad, mode)
    xr, wr, br = (t.clone().requires_grad_(True) for t in (x, w, b))
    yr = expected(xr, wr, br, pad=pad, pad_mode=pad_mode)
    torch.testing.assert_close(y, yr, atol=1e-11, rtol=1e-11)
    grad = torch.randn(yr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got = torch.ops.dip_fast._bn_act_backward_emulated(grad, x, w, b, mean, invstd, 0.2, pad, mode)
    want = torch.autograd.grad(yr, (xr, wr, br), grad)
    for name, a, e in zip(("x", "weight", "bias"), got, want):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=f"gradient of {name}")
