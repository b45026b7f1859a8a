"""The noise level estimate that restore() and its stopping rule use (dip_fast.pipeline.noise_level)."""
from __future__ import annotations

import pytest
import torch
from skimage import data

from dip_fast.pipeline import noise_level
from dip_fast.pipeline.noise_level import estimate_sigma, patch_size_for


def _photo(size: int = 128) -> torch.Tensor:
    """A textured photograph crop (hair, fabric, a flag), ``(1, 3, size, size)`` in [0, 1]."""
    img = torch.from_numpy(data.astronaut()[:size, 100:100 + size].copy()).permute(2, 0, 1).double() / 255
    return img[None]


def _noisy(clean: torch.Tensor, sigma: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (clean + torch.randn(clean.shape, generator=g, dtype=clean.dtype) * sigma / 255).clamp(0, 1)


def _present(noisy: torch.Tensor, clean: torch.Tensor) -> float:
    return 255 * float((noisy - clean).square().mean().sqrt())


@pytest.mark.parametrize("sigma, tolerance", [(5, 0.06), (15, 0.05), (25, 0.05), (50, 0.05)])
def test_estimate_on_a_textured_photograph_is_within_5_percent_of_the_noise(sigma, tolerance):
    clean = _photo()
    noisy = _noisy(clean, sigma)
    # Read before clipping: the sigma added; without the clipping model: the noise present after clipping.
    # At sigma 5 this crop's hair and fabric are as faint as the noise in some patch directions and join
    # the noise tail: it reads 5.8% high (3.2% before the sample-spread correction, which scales the tail).
    assert estimate_sigma(noisy) == pytest.approx(sigma, rel=tolerance)
    assert estimate_sigma(noisy, clipped=False) == pytest.approx(_present(noisy, clean), rel=tolerance)


@pytest.mark.parametrize("sigma", [25, 50])
def test_a_clipped_photograph_reads_the_sigma_added(sigma):
    # The photograph darkened and brightened so that a tenth or more of the noisy values sit at 0 or 1.
    clean = ((_photo() - 0.5) * 1.6 + 0.5).clamp(0, 1)
    noisy = _noisy(clean, sigma)
    assert noise_level.clipped_share(noisy) > 0.1
    assert estimate_sigma(noisy) == pytest.approx(sigma, rel=0.03)
    # The patch estimate alone reads the clipped noise, well below it.
    assert estimate_sigma(noisy, clipped=False) < 0.95 * sigma


def test_without_clipped_values_the_clipping_model_changes_nothing():
    clean = _photo() * 0.6 + 0.2
    noisy = clean + torch.randn(clean.shape, generator=torch.Generator().manual_seed(0), dtype=clean.dtype) * 0.02
    assert noise_level.clipped_share(noisy) == 0.0
    assert estimate_sigma(noisy) == estimate_sigma(noisy, clipped=False)
    # Values outside [0, 1] were not clipped there: no model either.
    shifted = noisy - 0.25
    assert estimate_sigma(shifted) == estimate_sigma(shifted, clipped=False)


def test_a_clean_photograph_reads_far_below_any_noise_level_worth_denoising():
    # Texture is not noise: it lies in few patch directions (the wavelet estimator read texture as noise).
    assert estimate_sigma(_photo()) < 2.0


def test_a_grey_image_stored_as_rgb_counts_its_noise_once():
    grey = _noisy(_photo()[:, :1], 20)
    assert estimate_sigma(grey.expand(1, 3, -1, -1)) == pytest.approx(estimate_sigma(grey), rel=1e-9)


def test_a_large_image_is_sampled_on_a_grid_and_stays_accurate(monkeypatch):
    clean = torch.nn.functional.interpolate(_photo(256), scale_factor=2, mode="bilinear")
    noisy = _noisy(clean, 25)
    full = estimate_sigma(noisy)
    monkeypatch.setattr(noise_level, "MAX_PATCHES", 16384)  # stride 4 instead of 1
    assert estimate_sigma(noisy) == pytest.approx(full, rel=0.03)
    assert full == pytest.approx(_present(noisy, clean), rel=0.05)


def test_too_small_an_image_reads_zero_with_a_warning():
    with pytest.warns(UserWarning, match="shows no noise"):
        assert estimate_sigma(torch.rand(1, 3, 3, 3)) == 0.0


@pytest.mark.parametrize("kind", ["ramp", "stripes", "waves"])
def test_clean_synthetic_images_read_zero_with_a_warning(kind):
    # Their patches span few directions; the tail of the spectrum is exact zeros, not noise.
    t = torch.arange(64, dtype=torch.float64)
    if kind == "ramp":
        image = (t / 63).repeat(3, 64, 1)
    elif kind == "stripes":
        image = (0.25 + 0.5 * (t % 2)).repeat(3, 64, 1).transpose(1, 2)
    else:
        w = torch.outer(torch.sin(t / 3), torch.cos(t / 5))
        image = torch.stack([0.5 + 0.4 * w, 0.5 + 0.3 * w**2, 0.2 + 0.1 * w])
    with pytest.warns(UserWarning, match="shows no noise"):
        assert estimate_sigma(image[None]) == 0.0
    noisy = _noisy(image[None], 10)
    assert estimate_sigma(noisy) == pytest.approx(_present(noisy, image[None]), rel=0.05)


def test_non_finite_pixels_are_refused():
    x = torch.rand(1, 3, 32, 32)
    x[0, 1, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        estimate_sigma(x)


def test_patch_size_shrinks_for_small_images():
    assert patch_size_for(128, 128, 3) == 7
    assert patch_size_for(16, 16, 3) == 4
    assert patch_size_for(16, 16, 1) == 6
    assert patch_size_for(1, 100, 3) == 0


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 96, 160), (1, 128, 128)])
def test_marchenko_pastur_quantiles_match_overlapping_patches_of_white_noise(shape):
    # The sample-spread correction rests on this: the law's expected eigenvalues are those of overlapping
    # patches (correlated samples), at every tail length the selection may keep.
    d = patch_size_for(shape[1], shape[2], shape[0])
    count = (shape[1] - d + 1) * (shape[2] - d + 1)
    dims = shape[0] * d * d
    draws = torch.stack([noise_level._patch_eigenvalues(torch.randn(shape, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(s)), d, 1)[0] for s in range(6)])
    measured = draws / draws.mean(dim=1, keepdim=True)  # each draw's own variance: its shape only
    expected = noise_level._marchenko_pastur_quantiles(dims, count)
    for k in (dims // 2, (3 * dims) // 4, (9 * dims) // 10):
        assert float(measured[:, :k].mean()) == pytest.approx(float(expected[:k].mean()), rel=0.004)


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 128, 128), (1, 128, 128)])
def test_white_noise_reads_its_variance_without_the_tails_shortfall(shape):
    # The kept tail of a sample's eigenvalues averages 2-8% below sigma^2 (more with fewer patches);
    # corrected, the estimate of white noise sits within 1% of the sample's own standard deviation.
    ratios, raw = [], []
    for seed in range(4):
        noise = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 0.1
        ratios.append(estimate_sigma((noise + 0.5)[None], clipped=False) / (255 * float(noise.std())))
        d = patch_size_for(shape[1], shape[2], shape[0])
        eigenvalues, _ = noise_level._patch_eigenvalues(noise, d, 1)
        raw.append(float(eigenvalues[: noise_level._noise_tail(eigenvalues)].mean()) ** 0.5 / float(noise.std()))
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, abs=0.01)
    assert sum(raw) < sum(ratios)  # the shortfall the correction removes
