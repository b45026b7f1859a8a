"""Restoration tasks of the Deep Image Prior paper: data terms and presets.

A *data term* ``E(x; x0)`` compares the generated image ``x`` with the
degraded observation ``x0``:

* denoising:         ``mse(x, x0)``
* inpainting:        ``mse(x * m, x0 * m)`` with the known-pixel mask ``m``
* super-resolution:  ``mse(d(x), x0)`` with ``d`` the Lanczos-2 downsampler
  (``factor = scale``, phase 0.5, ``preserve_size=True``)
* JPEG artefact removal: the denoising term on the compressed image (the
  denoising notebook's snail); only the presets differ
* deblurring:        ``mse(k * x, x0)`` with ``k * x`` the convolution with a
  known kernel of the reflect-padded image (see :func:`blur`)
* any forward model: ``mse(A(x), x0)`` for a differentiable callable ``A``

``mse`` is the mean over all elements (``nn.MSELoss``), as in the notebooks.
Each data term also tells :func:`dip_fast.fit.fit` how to measure the PSNR
against the observation (``fit_kwargs()``).

A :class:`Preset` holds the settings of one experiment of the paper's
notebooks; :data:`PRESETS` is the registry.  :func:`build_network` builds the
preset's network through a ``backend`` callable with the signature of
:func:`dip_fast.reference.skip` (the reference by default), so task code
never depends on which implementation runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import io
from .fit import FitResult, fit
from .reference.downsampler import Downsampler
from .reference.noise import get_noise
from .reference.skip import skip

__all__ = [
    "PRESETS",
    "RESTORE_PRESETS",
    "TASKS",
    "DeblurTerm",
    "DenoiseTerm",
    "ForwardModelTerm",
    "InpaintTerm",
    "OperatorTerm",
    "Preset",
    "SuperResolutionTerm",
    "add_gaussian_noise",
    "bernoulli_mask",
    "blur",
    "build_network",
    "check_operator",
    "crop_to_multiple",
    "get_preset",
    "make_blur_kernel",
    "make_data_term",
    "make_input",
    "mse",
    "preset_for",
    "solve",
]

#: Tasks of the presets.  ``'callable'`` is a caller-supplied forward model
#: (:class:`OperatorTerm`); ``'jpeg'`` uses the denoising data term.
TASKS = ("denoise", "inpaint", "super_resolution", "deblur", "jpeg", "callable")

Backend = Callable[..., nn.Module]


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements (``nn.MSELoss`` with mean reduction)."""
    return F.mse_loss(a, b)


def _as_batch(image: torch.Tensor, name: str) -> torch.Tensor:
    """Accept ``(C, H, W)`` or ``(1, C, H, W)``; return a detached 4-D tensor."""
    if image.dim() == 3:
        image = image[None]
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"{name} must have shape (C, H, W) or (1, C, H, W), got {tuple(image.shape)}")
    return image.detach()


class DenoiseTerm(nn.Module):
    """Denoising data term ``mse(x, x0)``."""

    def __init__(self, observation: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("observation", _as_batch(observation, "observation"))
        self.mask: Optional[torch.Tensor] = None

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        """The forward model (identity)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Data term for the generated image ``x``."""
        return mse(x, self.observation)

    def fit_kwargs(self) -> Dict[str, Any]:
        """Arguments of :func:`~dip_fast.fit.fit` that describe the observation."""
        return {"observation": self.observation, "mask": None, "degrade": None}


class InpaintTerm(nn.Module):
    """Inpainting data term ``mse(x * m, x0 * m)``; ``m`` is 1 on known pixels.

    The mask may have one channel (shared) or as many as the image.  The
    PSNR against the observation is taken over known pixels only.
    """

    def __init__(self, observation: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        obs = _as_batch(observation, "observation")
        m = _as_batch(mask, "mask").to(obs.dtype)
        if m.shape[2:] != obs.shape[2:] or m.shape[1] not in (1, obs.shape[1]):
            raise ValueError(f"mask shape {tuple(m.shape)} does not fit observation {tuple(obs.shape)}")
        self.register_buffer("observation", obs)
        self.register_buffer("mask", m)
        # Precomputed: the masked observation is constant.
        self.register_buffer("masked_observation", obs * m)

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        """The forward model as far as the PSNR is concerned (identity; the mask is separate)."""
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Data term for the generated image ``x``."""
        return mse(x * self.mask, self.masked_observation)

    def fit_kwargs(self) -> Dict[str, Any]:
        """Arguments of :func:`~dip_fast.fit.fit` that describe the observation."""
        return {"observation": self.observation, "mask": self.mask, "degrade": None}


Box = Tuple[int, int, int, int]


class ForwardModelTerm(nn.Module):
    """Data term ``mse(A(x), x0)`` for a forward model ``A`` (subclasses define :meth:`forward_model`).

    With ``box = (top, left, H, W)`` (as from :func:`dip_fast.io.pad_to_multiple`)
    the generated image is first cut to that region, so the generator may
    work at a padded size while ``A`` sees exactly the image; the padding is
    left unconstrained.
    """

    def __init__(self, observation: torch.Tensor, box: Optional[Box] = None) -> None:
        super().__init__()
        self.register_buffer("observation", _as_batch(observation, "observation"))
        self.box = box
        self.mask: Optional[torch.Tensor] = None

    def forward_model(self, x: torch.Tensor) -> torch.Tensor:
        """``A`` applied to the (cropped) generated image."""
        raise NotImplementedError

    def degrade(self, x: torch.Tensor) -> torch.Tensor:
        """Crop to ``box`` (if any), then apply the forward model: the observation's prediction."""
        return self.forward_model(x if self.box is None else io.crop(x, self.box))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Data term for the generated image ``x``."""
        return mse(self.degrade(x), self.observation)

    def fit_kwargs(self) -> Dict[str, Any]:
        """Arguments of :func:`~dip_fast.fit.fit`: the PSNR is taken between ``degrade(x)`` and the observation."""
        return {"observation": self.observation, "mask": None, "degrade": self.degrade}


class SuperResolutionTerm(ForwardModelTerm):
    """Super-resolution data term ``mse(d(x), x0)``.

    ``d`` is ``Downsampler(C, factor, kernel_type, phase=0.5,
    preserve_size=True)``, which maps an ``(H * factor, W * factor)`` image to
    ``(H, W)`` for the Lanczos kernels.
    """

    def __init__(self, observation: torch.Tensor, factor: int, kernel_type: str = "lanczos2") -> None:
        super().__init__(observation)
        obs = self.observation
        self.factor = int(factor)
        self.downsampler = Downsampler(
            n_planes=obs.shape[1], factor=self.factor, kernel_type=kernel_type, phase=0.5, preserve_size=True
        ).to(device=obs.device, dtype=obs.dtype)
        # Odd factors lose a row/column with the paper's padding rule; fail
        # here rather than let the loss broadcast mismatched shapes.
        k = self.downsampler.kernel.shape[0]
        low = tuple((n + 2 * self.downsampler.pad - k) // self.factor + 1 for n in self.output_size)
        if low != tuple(obs.shape[2:]):
            raise ValueError(
                f"factor={self.factor} with kernel_type={kernel_type!r} maps {self.output_size} to {low}, "
                f"not to the observation size {tuple(obs.shape[2:])}"
            )

    @property
    def output_size(self) -> Tuple[int, int]:
        """High-resolution ``(H, W)`` the generator must produce."""
        return self.observation.shape[2] * self.factor, self.observation.shape[3] * self.factor

    def forward_model(self, x: torch.Tensor) -> torch.Tensor:
        """Filter and decimate the high-resolution image ``x``."""
        return self.downsampler(x)


# --------------------------------------------------------------------------
# Deblurring
# --------------------------------------------------------------------------

KernelLike = Union[str, np.ndarray, torch.Tensor, Sequence[Sequence[float]]]

_KERNEL_FORMS = "'gaussian:SIGMA', 'box:N' (N odd) or a 2-D array with odd sides"


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian of std ``sigma`` pixels, ``2 * ceil(3 sigma) + 1`` wide (covers +-3 sigma)."""
    radius = math.ceil(3.0 * sigma)
    r = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return (torch.outer(g, g) / g.sum() ** 2).to(torch.float32)


#: Largest blur kernel side accepted (a Gaussian of sigma 42): wider blurs leave nothing to recover
#: and would only allocate a huge kernel by mistake (e.g. 'gaussian:10000').
MAX_KERNEL_SIZE = 255


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
    """
    if isinstance(spec, str):
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
    """
    kh, kw = kernel.shape
    h, w = image.shape[-2:]
    pad = (kw // 2, kw // 2, kh // 2, kh // 2)
    mode = "reflect" if kh // 2 < h and kw // 2 < w else "replicate"
    c = image.shape[1]
    weight = kernel.flip(0, 1).to(image)[None, None].expand(c, 1, kh, kw)
    return F.conv2d(F.pad(image, pad, mode=mode), weight, groups=c)


class DeblurTerm(ForwardModelTerm):
    """Deblurring data term ``mse(blur(x, k), x0)`` with a known kernel ``k`` (see :func:`blur`).

    The boundary model is :func:`blur`'s: reflect padding of the (cropped)
    image, replicate padding where the kernel is too large for it.
    """

    def __init__(self, observation: torch.Tensor, kernel: KernelLike, box: Optional[Box] = None) -> None:
        super().__init__(observation, box)
        self.register_buffer("kernel", make_blur_kernel(kernel).to(self.observation))

    def forward_model(self, x: torch.Tensor) -> torch.Tensor:
        """Blur ``x`` with the kernel."""
        return blur(x, self.kernel)


# --------------------------------------------------------------------------
# A caller's forward operator
# --------------------------------------------------------------------------

Operator = Callable[[torch.Tensor], torch.Tensor]


class OperatorTerm(ForwardModelTerm):
    """Data term ``mse(A(x), x0)`` for a caller's differentiable forward operator ``A``.

    ``A`` maps a ``(1, C, H, W)`` image in [0, 1] to a tensor of the
    observation's shape, with torch operations (gradients flow through it).
    """

    def __init__(self, observation: torch.Tensor, operator: Operator, box: Optional[Box] = None) -> None:
        super().__init__(observation, box)
        if not callable(operator):
            raise TypeError(f"operator must be callable, got {type(operator).__name__}")
        self.operator = operator

    def forward_model(self, x: torch.Tensor) -> torch.Tensor:
        """``A(x)``."""
        return self.operator(x)


def check_operator(
    operator: Operator, image_shape: Tuple[int, int, int], observation: torch.Tensor, name: str = "operator"
) -> None:
    """Call ``operator`` once on a grey ``(1, *image_shape)`` image and check its output against ``observation``.

    Raises:
        TypeError: the operator does not return a tensor.
        ValueError: its output has another shape or device than the
            observation, or does not depend differentiably on its input.
    """
    grey = torch.full((1, *image_shape), 0.5, device=observation.device, dtype=observation.dtype, requires_grad=True)
    with torch.enable_grad():
        out = operator(grey)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must return a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(observation.shape):
        raise ValueError(
            f"{name} maps an image of shape {tuple(grey.shape)} to {tuple(out.shape)}, "
            f"but the observation has shape {tuple(observation.shape)}"
        )
    if out.device != observation.device:
        raise ValueError(f"{name} returned a tensor on {out.device}; it must stay on the run's device {observation.device}")
    if not out.requires_grad:
        raise ValueError(f"{name} must be differentiable (torch operations on its input); its output has no gradient")


# --------------------------------------------------------------------------
# Degradation helpers matching the notebooks' data preparation.
# --------------------------------------------------------------------------


def add_gaussian_noise(
    image: torch.Tensor, sigma: float, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``clip(image + sigma * N(0, 1), 0, 1)``: the denoising notebook's synthetic noise (sigma in [0, 1] units)."""
    noise = torch.randn(image.shape, generator=generator, dtype=image.dtype, device=image.device)
    return (image + sigma * noise).clamp(0.0, 1.0)


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


def crop_to_multiple(image: torch.Tensor, d: int) -> torch.Tensor:
    """Centre-crop the last two dims down to multiples of ``d`` (the notebooks' ``crop_image``)."""
    h, w = image.shape[-2:]
    nh, nw = h - h % d, w - w % d
    top, left = (h - nh) // 2, (w - nw) // 2
    return image[..., top : top + nh, left : left + nw]


# --------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------

# The network most notebooks share (models/__init__.py get_net('skip') with
# skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=5): 2,217,831
# parameters for 32 input and 3 output channels.
DEFAULT_NETWORK: Mapping[str, Any] = {
    "num_channels_down": [128] * 5,
    "num_channels_up": [128] * 5,
    "num_channels_skip": [4] * 5,
    "filter_size_down": 3,
    "filter_size_up": 3,
    "filter_skip_size": 1,
    "upsample_mode": "bilinear",
    "downsample_mode": "stride",
    "pad": "reflection",
    "act_fun": "LeakyReLU",
    "need_sigmoid": True,
    "need_bias": True,
    "need1x1_up": True,
}


@dataclass(frozen=True)
class Preset:
    """Settings of one experiment from the paper's notebooks.

    Attributes:
        name: registry key.
        task: one of :data:`TASKS` (``'callable'``: a caller's forward operator).
        network: keyword arguments for ``skip()`` other than the channel
            counts of input and output.
        input_depth: channels of the network input ``z``.
        input_method: ``'noise'`` or ``'meshgrid'`` (see ``get_noise``).
        input_noise_type, input_var: ``get_noise`` noise type and scale.
        iterations, lr, reg_noise_std, exp_weight: optimisation settings.
        backtrack, check_every, check_mode: backtracking (see :mod:`dip_fast.fit`).
        sr_factor, sr_kernel: super-resolution scale and downsampling kernel.
        noise_sigma: std of the synthetic Gaussian noise (denoising; [0, 1] units).
        mask_keep_fraction: fraction of known pixels of a random mask.
        crop_multiple: the notebook centre-crops the image to multiples of this.
        source: notebook and figure the settings come from.
        notes: remarks on the notebook's settings.
    """

    name: str
    task: str
    network: Mapping[str, Any]
    input_depth: int
    iterations: int
    lr: float = 0.01
    reg_noise_std: float = 0.0
    exp_weight: Optional[float] = None
    backtrack: bool = False
    check_every: int = 100
    check_mode: str = "periodic"
    input_method: str = "noise"
    input_noise_type: str = "u"
    input_var: float = 1.0 / 10
    sr_factor: Optional[int] = None
    sr_kernel: str = "lanczos2"
    noise_sigma: Optional[float] = None
    mask_keep_fraction: Optional[float] = None
    crop_multiple: int = 32
    source: str = ""
    notes: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "super_resolution" and not self.sr_factor:
            raise ValueError("sr_factor is required for task 'super_resolution'")

    def fit_kwargs(self) -> Dict[str, Any]:
        """The optimisation settings as keyword arguments of :func:`~dip_fast.fit.fit`."""
        return {
            "iterations": self.iterations,
            "lr": self.lr,
            "reg_noise_std": self.reg_noise_std,
            "exp_weight": self.exp_weight,
            "backtrack": self.backtrack,
            "check_every": self.check_every,
            "check_mode": self.check_mode,
        }

    def with_overrides(self, **changes: Any) -> "Preset":
        """A copy with some fields replaced (e.g. fewer iterations for a test)."""
        return replace(self, **changes)


def _net(**changes: Any) -> Dict[str, Any]:
    cfg = dict(DEFAULT_NETWORK)
    cfg.update(changes)
    return cfg


_DENOISE_COMMON = dict(
    task="denoise",
    input_depth=32,
    iterations=3000,
    lr=0.01,
    exp_weight=0.99,
    backtrack=True,
    check_every=100,
    # The notebook's `if i % show_every:` (see dip_fast.fit).
    check_mode="off_period",
    crop_multiple=32,
)

_PRESET_LIST = [
    # denoising.ipynb, fname = F16_GT.png: get_net(32, 'skip', 'reflection',
    # skip_n33d=128, skip_n33u=128, skip_n11=4, num_scales=5,
    # upsample_mode='bilinear'); reg_noise_std = 1/30 ("set to 1/20 for sigma=50").
    Preset(
        name="denoise_f16_sigma25",
        network=_net(),
        reg_noise_std=1.0 / 30.0,
        noise_sigma=25.0 / 255.0,
        source="denoising.ipynb (F16_GT.png, sigma=25; figure 'Blind image denoising')",
        **_DENOISE_COMMON,
    ),
    Preset(
        name="denoise_f16_sigma50",
        network=_net(),
        reg_noise_std=1.0 / 20.0,
        noise_sigma=50.0 / 255.0,
        source="denoising.ipynb (F16_GT.png with sigma=50, per its reg_noise_std comment)",
        **_DENOISE_COMMON,
    ),
    # denoising.ipynb, fname = snail.jpg (blind JPEG artefact removal): the
    # denoising data term on the compressed image; the fixed step budget is
    # the early stopping that keeps the blocks out.
    Preset(
        name="dejpeg_snail",
        network=_net(
            num_channels_down=[8, 16, 32, 64, 128],
            num_channels_up=[8, 16, 32, 64, 128],
            num_channels_skip=[0, 0, 0, 4, 4],
        ),
        reg_noise_std=1.0 / 30.0,
        source="denoising.ipynb (snail.jpg; figure 'Blind restoration of a JPEG-compressed image')",
        **dict(_DENOISE_COMMON, task="jpeg", input_depth=3, iterations=2400),
    ),
    # super-resolution.ipynb: input_depth 32, LR 0.01, KERNEL_TYPE 'lanczos2',
    # factor 4 -> 2000 iterations, reg_noise_std 0.03; factor 8 -> 4000, 0.05.
    # No averaging, no backtracking.
    Preset(
        name="sr_x4",
        task="super_resolution",
        network=_net(),
        input_depth=32,
        iterations=2000,
        lr=0.01,
        reg_noise_std=0.03,
        sr_factor=4,
        sr_kernel="lanczos2",
        crop_multiple=32,
        source="super-resolution.ipynb (factor = 4; main paper figures 1 and 5)",
    ),
    Preset(
        name="sr_x8",
        task="super_resolution",
        network=_net(),
        input_depth=32,
        iterations=4000,
        lr=0.01,
        reg_noise_std=0.05,
        sr_factor=8,
        sr_kernel="lanczos2",
        crop_multiple=32,
        source="super-resolution.ipynb (factor = 8; supmat figure 9)",
    ),
    # inpainting.ipynb, kate.png (text removal): skip with 128 channels and
    # 128 skip channels at all 5 scales, nearest upsampling; 3,002,627 params.
    Preset(
        name="inpaint_kate",
        task="inpaint",
        network=_net(num_channels_skip=[128] * 5, upsample_mode="nearest"),
        input_depth=32,
        iterations=6001,
        lr=0.01,
        reg_noise_std=0.03,
        crop_multiple=64,
        source="inpainting.ipynb (kate.png; main paper figure 7, top)",
    ),
    # inpainting.ipynb, vase.png: meshgrid input, no skip connections.
    Preset(
        name="inpaint_vase",
        task="inpaint",
        network=_net(num_channels_skip=[0] * 5, upsample_mode="nearest"),
        input_depth=2,
        input_method="meshgrid",
        iterations=5001,
        lr=0.01,
        reg_noise_std=0.03,
        crop_multiple=64,
        source="inpainting.ipynb (vase.png; main paper figure 6)",
    ),
    # inpainting.ipynb, library.png with NET_TYPE = 'skip_depth6'.
    Preset(
        name="inpaint_library",
        task="inpaint",
        network=_net(
            num_channels_down=[16, 32, 64, 128, 128, 128],
            num_channels_up=[16, 32, 64, 128, 128, 128],
            num_channels_skip=[0] * 6,
            filter_size_down=5,
            filter_size_up=3,
            upsample_mode="nearest",
            need1x1_up=False,
        ),
        input_depth=1,
        iterations=3001,
        lr=0.01,
        reg_noise_std=0.0,
        crop_multiple=64,
        source="inpainting.ipynb (library.png, NET_TYPE='skip_depth6'; main paper figure 8)",
        notes=(
            "The notebook sets param_noise=True, but its loop rebinds a local name "
            "(n = n + noise) and never changes the weights, so it has no effect and is omitted."
        ),
    ),
    # restoration.ipynb, barbara.png: 50 % of the pixels kept, grayscale.
    Preset(
        name="restore_barbara",
        task="inpaint",
        network=_net(),
        input_depth=32,
        iterations=11000,
        lr=0.001,
        reg_noise_std=0.03,
        backtrack=True,
        check_every=50,
        check_mode="periodic",
        mask_keep_fraction=0.5,
        crop_multiple=1,
        source="restoration.ipynb (barbara.png; main paper figure 7, bottom)",
        notes=(
            "The notebook reflection-pads barbara by 1 pixel instead of cropping, and "
            "builds the net with n_channels=1 (grayscale); backtracking runs at "
            "i % 50 == 0 against the masked PSNR."
        ),
    ),
    # restoration.ipynb, kate.png: 2 % of the pixels kept (same mask on all channels).
    Preset(
        name="restore_kate",
        task="inpaint",
        network=_net(
            num_channels_down=[16, 32, 64, 128, 128],
            num_channels_up=[16, 32, 64, 128, 128],
            num_channels_skip=[0] * 5,
            downsample_mode="avg",
        ),
        input_depth=32,
        iterations=1000,
        lr=0.01,
        reg_noise_std=0.0,
        backtrack=True,
        check_every=50,
        check_mode="periodic",
        mask_keep_fraction=0.02,
        crop_multiple=1,
        source="restoration.ipynb (kate.png; supmat figure 14)",
    ),
]

#: Registry of the notebooks' experiments, by name.
PRESETS: Dict[str, Preset] = {p.name: p for p in _PRESET_LIST}


def get_preset(name: str) -> Preset:
    """Look up a preset by name (see :data:`PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None


# --------------------------------------------------------------------------
# Building blocks of a run
# --------------------------------------------------------------------------


def build_network(
    preset: Preset,
    num_output_channels: int = 3,
    *,
    backend: Optional[Backend] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Build the preset's generator with ``backend`` (default: the reference :func:`skip`).

    ``backend`` is any callable with ``skip``'s signature; the task code
    never needs to know which implementation it gets.
    """
    make = skip if backend is None else backend
    net = make(num_input_channels=preset.input_depth, num_output_channels=num_output_channels, **dict(preset.network))
    return net.to(device) if device is not None else net


def make_input(
    preset: Preset,
    spatial_size: Tuple[int, int],
    *,
    generator: Optional[torch.Generator] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """The preset's network input ``z`` of size ``spatial_size`` (the output image size)."""
    return get_noise(
        preset.input_depth,
        preset.input_method,
        spatial_size,
        noise_type=preset.input_noise_type,
        var=preset.input_var,
        generator=generator,
        device=device,
    )


def make_data_term(
    preset: Preset,
    observation: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    blur_kernel: Optional[KernelLike] = None,
    operator: Optional[Operator] = None,
    box: Optional[Box] = None,
) -> nn.Module:
    """The preset task's data term for ``observation``.

    Args:
        preset: its ``task`` picks the term.
        observation: the degraded image, ``(C, H, W)`` or ``(1, C, H, W)``.
        mask: inpainting: the known-pixel mask (required).
        blur_kernel: deblurring: the kernel (required; see :func:`make_blur_kernel`).
        operator: ``'callable'``: the forward operator ``A`` (required).
        box: deblurring and ``'callable'``: the region of the generated image
            that the forward model sees (see :class:`ForwardModelTerm`).
    """
    if preset.task in ("denoise", "jpeg"):
        return DenoiseTerm(observation)
    if preset.task == "inpaint":
        if mask is None:
            raise ValueError("task 'inpaint' needs a mask")
        return InpaintTerm(observation, mask)
    if preset.task == "deblur":
        if blur_kernel is None:
            raise ValueError("task 'deblur' needs a blur_kernel")
        return DeblurTerm(observation, blur_kernel, box)
    if preset.task == "callable":
        if operator is None:
            raise ValueError("task 'callable' needs an operator")
        return OperatorTerm(observation, operator, box)
    return SuperResolutionTerm(observation, preset.sr_factor, preset.sr_kernel)


def solve(
    preset: Union[str, Preset],
    observation: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    blur_kernel: Optional[KernelLike] = None,
    operator: Optional[Operator] = None,
    image_shape: Optional[Tuple[int, int, int]] = None,
    reference: Optional[torch.Tensor] = None,
    backend: Optional[Backend] = None,
    generator: Optional[torch.Generator] = None,
    **fit_overrides: Any,
) -> Tuple[FitResult, nn.Module]:
    """Run a preset on an observation: build network, input and data term, then :func:`fit`.

    The network is built on the observation's device and initialised from
    the global RNG (seed it with ``torch.manual_seed`` for reproducibility);
    ``generator`` drives the input ``z`` and its perturbations and must live
    on that device.  ``fit_overrides`` replace the preset's fit settings or
    add others (``max_time``, ``callback``, ...).  ``mask``, ``blur_kernel``
    and ``operator`` are as for :func:`make_data_term`; a ``'callable'``
    preset also needs ``image_shape = (C, H, W)``, the image ``operator`` takes.

    Returns:
        ``(result, net)``.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    term = make_data_term(preset, observation, mask, blur_kernel=blur_kernel, operator=operator)
    obs = term.observation
    channels, size = obs.shape[1], (obs.shape[2], obs.shape[3])
    if isinstance(term, SuperResolutionTerm):
        size = term.output_size
    elif isinstance(term, OperatorTerm):
        if image_shape is None:
            raise ValueError("task 'callable' needs image_shape=(C, H, W), the image the operator takes")
        check_operator(term.operator, image_shape, obs)
        channels, size = image_shape[0], (image_shape[1], image_shape[2])
    net = build_network(preset, channels, backend=backend, device=obs.device)
    net_input = make_input(preset, size, generator=generator, device=obs.device)
    kwargs: Dict[str, Any] = dict(preset.fit_kwargs())
    kwargs.update(term.fit_kwargs())
    if reference is not None:
        kwargs["reference"] = _as_batch(reference, "reference").to(obs.device)
    kwargs["generator"] = generator
    kwargs.update(fit_overrides)
    result = fit(net, net_input, term, **kwargs)
    return result, net


# --------------------------------------------------------------------------
# Cheaper presets for restore() on a CPU, and the lookup restore() uses
# --------------------------------------------------------------------------

# The paper's network spends most of its time in the 128-channel convolutions
# at full resolution.  A channel pyramid (few channels at full resolution,
# 128 only at the coarse scales, as restoration.ipynb's kate network) costs a
# fraction of that; "fast" is the CPU default of restore(preset="auto"),
# "quick" a preview.  Step counts and upsampling modes were chosen from PSNR
# curves on a 128x128 crop of scikit-image's astronaut (README, "Python API").
_FAST_NETWORK = _net(num_channels_down=[16, 32, 64, 128, 128], num_channels_up=[16, 32, 64, 128, 128])
_QUICK_NETWORK = _net(num_channels_down=[8, 16, 32, 64, 128], num_channels_up=[8, 16, 32, 64, 128])
# Nearest upsampling inpaints text holes better (as inpaint_kate's network).
_FAST_INPAINT_NETWORK = dict(_FAST_NETWORK, upsample_mode="nearest")

_CHEAP_PRESETS = [
    Preset(name="denoise_fast", network=_FAST_NETWORK, reg_noise_std=1.0 / 30.0,
           source="denoise_f16_sigma25 with a channel-pyramid network and fewer steps",
           **dict(_DENOISE_COMMON, iterations=1500)),
    Preset(name="denoise_quick", network=_QUICK_NETWORK, reg_noise_std=1.0 / 30.0,
           source="denoise_f16_sigma25 with a small network and few steps (preview)",
           **dict(_DENOISE_COMMON, iterations=800)),
    Preset(name="inpaint_fast", task="inpaint", network=_FAST_INPAINT_NETWORK, input_depth=32, iterations=2000,
           lr=0.01, reg_noise_std=0.03, source="inpaint_kate's settings with a channel-pyramid network"),
    Preset(name="inpaint_quick", task="inpaint", network=_FAST_INPAINT_NETWORK, input_depth=32, iterations=700,
           lr=0.01, reg_noise_std=0.03, source="inpaint_fast with few steps (preview)"),
    Preset(name="sr_fast", task="super_resolution", network=_FAST_NETWORK, input_depth=32, iterations=2000,
           lr=0.01, reg_noise_std=0.03, sr_factor=4, source="sr_x4 with a channel-pyramid network"),
    Preset(name="sr_quick", task="super_resolution", network=_QUICK_NETWORK, input_depth=32, iterations=600,
           lr=0.01, reg_noise_std=0.03, sr_factor=4, source="sr_x4 with a small network and few steps (preview)"),
]
PRESETS.update({p.name: p for p in _CHEAP_PRESETS})


def _variant(base: str, name: str, source: str, **changes: Any) -> Preset:
    """A copy of preset ``base`` under a new name (usually for another task)."""
    return PRESETS[base].with_overrides(name=name, source=source, notes="", **changes)


# Deblurring and a caller's forward operator: the paper has no notebook for
# them, so they take the denoising settings at every level (averaging,
# input noise 1/30, backtracking on the PSNR of the re-degraded estimate
# against the observation).  JPEG: the snail network is already a channel
# pyramid (8 channels at full resolution), so the cheaper levels only take
# fewer steps (PSNR at each level: README, "Python API").
_TASK_PRESETS = [
    _variant("denoise_f16_sigma25", "deblur_paper", "denoise_f16_sigma25's network and settings", task="deblur"),
    _variant("denoise_fast", "deblur_fast", "denoise_fast's network and settings", task="deblur"),
    _variant("denoise_quick", "deblur_quick", "denoise_quick's network and settings (preview)", task="deblur"),
    _variant("dejpeg_snail", "jpeg_fast", "dejpeg_snail with fewer steps", iterations=1500),
    _variant("dejpeg_snail", "jpeg_quick", "dejpeg_snail with few steps (preview)", iterations=800),
    _variant("denoise_f16_sigma25", "callable_paper", "denoise_f16_sigma25's network and settings", task="callable"),
    _variant("denoise_fast", "callable_fast", "denoise_fast's network and settings", task="callable"),
    _variant("denoise_quick", "callable_quick", "denoise_quick's network and settings (preview)", task="callable"),
]
PRESETS.update({p.name: p for p in _TASK_PRESETS})

#: The preset :func:`preset_for` picks, by task and level.
RESTORE_PRESETS: Dict[str, Dict[str, str]] = {
    "denoise": {"paper": "denoise_f16_sigma25", "fast": "denoise_fast", "quick": "denoise_quick"},
    "inpaint": {"paper": "inpaint_kate", "fast": "inpaint_fast", "quick": "inpaint_quick"},
    "super_resolution": {"paper": "sr_x4", "fast": "sr_fast", "quick": "sr_quick"},
    "deblur": {"paper": "deblur_paper", "fast": "deblur_fast", "quick": "deblur_quick"},
    "jpeg": {"paper": "dejpeg_snail", "fast": "jpeg_fast", "quick": "jpeg_quick"},
    "callable": {"paper": "callable_paper", "fast": "callable_fast", "quick": "callable_quick"},
}


def preset_for(task: str, level: str = "paper", scale: Optional[int] = None) -> Preset:
    """The preset ``dip_fast.restore`` runs for ``task`` at ``level`` (``'paper'``, ``'fast'`` or ``'quick'``).

    For super-resolution the factor is set to ``scale``; at the paper level a
    factor above 4 takes ``sr_x8``'s settings (4000 steps, more input noise).
    """
    if task not in RESTORE_PRESETS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if level not in RESTORE_PRESETS[task]:
        raise ValueError(f"level must be one of {sorted(RESTORE_PRESETS[task])}, got {level!r}")
    name = RESTORE_PRESETS[task][level]
    if task == "super_resolution" and level == "paper" and scale is not None and scale > 4:
        name = "sr_x8"
    preset = PRESETS[name]
    if task == "super_resolution" and scale is not None and scale != preset.sr_factor:
        preset = preset.with_overrides(sr_factor=scale)
    return preset
