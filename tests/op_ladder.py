"""The op-test ladder: the rungs every op family's tests climb, written once.

An op family's test file (tests/test_ops_<family>.py) brings what is its
own (the PyTorch composition the op replaces, its inputs, its tolerances, its
argument errors) and climbs these rungs with it:

1. ``assert_matches``: forward and backward against PyTorch, on odd sizes
   and in every layout of :data:`LAYOUTS` (:func:`as_layout`). conftest
   poisons every op output with NaN, and the rung fails on NaN, so an
   element a kernel forgets to write cannot pass.
2. ``gradcheck``: float64 gradcheck, and gradgradcheck (double backward).
3. ``opcheck``: ``torch.library.opcheck`` of each op, forward and the
   private backward (schema, fake kernel, autograd registration, strides).
4. ``compiles``: ``torch.compile(fullgraph=True)`` traces the op and gives
   what eager mode gives.
5. ``fuzz``: a hypothesis property run (tests marked slow), DIP_FAST_FUZZ_EXAMPLES examples.
6. ``cuda_twin``: the same call on the GPU against the CPU (tests marked
   ``cuda``, which skip without a GPU).

tests/test_contributing_recipe.py climbs all six with a toy op family built
the way CONTRIBUTING.md ("Add a C++/CUDA op") says.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Optional, Sequence

import pytest
import torch

from .conftest import FUZZ_EXAMPLES

#: Memory layouts of a 4-D tensor the ops accept, each holding the same values (see :func:`as_layout`).
LAYOUTS = ("contiguous", "channels_last", "non_contiguous", "sliced", "cropped")

#: The layouts a CUDA kernel sees differently: dense NCHW and channels_last, each aligned (the vector
#: paths) and one element off a 16-byte boundary (the scalar path). The other layouts of :data:`LAYOUTS`
#: reach the kernels as an aligned dense copy.
KERNEL_LAYOUTS = ("contiguous", "channels_last", "misaligned", "misaligned_channels_last")


# ---------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of the 4-D tensor ``t`` in the memory layout named ``layout``.

    contiguous: NCHW; channels_last: NHWC; non_contiguous: H and W swapped in
    memory (a transposed copy viewed back); sliced: every other element of an
    interleaved copy (W stride 2, storage offset 1, so misaligned for vector
    loads); cropped: a window of a padded tensor (a storage offset, row
    strides larger than W); misaligned, misaligned_channels_last: dense NCHW
    or NHWC in storage one element past a 16-byte boundary (:func:`misaligned`).
    Works on any device: apply it after moving ``t`` (a copy to another device
    is aligned again).
    """
    if layout in ("misaligned", "misaligned_channels_last"):
        return misaligned(as_layout(t, layout.removeprefix("misaligned").lstrip("_") or "contiguous"))
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "non_contiguous":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced":
        return torch.stack([t, t], dim=-1)[..., 1]
    if layout == "cropped":
        return torch.nn.functional.pad(t, (2, 3, 1, 4))[..., 1:-4, 2:-3]
    raise ValueError(f"unknown layout {layout!r}; one of {LAYOUTS}")


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t``, on its device and in its layout (NCHW or channels_last), in storage that
    starts one element past a 16-byte boundary: the kernels' scalar path."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        n, c, h, w = t.shape
        view = flat[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        view = flat[1:].view(t.shape)
    view.copy_(t)
    return view


def case_id(value: Any) -> str:
    """A readable test id part: shapes as 2x3x5, dtypes by name (float32, several joined by +), the rest
    as str()."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple):
        return ("+" if all(isinstance(v, torch.dtype) for v in value) else "x").join(case_id(v) for v in value)
    return str(value)


def case(*values: Any):
    """One test case: a pytest param of the values with a readable id."""
    return pytest.param(*values, id="-".join(case_id(v) for v in values))


def cases(*axes: Sequence[Any]) -> list:
    """The product of the axes, as pytest params (one value of each axis, in order) with readable ids."""
    return [case(*combo) for combo in itertools.product(*axes)]


def for_each_dtype(dtypes: Sequence[torch.dtype], check: Callable[[torch.dtype], Any]) -> list:
    """``check(dtype)`` for each dtype (one test case runs them all: cheaper than a test each); an
    assertion names the dtype that failed. Returns the results."""
    results = []
    for dtype in dtypes:
        try:
            results.append(check(dtype))
        except AssertionError as e:
            raise AssertionError(f"in {case_id(dtype)}: {e}") from e
    return results


#: float16 and bfloat16: the ops accumulate in float32 and round once on the store.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def rounding_tolerance(dtype: torch.dtype, float64: float, float32: float) -> float:
    """atol = rtol for an op's result in ``dtype`` against a float64 reference computed from the same
    (already rounded) inputs: the op's own ``float64`` and ``float32`` figures, and for float16 and
    bfloat16 the dtype's machine epsilon, twice the at most half-ulp relative error of the one rounding
    of a float32 result (an element off by one neighbour or one tap is off by far more)."""
    if dtype == torch.float64:
        return float64
    if dtype == torch.float32:
        return float32
    if dtype in HALF_DTYPES:
        return torch.finfo(dtype).eps
    raise ValueError(f"no tolerance for {dtype}")


def _as_tuple(out: Any) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _differentiable(inputs: Sequence[Any]) -> list:
    return [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]


def _fresh(inputs: Sequence[Any]) -> list:
    """New leaves viewing the tensor inputs (same storage and strides, so the layout under test is
    what the op sees), requiring grad where the inputs do."""
    return [t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]


def run_with_grad(fn: Callable, inputs: Sequence[Any], grad: Optional[torch.Tensor] = None):
    """``(out, grads)``: ``fn(*inputs)`` (first output when it returns several) and the gradients
    of ``<out, grad>`` with respect to the inputs that require grad (``None`` where unused).
    Without ``grad``, no backward runs and ``grads`` is empty.
    """
    out = _as_tuple(fn(*inputs))[0]
    wrt = _differentiable(inputs)
    if grad is None or not wrt:
        return out, ()
    return out, torch.autograd.grad(out, wrt, grad, allow_unused=True)


# ---------------------------------------------------------------------------
# Rung 1: against PyTorch
# ---------------------------------------------------------------------------


def assert_matches(
    fn: Callable,
    reference: Callable,
    inputs: Sequence[Any],
    *,
    grad: Optional[torch.Tensor] = None,
    atol: float,
    rtol: Optional[float] = None,
    grad_atol: Optional[float] = None,
    grad_rtol: Optional[float] = None,
    names: Optional[Sequence[str]] = None,
):
    """``fn`` equals ``reference`` (PyTorch's composition) in forward and, given ``grad``, backward.

    Both run on new leaves viewing ``inputs`` (same strides; tensors that
    require grad are differentiated). Tolerances: ``rtol`` defaults to ``atol``; the gradients'
    to ten times the output's. Every output and gradient must be free of NaN
    (outputs start as NaN in the tests, so an unwritten element fails here).
    Returns ``(out, grads)`` of ``fn``.
    """
    rtol = atol if rtol is None else rtol
    grad_atol = 10 * atol if grad_atol is None else grad_atol
    grad_rtol = 10 * rtol if grad_rtol is None else grad_rtol
    ours = _fresh(inputs)
    out, grads = run_with_grad(fn, ours, grad)
    want, want_grads = run_with_grad(reference, _fresh(inputs), grad)
    assert not torch.isnan(out).any(), "unwritten output elements"
    torch.testing.assert_close(out, want, atol=atol, rtol=rtol)
    names = names or [f"input {i}" for i in range(len(grads))]
    for name, got, exp in zip(names, grads, want_grads, strict=True):
        if exp is None:  # the reference does not use this input: neither may the op
            assert got is None or not got.any(), f"gradient of {name}, which the reference does not use"
            continue
        if exp.numel() == 0:
            continue
        assert got is not None, f"no gradient of {name}"
        assert not torch.isnan(got).any(), f"unwritten gradient of {name}"
        torch.testing.assert_close(got, exp, atol=grad_atol, rtol=grad_rtol, msg=f"gradient of {name}")
    return out, grads


# ---------------------------------------------------------------------------
# Rungs 2-4: gradcheck, opcheck, torch.compile
# ---------------------------------------------------------------------------


def gradcheck(fn: Callable, inputs: Sequence[torch.Tensor], *, gradgrad: bool = True, **kwargs) -> None:
    """float64 gradcheck of ``fn`` (and gradgradcheck unless ``gradgrad=False``); kwargs go to both."""
    for t in _differentiable(inputs):
        assert t.dtype == torch.float64, "gradcheck runs in float64"
    assert torch.autograd.gradcheck(fn, tuple(inputs), **kwargs)
    if gradgrad:
        assert torch.autograd.gradgradcheck(fn, tuple(inputs), **kwargs)


def opcheck(*cases: tuple) -> None:
    """``torch.library.opcheck`` of each ``(op overload, args)`` case (forward and backward ops alike)."""
    for op, args in cases:
        torch.library.opcheck(op, tuple(args))


def compiles(fn: Callable, inputs: Sequence[Any], *, atol: float = 0.0, rtol: float = 0.0,
             expected: Optional[Any] = None, backend: str = "eager") -> Any:
    """``torch.compile(fn, fullgraph=True)`` traces the op (no graph break) and returns what
    ``expected`` says (eager ``fn`` by default) within the tolerances. Returns the compiled output."""
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    got = compiled(*inputs)
    want = fn(*inputs) if expected is None else expected
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)
    return got


# ---------------------------------------------------------------------------
# Rung 5: fuzzing
# ---------------------------------------------------------------------------


def _strategy(st, spec: Any):
    """A hypothesis strategy from a short spec: (lo, hi) ints -> integers, (lo, hi) floats -> floats,
    a list -> sampled_from, a bool type -> booleans; a strategy passes through."""
    if isinstance(spec, tuple) and len(spec) == 2:
        lo, hi = spec
        if isinstance(lo, int) and isinstance(hi, int) and not isinstance(lo, bool):
            return st.integers(lo, hi)
        return st.floats(float(lo), float(hi))
    if isinstance(spec, list):
        return st.sampled_from(spec)
    if spec is bool:
        return st.booleans()
    return spec


def fuzz(check: Callable[..., None], *, examples: Optional[int] = None, **params: Any) -> None:
    """Run ``check(**drawn)`` on ``examples`` (default FUZZ_EXAMPLES) hypothesis examples.

    Each keyword names a parameter of ``check`` and how to draw it (see
    :func:`_strategy`). Inside ``check``, :func:`assume` discards an example.
    Skips when hypothesis is not installed. Call it from a test marked slow.
    """
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    given = {name: _strategy(st, spec) for name, spec in params.items()}
    settings = hypothesis.settings(max_examples=examples or FUZZ_EXAMPLES, deadline=None)
    settings(hypothesis.given(**given)(check))()


def assume(condition: bool) -> None:
    """Discard the current fuzz example unless ``condition`` holds."""
    import hypothesis

    hypothesis.assume(condition)


# ---------------------------------------------------------------------------
# Rung 6: the CUDA twin
# ---------------------------------------------------------------------------


def cuda_twin(
    fn: Callable,
    inputs: Sequence[Any],
    *,
    grad: Optional[torch.Tensor] = None,
    atol: Optional[float] = None,
    rtol: Optional[float] = None,
    dtype: Optional[torch.dtype] = None,
    compare_dtype: Optional[torch.dtype] = torch.float32,
    device: str = "cuda",
) -> None:
    """``fn`` on ``device`` (the GPU) gives what it gives on the CPU: output and gradients.

    The same inputs (cast to ``dtype`` when given, keeping requires_grad)
    go to both devices; results are compared as ``compare_dtype``
    (``None``: as they are), within ``atol`` and ``rtol`` (default: ``atol``;
    neither: torch.testing's defaults for the dtype). Call it from a test
    marked ``cuda``. Returns ``(out, grads)`` of the ``device`` run, on the CPU.
    """
    tolerances = {} if atol is None else {"atol": atol, "rtol": atol if rtol is None else rtol}
    results = []
    for dev in ("cpu", device):
        args = [
            (t.detach().to(dev, dtype if dtype is not None and t.is_floating_point() else t.dtype)
             .requires_grad_(t.requires_grad)) if isinstance(t, torch.Tensor) else t
            for t in inputs
        ]
        g = None if grad is None else grad.to(dev, dtype or grad.dtype)
        out, grads = run_with_grad(fn, args, g)
        results.append([None if t is None else t.detach().cpu() for t in (out, *grads)])
    names = ["output"] + [f"gradient of input {i}" for i in range(len(results[0]) - 1)]
    for name, a, b in zip(names, *results, strict=True):
        assert (a is None) == (b is None), f"{name}: None on one device only"
        if a is None:
            continue
        if compare_dtype is not None:
            a, b = a.to(compare_dtype), b.to(compare_dtype)
        torch.testing.assert_close(b, a, **tolerances, msg=lambda m, name=name: f"{name}: {m}")
    return results[1][0], tuple(results[1][1:])

