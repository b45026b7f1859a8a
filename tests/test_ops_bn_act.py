"""The bn_act op family (BatchNorm + LeakyReLU + pad, fused) against the PyTorch sequence it replaces,
up the op-test ladder (tests/op_ladder.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dip_fast import _ops
from dip_fast.ops.bn_act import batch_norm_act

from . import op_ladder as ladder
from .conftest import requires_extension

# Small tensors: on a shared 2-core machine, thread hand-offs cost more than they save.
pytestmark = [requires_extension, pytest.mark.usefixtures("one_thread")]


def expected(x, weight, bias, *, eps=1e-5, slope=0.2, pad=0, pad_mode="reflect"):
    """The unfused composition: batch_norm (training) -> leaky_relu -> pad."""
    y = F.leaky_relu(F.batch_norm(x, None, None, weight, bias, training=True, eps=eps), slope)
    if pad:
        y = F.pad(y, (pad,) * 4, mode="reflect" if pad_mode == "reflect" else "constant")
    return y


def make_inputs(shape, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dtype=dtype, generator=g) * 2.0 + 0.5
    x = ladder.as_layout(x, layout)
    c = shape[1]
    weight = torch.randn(c, dtype=dtype, generator=g)
    bias = torch.randn(c, dtype=dtype, generator=g)
    return x, weight, bias


def compare(shape, dtype, layout, pad, pad_mode, slope, atol, device="cpu"):
    x, w, b = make_inputs(shape, dtype, layout)
    x, w, b = (t.to(device).requires_grad_(True) for t in (x, w, b))
    n, c, h, wd = shape
    grad = torch.randn((n, c, h + 2 * pad, wd + 2 * pad), dtype=dtype, generator=torch.Generator().manual_seed(1))
    y, _ = ladder.assert_matches(
        lambda *a: batch_norm_act(*a, slope=slope, pad=pad, pad_mode=pad_mode),
        lambda *a: expected(*a, slope=slope, pad=pad, pad_mode=pad_mode),
        [x, w, b], grad=grad.to(device), atol=atol, names=("x", "weight", "bias"),
    )
    if _ops.working_memory_format(x) == torch.channels_last:
        # Not for a 1x1 image: its strides fit both layouts, and the rule (checks.h) reads it as NCHW.
        assert y.is_contiguous(memory_format=torch.channels_last)


SHAPES = [(2, 5, 7, 9), (1, 16, 8, 8), (1, 3, 2, 3), (3, 1, 5, 4)]


def geometries(shapes, pads):
    """``(shape, pad, pad_mode)`` without a reflection pad as large as the image (which the op refuses,
    tested in test_bad_arguments)."""
    return [(shape, pad, mode) for shape in shapes for pad, mode in pads
            if not (mode == "reflect" and pad >= min(shape[2:]))]


def shape_pads(shapes, pads):
    """The :func:`geometries` as a parametrize mark: no case is generated only to be skipped."""
    cases = geometries(shapes, pads)
    ids = [f"{'x'.join(map(str, shape))}-{mode}{pad}" for shape, pad, mode in cases]
    return pytest.mark.parametrize("shape,pad,pad_mode", cases, ids=ids)


@shape_pads(SHAPES, [(0, "reflect"), (1, "reflect"), (2, "reflect"), (1, "zeros"), (3, "zeros")])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_matches_pytorch(shape, layout, pad, pad_mode, dtype, atol):
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
    _, mean, invstd = torch.ops.dip_fast.bn_act(xb, w, b, 1e-5, 0.2, 1, 1)
    dx = torch.ops.dip_fast._bn_act_backward(g, xb, w, b, mean, invstd, 0.2, 1, 1)[0]
    dx32 = torch.ops.dip_fast._bn_act_backward(g.float(), xb.float(), w, b, mean, invstd, 0.2, 1, 1)[0]
    assert torch.equal(dx, dx32.bfloat16())
    # NaN stays NaN (a quiet NaN, as torch's cast gives).
    xn = xb.clone()
    xn[0, 3, 2, 2] = float("nan")
    assert torch.isnan(batch_norm_act(xn, w, b, pad=1)[0, 3]).all()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("pad,pad_mode", [(0, "reflect"), (2, "reflect"), (1, "zeros")])
def test_gradcheck_float64(layout, pad, pad_mode):
    x, w, b = make_inputs((2, 3, 5, 6), torch.float64, layout)
    inputs = [t.requires_grad_(True) for t in (x, w, b)]
    ladder.gradcheck(lambda *a: batch_norm_act(*a, slope=0.2, pad=pad, pad_mode=pad_mode), inputs,
                     gradgrad=False, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    x, w, b = make_inputs((2, 4, 6, 5), torch.float32, layout)
    args = (x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True), 1e-5, 0.2, 1, 1)
    y, mean, invstd = torch.ops.dip_fast.bn_act(*args)
    bwd_args = (torch.randn_like(y), x.detach(), w.detach(), b.detach(), mean, invstd, 0.2, 1, 1)
    ladder.opcheck((torch.ops.dip_fast.bn_act.default, args), (torch.ops.dip_fast._bn_act_backward.default, bwd_args))


def test_running_stats_follow_batchnorm():
    x, w, b = make_inputs((2, 4, 6, 5), torch.float64, "contiguous")
    bn = torch.nn.BatchNorm2d(4).double()
    bn(x)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    batch_norm_act(x, w, b, running_mean=rm, running_var=rv, momentum=0.1)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)


def test_running_stats_op_checks_and_opcheck():
    rm, rv, mean, invstd = torch.zeros(4), torch.ones(4), torch.randn(4), torch.rand(4) + 0.5
    ladder.opcheck((torch.ops.dip_fast.bn_act_running_stats_update.default, (rm, rv, mean, invstd, 0.1, 1e-5, 7)))
    with pytest.raises(RuntimeError, match="momentum"):
        torch.ops.dip_fast.bn_act_running_stats_update(rm, rv, mean, invstd, 1.5, 1e-5, 7)
    with pytest.raises(RuntimeError, match=r"contiguous \[4\] tensors"):
        torch.ops.dip_fast.bn_act_running_stats_update(rm, torch.ones(5), mean, invstd, 0.1, 1e-5, 7)
    with pytest.raises(RuntimeError, match="same dtype"):
        torch.ops.dip_fast.bn_act_running_stats_update(rm, rv.double(), mean, invstd, 0.1, 1e-5, 7)


def test_torch_compile_traces_the_op():
    x, w, b = make_inputs((1, 4, 8, 8), torch.float32, "contiguous")
    ladder.compiles(lambda x, w, b: batch_norm_act(x, w, b, pad=1) * 2, [x, w, b],
                    expected=expected(x, w, b, pad=1) * 2, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("pad,pad_mode", [(2, "reflect"), (1, "zeros")])
def test_channels_last_many_pixel_blocks(pad, pad_mode):
    """channels_last with C = 132 (not a multiple of the kernels' vector width, so pixels are grouped):
    several fixed pixel blocks whose edges fall inside rows and inside the reflection's bands, against
    PyTorch in float64, and bitwise the same with 1 and 2 threads (blocks merged in a fixed order)."""
    shape = (2, 132, 11, 23)
    compare(shape, torch.float64, "channels_last", pad, pad_mode, 0.2, 1e-11)
    x, w, b = make_inputs(shape, torch.float32, "channels_last")
    mode = 1 if pad_mode == "reflect" else 0
    grad = torch.randn(2, 132, 11 + 2 * pad, 23 + 2 * pad).contiguous(memory_format=torch.channels_last)
    outs = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        y, mean, invstd = torch.ops.dip_fast.bn_act(x, w, b, 1e-5, 0.2, pad, mode)
        outs.append((y, mean, invstd, *torch.ops.dip_fast._bn_act_backward(grad, x, w, b, mean, invstd, 0.2, pad, mode)))
    torch.set_num_threads(1)
    for one, two in zip(*outs):
        assert torch.equal(one, two)


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
        torch.ops.dip_fast.bn_act(x, w, b, 1e-5, 0.2, 1, 7)
    with pytest.raises(RuntimeError, match="grad_y must have shape"):
        y, m, s = torch.ops.dip_fast.bn_act(x, w, b, 1e-5, 0.2, 1, 1)
        torch.ops.dip_fast._bn_act_backward(y[..., 1:], x, w, b, m, s, 0.2, 1, 1)


@pytest.mark.slow
def test_fuzz_against_pytorch():
    def check(n, c, h, w, pad, mode, layout, dtype, slope):
        ladder.assume(n * h * w > 1)
        ladder.assume(mode == "zeros" or pad < min(h, w))
        compare((n, c, h, w), dtype, layout, pad, mode, slope, 1e-10 if dtype == torch.float64 else 5e-5)

    ladder.fuzz(check, n=(1, 3), c=(1, 9), h=(1, 13), w=(1, 13), pad=(0, 3), mode=["reflect", "zeros"],
                layout=["contiguous", "channels_last", "sliced"], dtype=[torch.float32, torch.float64],
                slope=[0.2, 1.0, 0.0])


@pytest.mark.slow
def test_fuzz_running_stats_against_batchnorm():
    def check(n, c, h, w, momentum, dtype, seed):
        ladder.assume(n * h * w > 1)  # BatchNorm's unbiased variance needs two values per channel
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, c, h, w, dtype=dtype, generator=g) * 3.0 + 1.0
        bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(dtype)
        rm, rv = torch.randn(c, dtype=dtype, generator=g), torch.rand(c, dtype=dtype, generator=g) + 0.5
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn(x)
        _, mean, invstd = torch.ops.dip_fast.bn_act(x, torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype),
                                                            1e-5, 1.0, 0, 1)
        torch.ops.dip_fast.bn_act_running_stats_update(rm, rv, mean, invstd, momentum, 1e-5, n * h * w)
        tol = 1e-10 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(rm, bn.running_mean, atol=tol, rtol=tol)
        torch.testing.assert_close(rv, bn.running_var, atol=tol, rtol=tol)

    ladder.fuzz(check, n=(1, 3), c=(1, 9), h=(1, 7), w=(1, 7), momentum=(0.0, 1.0),
                dtype=[torch.float32, torch.float64], seed=(0, 2**31 - 1))


# ---------------------------------------------------------------------------
# The GPU's cases, run on the CPU too. The CUDA kernels' per-thread code runs
# over their launch grid on the CPU (the emulation ops, which also return a
# trace: [V, parts, reduce blocks, apply blocks, fewest writes, most writes],
# csrc/cpu/bn_act_emulated.cpp). Every case of GRID_CASES runs three ways: on
# the GPU against PyTorch, through the emulation against PyTorch, and on the
# GPU against the emulation bit for bit (same plan, same merge order, no
# multiply-add contraction); one list, so what the GPU is checked on and what
# the CPU checks cannot drift apart.
# ---------------------------------------------------------------------------

#: SHAPES, plus: C = 16 and 132 (wider vectors; channels_last blocks of fewer than 256 threads), a plane
#: reduced in several blocks per channel (their partials merged by the finalize kernel), and N = 3.
GRID_SHAPES = SHAPES + [(1, 16, 17, 5), (2, 132, 5, 6), (1, 4, 64, 48), (3, 3, 5, 7)]
GRID_PADS = [(0, "reflect"), (1, "reflect"), (2, "reflect"), (1, "zeros"), (2, "zeros")]
GRID_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


#: (shape, pad, pad_mode, layout, dtype).
GRID_CASES = [ladder.case(*geometry, layout, dtype)
              for geometry in geometries(GRID_SHAPES, GRID_PADS)
              for layout in ladder.KERNEL_LAYOUTS for dtype in GRID_DTYPES]
# The paper's 128-channel layers at 64x64 (the size the network runs at), in float32.
GRID_CASES += [ladder.case(*geometry, layout, torch.float32)
               for geometry in geometries([(1, 128, 64, 64)], [(0, "reflect"), (1, "reflect"), (1, "zeros")])
               for layout in ("contiguous", "channels_last")]
GRID_ARGS = "shape,pad,pad_mode,layout,dtype"
PAD_MODES = {"zeros": 0, "reflect": 1}


def grid_case_inputs(shape, pad, dtype):
    """x, weight, bias and an output gradient of a grid case (contiguous, on the CPU): x and the gradient
    in dtype, the affine parameters in float64 for float64 and float32 otherwise."""
    x, w, b = make_inputs(shape, torch.float64, "contiguous")
    n, c, h, wd = shape
    grad = torch.randn(n, c, h + 2 * pad, wd + 2 * pad, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(3))
    param = torch.float64 if dtype == torch.float64 else torch.float32
    return x.to(dtype), w.to(param), b.to(param), grad.to(dtype)


def check_grid_case(run, shape, pad, pad_mode, layout, dtype, device="cpu"):
    """``run(x, w, b, grad)`` (x and grad in ``layout`` on ``device``) returns (y, dx, dw, db, traces or
    None); all four against PyTorch in float64 on the same rounded inputs, within the dtype's rounding
    (gradients 10x in float64 and float32, as a sum over the batch). Traces must show every output element
    written once. Returns the traces."""
    x, w, b, grad = grid_case_inputs(shape, pad, dtype)
    xr, wr, br = (t.double().requires_grad_(True) for t in (x, w, b))
    yr = expected(xr, wr, br, pad=pad, pad_mode=pad_mode)
    want = (yr.detach(), *torch.autograd.grad(yr, (xr, wr, br), grad.double()))
    xd, gd = (ladder.as_layout(t.to(device), layout) for t in (x, grad))
    y, dx, dw, db, traces = run(xd, w.to(device), b.to(device), gd)
    tol = ladder.rounding_tolerance(dtype, 1e-11, 2e-5)
    grad_tol = tol if dtype in ladder.HALF_DTYPES else 10 * tol
    assert y.dtype == dtype and dx.dtype == dtype
    for name, got, exp, t in zip(("y", "dx", "dw", "db"), (y, dx, dw, db), want, (tol,) + (grad_tol,) * 3):
        torch.testing.assert_close(got.cpu().double(), exp, atol=t, rtol=t, msg=lambda m, n=name: f"{n}: {m}")
    if layout.endswith("channels_last") and _ops.working_memory_format(xd) == torch.channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for trace in traces or ():
        assert trace[4] == 1 and trace[5] == 1, f"output elements written {trace[4]}..{trace[5]} times, not once"
    return traces


def emulate(x, w, b, pad, mode, grad, slope=0.2):
    y, mean, invstd, trace_f = torch.ops.dip_fast._bn_act_emulated(x, w, b, 1e-5, slope, pad, mode)
    dx, dw, db, trace_b = torch.ops.dip_fast._bn_act_backward_emulated(grad, x, w, b, mean, invstd, slope, pad, mode)
    return (y, mean, invstd, dx, dw, db), trace_f.tolist(), trace_b.tolist()


def run_emulated(pad, pad_mode):
    """The emulation ops: (y, dx, dw, db, [forward trace, backward trace])."""
    def run(x, w, b, grad):
        (y, _, _, dx, dw, db), trace_f, trace_b = emulate(x, w, b, pad, PAD_MODES[pad_mode], grad)
        return y, dx, dw, db, [trace_f, trace_b]
    return run


def run_op(pad, pad_mode):
    """The public op with autograd, on the inputs' device: (y, dx, dw, db, None)."""
    def run(x, w, b, grad):
        x, w, b = (t.requires_grad_(True) for t in (x, w, b))
        y = batch_norm_act(x, w, b, slope=0.2, pad=pad, pad_mode=pad_mode)
        return (y.detach(), *torch.autograd.grad(y, (x, w, b), grad), None)
    return run


@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_grid_emulation_matches_pytorch(shape, pad, pad_mode, layout, dtype):
    check_grid_case(run_emulated(pad, pad_mode), shape, pad, pad_mode, layout, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_matches_pytorch(shape, pad, pad_mode, layout, dtype):
    check_grid_case(run_op(pad, pad_mode), shape, pad, pad_mode, layout, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_equals_grid_emulation_bitwise(shape, pad, pad_mode, layout, dtype):
    inputs = grid_case_inputs(shape, pad, dtype)
    mode = PAD_MODES[pad_mode]
    results = []
    for device in ("cpu", "cuda"):
        x, w, b, g = inputs
        x, g = (ladder.as_layout(t.to(device), layout) for t in (x, g))
        w, b = w.to(device), b.to(device)
        if device == "cpu":
            out, trace_f, _ = emulate(x, w, b, pad, mode, g)
        else:
            y, mean, invstd = torch.ops.dip_fast.bn_act(x, w, b, 1e-5, 0.2, pad, mode)
            out = (y, mean, invstd, *torch.ops.dip_fast._bn_act_backward(g, x, w, b, mean, invstd, 0.2, pad, mode))
        results.append([t.cpu() for t in out])
    for name, want, got in zip(("y", "mean", "invstd", "dx", "dw", "db"), *results):
        assert torch.equal(got, want), f"{name} differs from the emulated grid (V={trace_f[0]})"


#: The CUDA twin (GPU against the CPU op) runs a slice of the grid cases: one shape and pad, channels_last,
#: every dtype but float64.
TWIN_SHAPE, TWIN_PAD = GRID_SHAPES[5], GRID_PADS[1]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GRID_DTYPES[1:])
def test_cuda_matches_cpu(dtype):
    x, w, b = make_inputs(TWIN_SHAPE, torch.float32, "channels_last")
    n, c, h, wd = TWIN_SHAPE
    pad, pad_mode = TWIN_PAD
    g = torch.randn(n, c, h + 2 * pad, wd + 2 * pad)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    # x and the gradient in dtype, the affine parameters in float32.
    inputs = [x.to(dtype).requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)]
    ladder.cuda_twin(lambda *a: batch_norm_act(*a, pad=pad, pad_mode=pad_mode), inputs, grad=g.to(dtype), atol=tol)


#: The running-statistics update: (statistics dtype, momentum, channels); 300 channels take two blocks.
RUNNING_CASES = ladder.cases([torch.float32, torch.float64], [0.1, 1.0, 0.0], [5, 300])


def check_running_stats(update, stats_dtype, momentum, channels, device="cpu"):
    """``update(running_mean, running_var, mean, invstd, momentum, eps, count)`` updates in place (and
    returns a trace or None): the same running statistics as nn.BatchNorm2d, step after step.
    Returns the traces."""
    x, w, b = make_inputs((2, channels, 4, 3), torch.float32, "contiguous")
    x = x.to(device)
    bn = torch.nn.BatchNorm2d(channels, momentum=momentum).to(device, stats_dtype)
    rm = torch.zeros(channels, dtype=stats_dtype, device=device)
    rv = torch.ones(channels, dtype=stats_dtype, device=device)
    traces = []
    for k in range(3):
        xk = x.to(stats_dtype) * (k + 1) + k
        bn(xk)
        _, mean, invstd = torch.ops.dip_fast.bn_act(xk, w.to(device, stats_dtype), b.to(device, stats_dtype),
                                                    1e-5, 1.0, 0, 1)
        traces.append(update(rm, rv, mean, invstd, momentum, 1e-5, xk.numel() // channels))
    tol = 1e-12 if stats_dtype == torch.float64 else 1e-5
    torch.testing.assert_close(rm, bn.running_mean, atol=tol, rtol=tol)
    torch.testing.assert_close(rv, bn.running_var, atol=tol, rtol=tol)
    return traces


@pytest.mark.parametrize("stats_dtype,momentum,channels", RUNNING_CASES)
def test_running_stats_op_follows_batchnorm(stats_dtype, momentum, channels):
    check_running_stats(torch.ops.dip_fast.bn_act_running_stats_update, stats_dtype, momentum, channels)


@pytest.mark.parametrize("stats_dtype,momentum,channels", RUNNING_CASES)
def test_running_stats_grid_emulation_follows_batchnorm(stats_dtype, momentum, channels):
    traces = check_running_stats(torch.ops.dip_fast._bn_act_running_stats_update_emulated, stats_dtype, momentum,
                                 channels)
    for blocks, lo, hi in (t.tolist() for t in traces):
        assert blocks == -(-channels // 256) and lo == 1 and hi == 1, "each channel updated once"


@pytest.mark.cuda
@pytest.mark.parametrize("stats_dtype,momentum,channels", RUNNING_CASES)
def test_cuda_running_stats_op_follows_batchnorm(stats_dtype, momentum, channels):
    check_running_stats(torch.ops.dip_fast.bn_act_running_stats_update, stats_dtype, momentum, channels,
                        device="cuda")


# (shape, layout, dtype) -> the vector width the plan must pick when aligned.
VECTOR_CASES = [
    ((1, 8, 16, 16), "contiguous", torch.float32, 4),   # 16-byte vectors, plane of 256
    ((1, 3, 6, 7), "contiguous", torch.float32, 2),     # plane 42: 8-byte vectors only
    ((1, 3, 5, 7), "contiguous", torch.float32, 1),     # odd plane: the scalar path
    ((2, 8, 5, 6), "channels_last", torch.float32, 4),  # C = 8
    ((1, 132, 3, 5), "channels_last", torch.float32, 4),
    ((1, 132, 3, 5), "channels_last", torch.bfloat16, 4),  # 132 % 8 != 0: 8-byte vectors
    ((1, 16, 4, 4), "channels_last", torch.bfloat16, 8),
    ((1, 3, 4, 6), "channels_last", torch.float32, 1),  # C = 3
    ((1, 4, 8, 8), "contiguous", torch.float64, 2),
]


@pytest.mark.parametrize("shape,layout,dtype,vector", VECTOR_CASES)
def test_cuda_grid_emulation_takes_vector_and_scalar_paths(shape, layout, dtype, vector):
    # pad 0 keeps the output plane equal to the input's, so the vector width is
    # decided by the input alone.
    trace_f, trace_b = check_grid_case(run_emulated(0, "reflect"), shape, 0, "reflect", layout, dtype)
    assert trace_f[0] == vector and trace_b[0] == vector
    # The same values one element off a 16-byte boundary take the scalar path
    # and give the same result.
    off = "misaligned_channels_last" if layout == "channels_last" else "misaligned"
    trace_f, trace_b = check_grid_case(run_emulated(0, "reflect"), shape, 0, "reflect", off, dtype)
    assert trace_f[0] == 1 and trace_b[0] == 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_grid_emulation_merges_many_parts(layout):
    """A shape large enough that each channel is reduced in several blocks
    and the finalize kernel merges their partials (lanes and tree)."""
    shape = (2, 4, 64, 48)
    trace_f, trace_b = check_grid_case(run_emulated(1, "reflect"), shape, 1, "reflect", layout, torch.float64)
    assert trace_f[1] > 1 and trace_b[1] > 1, "one part per channel: the merge order went untested"
    assert trace_f[1] == trace_b[1]
    # Deterministic: a second run is bitwise identical.
    x, w, b, g = grid_case_inputs(shape, 1, torch.float64)
    x, g = ladder.as_layout(x, layout), ladder.as_layout(g, layout)
    first, _, _ = emulate(x, w, b, 1, 1, g)
    second, _, _ = emulate(x, w, b, 1, 1, g)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_graph_replay_is_bitwise_eager(layout):
    x, w, b = (t.cuda() for t in make_inputs((2, 32, 33, 31), torch.float32, layout))
    g = torch.randn(2, 32, 35, 33, device="cuda")
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)

    def run():
        y, mean, invstd = torch.ops.dip_fast.bn_act(x, w, b, 1e-5, 0.2, 1, 1)
        return (y, *torch.ops.dip_fast._bn_act_backward(g, x, w, b, mean, invstd, 0.2, 1, 1))

    eager = [t.clone() for t in run()]
    again = run()
    for a, e in zip(again, eager):
        assert torch.equal(a, e), "two eager runs differ: the kernels are not deterministic"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        for a, e in zip(captured, eager):
            assert torch.equal(a, e)
