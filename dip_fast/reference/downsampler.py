"""Fixed anti-aliasing downsampler of the Deep Image Prior paper.

The paper degrades a high-resolution estimate with a Lanczos (or Gaussian,
or box) filter followed by decimation.  This module reproduces its kernels
sample for sample and its ``Downsampler`` module layer for layer.

Kernel definition (``get_kernel``)
----------------------------------
For a nominal ``kernel_width`` ``W`` the 2-D kernel has ``W x W`` taps, except
for a half-phase (``phase=0.5``) Lanczos/Gauss kernel, which has ``(W-1)^2``
taps so that its centre falls between two samples.  With 1-based tap index
``i`` and ``c = (W + 1) / 2``:

* lanczos, phase 0:   ``x_i = |i - c| / factor``
* lanczos, phase 0.5: ``x_i = |i + 0.5 - c| / factor``
  and ``w(x) = sinc(x) * sinc(x / support)`` (``w(0) = 1``);
* gauss (phase 0 only): ``x_i = (i - c) / 2`` and
  ``w(x) = exp(-x^2 / (2 sigma^2))``; note the fixed ``/ 2`` and that
  ``factor`` does not enter, exactly as in the paper;
* box (phase 0.5 only): constant.

Every kernel is separable, ``K[i, j] = w(x_i) * w(x_j)``, and is normalised to
sum to one.  Hence, with ``k = w / sum(w)``, ``K == outer(k, k)`` exactly (up
to float rounding); ``get_kernel_1d`` returns that ``k``.  Fast kernels may
therefore filter rows and columns separately with ``k``.

Module (``Downsampler``)
------------------------
``[ReplicationPad2d(p)] -> conv2d(K, stride=factor)`` with one diagonal
``n_planes x n_planes`` weight, as the paper builds it.  With
``preserve_size=True`` the padding is ``p = (K - 1) // 2`` for an odd kernel
size ``K`` and ``p = int((K - factor) / 2)`` for an even one, so the output is
``floor(H / factor)`` for the even Lanczos kernels.

Deviation: the paper stores the weight (and a zero bias) in a trainable
``nn.Conv2d``, so when a downsampler sits inside the network (downsample mode
``lanczos2``/``lanczos3``) Adam also updates it and it is counted among the
network's parameters.  Here the weight is a fixed, non-persistent buffer: it
never trains, is not a parameter and does not appear in ``state_dict``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import is_int

__all__ = [
    "KERNEL_TYPES",
    "Downsampler",
    "downsampler_padding",
    "get_kernel",
    "get_kernel_1d",
    "resolve_kernel",
]

# Named kernels accepted by ``Downsampler`` (the paper's set).
KERNEL_TYPES = ("lanczos2", "lanczos3", "gauss12", "gauss1sq2", "lanczos", "gauss", "box")
_BASE_TYPES = ("lanczos", "gauss", "box")


def _check_factor(factor: int) -> int:
    if not is_int(factor, minimum=1):
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    return int(factor)


def _check_phase(phase: float) -> float:
    if phase not in (0, 0.5):
        raise ValueError(f"phase must be 0 or 0.5, got {phase!r}")
    return float(phase)


def _taps_1d(
    factor: int,
    kernel_type: str,
    phase: float,
    kernel_width: int,
    support: Optional[float],
    sigma: Optional[float],
) -> np.ndarray:
    """Unnormalised 1-D window ``w(x_i)`` (float64) for a base kernel type."""
    factor = _check_factor(factor)
    phase = _check_phase(phase)
    if kernel_type not in _BASE_TYPES:
        raise ValueError(f"kernel_type must be one of {_BASE_TYPES}, got {kernel_type!r}")
    if not is_int(kernel_width, minimum=1):
        raise ValueError(f"kernel_width must be a positive integer, got {kernel_width!r}")
    kernel_width = int(kernel_width)

    if kernel_type == "box":
        if phase != 0.5:
            raise ValueError("phase must be 0.5 for kernel_type 'box' (the box filter is always half-phased)")
        return np.ones(kernel_width, dtype=np.float64)

    # Half-phase kernels drop one tap so that the centre lies between samples.
    n = kernel_width - 1 if phase == 0.5 else kernel_width
    if n < 1:
        raise ValueError(f"kernel_width {kernel_width} is too small for phase {phase}")
    idx = np.arange(1, n + 1, dtype=np.float64)
    center = (kernel_width + 1) / 2.0

    if kernel_type == "gauss":
        if not sigma:
            raise ValueError("sigma must be given (and non-zero) for kernel_type 'gauss'")
        if phase == 0.5:
            raise ValueError("phase 0.5 is not supported for kernel_type 'gauss'")
        x = (idx - center) / 2.0
        return np.exp(-(x * x) / (2.0 * sigma * sigma))

    # lanczos
    if not support:
        raise ValueError("support must be given (and non-zero) for kernel_type 'lanczos'")
    offset = 0.5 if phase == 0.5 else 0.0
    x = np.abs(idx + offset - center) / factor
    w = np.ones_like(x)
    nz = x != 0
    xs = x[nz]
    w[nz] = support * np.sin(np.pi * xs) * np.sin(np.pi * xs / support) / (np.pi * np.pi * xs * xs)
    return w


def get_kernel(
    factor: int,
    kernel_type: str,
    phase: float,
    kernel_width: int,
    support: Optional[float] = None,
    sigma: Optional[float] = None,
) -> np.ndarray:
    """Return the paper's normalised 2-D resampling kernel (float64 numpy array).

    Args:
        factor: downsampling factor (positive integer); scales Lanczos taps.
        kernel_type: ``'lanczos'``, ``'gauss'`` or ``'box'``.
        phase: ``0`` (centred on a sample) or ``0.5`` (centred between samples;
            the kernel then has ``kernel_width - 1`` taps, except for ``'box'``).
        kernel_width: nominal width ``W`` (see the module docstring).
        support: Lanczos lobe count ``a`` (required for ``'lanczos'``).
        sigma: Gaussian width (required for ``'gauss'``).

    Raises:
        ValueError: on an unsupported argument or combination.
    """
    w = _taps_1d(factor, kernel_type, phase, kernel_width, support, sigma)
    if kernel_type == "gauss":
        # The paper also divides by 2*pi*sigma^2; it cancels in the
        # normalisation but is kept so intermediate values match.
        k = np.outer(w, w) / (2.0 * np.pi * sigma * sigma)
    else:
        k = np.outer(w, w)
    return k / k.sum()


def get_kernel_1d(
    factor: int,
    kernel_type: str,
    phase: float,
    kernel_width: int,
    support: Optional[float] = None,
    sigma: Optional[float] = None,
) -> np.ndarray:
    """Return the normalised 1-D kernel ``k`` with ``outer(k, k) == get_kernel(...)``.

    Same arguments as :func:`get_kernel`.  ``k`` sums to one and is symmetric,
    so a separable implementation filters rows, then columns, with ``k``.
    """
    w = _taps_1d(factor, kernel_type, phase, kernel_width, support, sigma)
    return w / w.sum()


def resolve_kernel(
    kernel_type: str,
    factor: int,
    kernel_width: Optional[int] = None,
    support: Optional[float] = None,
    sigma: Optional[float] = None,
) -> Tuple[str, int, Optional[float], Optional[float]]:
    """Map a named kernel to ``(base_type, kernel_width, support, sigma)``.

    Named kernels fix their own parameters (as in the paper):

    * ``lanczos2``: support 2, width ``4 * factor + 1``;
    * ``lanczos3``: support 3, width ``6 * factor + 1``;
    * ``gauss12``: width 7, sigma 1/2;  ``gauss1sq2``: width 9, sigma 1/sqrt(2);
    * ``box``: width defaults to ``factor`` (the paper required it explicitly);
    * ``lanczos`` / ``gauss``: width and support/sigma must be passed.

    The paper silently overrode explicit values for named kernels; passing a
    *conflicting* explicit value raises ``ValueError`` instead.
    """
    factor = _check_factor(factor)
    named = {
        "lanczos2": ("lanczos", 4 * factor + 1, 2, None),
        "lanczos3": ("lanczos", 6 * factor + 1, 3, None),
        "gauss12": ("gauss", 7, None, 1.0 / 2.0),
        "gauss1sq2": ("gauss", 9, None, 1.0 / math.sqrt(2.0)),
    }
    if kernel_type in named:
        base, width, sup, sig = named[kernel_type]
        for arg, given, fixed in (
            ("kernel_width", kernel_width, width),
            ("support", support, sup),
            ("sigma", sigma, sig),
        ):
            if given is not None and given != fixed:
                raise ValueError(f"{arg}={given!r} conflicts with kernel_type {kernel_type!r} (which fixes {fixed!r})")
        return base, width, sup, sig
    if kernel_type == "box":
        return "box", factor if kernel_width is None else kernel_width, support, sigma
    if kernel_type in ("lanczos", "gauss"):
        if kernel_width is None:
            raise ValueError(f"kernel_width must be given for kernel_type {kernel_type!r}")
        return kernel_type, kernel_width, support, sigma
    raise ValueError(f"kernel_type must be one of {KERNEL_TYPES}, got {kernel_type!r}")


def downsampler_padding(kernel_size: int, factor: int) -> int:
    """Replication padding (each side) the paper uses for ``preserve_size=True``."""
    if kernel_size % 2 == 1:
        return (kernel_size - 1) // 2
    # int() truncation as in the paper (matters for odd factors).
    return int((kernel_size - factor) / 2.0)


class Downsampler(nn.Module):
    """Filter-and-decimate by ``factor`` with a fixed kernel (the paper's ``Downsampler``).

    Args:
        n_planes: number of channels; each is filtered independently.
        factor: integer decimation factor (the convolution stride).
        kernel_type: one of :data:`KERNEL_TYPES` (see :func:`resolve_kernel`).
        phase: 0 or 0.5 (Lanczos: both; gauss: 0 only; box: 0.5 only).
        kernel_width, support, sigma: only for ``'lanczos'``, ``'gauss'``,
            ``'box'`` (see :func:`resolve_kernel`).
        preserve_size: replicate-pad first so that the output is about
            ``input / factor`` (see :func:`downsampler_padding`).

    Attributes:
        kernel: the 2-D numpy kernel (float64), as in the paper.
        kernel_1d: its separable 1-D factor (float64).
        pad: padding on each side (0 when ``preserve_size`` is False).
        weight: dense diagonal ``(n_planes, n_planes, K, K)`` buffer (default dtype).
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
        factor = _check_factor(factor)
        phase = _check_phase(phase)
        base, width, support, sigma = resolve_kernel(kernel_type, factor, kernel_width, support, sigma)

        self.n_planes = int(n_planes)
        self.factor = factor
        self.kernel_type = kernel_type
        self.phase = phase
        self.preserve_size = bool(preserve_size)
        self.kernel = get_kernel(factor, base, phase, width, support=support, sigma=sigma)
        self.kernel_1d = get_kernel_1d(factor, base, phase, width, support=support, sigma=sigma)
        ksize = self.kernel.shape[0]
        self.pad = downsampler_padding(ksize, factor) if self.preserve_size else 0

        # Dense diagonal weight, like the paper's Conv2d(n, n, K): plane c only
        # sees input plane c.  Non-persistent: it is derived, not learned.
        # Built in the default dtype, like the paper's Conv2d weight.
        dtype = torch.get_default_dtype()
        weight = torch.zeros(self.n_planes, self.n_planes, ksize, ksize, dtype=dtype)
        k = torch.from_numpy(self.kernel).to(dtype)
        for c in range(self.n_planes):
            weight[c, c] = k
        self.register_buffer("weight", weight, persistent=False)
        self.padding = nn.ReplicationPad2d(self.pad) if self.preserve_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Filter and decimate ``x`` of shape ``(N, n_planes, H, W)``."""
        if self.padding is not None:
            x = self.padding(x)
        return F.conv2d(x, self.weight.to(dtype=x.dtype), stride=self.factor)

    def extra_repr(self) -> str:
        return (
            f"n_planes={self.n_planes}, factor={self.factor}, kernel_type={self.kernel_type!r}, "
            f"phase={self.phase}, kernel_size={self.kernel.shape[0]}, pad={self.pad}"
        )
