"""The leaky_relu op family against torch.nn.functional.leaky_relu, up the op-test ladder (tests/op_ladder.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_fast import _ops, ops

from . import op_ladder as ladder
from .conftest import requires_extension

# Small tensors: on a shared 2-core machine, thread hand-offs cost more than they save.
pytestmark = [requires_extension, pytest.mark.usefixtures("one_thread")]

LAYOUTS = ["contiguous", "channels_last", "non_contiguous", "sliced"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_match_torch(dtype, layout):
    torch.manual_seed(0)
    x = ladder.as_layout(torch.randn(2, 3, 7, 9, dtype=dtype), layout)
    x[0, 0, 0, 0] = 0.0  # the derivative at 0 must match torch's (slope)
    g = torch.randn(2, 3, 7, 9, dtype=dtype)
    ladder.assert_matches(lambda t: ops.leaky_relu(t, 0.2), lambda t: F.leaky_relu(t, 0.2),
                          [x.requires_grad_(True)], grad=g, atol=0, grad_atol=0)


@pytest.mark.slow
def test_fuzz_against_torch():
    def check(n, c, h, w, layout, dtype, slope, seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w, generator=g)
        x = torch.where(torch.rand(x.shape, generator=g) < 0.1, 0.0, x)  # the kink, where torch's slope applies
        x = ladder.as_layout(x.to(dtype), layout).requires_grad_(True)
        grad = torch.randn(n, c, h, w, generator=g).to(dtype)
        ladder.assert_matches(lambda t: ops.leaky_relu(t, slope), lambda t: F.leaky_relu(t, slope), [x],
                              grad=grad, atol=0, grad_atol=0)

    ladder.fuzz(check, n=(1, 3), c=(1, 9), h=(1, 13), w=(1, 13), layout=LAYOUTS,
                dtype=[torch.float32, torch.float64, torch.bfloat16], slope=(-2.0, 2.0), seed=(0, 2**31 - 1))


def test_channels_last_output_stays_channels_last():
    x = torch.randn(1, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    assert ops.leaky_relu(x).is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_float64():
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x).requires_grad_(True)  # away from the kink
    ladder.gradcheck(lambda t: ops.leaky_relu(t, 0.3), [x])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck(memory_format):
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=memory_format).requires_grad_(True)
    ladder.opcheck(
        (torch.ops.dip_fast.leaky_relu.default, (x, 0.2)),
        (torch.ops.dip_fast._leaky_relu_backward.default, (torch.randn(2, 3, 5, 7), x.detach(), 0.2)),
    )


def test_torch_compile_traces_the_op():
    x = torch.randn(1, 3, 6, 5)
    ladder.compiles(lambda t: ops.leaky_relu(t, 0.2) * 2, [x], expected=F.leaky_relu(x, 0.2) * 2)


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
        torch.ops.dip_fast.leaky_relu(torch.arange(4), 0.2)
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.dip_fast._leaky_relu_backward(torch.randn(3), torch.randn(4), 0.2)



# ---------------------------------------------------------------------------
# The GPU's cases, run on the CPU too. The CUDA kernels' per-thread loop runs
# over their grid-stride launch on the CPU (the emulation ops, which also
# return a trace [blocks, fewest writes, most writes]). Every case of
# GRID_CASES runs on the GPU against torch and the CPU op, through the
# emulation against torch, and on the GPU against the emulation bit for bit;
# one list, so what the GPU is checked on and what the CPU checks cannot
# drift apart.
# ---------------------------------------------------------------------------

#: (shape, layout, dtype): 3,366 elements (14 blocks of 256 threads, the last one partly idle) and an empty
#: tensor (no launch).
GRID_CASES = ladder.cases([(2, 3, 33, 17), (1, 2, 0, 5)], ladder.KERNEL_LAYOUTS + ("non_contiguous",),
                          [torch.float64, torch.float32, torch.float16, torch.bfloat16])
GRID_ARGS = "shape,layout,dtype"


def grid_case_inputs(shape, dtype):
    """x (one element in ten exactly 0, where torch's derivative is the slope) and an output gradient,
    in dtype (contiguous, on the CPU)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x = torch.where(torch.rand(shape, generator=g) < 0.1, 0.0, x)
    return x.to(dtype), torch.randn(shape, generator=g).to(dtype)


def check_grid_case(run, shape, layout, dtype, device="cpu"):
    """``run(x, grad)`` (in ``layout`` on ``device``) returns (y, grad_x, traces or None): both equal to
    torch's leaky_relu on the CPU, exactly (one multiply in float32 or float64, rounded once). Traces must
    show every element written once. Returns the traces."""
    x, grad = grid_case_inputs(shape, dtype)
    xr = x.clone().requires_grad_(True)
    want_y = F.leaky_relu(xr, 0.2)
    (want_gx,) = torch.autograd.grad(want_y, xr, grad)
    y, gx, traces = run(*(ladder.as_layout(t.to(device), layout) for t in (x, grad)))
    assert y.dtype == dtype and gx.dtype == dtype
    torch.testing.assert_close(y.cpu(), want_y.detach(), atol=0, rtol=0)
    torch.testing.assert_close(gx.cpu(), want_gx, atol=0, rtol=0)
    for blocks, lo, hi in traces or ():
        assert blocks == -(-x.numel() // 256) and (lo, hi) == ((1, 1) if x.numel() else (0, 0))
    return traces


def run_emulated(x, grad):
    y, trace_f = torch.ops.dip_fast._leaky_relu_emulated(x, 0.2)
    gx, trace_b = torch.ops.dip_fast._leaky_relu_backward_emulated(grad, x, 0.2)
    return y, gx, [trace_f.tolist(), trace_b.tolist()]


def run_op(x, grad):
    x = x.requires_grad_(True)
    y = ops.leaky_relu(x, 0.2)
    return (y.detach(), *torch.autograd.grad(y, x, grad), None)


@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_grid_emulation_matches_torch(shape, layout, dtype):
    check_grid_case(run_emulated, shape, layout, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_matches_torch(shape, layout, dtype):
    check_grid_case(run_op, shape, layout, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_matches_cpu(shape, layout, dtype):
    x, grad = grid_case_inputs(shape, dtype)
    x = ladder.as_layout(x, layout)
    ladder.cuda_twin(lambda t: ops.leaky_relu(t, 0.2), [x.requires_grad_(True)], grad=grad, compare_dtype=None)


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_equals_grid_emulation_bitwise(shape, layout, dtype):
    x, grad = grid_case_inputs(shape, dtype)
    want = run_emulated(ladder.as_layout(x, layout), ladder.as_layout(grad, layout))
    xc, gc = (ladder.as_layout(t.cuda(), layout) for t in (x, grad))
    got = (torch.ops.dip_fast.leaky_relu(xc, 0.2), torch.ops.dip_fast._leaky_relu_backward(gc, xc, 0.2))
    for name, a, e in zip(("y", "grad_x"), got, want):
        assert torch.equal(a.cpu(), e), f"{name} differs from the emulated grid"
