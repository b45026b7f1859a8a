"""Tests of the reference resampling kernels and Downsampler."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dip_fast.reference import Downsampler, get_kernel, get_kernel_1d, resolve_kernel

FACTORS = [2, 3, 4, 8]
# (named kernel, phase) pairs the paper supports.
SUPPORTED = [
    ("lanczos2", 0), ("lanczos2", 0.5), ("lanczos3", 0), ("lanczos3", 0.5),
    ("gauss12", 0), ("gauss1sq2", 0), ("box", 0.5),
]

pytestmark = pytest.mark.usefixtures("one_thread")




def lanczos_1d(factor: int, a: int, phase: float) -> np.ndarray:
    """Independent Lanczos window: sinc(x) * sinc(x / a) at taps spaced 1/factor, normalised.

    Phase 0 has 2*a*factor + 1 taps centred on a sample; phase 0.5 has 2*a*factor taps
    centred between the two middle samples.
    """
    n = 2 * a * factor + (1 if phase == 0 else 0)
    x = (np.arange(n) - (n - 1) / 2.0) / factor
    w = np.sinc(x) * np.sinc(x / a)  # numpy's sinc is sin(pi x) / (pi x)
    return w / w.sum()


def gauss_1d(width: int, sigma: float) -> np.ndarray:
    """Independent Gaussian window of the paper: taps at (j - centre) / 2."""
    x = (np.arange(width) - (width - 1) / 2.0) / 2.0
    w = np.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def expected_1d(kernel: str, factor: int, phase: float) -> np.ndarray:
    if kernel == "lanczos2":
        return lanczos_1d(factor, 2, phase)
    if kernel == "lanczos3":
        return lanczos_1d(factor, 3, phase)
    if kernel == "gauss12":
        return gauss_1d(7, 0.5)
    if kernel == "gauss1sq2":
        return gauss_1d(9, 1 / np.sqrt(2))
    if kernel == "box":
        return np.full(factor, 1.0 / factor)
    raise AssertionError(kernel)


@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("kernel,phase", SUPPORTED)
def test_kernels_match_formula_and_are_separable(kernel, phase, factor):
    base, width, support, sigma = resolve_kernel(kernel, factor)
    k1 = get_kernel_1d(factor, base, phase, width, support=support, sigma=sigma)
    k2 = get_kernel(factor, base, phase, width, support=support, sigma=sigma)
    ref = expected_1d(kernel, factor, phase)
    assert k1.shape == ref.shape
    np.testing.assert_allclose(k1, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(k2, np.outer(ref, ref), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(np.outer(k1, k1), k2, rtol=1e-12, atol=1e-15)
    assert abs(k2.sum() - 1) < 1e-12
    np.testing.assert_allclose(k1, k1[::-1], atol=1e-15)


def test_kernel_sizes():
    # lanczos2: 4f+1 taps at phase 0, 4f at phase 0.5; lanczos3: 6f+1 / 6f.
    assert get_kernel(4, "lanczos", 0, 17, support=2).shape == (17, 17)
    assert get_kernel(4, "lanczos", 0.5, 17, support=2).shape == (16, 16)
    assert get_kernel(2, "lanczos", 0.5, 13, support=3).shape == (12, 12)
    assert get_kernel(3, "box", 0.5, 3).shape == (3, 3)
    assert get_kernel(2, "gauss", 0, 7, sigma=0.5).shape == (7, 7)


def test_lanczos_phase0_has_zero_crossings():
    # sinc vanishes at non-zero integers: every factor-th tap away from the centre is 0.
    k = get_kernel_1d(4, "lanczos", 0, 17, support=2)
    assert k[8] == k.max()
    np.testing.assert_allclose(k[[0, 4, 12, 16]], 0, atol=1e-17)
    assert (k[[1, 2, 3]] < 0).all()


@settings(max_examples=40, deadline=None)
@given(
    factor=st.integers(1, 6),
    support=st.integers(1, 4),
    phase=st.sampled_from([0, 0.5]),
    extra=st.integers(0, 3),
)
def test_outer_product_identity_generic_lanczos(factor, support, phase, extra):
    width = 2 * support * factor + 1 + 2 * extra
    k1 = get_kernel_1d(factor, "lanczos", phase, width, support=support)
    k2 = get_kernel(factor, "lanczos", phase, width, support=support)
    np.testing.assert_allclose(np.outer(k1, k1), k2, rtol=1e-10, atol=1e-15)


def separable_reference(x: torch.Tensor, k1: np.ndarray, factor: int, pad: int) -> torch.Tensor:
    """Replicate pad, then depthwise 1-D convolutions along rows and columns with stride factor."""
    c = x.shape[1]
    if pad:
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    k = torch.from_numpy(k1).to(x.dtype)
    kv = k.view(1, 1, -1, 1).repeat(c, 1, 1, 1)
    kh = k.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    x = F.conv2d(x, kv, stride=(factor, 1), groups=c)
    return F.conv2d(x, kh, stride=(1, factor), groups=c)


def paper_pad(ksize: int, factor: int) -> int:
    return (ksize - 1) // 2 if ksize % 2 else (ksize - factor) // 2


@pytest.fixture
def float64_default():
    """Build modules in float64 so that the comparison can be tight."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.mark.parametrize("preserve_size", [True, False])
@pytest.mark.parametrize("factor", FACTORS)
@pytest.mark.parametrize("kernel,phase", SUPPORTED)
def test_downsampler_equals_separable_computation(kernel, phase, factor, preserve_size, float64_default):
    torch.manual_seed(0)
    x = torch.rand(1, 3, 61, 70, dtype=torch.float64)
    d = Downsampler(3, factor, kernel, phase=phase, preserve_size=preserve_size)
    assert d.weight.dtype == torch.float64
    k1 = expected_1d(kernel, factor, phase)
    pad = paper_pad(len(k1), factor) if preserve_size else 0
    ref = separable_reference(x, k1, factor, pad)
    y = d(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-12)
    assert d.pad == pad


@pytest.mark.parametrize("factor", [2, 4, 8])
@pytest.mark.parametrize("kernel", ["lanczos2", "lanczos3"])
def test_half_phase_preserve_size_divides_exactly(kernel, factor):
    # The super-resolution data term relies on this: H*factor -> H (even factors).
    d = Downsampler(3, factor, kernel, phase=0.5, preserve_size=True)
    assert d(torch.rand(1, 3, 8 * factor, 5 * factor)).shape == (1, 3, 8, 5)


def test_half_phase_odd_factor_loses_a_row_like_the_paper():
    # Factor 3: 12 taps, padding int(9 / 2) = 4 per side, so 24 -> (24 + 8 - 12) // 3 + 1 = 7.
    d = Downsampler(1, 3, "lanczos2", phase=0.5, preserve_size=True)
    assert d.pad == 4
    assert d(torch.rand(1, 1, 24, 24)).shape == (1, 1, 7, 7)


def test_downsampler_is_not_trainable_and_stateless():
    d = Downsampler(4, 2, "lanczos2", phase=0.5, preserve_size=True)
    assert list(d.parameters()) == []
    assert d.state_dict() == {}
    assert not d.weight.requires_grad
    # Planes do not mix: a constant in one plane only shows up in that plane.
    x = torch.zeros(1, 4, 16, 16)
    x[:, 2] = 1.0
    y = d(x)
    torch.testing.assert_close(y[:, 2], torch.ones_like(y[:, 2]))
    assert y[:, [0, 1, 3]].abs().max() == 0
    # Gradients flow to the input.
    xi = torch.rand(1, 4, 16, 16, requires_grad=True)
    d(xi).sum().backward()
    assert xi.grad is not None and xi.grad.abs().sum() > 0


def test_box_width_defaults_to_factor():
    d = Downsampler(1, 4, "box", phase=0.5)
    assert d.kernel.shape == (4, 4)
    x = torch.arange(64.0).view(1, 1, 8, 8)
    torch.testing.assert_close(d(x), F.avg_pool2d(x, 4))


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(kernel_type="lanczos2", phase=0.25), "phase"),
        (dict(kernel_type="box", phase=0), "phase"),
        (dict(kernel_type="gauss12", phase=0.5), "phase"),
        (dict(kernel_type="gauss1sq2", phase=0.5), "phase"),
        (dict(kernel_type="bicubic", phase=0), "kernel_type"),
        (dict(kernel_type="lanczos2", phase=0.5, kernel_width=5), "kernel_width"),
        (dict(kernel_type="lanczos3", phase=0.5, support=2), "support"),
        (dict(kernel_type="gauss12", phase=0, sigma=2.0), "sigma"),
        (dict(kernel_type="lanczos", phase=0.5), "kernel_width"),
        (dict(kernel_type="lanczos", phase=0.5, kernel_width=9), "support"),
        (dict(kernel_type="gauss", phase=0, kernel_width=7), "sigma"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        Downsampler(3, 2, **kwargs)


def test_bad_factor_and_planes():
    with pytest.raises(ValueError, match="factor"):
        Downsampler(3, 0, "lanczos2", phase=0.5)
    with pytest.raises(ValueError, match="factor"):
        get_kernel(2.5, "lanczos", 0, 9, support=2)
    with pytest.raises(ValueError, match="n_planes"):
        Downsampler(0, 2, "lanczos2", phase=0.5)
    with pytest.raises(ValueError, match="kernel_type"):
        get_kernel(2, "lanczos2", 0, 9, support=2)  # named kernels go through resolve_kernel


def test_explicit_generic_kernels_match_named():
    a = Downsampler(2, 3, "lanczos2", phase=0.5, preserve_size=True)
    b = Downsampler(2, 3, "lanczos", phase=0.5, kernel_width=13, support=2, preserve_size=True)
    np.testing.assert_array_equal(a.kernel, b.kernel)
    x = torch.rand(1, 2, 30, 33)
    torch.testing.assert_close(a(x), b(x))
