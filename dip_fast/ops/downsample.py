"""The downsample op family: separable filter-and-decimate (the paper's ``Downsampler``) as one custom op.

Schemas: csrc/ops/downsample.cpp; kernels: csrc/cpu/downsample.cpp and
csrc/cuda/downsample.cu. The autograd formulas are here (Python): the op runs
once per step.

``downsample(x, factor, kernel="lanczos2", phase=0.5, preserve_size=True)``
equals ``dip_fast.reference.Downsampler(C, factor, kernel, phase,
preserve_size=preserve_size)(x)``: the same kernels, the same replication
padding and the same output size. It runs as ``torch.ops.dip_fast.downsample``:

* separable: every kernel of the paper is an outer product ``k k^T`` of a
  normalised 1-D kernel ``k`` (:func:`dip_fast.reference.get_kernel_1d`), so
  each channel is filtered down the columns, then along the rows, K
  multiply-adds per pass instead of K^2 (and none of the reference's
  ``C x C`` dense diagonal weight);
* the replication padding is index clamping in the kernel, not a padded copy;
* the vertical pass already decimates, so the strided horizontal pass works on
  an intermediate ``factor`` times smaller, kept per thread (CPU) or in shared
  memory (CUDA): ``x`` is read once and the output written once;
* linear in ``x``: autograd saves only the K taps and the input size, and the
  backward op (the exact transpose) reads ``grad_out`` once and writes
  ``grad_x`` once; it is deterministic on CPU and CUDA (a gather, no atomics).

The 1-D taps are computed once per (kernel, factor, phase, kernel_width,
support, sigma) in float64, and kept per (device, dtype) so that a call moves
nothing to the GPU after the first one.

Supported (as in the reference): ``lanczos2`` and ``lanczos3`` at phase 0 and
0.5, ``gauss12`` and ``gauss1sq2`` at phase 0, ``box`` at phase 0.5, and the
generic ``lanczos`` / ``gauss`` with an explicit ``kernel_width`` and
``support`` / ``sigma``; any integer factor; float32 and float64, and float16 /
bfloat16 accumulating in float32; NCHW, channels_last (kept in the output)
and any other strides (copied to NCHW first).
"""
from __future__ import annotations

import functools
import numbers
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import _ops
from .._checks import is_int
from .._ops import check_float_tensor, require_extension, working_memory_format
from ..reference.downsampler import downsampler_padding, get_kernel_1d, resolve_kernel

__all__ = ["downsample", "Downsample", "downsample_taps", "KERNEL_PHASES"]

#: The phases each kernel name accepts (the reference's rules).
KERNEL_PHASES: Dict[str, Tuple[float, ...]] = {
    "lanczos2": (0.0, 0.5),
    "lanczos3": (0.0, 0.5),
    "lanczos": (0.0, 0.5),
    "gauss12": (0.0,),
    "gauss1sq2": (0.0,),
    "gauss": (0.0,),
    "box": (0.5,),
}

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_OPS = ("downsample", "_downsample_backward")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _output_size(n, k: int, factor: int, pad: int):
    return (n + 2 * pad - k) // factor + 1


def _register() -> None:
    @torch.library.register_fake("dip_fast::downsample")
    def _(x, taps, factor, pad):
        torch._check(x.dim() == 4, lambda: f"x must be 4-D, got {x.dim()}-D")
        torch._check(taps.dim() == 1, lambda: f"taps must be 1-D, got {taps.dim()}-D")
        n, c, h, w = x.shape
        k = taps.shape[0]
        size = (n, c, _output_size(h, k, factor, pad), _output_size(w, k, factor, pad))
        return torch.empty(size, dtype=x.dtype, device=x.device, memory_format=working_memory_format(x))

    @torch.library.register_fake("dip_fast::_downsample_backward")
    def _(grad_out, taps, factor, pad, height, width):
        torch._check(grad_out.dim() == 4, lambda: f"grad_out must be 4-D, got {grad_out.dim()}-D")
        n, c = grad_out.shape[:2]
        fmt = working_memory_format(grad_out)
        return torch.empty((n, c, height, width), dtype=grad_out.dtype, device=grad_out.device, memory_format=fmt)

    # Forward: linear in x, so only the taps and the input size are saved.
    def setup_context(ctx, inputs, output) -> None:
        x, taps, factor, pad = inputs
        ctx.save_for_backward(taps)
        ctx.args = (factor, pad, x.shape[2], x.shape[3])

    def backward(ctx, grad_out):
        (taps,) = ctx.saved_tensors
        factor, pad, height, width = ctx.args
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.dip_fast._downsample_backward(grad_out, taps, factor, pad, height, width)
        return grad_x, None, None, None

    torch.library.register_autograd("dip_fast::downsample", backward, setup_context=setup_context)

    # The backward op is linear in grad_out; its own transpose is the forward op.
    def setup_context_bwd(ctx, inputs, output) -> None:
        _, taps, factor, pad, _h, _w = inputs
        ctx.save_for_backward(taps)
        ctx.args = (factor, pad)

    def backward_bwd(ctx, grad_grad_x):
        (taps,) = ctx.saved_tensors
        factor, pad = ctx.args
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.dip_fast.downsample(grad_grad_x, taps, factor, pad)
        return grad, None, None, None, None, None

    torch.library.register_autograd(
        "dip_fast::_downsample_backward", backward_bwd, setup_context=setup_context_bwd
    )


if _ops.has_ops(*_OPS):
    _register()


# ---------------------------------------------------------------------------
# Arguments and taps
# ---------------------------------------------------------------------------


def _check_factor(factor: object) -> int:
    if not is_int(factor):
        raise TypeError(f"factor must be an int, got {type(factor).__name__} {factor!r}")
    if factor < 1:
        raise ValueError(f"factor must be >= 1, got {factor}")
    return int(factor)


def _check_kernel_phase(kernel: object, phase: object) -> float:
    if not isinstance(kernel, str) or kernel not in KERNEL_PHASES:
        raise ValueError(f"kernel must be one of {tuple(KERNEL_PHASES)}, got {kernel!r}")
    if isinstance(phase, bool) or not isinstance(phase, numbers.Real) or float(phase) not in (0.0, 0.5):
        raise ValueError(f"phase must be 0 or 0.5, got {phase!r}")
    phase = float(phase)
    allowed = KERNEL_PHASES[kernel]
    if phase not in allowed:
        raise ValueError(
            f"phase={phase:g} is not supported for kernel {kernel!r} (supported: {', '.join(f'{p:g}' for p in allowed)})"
        )
    return phase


@functools.lru_cache(maxsize=256)
def _spec_cached(
    kernel: str,
    factor: int,
    phase: float,
    kernel_width: Optional[int],
    support: Optional[float],
    sigma: Optional[float],
) -> Tuple[Tuple[float, ...], int]:
    """The normalised 1-D taps (float64 values) and the preserve_size padding."""
    base, width, sup, sig = resolve_kernel(kernel, factor, kernel_width, support, sigma)
    k = get_kernel_1d(factor, base, phase, width, support=sup, sigma=sig)
    return tuple(float(v) for v in k), downsampler_padding(len(k), factor)


# torch.compile: the taps are constants of the traced graph, never traced numpy.
@torch.compiler.assume_constant_result
def _spec(
    kernel: str,
    factor: int,
    phase: float,
    kernel_width: Optional[int],
    support: Optional[float],
    sigma: Optional[float],
) -> Tuple[Tuple[float, ...], int]:
    return _spec_cached(kernel, factor, phase, kernel_width, support, sigma)


@functools.lru_cache(maxsize=256)
def _taps_cached(taps: Tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(taps, dtype=dtype, device=device)


def _taps_on(taps: Tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The taps as a tensor on ``device``: made once per (taps, device, dtype) in eager mode."""
    if torch.compiler.is_compiling():
        return torch.tensor(taps, dtype=dtype, device=device)  # a graph constant
    return _taps_cached(taps, device, dtype)


def downsample_taps(
    factor: int,
    kernel: str = "lanczos2",
    phase: float = 0.5,
    *,
    kernel_width: Optional[int] = None,
    support: Optional[float] = None,
    sigma: Optional[float] = None,
) -> Tuple[torch.Tensor, int]:
    """The op's arguments for a kernel: ``(taps, pad)``.

    ``taps`` is the normalised 1-D kernel (float64, CPU; ``outer(taps, taps)``
    is the reference's 2-D kernel) and ``pad`` the replication padding of
    ``preserve_size=True`` (the op takes 0 for the valid correlation). For
    ``torch.ops.dip_fast.downsample(x, taps, factor, pad)`` the taps
    must be float64 for float64 ``x`` and float32 otherwise, on ``x``'s device.
    """
    factor = _check_factor(factor)
    phase = _check_kernel_phase(kernel, phase)
    values, pad = _spec(kernel, factor, phase, kernel_width, support, sigma)
    return torch.tensor(values, dtype=torch.float64), pad


def _prepare(x: object, factor: int, spec: Tuple[Tuple[float, ...], int], preserve_size: bool, what: str):
    check_float_tensor(x, "x")
    assert isinstance(x, torch.Tensor)
    if x.dtype not in _DTYPES:
        raise TypeError(f"x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    values, preserve_pad = spec
    pad = preserve_pad if preserve_size else 0
    k = len(values)
    h, w = x.shape[2], x.shape[3]
    if h + 2 * pad < k or w + 2 * pad < k:
        need = k - 2 * pad
        raise ValueError(
            f"x is {h}x{w} but {what} needs at least {need}x{need} "
            f"({k} taps{', ' + str(pad) + ' replicated on each side' if pad else ', preserve_size=False'})"
        )
    require_extension(*_OPS)
    taps = _taps_on(values, x.device, _acc_dtype(x.dtype))
    return taps, pad


def downsample(
    x: torch.Tensor,
    factor: int,
    kernel: str = "lanczos2",
    phase: float = 0.5,
    preserve_size: bool = True,
    *,
    kernel_width: Optional[int] = None,
    support: Optional[float] = None,
    sigma: Optional[float] = None,
) -> torch.Tensor:
    """Filter each channel of ``x`` (N, C, H, W) with the paper's kernel and decimate by ``factor``.

    Same result as ``dip_fast.reference.Downsampler(C, factor, kernel, phase,
    kernel_width, support, sigma, preserve_size)(x)``, differentiable in ``x``.

    Raises:
        TypeError: ``x`` is not a float32/float64/float16/bfloat16 tensor, or
            ``factor`` is not an int.
        ValueError: ``factor < 1``, ``x`` is not 4-D or smaller than the
            kernel allows, or an unknown kernel or unsupported (kernel, phase).
    """
    factor = _check_factor(factor)
    phase = _check_kernel_phase(kernel, phase)
    spec = _spec(kernel, factor, phase, kernel_width, support, sigma)
    taps, pad = _prepare(x, factor, spec, bool(preserve_size), f"kernel {kernel!r} at factor {factor}")
    return torch.ops.dip_fast.downsample(x, taps, factor, pad)


class Downsample(nn.Module):
    """The fused twin of :class:`dip_fast.reference.Downsampler` (same arguments).

    No weights, no buffers: the 1-D taps are shared per device and dtype, so
    ``.to(device)`` has nothing to move and ``state_dict()`` is empty, as for
    the reference (whose weight buffer is not persistent).

    Attributes:
        kernel_1d: the normalised 1-D kernel (float64 numpy array), as the reference's.
        kernel: ``outer(kernel_1d, kernel_1d)``, the reference's 2-D kernel
            (equal up to float64 rounding).
        kernel_size: K, the kernel's length.
        pad: the replication padding on each side (0 without ``preserve_size``).
    """

    def __init__(
        self,
        n_planes: int,
        factor: int,
        kernel_type: str,
        phase: float = 0,
        kernel_width: Optional[int] = None,
        support: Optional[float] = None,
        sigma: Optional[float] = None,
        preserve_size: bool = False,
    ) -> None:
        super().__init__()
        if not is_int(n_planes, minimum=1):
            raise ValueError(f"n_planes must be a positive integer, got {n_planes!r}")
        self.n_planes = int(n_planes)
        self.factor = _check_factor(factor)
        self.kernel_type = kernel_type
        self.phase = _check_kernel_phase(kernel_type, phase)
        self.preserve_size = bool(preserve_size)
        self._spec = _spec(kernel_type, self.factor, self.phase, kernel_width, support, sigma)
        self.kernel_1d = np.asarray(self._spec[0], dtype=np.float64)
        self.kernel = np.outer(self.kernel_1d, self.kernel_1d)
        self.kernel_size = len(self.kernel_1d)
        self.pad = self._spec[1] if self.preserve_size else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] != self.n_planes:
            raise ValueError(f"x has {x.shape[1]} channels, this Downsample was built for n_planes={self.n_planes}")
        taps, pad = _prepare(
            x, self.factor, self._spec, self.preserve_size, f"kernel {self.kernel_type!r} at factor {self.factor}"
        )
        return torch.ops.dip_fast.downsample(x, taps, self.factor, pad)

    def extra_repr(self) -> str:
        return (
            f"n_planes={self.n_planes}, factor={self.factor}, kernel_type={self.kernel_type!r}, "
            f"phase={self.phase:g}, kernel_size={self.kernel_size}, pad={self.pad}"
        )
