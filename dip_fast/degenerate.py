"""Numbers that :func:`dip_fast.restore` derives from the pixels, made safe for degenerate images.

A run derives settings from the data before it fits anything: the noise
level (sigma) of a denoising observation, and from it the input
perturbation.  Images without texture break the usual estimators: the
wavelet estimator has no non-zero detail coefficient to take the median of
in a constant image (numpy warns and it returns NaN), and a NaN sigma then
poisons the network input and every step after it.  This module

* estimates sigma per colour channel and drops the channels that give no
  estimate, falling back (with a warning) to 0 when none does, and
* recognises an observation that is constant over its known pixels, whose
  restoration for the built-in tasks is that constant: Deep Image Prior's
  sigmoid output can only approach 0 and 1, so fitting would return a
  slightly wrong image after a long run, where the exact answer is free.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch

__all__ = ["constant_value", "estimate_sigma"]


def estimate_sigma(color: torch.Tensor, stacklevel: int = 2) -> Optional[float]:
    """Noise level (0-255) of a ``(1, C, H, W)`` image in [0, 1] by scikit-image's wavelet estimator.

    Each channel is estimated on its own and the finite estimates are
    averaged: a channel without fine detail (a constant channel, or one
    whose rows are all alike) carries no information about the noise.  When
    no channel gives an estimate the image has no fine detail at all, so it
    shows no noise either: the result is 0, with a ``UserWarning`` saying so.

    Args:
        color: the observation, ``(1, C, H, W)``.
        stacklevel: passed to :func:`warnings.warn`, to point at the caller's caller.

    Returns:
        A finite sigma >= 0, or None when scikit-image or PyWavelets is missing.
    """
    try:
        from skimage.restoration import estimate_sigma as wavelet_sigma
    except ImportError:
        return None
    img = color[0].detach().to("cpu", torch.float64).permute(1, 2, 0).numpy()
    with warnings.catch_warnings():
        # A channel with no non-zero detail coefficient makes numpy warn about
        # an empty median ("Mean of empty slice") and gives NaN: handled below.
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            per_channel = wavelet_sigma(img, channel_axis=-1, average_sigmas=False)
        except ImportError:  # PyWavelets is an optional dependency of scikit-image
            return None
    finite = [float(s) for s in per_channel if math.isfinite(float(s))]
    if not finite:
        warnings.warn(
            "dip_fast: cannot estimate the noise level: the image has no fine detail (it is flat, or "
            "changes along one direction only), so it shows no noise; assuming sigma=0 "
            "(pass sigma= to denoise it anyway)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return 0.0
    return 255.0 * max(0.0, sum(finite) / len(finite))


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
