"""The separable downsampling op (downsample) against the reference Downsampler.

The ground truth is ``dip_fast.reference.Downsampler`` (the paper's dense
diagonal conv2d after ReplicationPad2d), evaluated in float64 so that the
float32 op is checked against the exact result rather than against another
float32 rounding: the reference's own float32 error (a K*K-term sum) reaches
about 2e-6 for lanczos3 at x8, ten times the op's. Poison mode (conftest) fills
every output with NaN before the kernel runs, so an element a kernel skips
fails these comparisons.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import zlib

import pytest
import torch

from dip_fast import _ops, ops
from dip_fast.reference import Downsampler

from . import op_ladder as ladder

# By module path: the package attribute dip_fast.ops.downsample is the function.
family = importlib.import_module("dip_fast.ops.downsample")

pytestmark = pytest.mark.skipif(
    not _ops.has_ops("downsample", "_downsample_backward"),
    reason=f"extension not built or lacks the downsample ops: {_ops.LOAD_ERROR}",
)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: on a shared 2-core machine, thread hand-offs cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# Every (kernel, phase) the reference accepts among its named kernels.
KERNEL_PHASES = [
    ("lanczos2", 0.0),
    ("lanczos2", 0.5),
    ("lanczos3", 0.0),
    ("lanczos3", 0.5),
    ("gauss12", 0.0),
    ("gauss1sq2", 0.0),
    ("box", 0.5),
]
FACTORS = [2, 3, 4, 8]
ATOL = 2e-6


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def reference64(x: torch.Tensor, g: torch.Tensor, factor: int, kernel: str, phase: float, preserve_size: bool):
    """Output and input gradient of the reference Downsampler in float64 (exact weights)."""
    with default_dtype(torch.float64):
        ref = Downsampler(x.shape[1], factor, kernel, phase=phase, preserve_size=preserve_size)
    xr = x.detach().double().requires_grad_(True)
    y = ref(xr)
    (gx,) = torch.autograd.grad(y, xr, g.double())
    return y.detach(), gx


def op_with_grad(x: torch.Tensor, g: torch.Tensor, **kwargs):
    x = x.detach().requires_grad_(True)
    y = ops.downsample(x, **kwargs)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx


def kernel_size(factor: int, kernel: str, phase: float) -> int:
    taps, _ = ops.downsample_taps(factor, kernel, phase)
    return taps.numel()


def test_poison_mode_is_on():
    assert _ops._C.poison_outputs()


@pytest.mark.parametrize("preserve_size", [True, False], ids=["preserve", "valid"])
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("kernel,phase", KERNEL_PHASES, ids=[f"{k}-{p:g}" for k, p in KERNEL_PHASES])
def test_matches_reference(kernel, phase, factor, preserve_size):
    k = kernel_size(factor, kernel, phase)
    # The same inputs in every process (hash() of a str changes per process), different per case.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kernel}-{phase}-{factor}-{preserve_size}".encode()))
    # Odd sizes a few pixels past the kernel, batch 2, 4 channels.
    h, w = max(k, 5) + 2 * factor + 1, max(k, 5) + factor + 2
    x = torch.rand(2, 4, h, w, generator=gen)
    with default_dtype(torch.float64):
        ref = Downsampler(4, factor, kernel, phase=phase, preserve_size=preserve_size)
    out_shape = ref(x.double()).shape
    g = torch.rand(out_shape, generator=gen)
    y_ref, gx_ref = reference64(x, g, factor, kernel, phase, preserve_size)
    y, gx = op_with_grad(x, g, factor=factor, kernel=kernel, phase=phase, preserve_size=preserve_size)
    assert y.shape == y_ref.shape and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kernel,phase", [("lanczos2", 0.5), ("lanczos3", 0.0), ("gauss1sq2", 0.0)])
def test_matches_float32_reference(kernel, phase):
    """Against the reference as the paper runs it (float32): within the reference's own rounding."""
    gen = torch.Generator().manual_seed(1)
    ref = Downsampler(3, 4, kernel, phase=phase, preserve_size=True)
    x = torch.rand(1, 3, 45, 38, generator=gen, requires_grad=True)
    y_ref = ref(x)
    g = torch.rand(y_ref.shape, generator=gen)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    y, gx = op_with_grad(x, g, factor=4, kernel=kernel, phase=phase, preserve_size=True)
    torch.testing.assert_close(y, y_ref.detach(), rtol=0, atol=4e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=4e-6)


@pytest.mark.parametrize(
    "shape,factor,kernel,phase,preserve_size",
    [
        ((3, 5, 29, 31), 2, "lanczos2", 0.5, True),
        ((1, 1, 7, 9), 4, "lanczos2", 0.5, True),  # image smaller than the kernel: all clamped
        ((2, 2, 1, 13), 2, "lanczos2", 0.0, True),  # a single row
        ((1, 7, 70, 4), 3, "lanczos3", 0.5, True),  # 4 + 2 * 7 = 18 taps exactly
        ((4, 3, 33, 17), 8, "gauss12", 0.0, False),  # factor > K: untouched input pixels
        ((1, 6, 40, 41), 3, "box", 0.5, True),
        ((1, 2, 9, 1), 3, "box", 0.5, True),  # a single column
        ((2, 3, 1, 1), 3, "box", 0.5, True),  # a single pixel
        ((2, 1, 50, 97), 8, "lanczos2", 0.0, False),
    ],
)
def test_odd_shapes(shape, factor, kernel, phase, preserve_size):
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(shape, generator=gen)
    with default_dtype(torch.float64):
        out_shape = Downsampler(shape[1], factor, kernel, phase=phase, preserve_size=preserve_size)(x.double()).shape
    g = torch.rand(out_shape, generator=gen)
    y_ref, gx_ref = reference64(x, g, factor, kernel, phase, preserve_size)
    y, gx = op_with_grad(x, g, factor=factor, kernel=kernel, phase=phase, preserve_size=preserve_size)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=0, atol=ATOL)


def test_untouched_pixels_get_zero_gradient():
    """gauss12 has 7 taps: at x8 without padding, 1 of 8 columns is never read."""
    x = torch.rand(1, 2, 23, 31, requires_grad=True)
    y = ops.downsample(x, 8, "gauss12", phase=0, preserve_size=False)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert not torch.isnan(gx).any()
    assert (gx[..., 7::8] == 0).all() and (gx[..., 7::8, :] == 0).all()
    assert (gx[..., :7, :7] > 0).all()


@pytest.mark.parametrize("layout", ladder.LAYOUTS)
@pytest.mark.parametrize("channels", [3, 5])
def test_layouts(layout, channels):
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(2, channels, 41, 37, generator=gen)
    x = ladder.as_layout(base, layout)
    assert torch.equal(x, base)
    with default_dtype(torch.float64):
        y_ref0 = Downsampler(channels, 3, "lanczos2", phase=0.5, preserve_size=True)(base.double())
    g = torch.rand(y_ref0.shape, generator=gen)
    y_ref, gx_ref = reference64(base, g, 3, "lanczos2", 0.5, True)
    g_in = g.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else g
    y, gx = op_with_grad(x, g_in, factor=3, kernel="lanczos2", phase=0.5, preserve_size=True)
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=0, atol=ATOL)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert gx.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cpu(dtype):
    """Half inputs accumulate in float32: equal to the float32 op on the rounded input, up to the output rounding."""
    x = torch.rand(1, 3, 40, 44).to(dtype)
    g = torch.rand(1, 3, 10, 11).to(dtype)
    y, gx = op_with_grad(x, g, factor=4)
    y32, gx32 = op_with_grad(x.float(), g.float(), factor=4)
    assert y.dtype == dtype and gx.dtype == dtype
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    torch.testing.assert_close(y.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), gx32, rtol=tol, atol=tol * 0.1)


def test_float64_matches_reference_closely():
    x = torch.rand(2, 3, 27, 30, dtype=torch.float64)
    g = torch.rand(2, 3, 6, 7, dtype=torch.float64)
    y_ref, gx_ref = reference64(x, g, 4, "lanczos3", 0.5, True)
    y, gx = op_with_grad(x, g, factor=4, kernel="lanczos3", phase=0.5, preserve_size=True)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize(
    "factor,kernel,phase,preserve_size",
    [(2, "lanczos2", 0.5, True), (3, "lanczos2", 0.0, True), (2, "gauss12", 0.0, False), (3, "box", 0.5, True)],
)
def test_gradcheck_float64(factor, kernel, phase, preserve_size):
    k = kernel_size(factor, kernel, phase)
    shape = (1, 2, 5, 7) if preserve_size else (1, 2, k + 3, k + 2)
    x = torch.rand(shape, dtype=torch.float64, requires_grad=True)

    def fn(t):
        return ops.downsample(t, factor, kernel, phase, preserve_size)

    ladder.gradcheck(fn, [x])


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_opcheck(memory_format):
    taps, pad = ops.downsample_taps(2, "lanczos2", 0.5)
    taps = taps.float()
    x = torch.rand(2, 3, 11, 9).contiguous(memory_format=memory_format).requires_grad_(True)
    y = torch.ops.dip_fast.downsample(x.detach(), taps, 2, pad)
    g = torch.rand(y.shape).contiguous(memory_format=memory_format).requires_grad_(True)
    ladder.opcheck((torch.ops.dip_fast.downsample.default, (x, taps, 2, pad)),
                   (torch.ops.dip_fast._downsample_backward.default, (g, taps, 2, pad, 11, 9)))


def test_torch_compile_fullgraph():
    m = ops.Downsample(3, 4, "lanczos2", phase=0.5, preserve_size=True)
    mc = torch.compile(m, fullgraph=True)
    x = torch.rand(1, 3, 33, 35, requires_grad=True)
    y = mc(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    y0 = m(x)
    (gx0,) = torch.autograd.grad(y0.square().sum(), x)
    torch.testing.assert_close(y, y0, rtol=0, atol=0)
    torch.testing.assert_close(gx, gx0, rtol=1e-6, atol=1e-7)


def test_deterministic_across_thread_counts():
    x = torch.rand(2, 3, 70, 90)
    g = torch.rand(2, 3, 17, 22)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, gx1 = op_with_grad(x, g, factor=4)
        torch.set_num_threads(max(2, threads))
        y2, gx2 = op_with_grad(x, g, factor=4)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)


def test_module_matches_reference_module():
    ref = Downsampler(4, 2, "lanczos3", phase=0.5, preserve_size=True)
    fast = ops.Downsample(4, 2, "lanczos3", phase=0.5, preserve_size=True)
    assert fast.pad == ref.pad and fast.kernel_size == ref.kernel.shape[0]
    torch.testing.assert_close(torch.from_numpy(fast.kernel_1d), torch.from_numpy(ref.kernel_1d), rtol=0, atol=0)
    torch.testing.assert_close(torch.from_numpy(fast.kernel), torch.from_numpy(ref.kernel), rtol=1e-12, atol=1e-15)
    assert fast.state_dict() == {} and list(fast.parameters()) == []
    x = torch.rand(1, 4, 19, 24)
    torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=4e-6)
    assert "lanczos3" in repr(fast)


def test_generic_kernels_with_explicit_parameters():
    x = torch.rand(1, 2, 30, 30)
    for kw in (dict(kernel_type="lanczos", kernel_width=9, support=2), dict(kernel_type="gauss", kernel_width=5, sigma=0.8)):
        phase = 0.5 if kw["kernel_type"] == "lanczos" else 0
        with default_dtype(torch.float64):
            ref = Downsampler(2, 2, phase=phase, preserve_size=True, **kw)
        fast = ops.Downsample(2, 2, phase=phase, preserve_size=True, **kw)
        torch.testing.assert_close(fast(x).double(), ref(x.double()), rtol=0, atol=ATOL)


def test_taps_are_cached_per_device_and_dtype():
    x = torch.rand(1, 1, 20, 20)
    ops.downsample(x, 2)
    before = family._taps_cached.cache_info().hits
    ops.downsample(x, 2)
    assert family._taps_cached.cache_info().hits == before + 1
    taps, pad = ops.downsample_taps(4, "lanczos2", 0.5)
    assert taps.dtype == torch.float64 and taps.numel() == 16 and pad == 6
    torch.testing.assert_close(taps.sum(), torch.tensor(1.0, dtype=torch.float64))


# ---------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(factor=0), ValueError, "factor"),
        (dict(factor=-2), ValueError, "factor"),
        (dict(factor=2.0), TypeError, "factor"),
        (dict(factor=True), TypeError, "factor"),
        (dict(factor="2"), TypeError, "factor"),
        (dict(factor=2, kernel="lanczos4"), ValueError, "kernel"),
        (dict(factor=2, kernel="gauss12", phase=0.5), ValueError, "phase"),
        (dict(factor=2, kernel="gauss1sq2", phase=0.5), ValueError, "phase"),
        (dict(factor=2, kernel="box", phase=0), ValueError, "phase"),
        (dict(factor=2, phase=0.25), ValueError, "phase"),
        (dict(factor=4, kernel="lanczos", phase=0.5), ValueError, "kernel_width"),
        (dict(factor=4, kernel="lanczos2", kernel_width=5), ValueError, "kernel_width"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ops.downsample(torch.rand(1, 3, 32, 32), **kwargs)


def test_bad_inputs():
    with pytest.raises(TypeError, match="x"):
        ops.downsample([[1.0]], 2)
    with pytest.raises(TypeError, match="x"):
        ops.downsample(torch.ones(1, 1, 16, 16, dtype=torch.int64), 2)
    with pytest.raises(TypeError, match="x"):
        ops.downsample(torch.ones(1, 1, 16, 16, dtype=torch.complex64), 2)
    with pytest.raises(ValueError, match="x must be 4-D"):
        ops.downsample(torch.rand(3, 16, 16), 2)
    # Without preserve_size the image must cover the kernel (16 taps here).
    with pytest.raises(ValueError, match="x is 15x40"):
        ops.downsample(torch.rand(1, 1, 15, 40), 4, preserve_size=False)
    ops.downsample(torch.rand(1, 1, 16, 40), 4, preserve_size=False)
    # With preserve_size 2 * pad + H must still cover it.
    with pytest.raises(ValueError, match="x is 3x20"):
        ops.downsample(torch.rand(1, 1, 3, 20), 4, "box", preserve_size=True)
    with pytest.raises(ValueError, match="n_planes"):
        ops.Downsample(3, 2, "lanczos2")(torch.rand(1, 4, 16, 16))
    with pytest.raises(ValueError, match="n_planes"):
        ops.Downsample(0, 2, "lanczos2")


def test_cpp_checks():
    op = torch.ops.dip_fast.downsample
    bwd = torch.ops.dip_fast._downsample_backward
    x = torch.rand(1, 2, 12, 12)
    taps = torch.full((4,), 0.25)
    assert op(x, taps, 2, 1).shape == (1, 2, 6, 6)
    with pytest.raises(RuntimeError, match="taps must be Float"):
        op(x, taps.double(), 2, 1)
    with pytest.raises(RuntimeError, match="taps must be 1-D"):
        op(x, taps.view(2, 2), 2, 1)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        op(x[0], taps, 2, 1)
    with pytest.raises(RuntimeError, match="x must be a floating-point"):
        op(x.int(), taps, 2, 1)
    with pytest.raises(RuntimeError, match="factor must be >= 1"):
        op(x, taps, 0, 1)
    with pytest.raises(RuntimeError, match="pad must be >= 0"):
        op(x, taps, 2, -1)
    with pytest.raises(RuntimeError, match="smaller than the kernel"):
        op(torch.rand(1, 2, 2, 12), taps, 2, 0)
    with pytest.raises(RuntimeError, match="grad_out must be 6x6"):
        bwd(torch.rand(1, 2, 5, 6), taps, 2, 1, 12, 12)
    with pytest.raises(RuntimeError, match="taps must be Double"):
        bwd(torch.rand(1, 2, 6, 6, dtype=torch.float64), taps, 2, 1, 12, 12)


# ---------------------------------------------------------------------------
# Fuzzing (slow)
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_fuzz_against_reference():
    def check(kp, factor, preserve_size, n, c, extra_h, extra_w, channels_last, seed):
        kernel, phase = kp
        k = kernel_size(factor, kernel, phase)
        _, pad = ops.downsample_taps(factor, kernel, phase)
        low = max(1, k - 2 * pad) if preserve_size else k
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(n, c, low + extra_h, low + extra_w, generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with default_dtype(torch.float64):
            shape = Downsampler(c, factor, kernel, phase=phase, preserve_size=preserve_size)(x.double()).shape
        g = torch.rand(shape, generator=gen)
        y_ref, gx_ref = reference64(x, g, factor, kernel, phase, preserve_size)
        y, gx = op_with_grad(x, g, factor=factor, kernel=kernel, phase=phase, preserve_size=preserve_size)
        torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(gx.double(), gx_ref, rtol=0, atol=ATOL)

    ladder.fuzz(check, kp=KERNEL_PHASES, factor=(1, 8), preserve_size=bool, n=(1, 3), c=(1, 5), extra_h=(0, 60),
                extra_w=(0, 60), channels_last=bool, seed=(0, 2**31 - 1))


# ---------------------------------------------------------------------------
# The GPU's cases, run on the CPU too. The CUDA kernels' per-thread phases run
# over their launch grid on the CPU (the emulation ops, which also return a
# trace [blocks, shared bytes, fewest writes, most writes]). Every case of
# GRID_CASES runs three ways: on the GPU against the float64 reference,
# through the emulation against the same reference, and on the GPU against
# the emulation bit for bit; one list, so what the GPU is checked on and what
# the CPU checks cannot drift apart.
# ---------------------------------------------------------------------------


def odd_shape(kernel: str, phase: float, factor: int) -> tuple:
    """Two images of 5 channels a few odd pixels past the kernel (valid without preserve_size too)."""
    k = kernel_size(factor, kernel, phase)
    return (2, 5, k + 2 * factor + 7, k + 3 * factor + 2)


GRID_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: (kernel, phase, factor, preserve_size, shape, layout, dtype).
GRID_CASES = (
    # Every named kernel and phase at every factor, both paddings, in every dtype.
    [ladder.case(kernel, phase, factor, preserve, odd_shape(kernel, phase, factor), "contiguous", dtype)
     for (kernel, phase), factor, preserve, dtype in itertools.product(KERNEL_PHASES, FACTORS, [True, False],
                                                                       GRID_DTYPES)]
    # Every layout in every dtype, over several forward (8 x 32) and backward (32 x 32) tiles.
    + ladder.cases(["lanczos2"], [0.5], [4], [True], [(2, 3, 70, 141)],
                   ladder.KERNEL_LAYOUTS + ("non_contiguous", "sliced"), GRID_DTYPES)
    # More planes than the grid's z dimension holds (65,535): the kernels loop over planes.
    + ladder.cases(["lanczos2"], [0.5], [2], [True], [(70000, 1, 4, 4)], ["contiguous"], [torch.float32])
)


def grid_case_inputs(kernel, phase, factor, preserve_size, shape, dtype):
    """x and an output gradient of a grid case, in dtype (contiguous, on the CPU): the values every run
    and the reference see."""
    gen = torch.Generator().manual_seed(11)
    x = torch.rand(shape, generator=gen, dtype=torch.float64)
    _, pad = ops.downsample_taps(factor, kernel, phase)
    k = kernel_size(factor, kernel, phase)
    pad = pad if preserve_size else 0
    ho, wo = ((s + 2 * pad - k) // factor + 1 for s in shape[2:])
    g = torch.rand(shape[0], shape[1], ho, wo, generator=gen, dtype=torch.float64)
    return x.to(dtype), g.to(dtype)


def check_grid_case(run, kernel, phase, factor, preserve_size, shape, layout, dtype, device="cpu"):
    """``run(x, g)`` (in ``layout`` on ``device``; g in channels_last when x is) returns (y, grad_x, traces
    or None); both against the float64 reference Downsampler on the same rounded inputs (absolute error
    ATOL in float32, the dtype's rounding in float16 and bfloat16). Traces must show every element written
    once. Returns the traces."""
    x, g = grid_case_inputs(kernel, phase, factor, preserve_size, shape, dtype)
    want_y, want_gx = reference64(x, g, factor, kernel, phase, preserve_size)
    xd = ladder.as_layout(x.to(device), layout)
    gd = ladder.as_layout(g.to(device), "channels_last" if layout.endswith("channels_last") else "contiguous")
    y, gx, traces = run(xd, gd)
    tol = ladder.rounding_tolerance(dtype, 1e-13, ATOL)
    rtol = tol if dtype in ladder.HALF_DTYPES else 0.0
    assert y.dtype == dtype and gx.dtype == dtype
    torch.testing.assert_close(y.cpu().double(), want_y, rtol=rtol, atol=tol)
    torch.testing.assert_close(gx.cpu().double(), want_gx, rtol=rtol, atol=tol)
    if layout.endswith("channels_last") and shape[1] > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for trace in traces or ():
        assert trace[2] == 1 and trace[3] == 1, f"outputs written {trace[2]}..{trace[3]} times, not once"
    return traces


def grid_taps(factor, kernel, phase, dtype, device="cpu"):
    """The taps and pad the compiled ops take for x in dtype (float64 for float64, else float32)."""
    taps, pad = ops.downsample_taps(factor, kernel, phase)
    return taps.to(device, torch.float64 if dtype == torch.float64 else torch.float32), pad


def run_emulated(kernel, phase, factor, preserve_size):
    """The emulation ops: (y, grad_x, [forward trace, backward trace])."""
    def run(x, g):
        taps, pad = grid_taps(factor, kernel, phase, x.dtype)
        pad = pad if preserve_size else 0
        y, trace_f = torch.ops.dip_fast._downsample_emulated(x, taps, factor, pad)
        gx, trace_b = torch.ops.dip_fast._downsample_backward_emulated(g, taps, factor, pad, x.shape[2], x.shape[3])
        return y, gx, [trace_f.tolist(), trace_b.tolist()]
    return run


def run_op(kernel, phase, factor, preserve_size):
    """The public op with autograd, on the inputs' device: (y, grad_x, None)."""
    def run(x, g):
        y, gx = op_with_grad(x, g, factor=factor, kernel=kernel, phase=phase, preserve_size=preserve_size)
        return y, gx, None
    return run


GRID_ARGS = "kernel,phase,factor,preserve_size,shape,layout,dtype"


@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_grid_emulation_matches_reference(kernel, phase, factor, preserve_size, shape, layout, dtype):
    check_grid_case(run_emulated(kernel, phase, factor, preserve_size), kernel, phase, factor, preserve_size, shape,
                    layout, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_matches_reference(kernel, phase, factor, preserve_size, shape, layout, dtype):
    check_grid_case(run_op(kernel, phase, factor, preserve_size), kernel, phase, factor, preserve_size, shape,
                    layout, dtype, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_equals_grid_emulation_bitwise(kernel, phase, factor, preserve_size, shape, layout, dtype):
    """The GPU computes exactly what the emulation computes (same plan, no multiply-add contraction)."""
    x, g = grid_case_inputs(kernel, phase, factor, preserve_size, shape, dtype)
    _, pad = ops.downsample_taps(factor, kernel, phase)
    pad = pad if preserve_size else 0
    g_layout = "channels_last" if layout.endswith("channels_last") else "contiguous"
    results = []
    for device in ("cpu", "cuda"):
        taps, _ = grid_taps(factor, kernel, phase, dtype, device)
        xd, gd = ladder.as_layout(x.to(device), layout), ladder.as_layout(g.to(device), g_layout)
        if device == "cpu":
            y, _ = torch.ops.dip_fast._downsample_emulated(xd, taps, factor, pad)
            gx, _ = torch.ops.dip_fast._downsample_backward_emulated(gd, taps, factor, pad, *shape[2:])
        else:
            y = torch.ops.dip_fast.downsample(xd, taps, factor, pad)
            gx = torch.ops.dip_fast._downsample_backward(gd, taps, factor, pad, *shape[2:])
        results.append((y.cpu(), gx.cpu()))
    (want_y, want_gx), (y, gx) = results
    assert torch.equal(y, want_y), "the output differs from the emulated grid"
    assert torch.equal(gx, want_gx), "the input gradient differs from the emulated grid"


@pytest.mark.cuda
def test_cuda_deterministic_and_opcheck():
    x = torch.rand(3, 4, 129, 77, device="cuda")
    g = torch.rand(3, 4, 32, 19, device="cuda")
    a = op_with_grad(x, g, factor=4)
    b = op_with_grad(x, g, factor=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    taps, pad = ops.downsample_taps(2, "lanczos3", 0.5)
    taps = taps.float().cuda()
    xs = torch.rand(2, 3, 21, 18, device="cuda", requires_grad=True)
    gs = torch.rand(2, 3, 10, 9, device="cuda")
    ladder.opcheck((torch.ops.dip_fast.downsample.default, (xs, taps, 2, pad)),
                   (torch.ops.dip_fast._downsample_backward.default, (gs, taps, 2, pad, 21, 18)))


def _emulated(x, g, factor, kernel="lanczos3", phase=0.5):
    taps, pad = grid_taps(factor, kernel, phase, x.dtype)
    y, trace_f = torch.ops.dip_fast._downsample_emulated(x, taps, factor, pad)
    gx, trace_b = torch.ops.dip_fast._downsample_backward_emulated(g, taps, factor, pad, x.shape[2], x.shape[3])
    want_y = torch.ops.dip_fast.downsample(x, taps, factor, pad)
    want_gx = torch.ops.dip_fast._downsample_backward(g, taps, factor, pad, x.shape[2], x.shape[3])
    return (y, gx), (want_y, want_gx), trace_f.tolist(), trace_b.tolist()


@pytest.mark.parametrize("shape", [(1, 3, 37, 29), (2, 2, 70, 41), (1, 4, 20, 35)])
@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_grid_emulation_matches_cpu_op(shape, factor, layout):
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(*shape, generator=gen, dtype=torch.float64)
    taps, pad = ops.downsample_taps(factor, "lanczos3", 0.5)
    ho, wo = ((s + 2 * pad - taps.numel()) // factor + 1 for s in shape[2:])
    g = torch.rand(shape[0], shape[1], ho, wo, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x, g = (t.contiguous(memory_format=torch.channels_last) for t in (x, g))
    (y, gx), (want_y, want_gx), trace_f, trace_b = _emulated(x, g, factor)
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-13)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=1e-13)
    for trace in (trace_f, trace_b):
        assert trace[2] == 1 and trace[3] == 1, f"outputs written {trace[2]}..{trace[3]} times, not once"
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_cuda_grid_emulation_several_tiles_and_planes():
    """A forward tile of 32 columns and a backward tile of 32 rows are exceeded,
    so blocks meet at tile edges; the float32 path rounds like the CPU op."""
    gen = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 150, 140, generator=gen)
    g = torch.rand(2, 3, 75, 70, generator=gen)
    (y, gx), (want_y, want_gx), trace_f, trace_b = _emulated(x, g, 2)
    assert trace_f[0] > 1 and trace_b[0] > 1
    torch.testing.assert_close(y, want_y, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, want_gx, rtol=0, atol=1e-6)
