"""Image quality metrics used by the optimisation loop."""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["psnr", "psnr_float"]


def psnr(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    per_image: bool = False,
) -> torch.Tensor:
    """Peak signal-to-noise ratio ``10 log10(data_range^2 / MSE)`` in dB.

    Args:
        a, b: tensors of the same shape.
        data_range: peak value range (1 for images in [0, 1]).
        mask: optional tensor broadcastable to ``a``; the MSE is then the mean
            over pixels where the mask is non-zero (weighted by the mask), so
            that unknown pixels of an inpainting observation do not count.
        per_image: one PSNR per entry of the first dimension (the images of
            a batch, or the networks of a packed run) instead of one overall.

    Returns:
        A 0-d float32 tensor (``(N,)`` with ``per_image``) on ``a``'s device
        (no host synchronisation); ``inf`` when the inputs are identical.
    """
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")
    # Work in float32 so that half-precision inputs do not lose the square.
    diff = a.detach().float() - b.detach().float()
    sq = diff * diff
    dims = tuple(range(1, sq.dim())) if per_image else tuple(range(sq.dim()))
    if mask is None:
        mse = sq.mean(dim=dims)
    else:
        m = mask.detach().float().expand_as(sq)
        mse = (sq * m).sum(dim=dims) / m.sum(dim=dims)
    # Scalars stay Python numbers: a tensor made from one would be a host-to-device
    # copy, which a CUDA graph cannot capture.
    return mse.reciprocal().mul(data_range * data_range).log10().mul(10.0)


def psnr_float(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, mask: Optional[torch.Tensor] = None) -> float:
    """:func:`psnr` as a Python float (synchronises with the device)."""
    return float(psnr(a, b, data_range=data_range, mask=mask))
