"""The upsample_cat op family against torch.cat + nn.Upsample(scale_factor=2), up the op-test ladder.

Shapes give the channel counts of one group; ``groups=G`` (packed networks)
multiplies both by G, and the reference concatenates per group.
"""
from __future__ import annotations

import pytest
import torch

from dip_fast.ops.upsample_cat import UPSAMPLE_MODES, upsample_cat
from dip_fast.reference.skip import upsample2x

from . import op_ladder as ladder
from .conftest import requires_extension

# Small tensors: on a shared 2-core machine, thread hand-offs cost more than they save.
pytestmark = [requires_extension, pytest.mark.usefixtures("one_thread")]


def expected(skip, deep, mode, groups=1):
    """The unfused composition the op replaces: per group, that group's skip channels then its upsampled deep ones."""
    up = upsample2x(deep, mode)
    if groups == 1:
        return torch.cat([skip, up], dim=1)
    n, _, hh, ww = up.shape
    cs, cd = skip.shape[1] // groups, up.shape[1] // groups
    cat = torch.cat([skip.reshape(n, groups, cs, hh, ww), up.reshape(n, groups, cd, hh, ww)], dim=2)
    return cat.reshape(n, groups * (cs + cd), hh, ww)


def make_inputs(n, cs, cd, h, w, dtype, layout, seed=0, groups=1):
    """skip (n, groups*cs, 2h, 2w) and deep (n, groups*cd, h, w): cs and cd count one group's channels."""
    g = torch.Generator().manual_seed(seed)
    skip = torch.randn(n, groups * cs, 2 * h, 2 * w, dtype=dtype, generator=g)
    deep = torch.randn(n, groups * cd, h, w, dtype=dtype, generator=g)
    return ladder.as_layout(skip, layout), ladder.as_layout(deep, layout)


def compare(n, cs, cd, h, w, dtype, layout, mode, atol, device="cpu", groups=1):
    skip, deep = make_inputs(n, cs, cd, h, w, dtype, layout, groups=groups)
    skip, deep = (t.to(device).requires_grad_(True) for t in (skip, deep))
    grad = torch.randn(n, groups * (cs + cd), 2 * h, 2 * w, dtype=dtype, generator=torch.Generator().manual_seed(1))
    grad = ladder.as_layout(grad, layout).to(device)
    out, _ = ladder.assert_matches(lambda s, d: upsample_cat(s, d, mode, groups),
                                   lambda s, d: expected(s, d, mode, groups),
                                   [skip, deep], grad=grad, atol=atol, names=("skip", "deep"))
    if layout == "channels_last" and groups * cd > 1 and h * w > 1:  # otherwise deep is NCHW-contiguous too
        assert out.is_contiguous(memory_format=torch.channels_last)


# (N, Cs, Cd, h, w): the deep input is h x w, the skip and the output 2h x 2w; Cs, Cd per group.
SHAPES = [(1, 4, 8, 8, 8), (2, 3, 5, 7, 9), (1, 0, 3, 4, 5), (1, 2, 3, 1, 5), (3, 1, 2, 1, 1)]
#: Packed networks: the plain op, and 2 and 3 groups (3 puts a group boundary inside 8- and 16-byte vectors).
GROUPS = [1, 2, 3]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("groups", GROUPS)
def test_matches_pytorch(shape, layout, mode, dtype, atol, groups):
    compare(*shape, dtype, layout, mode, atol, groups=groups)


@pytest.mark.parametrize("layout", ["non_contiguous", "cropped"])
@pytest.mark.parametrize("groups", GROUPS)
def test_matches_pytorch_strided_inputs(layout, groups):
    """The other strided layouts of the ladder: copied to the working layout first, then the same kernels."""
    compare(2, 3, 5, 7, 9, torch.float64, layout, "bilinear", 1e-12, groups=groups)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cs", [0, 2])
def test_groups_interleave_channels(layout, cs):
    """The packed layout, spelled out: every channel constant, so each output channel names its source."""
    g, cd = 3, 2
    skip = torch.arange(g * cs, dtype=torch.float32).view(1, g * cs, 1, 1).expand(1, g * cs, 4, 6)
    deep = (100 + torch.arange(g * cd, dtype=torch.float32)).view(1, g * cd, 1, 1).expand(1, g * cd, 2, 3)
    skip, deep = ladder.as_layout(skip.clone(), layout), ladder.as_layout(deep.clone(), layout)
    out = upsample_cat(skip, deep, "bilinear", groups=g)
    want = []
    for k in range(g):  # group k: its skip channels, then its deep channels
        want += list(range(k * cs, (k + 1) * cs)) + [100 + c for c in range(k * cd, (k + 1) * cd)]
    assert out.shape == (1, g * (cs + cd), 4, 6)
    assert torch.equal(out, torch.tensor(want, dtype=torch.float32).view(1, -1, 1, 1).expand_as(out))


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
@pytest.mark.parametrize("groups", GROUPS)
def test_gradcheck_float64(layout, mode, groups):
    # One image when grouped: the Jacobian grows with the channels; the groups are what is under test.
    skip, deep = make_inputs(2 if groups == 1 else 1, 2, 3, 3, 4, torch.float64, layout, groups=groups)
    ladder.gradcheck(lambda s, d: upsample_cat(s, d, mode, groups),
                     [skip.requires_grad_(True), deep.requires_grad_(True)])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", [1, 2])
def test_opcheck(layout, groups):
    skip, deep = make_inputs(2, 3, 4, 3, 5, torch.float32, layout, groups=groups)
    args = (skip.requires_grad_(True), deep.requires_grad_(True), 1, groups)
    grad = ladder.as_layout(torch.randn(2, 7 * groups, 6, 10), layout)
    ladder.opcheck((torch.ops.dip_fast.upsample_cat.default, args),
                   (torch.ops.dip_fast._upsample_cat_backward.default, (grad, 3 * groups, 1, groups)))


@pytest.mark.parametrize("groups", [1, 2])
def test_torch_compile_traces_the_op(groups):
    skip, deep = make_inputs(1, 2, 3, 4, 4, torch.float32, "contiguous", groups=groups)
    ladder.compiles(lambda s, d: upsample_cat(s, d, "bilinear", groups) * 2, [skip, deep],
                    expected=expected(skip, deep, "bilinear", groups) * 2, atol=1e-5, rtol=1.3e-6)


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


def test_bad_groups():
    skip, deep = make_inputs(1, 2, 3, 4, 4, torch.float32, "contiguous", groups=2)  # 4 skip, 6 deep channels
    for bad in (0, -2):
        with pytest.raises(ValueError, match="groups must be >= 1"):
            upsample_cat(skip, deep, "bilinear", bad)
    for bad in (2.0, True, "2"):
        with pytest.raises(TypeError, match="groups must be an integer"):
            upsample_cat(skip, deep, "bilinear", bad)
    with pytest.raises(ValueError, match=r"groups=3 must divide skip's and deep's channel counts, got 4 and 6"):
        upsample_cat(skip, deep, "bilinear", 3)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        upsample_cat(skip, deep, "bilinear", 4)
    # The compiled ops validate on their own too.
    with pytest.raises(RuntimeError, match="groups must be >= 1, got 0"):
        torch.ops.dip_fast.upsample_cat(skip, deep, 1, 0)
    with pytest.raises(RuntimeError, match=r"groups \(4\) must divide deep's channel count, got 6"):
        torch.ops.dip_fast.upsample_cat(skip, deep, 1, 4)
    with pytest.raises(RuntimeError, match=r"groups \(3\) must divide skip's channel count, got 4"):
        torch.ops.dip_fast.upsample_cat(skip, deep, 1, 3)
    with pytest.raises(RuntimeError, match="groups must be >= 1"):
        torch.ops.dip_fast._upsample_cat_backward(torch.randn(1, 10, 8, 8), 4, 1, -1)
    with pytest.raises(RuntimeError, match=r"groups \(3\) must divide skip_channels \(4\)"):
        torch.ops.dip_fast._upsample_cat_backward(torch.randn(1, 12, 8, 8), 4, 1, 3)
    with pytest.raises(RuntimeError, match=r"grad_out's channel count \(10\)"):
        torch.ops.dip_fast._upsample_cat_backward(torch.randn(1, 10, 8, 8), 4, 1, 4)
    # The emulation shares the checks.
    with pytest.raises(RuntimeError, match="groups must be >= 1"):
        torch.ops.dip_fast._upsample_cat_emulated(skip, deep, 1, 0)
    with pytest.raises(RuntimeError, match=r"groups \(3\) must divide skip_channels"):
        torch.ops.dip_fast._upsample_cat_backward_emulated(torch.randn(1, 12, 8, 8), 4, 1, 3)


@pytest.mark.slow
def test_fuzz_against_pytorch():
    def check(n, cs, cd, h, w, layout, dtype, mode, groups):
        compare(n, cs, cd, h, w, dtype, layout, mode, 1e-12 if dtype == torch.float64 else 2e-6, groups=groups)

    ladder.fuzz(check, n=(1, 3), cs=(0, 5), cd=(1, 9), h=(1, 11), w=(1, 11),
                layout=["contiguous", "channels_last", "sliced"], dtype=[torch.float32, torch.float64],
                mode=["nearest", "bilinear"], groups=(1, 4))


# ---------------------------------------------------------------------------
# The GPU's cases, run on the CPU too. The CUDA kernels' per-thread code runs
# over their launch grid on the CPU (the emulation ops, which also return a
# trace [V, fewest writes, most writes]). Every case of GRID_CASES runs three
# ways: on the GPU against PyTorch, through the emulation against PyTorch, and
# on the GPU against the emulation bit for bit; one list, so what the GPU is
# checked on and what the CPU checks cannot drift apart.
# ---------------------------------------------------------------------------

#: (N, Cs, Cd, h, w) as in SHAPES, plus: 132 channels (channels_last blocks of fewer threads than 256),
#: Cs = 8 and 16 (wider vectors), and planes larger than one tile of a block (several blocks per plane).
GRID_SHAPES = SHAPES + [(1, 4, 128, 3, 5), (2, 8, 4, 5, 6), (1, 16, 8, 5, 6), (1, 0, 6, 3, 3), (1, 1, 2, 40, 52)]
GRID_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
#: (shape, layout, mode, groups, dtypes): each case runs in each of its dtypes.
GRID_CASES = (ladder.cases(GRID_SHAPES, ladder.KERNEL_LAYOUTS, UPSAMPLE_MODES, GROUPS, [GRID_DTYPES])
              # The top level of the paper's network at 64x64 (the size the network runs at), in float32.
              + ladder.cases([(1, 4, 128, 64, 64)], ("contiguous", "channels_last"), UPSAMPLE_MODES, [1],
                             [(torch.float32,)]))
GRID_ARGS = "shape,layout,mode,groups,dtypes"


def grid_case_inputs(shape, dtype, groups):
    """skip, deep and an output gradient of a grid case, in dtype (contiguous, on the CPU): the values every
    run and the reference see."""
    n, cs, cd, h, w = shape
    skip, deep = make_inputs(*shape, torch.float64, "contiguous", groups=groups)
    grad = torch.randn(n, groups * (cs + cd), 2 * h, 2 * w, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(1))
    return [t.to(dtype) for t in (skip, deep, grad)]


def check_grid_case(run, shape, layout, mode, dtype, groups, device="cpu"):
    """``run(skip, deep, grad)`` (inputs in ``layout`` on ``device``) returns (out, grad_skip, grad_deep,
    trace or None); all three against PyTorch in float64 on the same rounded inputs, within the dtype's
    rounding (NaN, an unwritten element, fails). A trace must show every element written once.
    Returns the trace."""
    skip, deep, grad = grid_case_inputs(shape, dtype, groups)
    sr, dr = (t.double().requires_grad_(True) for t in (skip, deep))
    want_out = expected(sr, dr, mode, groups)
    want = (want_out.detach(), *torch.autograd.grad(want_out, (sr, dr), grad.double(), allow_unused=True))
    out, gs, gd, trace = run(*(ladder.as_layout(t.to(device), layout) for t in (skip, deep, grad)))
    tol = ladder.rounding_tolerance(dtype, 1e-12, 1e-6)
    assert out.dtype == dtype
    for name, got, exp in zip(("out", "grad_skip", "grad_deep"), (out, gs, gd), want):
        if exp is None or exp.numel() == 0:  # no skip channels
            continue
        torch.testing.assert_close(got.cpu().double(), exp, atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    if layout.endswith("channels_last") and groups * shape[2] > 1 and shape[3] * shape[4] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)  # otherwise deep is NCHW-dense too
    if trace is not None:
        for t in trace:
            assert t[1] == 1 and t[2] == 1, f"outputs written {t[1]}..{t[2]} times, not once"
    return trace


def run_op(mode, groups):
    """The public op with autograd, on the inputs' device: (out, grad_skip, grad_deep, None)."""
    def run(skip, deep, grad):
        skip, deep = skip.requires_grad_(True), deep.requires_grad_(True)
        out = upsample_cat(skip, deep, mode, groups)
        return (out.detach(), *torch.autograd.grad(out, (skip, deep), grad, allow_unused=True), None)
    return run


def run_emulated(mode, groups):
    """The emulation ops: (out, grad_skip, grad_deep, [forward trace, backward trace])."""
    code = UPSAMPLE_MODES[mode]

    def run(skip, deep, grad):
        out, trace_f = torch.ops.dip_fast._upsample_cat_emulated(skip, deep, code, groups)
        gs, gd, trace_b = torch.ops.dip_fast._upsample_cat_backward_emulated(grad, skip.shape[1], code, groups)
        return out, gs, gd, [trace_f.tolist(), trace_b.tolist()]
    return run


@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_grid_emulation_matches_pytorch(shape, layout, mode, groups, dtypes):
    ladder.for_each_dtype(dtypes, lambda dtype: check_grid_case(run_emulated(mode, groups), shape, layout, mode,
                                                                 dtype, groups))


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_matches_pytorch(shape, layout, mode, groups, dtypes):
    ladder.for_each_dtype(dtypes, lambda dtype: check_grid_case(run_op(mode, groups), shape, layout, mode, dtype,
                                                                 groups, device="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize(GRID_ARGS, GRID_CASES)
def test_cuda_equals_grid_emulation_bitwise(shape, layout, mode, groups, dtypes):
    """The GPU computes exactly what the emulation computes (same plan, no multiply-add contraction)."""
    ladder.for_each_dtype(dtypes, lambda dtype: check_bitwise(shape, layout, mode, dtype, groups))


def check_bitwise(shape, layout, mode, dtype, groups):
    """The CUDA ops and their emulation give bitwise equal results on one grid case."""
    n, cs, cd, h, w = shape
    inputs = grid_case_inputs(shape, dtype, groups)
    code = UPSAMPLE_MODES[mode]
    results = []
    for device in ("cpu", "cuda"):
        skip, deep, grad = (ladder.as_layout(t.to(device), layout) for t in inputs)
        if device == "cpu":
            out, _ = torch.ops.dip_fast._upsample_cat_emulated(skip, deep, code, groups)
            gs, gd, _ = torch.ops.dip_fast._upsample_cat_backward_emulated(grad, groups * cs, code, groups)
        else:
            out = torch.ops.dip_fast.upsample_cat(skip, deep, code, groups)
            gs, gd = torch.ops.dip_fast._upsample_cat_backward(grad, groups * cs, code, groups)
        results.append([t.cpu() for t in (out, gs, gd)])
    for name, want, got in zip(("out", "grad_skip", "grad_deep"), *results):
        assert torch.equal(got, want), f"{name} differs from the emulated grid"


#: The CUDA twin (GPU against the CPU op) runs a slice of the grid cases: one odd shape, every dtype but float64.
TWIN_SHAPE = SHAPES[1]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GRID_DTYPES[1:])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups", GROUPS)
def test_cuda_matches_cpu(dtype, layout, groups):
    n, cs, cd, h, w = TWIN_SHAPE
    skip, deep = make_inputs(*TWIN_SHAPE, torch.float32, layout, groups=groups)
    grad = ladder.as_layout(torch.randn(n, (cs + cd) * groups, 2 * h, 2 * w), layout)
    tol = 1e-6 if dtype == torch.float32 else 0.02
    inputs = [skip.requires_grad_(True), deep.requires_grad_(True)]
    ladder.cuda_twin(lambda s, d: upsample_cat(s, d, "bilinear", groups), inputs, grad=grad, dtype=dtype, atol=tol)


def test_cuda_grid_emulation_spans_several_channel_blocks():
    """channels_last with more channel vectors than a block's 256 threads: groups across blocks along y."""
    # out: 3 * (8 + 360) channels, grad_deep 3 * 360: over 256 vectors of 4 either way, and a block's
    # channel range ends inside a group.
    trace_f, trace_b = check_grid_case(run_emulated("bilinear", 3), (1, 8, 360, 2, 3), "channels_last", "bilinear",
                                       torch.float32, 3)
    assert trace_f[0] == 4 and trace_b[0] == 4


# (shape, layout, dtype, groups) -> the vector width the plan must pick when aligned (Cs, Cd per group).
VECTOR_CASES = [
    ((1, 4, 8, 8, 8), "contiguous", torch.float32, 1, 4),    # deep planes of 64
    ((1, 2, 3, 3, 3), "contiguous", torch.float32, 1, 1),    # deep planes of 9
    ((1, 4, 8, 3, 6), "channels_last", torch.float32, 1, 4),  # Cs = 4, Cd = 8
    ((1, 6, 2, 3, 3), "channels_last", torch.float32, 1, 2),  # Cs = 6: 8-byte vectors
    ((1, 16, 8, 2, 3), "channels_last", torch.bfloat16, 1, 8),
    ((1, 3, 4, 2, 2), "channels_last", torch.float32, 1, 1),  # Cs = 3
    ((1, 3, 5, 8, 8), "contiguous", torch.float32, 3, 4),    # NCHW groups fold into the batch: planes of 64
    ((1, 4, 8, 3, 6), "channels_last", torch.float32, 2, 4),  # Cs = 4, Cd = 8 per group
    ((1, 2, 4, 3, 3), "channels_last", torch.float32, 2, 2),  # 4 + 8 channels, but Cs = 2 within a group
    ((1, 0, 6, 3, 3), "channels_last", torch.float32, 2, 2),  # 12 deep channels, but Cd = 6 within a group
    ((1, 8, 4, 2, 3), "channels_last", torch.bfloat16, 2, 4),  # Cd = 4: 8-byte vectors
    ((1, 2, 6, 2, 2), "channels_last", torch.float32, 3, 2),
    ((1, 1, 4, 2, 2), "channels_last", torch.float32, 2, 1),  # Cs = 1: the scalar path
]


@pytest.mark.parametrize("shape,layout,dtype,groups,vector", VECTOR_CASES)
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_cuda_grid_emulation_takes_vector_and_scalar_paths(shape, layout, dtype, groups, vector, mode):
    run = run_emulated(mode, groups)
    trace_f, trace_b = check_grid_case(run, shape, layout, mode, dtype, groups)
    assert trace_f[0] == vector and trace_b[0] == vector
    trace_f, trace_b = check_grid_case(run, shape, "misaligned_" + layout if layout != "contiguous" else "misaligned",
                                       mode, dtype, groups)
    assert trace_f[0] == 1 and trace_b[0] == 1
