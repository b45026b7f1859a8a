"""Numbers that :func:`dip_fast.restore` derives from the pixels, made safe for degenerate images.

This module recognises an observation that is constant over its known
pixels, whose restoration for the built-in tasks is that constant: Deep
Image Prior's sigmoid output can only approach 0 and 1, so fitting would
return a slightly wrong image after a long run, where the exact answer is
free.  (The noise level of a flat image is :mod:`dip_fast.pipeline.noise_level`'s
concern: it returns 0 with a warning.)
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ["constant_value"]


def constant_value(color: torch.Tensor, mask: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The ``(1, C, 1, 1)`` colour of an image that holds one value per channel, else None.

    Args:
        color: ``(1, C, H, W)`` observation.
        mask: ``(1, 1 or C, H, W)`` known-pixel mask (1 = known) for inpainting;
            only the known pixels count.  A channel without any known pixel
            has no value to spread, so the image is not treated as constant.
    """
    x = color.detach()
    if mask is None:
        lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    else:
        known = mask.detach().expand_as(x) > 0
        inf = torch.tensor(math.inf, dtype=x.dtype, device=x.device)
        lo = torch.where(known, x, inf).amin(dim=(2, 3), keepdim=True)
        hi = torch.where(known, x, -inf).amax(dim=(2, 3), keepdim=True)
    if not bool(torch.isfinite(lo).all()) or not bool(torch.equal(lo, hi)):
        return None
    return lo
