"""The upsample_cat op family against torch.cat + nn.Upsample(scale_factor=2), up the op-test ladder."""
from __future__ import annotations

import pytest
import torch

from dip_fast.ops.upsample_cat import UPSAMPLE_MODES, upsample_cat
from dip_fast.reference.skip import upsample2x

from . import op_ladder as ladder
from .conftest import requires_extension

pytestmark = requires_extension


def expected(skip, deep, mode):
    """The unfused composition the op replaces."""
    return torch.cat([skip, upsample2x(deep, mode)], dim=1)


def make_inputs(n, cs, cd, h, w, dtype, layout, seed=0):
    g = torch.Generator().manual_seed(seed)
    skip = torch.randn(n, cs, 2 * h, 2 * w, dtype=dtype, generator=g)
    deep = torch.randn(n, cd, h, w, dtype=dtype, generator=g)
    return ladder.as_layout(skip, layout), ladder.as_layout(deep, layout)


def compare(n, cs, cd, h, w, dtype, layout, mode, atol, device="cpu"):
    skip, deep = make_inputs(n, cs, cd, h, w, dtype, layout)
    skip, deep = (t.to(device).requires_grad_(True) for t in (skip, deep))
    grad = torch.randn(n, cs + cd, 2 * h, 2 * w, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad = ladder.as_layout(grad, layout).to(device)
    out, _ = ladder.assert_matches(lambda s, d: upsample_cat(s, d, mode), lambda s, d: expected(s, d, mode),
                                   [skip, deep], grad=grad, atol=atol, names=("skip", "deep"))
    if layout == "channels_last" and cd > 1 and h * w > 1:  # otherwise deep is NCHW-contiguous too
        assert out.is_contiguous(memory_format=torch.channels_last)


# (N, Cs, Cd, h, w): the deep input is h x w, the skip and the output 2h x 2w.
SHAPES = [(1, 4, 8, 8, 8), (2, 3, 5, 7, 9), (1, 0, 3, 4, 5), (1, 2, 3, 1, 5), (3, 1, 2, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_matches_pytorch(shape, layout, mode, dtype, atol):
    compare(*shape, dtype, layout, mode, atol)


def test_paper_level_shape_both_modes():
    """The top level of the paper's network at 64x64: 4 skip channels, 128 upsampled ones."""
    for mode in UPSAMPLE_MODES:
        compare(1, 4, 128, 32, 32, torch.float32, "contiguous", mode, 1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_float32(dtype):
    skip, deep = make_inputs(1, 3, 6, 5, 7, torch.float32, "contiguous")
    out = upsample_cat(skip.to(dtype), deep.to(dtype), "bilinear")
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected(skip, deep, "bilinear"), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_gradcheck_float64(layout, mode):
    skip, deep = make_inputs(2, 2, 3, 3, 4, torch.float64, layout)
    ladder.gradcheck(lambda s, d: upsample_cat(s, d, mode), [skip.requires_grad_(True), deep.requires_grad_(True)])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(layout):
    skip, deep = make_inputs(2, 3, 4, 3, 5, torch.float32, layout)
    args = (skip.requires_grad_(True), deep.requires_grad_(True), 1)
    grad = ladder.as_layout(torch.randn(2, 7, 6, 10), layout)
    ladder.opcheck((torch.ops.dip_fast.upsample_cat.default, args),
                   (torch.ops.dip_fast._upsample_cat_backward.default, (grad, 3, 1)))


def test_torch_compile_traces_the_op():
    skip, deep = make_inputs(1, 2, 3, 4, 4, torch.float32, "contiguous")
    ladder.compiles(lambda s, d: upsample_cat(s, d, "bilinear") * 2, [skip, deep],
                    expected=expected(skip, deep, "bilinear") * 2, atol=1e-5, rtol=1.3e-6)


def test_bad_arguments():
    skip, deep = make_inputs(1, 2, 3, 4, 4, torch.float32, "contiguous")
    with pytest.raises(ValueError, match="mode must be one of"):
        upsample_cat(skip, deep, "bicubic")
    with pytest.raises(ValueError, match=r"skip must have shape \(1, Cs, 8, 8\)"):
        upsample_cat(skip[..., 1:], deep)
    with pytest.raises(ValueError, match="deep must be a non-empty 4-D"):
        upsample_cat(skip, deep[0])
    with pytest.raises(ValueError, match="share dtype"):
        upsample_cat(skip.double(), deep)
    with pytest.raises(TypeError, match="floating-point"):
        upsample_cat(skip.long(), deep)
    # The compiled op validates on its own too.
    with pytest.raises(RuntimeError, match="upsample mode"):
        torch.ops.dip_fast.upsample_cat(skip, deep, 5)
    with pytest.raises(RuntimeError, match="must be even"):
        torch.ops.dip_fast._upsample_cat_backward(torch.randn(1, 5, 7, 8), 2, 1)
    with pytest.raises(RuntimeError, match="skip_channels"):
        torch.ops.dip_fast._upsample_cat_backward(torch.randn(1, 5, 8, 8), 5, 1)


@pytest.mark.slow
def test_fuzz_against_pytorch():
    def check(n, cs, cd, h, w, layout, dtype, mode):
        compare(n, cs, cd, h, w, dtype, layout, mode, 1e-12 if dtype == torch.float64 else 2e-6)

    ladder.fuzz(check, n=(1, 3), cs=(0, 5), cd=(1, 9), h=(1, 11), w=(1, 11),
                layout=["contiguous", "channels_last", "sliced"], dtype=[torch.float32, torch.float64],
                mode=["nearest", "bilinear"])


@pytest.mark.cuda
@pytest.mark.parametrize("shape", SHAPES + [(1, 4, 128, 64, 64)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_cuda_matches_pytorch(shape, layout, mode, dtype, atol):
    compare(*shape, dtype, layout, mode, atol, device="cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    skip, deep = make_inputs(2, 4, 9, 7, 11, torch.float32, "channels_last")
    grad = torch.randn(2, 13, 14, 22)
    tol = 1e-6 if dtype == torch.float32 else 0.02
    inputs = [skip.requires_grad_(True), deep.requires_grad_(True)]
    ladder.cuda_twin(lambda s, d: upsample_cat(s, d, "bilinear"), inputs, grad=grad, dtype=dtype, atol=tol)


# ---------------------------------------------------------------------------
# The CUDA kernels' per-thread code, run over their launch grid on the CPU.
# The emulation ops return a trace [V, fewest writes, most writes].
# ---------------------------------------------------------------------------
def check_emulation(skip, deep, mode, atol):
    """Emulated forward and backward against PyTorch; every output element written once. Returns the traces."""
    code = UPSAMPLE_MODES[mode]
    out, trace_f = torch.ops.dip_fast._upsample_cat_emulated(skip, deep, code)
    sr, dr = (t.detach().double().clone().requires_grad_(True) for t in (skip, deep))
    want_out = expected(sr, dr, mode)
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=atol)
    grad = torch.randn(want_out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grad_in = grad.to(out.dtype)
    if out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous():
        grad_in = grad_in.contiguous(memory_format=torch.channels_last)
    gs, gd, trace_b = torch.ops.dip_fast._upsample_cat_backward_emulated(grad_in, skip.shape[1], code)
    want = torch.autograd.grad(want_out, (sr, dr), grad, allow_unused=True)
    for name, a, e in zip(("skip", "deep"), (gs, gd), want):
        if e is not None and e.numel():
            torch.testing.assert_close(a.double(), e, atol=atol, rtol=atol, msg=f"gradient of {name}")
    for trace in (trace_f.tolist(), trace_b.tolist()):
        assert trace[1] == 1 and trace[2] == 1, f"outputs written {trace[1]}..{trace[2]} times, not once"
    return trace_f.tolist(), trace_b.tolist()


@pytest.mark.parametrize("shape", SHAPES + [(1, 4, 128, 3, 5), (2, 8, 4, 5, 6)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_cuda_grid_emulation_matches_pytorch(shape, layout, mode):
    skip, deep = make_inputs(*shape, torch.float64, layout)
    check_emulation(skip, deep, mode, 1e-12)


def misaligned(t):
    """The same values, on t's device, in storage one element past a 16-byte boundary (same layout)."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        n, c, h, w = t.shape
        view = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


# (shape, layout, dtype) -> the vector width the plan must pick when aligned.
VECTOR_CASES = [
    ((1, 4, 8, 8, 8), "contiguous", torch.float32, 4),    # deep planes of 64
    ((1, 2, 3, 3, 3), "contiguous", torch.float32, 1),    # deep planes of 9
    ((1, 4, 8, 3, 6), "channels_last", torch.float32, 4),  # Cs = 4, Cd = 8
    ((1, 6, 2, 3, 3), "channels_last", torch.float32, 2),  # Cs = 6: 8-byte vectors
    ((1, 16, 8, 2, 3), "channels_last", torch.bfloat16, 8),
    ((1, 3, 4, 2, 2), "channels_last", torch.float32, 1),  # Cs = 3
]


@pytest.mark.parametrize("shape,layout,dtype,vector", VECTOR_CASES)
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_cuda_grid_emulation_takes_vector_and_scalar_paths(shape, layout, dtype, vector, mode):
    skip, deep = make_inputs(*shape, torch.float64, layout)
    skip, deep = skip.to(dtype), deep.to(dtype)
    atol = 1e-6 if dtype == torch.float32 else 0.02
    trace_f, trace_b = check_emulation(skip, deep, mode, atol)
    assert trace_f[0] == vector and trace_b[0] == vector
    trace_f, _ = check_emulation(misaligned(skip), misaligned(deep), mode, atol)
    assert trace_f[0] == 1


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8, 8), (2, 3, 5, 7, 9), (1, 16, 8, 5, 6)])
@pytest.mark.parametrize("offset", [False, True], ids=["aligned", "misaligned"])
def test_cuda_equals_grid_emulation_bitwise(layout, dtype, shape, offset):
    skip, deep = (t.to(dtype) for t in make_inputs(*shape, torch.float32, layout))
    grad = ladder.as_layout(torch.randn(shape[0], shape[1] + shape[2], 2 * shape[3], 2 * shape[4]), layout).to(dtype)
    move = (lambda t: misaligned(t)) if offset else (lambda t: t)
    want_out, _ = torch.ops.dip_fast._upsample_cat_emulated(move(skip), move(deep), 1)
    want_gs, want_gd, _ = torch.ops.dip_fast._upsample_cat_backward_emulated(move(grad), shape[1], 1)
    out = torch.ops.dip_fast.upsample_cat(move(skip.cuda()), move(deep.cuda()), 1)
    gs, gd = torch.ops.dip_fast._upsample_cat_backward(move(grad.cuda()), shape[1], 1)
    for name, got, exp in (("out", out, want_out), ("grad_skip", gs, want_gs), ("grad_deep", gd, want_gd)):
        assert torch.equal(got.cpu(), exp), f"{name} differs from the emulated grid"
