"""The noise level of an observation, from the statistics of its patches.

:func:`restore` needs sigma twice when the caller does not give it: for the
input perturbation, and as the level the stopping rule holds the residual to
(:class:`dip_fast.core.early_stop.DiscrepancyRule`).  The second use is
unforgiving: a level set too high stops the run before the image is fitted.

Why not the wavelet estimator (``skimage.restoration.estimate_sigma``, the
median of the finest diagonal wavelet coefficients)?  Texture also lives in
those coefficients, so on textured photographs it over-estimates, most at
low noise.  On 128x128 centre crops of the 68 CBSD68 photographs it was off
by up to +83% at sigma 15 and +38% at sigma 25 (against the standard
deviation of the clipped noise actually added), and those crops stopped
early and under-fitted (``bench/README.md``, "Early stopping").

The estimate here follows Chen, Zhu and Heng ("An Efficient Statistical
Method for Image Noise Level Estimation", ICCV 2015).  Overlapping colour
patches of a natural image lie close to a low-dimensional subspace, while
white noise spreads equally over every direction.  So the smallest
eigenvalues of the patch covariance are those of the noise alone, each
close to sigma^2.  Going from all eigenvalues towards fewer, the first tail
whose mean equals its median (as many values above the mean as below) is
taken as the noise part.  A finite sample's noise eigenvalues spread around
sigma^2 (the Marchenko-Pastur law), so that tail, which leaves out the
largest of them, averages below it: 2% of sigma^2 at 128x128, 7% at 64x64.
Its mean is divided by the law's expectation for the same tail
(:func:`_tail_variance`), which makes the estimate of white noise unbiased
to 0.3%.  On 128x128 centre crops of the 68 CBSD68 photographs with under
5% of their values clipped, the estimate was within 0.6-1.4%
(root-mean-square) of the sigma added at sigma 5-50 (0.4-1.1% at
256x256); at sigma 5 it reads 1% high on average, where texture as faint
as the noise joins the tail (``bench/noise_level.py``).

Clipping.  Stored photographs are clipped at 0 and 1, and where the image
is dark or bright the noise is clipped with it: the observation
``y = clip(x + n, 0, 1)`` then varies by less than sigma^2 around its mean
(half of it, less the clip's bias, at x = 0).  The patch estimate reads the
mean of that variance over the pixels, not the sigma that was added: on the
CBSD68 crops with at least 5% of their values clipped it read 7-10% low on
average (Set5's baby at sigma 25: 6.5% low), and the mean variance of the
clipped-Gaussian model at the true image agreed with it to about 1%.  So
when values sit at 0 or 1, ``estimate_sigma`` reads the unclipped sigma from
the model (:func:`dip_fast.core.early_stop.clipped_observation_variance`):
the true value of each pixel is taken as the one whose clipped mean is the
3x3 mean of the observation around it
(:func:`dip_fast.core.early_stop.clipped_mean_inverse`), and sigma is the
level whose mean clipped variance over those values is the patch estimate
(a fixed point, a few iterations).  On the same crops this came within
1.0-2.1% (root-mean-square) of the added sigma at 128x128 (1.5% at sigma
25, 1.7% at 50; it reads 0.5-1% low on average) and 0.8-1.4% at 256x256;
crops without clipping read as
before, since the model's variance is sigma^2 away from 0 and 1.  Limits:
the 3x3 mean blurs a dark texture towards its surroundings; a crop clipped
over a third of its values still reads about 5% low; and a region at exactly
0 or 1 with no noise at all (a letterbox) counts as clipped noise, which
raises the estimate less than the region lowered the patch estimate, so the
result stays on the low side.  ``clipped=False`` gives the patch estimate
itself (the noise present, for observations whose noise was not clipped at
0 and 1, such as JPEG's).

    >>> import torch
    >>> from dip_fast.pipeline.noise_level import estimate_sigma
    >>> g = torch.Generator().manual_seed(0)
    >>> clean = torch.linspace(0.2, 0.8, 128).repeat(3, 128, 1)[None]        # a smooth ramp
    >>> noisy = clean + torch.randn(clean.shape, generator=g) * (20 / 255)
    >>> round(estimate_sigma(noisy))
    20
"""
from __future__ import annotations

import math
import warnings
from typing import List, Tuple

import torch

from ..core.early_stop import clipped_mean_inverse, clipped_observation_variance

__all__ = ["clipped_share", "estimate_sigma", "patch_size_for"]

#: Side of the square patches (7x7, as the paper's experiments use 7 or 8).
PATCH = 7
#: At most this many patches enter the covariance; larger images are sampled on a regular grid (stride).
MAX_PATCHES = 1 << 16
#: An eigenvalue below this share of the largest is zero: a direction in which the patches do not vary
#: at all.  White noise varies in every direction, so such an image holds none (a clean synthetic image:
#: a ramp, stripes, a rendered drawing).
RANK_TOLERANCE = 1e-10
#: Fixed-point iterations of the clipping correction (the third changes sigma by under 0.1% on CBSD68 crops).
CLIP_ITERATIONS = 4


def clipped_share(color: torch.Tensor) -> float:
    """Share of the values of an image in [0, 1] that sit at 0 or 1 (clipped), over all channels.

    >>> import torch
    >>> clipped_share(torch.tensor([[[[0.0, 0.5], [1.0, 0.25]]]]))
    0.5
    """
    x = color.detach()
    return float(((x <= 0) | (x >= 1)).double().mean()) if x.numel() else 0.0


def _unclipped_variance(x: torch.Tensor, variance: float, stride: int) -> float:
    """sigma^2 before clipping at 0 and 1, from the patch estimate ``variance`` of ``(C, H, W)`` (see the docstring)."""
    local = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x[None], (1, 1, 1, 1), mode="reflect"), 3, 1)[0]
    local = local[:, ::stride, ::stride].reshape(-1)  # the same grid as the patches: a mean needs no more
    sigma = math.sqrt(variance)
    for _ in range(CLIP_ITERATIONS):
        ratio = float(clipped_observation_variance(clipped_mean_inverse(local, sigma), sigma).mean()) / sigma**2
        sigma = math.sqrt(variance / max(ratio, 1e-3))
    return sigma * sigma


def patch_size_for(height: int, width: int, channels: int) -> int:
    """The largest patch side, at most :data:`PATCH`, that leaves at least 3 patches per covariance dimension.

    >>> patch_size_for(128, 128, 3), patch_size_for(16, 16, 3), patch_size_for(3, 3, 3)
    (7, 4, 0)
    """
    for d in range(PATCH, 1, -1):
        if height >= d and width >= d and (height - d + 1) * (width - d + 1) >= 3 * channels * d * d:
            return d
    return 0


def _distinct_varying_channels(x: torch.Tensor) -> List[int]:
    """Indices of the channels of ``(C, H, W)`` that vary and are not an exact copy of an earlier one."""
    kept: List[int] = []
    for c in range(x.shape[0]):
        if bool(x[c].amax() == x[c].amin()):
            continue
        if any(torch.equal(x[c], x[k]) for k in kept):
            continue
        kept.append(c)
    return kept


def _patch_eigenvalues(x: torch.Tensor, d: int, stride: int) -> Tuple[torch.Tensor, int]:
    """Ascending eigenvalues of the covariance of the ``d`` x ``d`` patches of ``(C, H, W)`` on a ``stride``
    grid, and the number of patches."""
    patches = torch.nn.functional.unfold(x[None], d, stride=stride)[0]  # (C d d, number of patches)
    centred = patches - patches.mean(dim=1, keepdim=True)
    return torch.linalg.eigvalsh(centred @ centred.T / centred.shape[1]), centred.shape[1]


def _noise_tail(eigenvalues: torch.Tensor) -> int:
    """How many of the smallest eigenvalues are noise alone (0: none; see the module docstring)."""
    if float(eigenvalues[0]) <= RANK_TOLERANCE * float(eigenvalues[-1]):
        return 0  # some direction without any variance: no white noise
    for k in range(eigenvalues.numel(), 1, -1):
        tail = eigenvalues[:k]
        mean = tail.mean()
        if int((tail > mean).sum()) == int((tail < mean).sum()):
            return k
    return 1  # a single value is its own median


def _marchenko_pastur_quantiles(dimensions: int, patches: int) -> torch.Tensor:
    """Expected ascending eigenvalues of the sample covariance of white noise of variance 1.

    The quantiles at ``(i - 1/2) / dimensions`` of the Marchenko-Pastur law of
    ratio ``dimensions / patches``; they match the mean eigenvalues of
    overlapping patches of white noise to 0.1% (``tests/test_noise_level.py``).
    """
    ratio = dimensions / patches
    low, high = (1 - math.sqrt(ratio)) ** 2, (1 + math.sqrt(ratio)) ** 2
    x = torch.linspace(low, high, 20_001, dtype=torch.float64)
    cdf = torch.cumsum(((high - x) * (x - low)).clamp_min(0).sqrt() / x, 0)
    levels = (torch.arange(dimensions, dtype=torch.float64) + 0.5) / dimensions
    return x[torch.searchsorted(cdf / cdf[-1], levels).clamp_max(x.numel() - 1)]


def _tail_variance(eigenvalues: torch.Tensor, k: int, patches: int) -> float:
    """sigma^2 from the mean of the ``k`` smallest eigenvalues, corrected for the sample's spread.

    A finite sample's eigenvalues of white noise spread around its variance
    (Marchenko-Pastur), so the ``k`` smallest average below it: 2% of sigma^2
    for 135 of 147 at 128x128, 7% for 119 at 64x64.  The noise directions
    are counted as those below the law's upper edge at the tail's level (the
    signal's lie above it), and the tail's mean is divided by the mean of the
    law's ``k`` smallest expected eigenvalues in that many directions; twice,
    since the edge depends on sigma.
    """
    tail_mean = float(eigenvalues[:k].mean())
    variance = tail_mean
    for _ in range(2):
        edge = variance * (1 + math.sqrt(eigenvalues.numel() / patches)) ** 2
        noise_dims = max(k, int((eigenvalues <= edge).sum()))
        variance = tail_mean / float(_marchenko_pastur_quantiles(noise_dims, patches)[:k].mean())
    return variance


def estimate_sigma(color: torch.Tensor, stacklevel: int = 2, clipped: bool = True) -> float:
    """Noise level (0-255) of a ``(1, C, H, W)`` image in [0, 1], from its patch covariance.

    Constant channels and exact copies of another channel are left out (a
    grey photograph stored as RGB holds its noise once, not three times).
    When nothing is left, when the image is too small for 3 patches per
    covariance dimension, or when its patches do not vary at all in some
    direction (white noise varies in all of them), the image shows no noise
    that can be measured: the result is 0, with a ``UserWarning`` saying so.

    Args:
        color: the observation, ``(1, C, H, W)``.
        stacklevel: passed to :func:`warnings.warn`, to point at the caller's caller.
        clipped: when values sit at 0 or 1 (and none outside), read the
            sigma of the Gaussian noise before it was clipped (see the module
            docstring); False: the noise present in the observation.

    Returns:
        A finite sigma >= 0.

    Example (a ramp into black and white, 15% of its values clipped):

        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> clean = torch.linspace(-0.1, 1.1, 128).clamp(0, 1).repeat(3, 128, 1)[None]
        >>> noisy = (clean + torch.randn(clean.shape, generator=g) * (25 / 255)).clamp(0, 1)
        >>> round(clipped_share(noisy), 2), round(estimate_sigma(noisy, clipped=False)), round(estimate_sigma(noisy))
        (0.15, 23, 25)
    """
    x = color[0].detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("estimate_sigma: the image holds NaN or infinite values")
    channels = _distinct_varying_channels(x)
    d = patch_size_for(x.shape[1], x.shape[2], len(channels)) if channels else 0
    variance = 0.0
    if d:
        x = x[channels]
        count = (x.shape[1] - d + 1) * (x.shape[2] - d + 1)
        stride = max(1, math.ceil(math.sqrt(count / MAX_PATCHES)))
        eigenvalues, sampled = _patch_eigenvalues(x, d, stride)
        k = _noise_tail(eigenvalues)
        if k:
            variance = _tail_variance(eigenvalues, k, sampled)
        if clipped and variance > 0.0 and bool(((x <= 0) | (x >= 1)).any()) and 0 <= float(x.min()) \
                and float(x.max()) <= 1:
            variance = _unclipped_variance(x, variance, stride)
    if variance <= 0.0:
        warnings.warn(
            "dip_fast: cannot estimate the noise level: the image shows no noise (it is flat, too small, or "
            "free of noise); assuming sigma=0 (pass sigma= to denoise it anyway)",
            UserWarning,
            stacklevel=stacklevel + 1,
        )
        return 0.0
    return 255.0 * math.sqrt(variance)
