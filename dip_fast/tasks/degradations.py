"""Degradations: the synthetic damage the demo, the benchmarks and the tests inflict on clean images.

One unit for noise everywhere: ``sigma`` is the standard deviation in 0-255
units (25 means 25/255 of the range), as ``restore(sigma=...)``, the CLI's
``--sigma`` and ``RestoreInfo.sigma`` take it, whatever the array's dtype.

Torch helpers take and return ``(..., C, H, W)`` float tensors in [0, 1];
the numpy helpers (``*_array``) take and return ``H x W (x C)`` float32
arrays in [0, 1], for code that holds images as arrays (the demo).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "KernelLike",
    "MAX_KERNEL_SIZE",
    "add_gaussian_noise",
    "add_gaussian_noise_array",
    "bernoulli_mask",
    "bicubic_array",
    "blur",
    "crop_to_multiple",
    "downscale_array",
    "make_blur_kernel",
    "text_mask",
    "to_uint8",
]

KernelLike = Union[str, np.ndarray, torch.Tensor, Sequence[Sequence[float]]]

# --------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------


def add_gaussian_noise(
    image: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``clip(image + sigma/255 * N(0, 1), 0, 1)``: the denoising notebook's synthetic noise.

    Args:
        image: float tensor in [0, 1].
        sigma: standard deviation in 0-255 units.
        generator: draws the noise (seed it for a repeatable image).

    Examples:
        >>> import torch
        >>> from dip_fast.tasks.degradations import add_gaussian_noise
        >>> clean = torch.full((1, 3, 64, 64), 0.5)
        >>> noisy = add_gaussian_noise(clean, 25, torch.Generator().manual_seed(0))
        >>> noisy.shape, bool(noisy.min() >= 0), 23 < float((noisy - clean).std()) * 255 < 27
        (torch.Size([1, 3, 64, 64]), True, True)
    """
    return _add_noise(image, sigma / 255.0, generator)


def _add_noise(image: torch.Tensor, std: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``clip(image + std * N(0, 1), 0, 1)`` with ``std`` a fraction of the range."""
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return (image + std * noise).clamp(0.0, 1.0)


def add_gaussian_noise_array(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """:func:`add_gaussian_noise` for a float array in [0, 1], drawn with numpy's generator seeded by ``seed``."""
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, sigma / 255.0, image.shape), 0.0, 1.0).astype(np.float32)


# --------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------


def bernoulli_mask(
    shape: Sequence[int],
    keep_fraction: float,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Random known-pixel mask: each entry is 1 with probability ``keep_fraction``.

    The restoration notebook keeps a pixel where ``uniform > zero_fraction``,
    i.e. ``keep_fraction = 1 - zero_fraction``.
    """
    if not 0.0 <= keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in [0, 1], got {keep_fraction!r}")
    u = torch.rand(tuple(shape), generator=generator, device=device)
    return (u > 1.0 - keep_fraction).to(torch.float32)


def text_mask(height: int, width: int) -> np.ndarray:
    """A text-overlay mask (False under the letters, True elsewhere), like the paper's inpainting example."""
    canvas = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(canvas)
    size = max(8, height // 9)
    try:
        font: object = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        font = ImageFont.load_default()
    words = "deep image prior restores what the network can say".split()
    for row, y in enumerate(range(2, height, max(1, height // 6))):
        line = " ".join(words[row % 4 :] + words[: row % 4])
        draw.text((2 - (7 * row) % 20, y), line, fill=0, font=font)
    return np.asarray(canvas) > 127


# --------------------------------------------------------------------------
# Resampling and cropping
# --------------------------------------------------------------------------


def to_uint8(image: np.ndarray) -> np.ndarray:
    """A float array in [0, 1] as uint8, rounded to nearest."""
    return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)


def _resize_array(image: np.ndarray, size: "tuple[int, int]", method: Image.Resampling) -> np.ndarray:
    """Resize a float array in [0, 1] to ``size = (W, H)`` through 8-bit Pillow, as the notebooks did."""
    return np.asarray(Image.fromarray(to_uint8(image)).resize(size, method)).astype(np.float32) / 255.0


def downscale_array(image: np.ndarray, scale: int) -> np.ndarray:
    """Lanczos (Pillow) downscaling by ``scale``, as the super-resolution notebook made its inputs."""
    h, w = image.shape[:2]
    return _resize_array(image, (w // scale, h // scale), Image.Resampling.LANCZOS)


def bicubic_array(image: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic (Pillow) upscaling by ``scale``: the super-resolution baseline."""
    h, w = image.shape[:2]
    return _resize_array(image, (w * scale, h * scale), Image.Resampling.BICUBIC)


def crop_to_multiple(image: torch.Tensor, d: int) -> torch.Tensor:
    """Centre-crop the last two dims down to multiples of ``d`` (the notebooks' ``crop_image``)."""
    h, w = image.shape[-2:]
    nh, nw = h - h % d, w - w % d
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[..., top : top + nh, left : left + nw]


# --------------------------------------------------------------------------
# Blur
# --------------------------------------------------------------------------

_KERNEL_FORMS = "'gaussian:SIGMA', 'box:N' (N odd) or a 2-D array with odd sides"

#: Largest blur kernel side accepted (a Gaussian of sigma 42): wider blurs leave nothing to recover
#: and would only allocate a huge kernel by mistake (e.g. 'gaussian:10000').
MAX_KERNEL_SIZE = 255


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian of std ``sigma`` pixels, ``2 * ceil(3 sigma) + 1`` wide (covers +-3 sigma)."""
    radius = math.ceil(3.0 * sigma)
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return (torch.outer(g, g) / g.sum() ** 2).to(torch.float32)


def _kernel_from_string(spec: str, name: str) -> torch.Tensor:
    """``'gaussian:SIGMA'`` or ``'box:N'`` as a kernel (see :func:`make_blur_kernel`)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "gaussian":
        try:
            sigma = float(arg)
        except ValueError:
            sigma = float("nan")
        if not math.isfinite(sigma) or sigma <= 0:
            raise ValueError(f"{name}: 'gaussian:SIGMA' needs a positive SIGMA in pixels, got {spec!r}")
        if 2 * math.ceil(3 * sigma) + 1 > MAX_KERNEL_SIZE:
            raise ValueError(f"{name}: 'gaussian:SIGMA' must have SIGMA <= {(MAX_KERNEL_SIZE - 1) // 6} "
                             f"(a kernel at most {MAX_KERNEL_SIZE} wide), got {spec!r}")
        return _gaussian_kernel(sigma)
    if kind == "box":
        n = int(arg) if arg.strip().isdigit() else 0
        if n < 1 or n % 2 == 0 or n > MAX_KERNEL_SIZE:
            raise ValueError(f"{name}: 'box:N' needs an odd integer N in [1, {MAX_KERNEL_SIZE}] "
                             f"(a centred kernel), got {spec!r}")
        return torch.full((n, n), 1.0 / (n * n))
    raise ValueError(f"{name} must be {_KERNEL_FORMS}, got {spec!r}")


def make_blur_kernel(spec: KernelLike, name: str = "blur_kernel") -> torch.Tensor:
    """A blur kernel as a 2-D float32 CPU tensor summing to 1.

    Args:
        spec: ``'gaussian:SIGMA'`` (``SIGMA > 0`` pixels; ``2 * ceil(3 SIGMA) + 1``
            wide), ``'box:N'`` (``N x N`` mean, ``N`` odd >= 1), or a 2-D
            array, tensor or nested list with odd sides and non-negative
            finite entries, normalised here to sum 1.
        name: the argument's name in error messages.

    Raises:
        ValueError: an unknown string, a bad parameter, a kernel that is not
            2-D with odd sides, or one with negative, NaN/inf entries or zero sum.
        TypeError: not a string, array or tensor of numbers.

    Examples:
        >>> from dip_fast.tasks.degradations import make_blur_kernel
        >>> k = make_blur_kernel("box:3")
        >>> tuple(k.shape), round(float(k.sum()), 6)
        ((3, 3), 1.0)
        >>> tuple(make_blur_kernel("gaussian:1").shape)
        (7, 7)
    """
    if isinstance(spec, str):
        return _kernel_from_string(spec, name)
    if isinstance(spec, torch.Tensor):
        values = None if spec.is_complex() else spec.detach().to("cpu", torch.float64)
    else:
        try:
            arr = np.asarray(spec)
            values = torch.from_numpy(arr.astype(np.float64)) if arr.dtype.kind in "biuf" else None
        except (TypeError, ValueError):
            values = None
    if values is None:
        raise TypeError(f"{name} must be {_KERNEL_FORMS}, got {type(spec).__name__}")
    if values.dim() != 2 or values.shape[0] % 2 == 0 or values.shape[1] % 2 == 0:
        raise ValueError(f"{name} must be a 2-D kernel with odd sides (centred), got shape {tuple(values.shape)}")
    if max(values.shape) > MAX_KERNEL_SIZE:
        raise ValueError(f"{name} must be at most {MAX_KERNEL_SIZE} wide, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if (values < 0).any():
        raise ValueError(f"{name} must be non-negative (a blur), got a minimum of {values.min().item():g}")
    total = values.sum()
    if total <= 0:
        raise ValueError(f"{name} sums to 0; a blur kernel needs a positive sum")
    return (values / total).to(torch.float32)


def blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve every channel of ``(N, C, H, W)`` ``image`` with the 2-D ``kernel``; same-size output.

    Boundary model: the image is reflect-padded (mirrored about the edge
    pixel, ``F.pad(mode='reflect')``) by half the kernel size before a
    valid convolution.  Where the image is too small for that (half the
    kernel not smaller than a side), it is edge-replicated instead.  The
    kernel is flipped, so this is a true convolution (as
    ``scipy.ndimage.convolve``), not a correlation; for symmetric kernels the
    two agree.

    Examples:
        >>> import torch
        >>> from dip_fast.tasks.degradations import blur, make_blur_kernel
        >>> flat = torch.full((1, 1, 8, 8), 0.25)
        >>> torch.allclose(blur(flat, make_blur_kernel("box:3")), flat)
        True
    """
    kh, kw = kernel.shape
    h, w = image.shape[-2:]
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    mode = "reflect" if kh // 2 < h and kw // 2 < w else "replicate"
    c = image.shape[1]
    weight = kernel.flip(0, 1).to(image)[None, None].expand(c, 1, kh, kw)
    return F.conv2d(F.pad(image, pad, mode=mode), weight, groups=c)
