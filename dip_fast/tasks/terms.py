"""Data terms ``E(x; x0)``: how a generated image ``x`` is compared with the degraded observation ``x0``.

* denoising (and JPEG artefact removal): ``mse(x, x0)``
* inpainting:        ``mse(x * m, x0 * m)`` with the known-pixel mask ``m``
* super-resolution:  ``mse(d(x), x0)`` with ``d`` the Lanczos-2 downsampler
  (``factor = scale``, phase 0.5, ``preserve_size=True``)
* deblurring:        ``mse(k * x, x0)`` with ``k * x`` the convolution with a
  known kernel of the reflect-padded image (see :func:`~dip_fast.tasks.degradations.blur`)
* any forward model: ``mse(A(x), x0)`` for a differentiable callable ``A``

``mse`` is the mean over all elements (``nn.MSELoss``), as in the notebooks.
Each data term also tells :func:`dip_fast.core.fit.fit` how to measure the PSNR
against the observation (``fit_kwargs()``).  Which task uses which term is
the task registry's business (:mod:`dip_fast.tasks.registry`).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import io
from ..reference.downsampler import Downsampler
from .degradations import KernelLike, blur, make_blur_kernel

__all__ = [
    "Box",
    "DeblurTerm",
    "DenoiseTerm",
    "ForwardModelTerm",
    "InpaintTerm",
    "Operator",
    "OperatorTerm",
    "PackedTerm",
    "SuperResolutionTerm",
    "check_operator",
    "mse",
]


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
        """Arguments of :func:`~dip_fast.core.fit.fit` that describe the observation."""
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
        """Arguments of :func:`~dip_fast.core.fit.fit` that describe the observation."""
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
        """Arguments of :func:`~dip_fast.core.fit.fit`: the PSNR is taken between ``degrade(x)`` and the observation."""
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


class PackedTerm(nn.Module):
    """The data terms of ``K`` runs packed in one step (:func:`dip_fast.core.fit.fit_packed`).

    Called on the ``K`` networks' images ``(K, C, H, W)``, it returns the
    ``(K,)`` data terms, term ``k`` applied to image ``k`` alone: each
    network's loss is exactly what its own run computes.  The observations
    must have one shape (runs of one task at one size).

    Example:
        >>> import torch
        >>> terms = [DenoiseTerm(torch.zeros(1, 3, 8, 8)), DenoiseTerm(torch.ones(1, 3, 8, 8))]
        >>> PackedTerm(terms)(torch.zeros(2, 3, 8, 8)).tolist()
        [0.0, 1.0]
    """

    def __init__(self, terms: Sequence[nn.Module]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("PackedTerm needs at least one term")
        shapes = {tuple(t.observation.shape) for t in terms}
        if len(shapes) != 1:
            raise ValueError(f"packed runs need observations of one shape, got {sorted(shapes)}")
        self.terms = nn.ModuleList(terms)
        self.register_buffer("observation", torch.cat([t.observation for t in terms]))
        self._settings = [t.fit_kwargs() for t in terms]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([term(x[k : k + 1]) for k, term in enumerate(self.terms)])

    def select(self, keep: Sequence[int]) -> "PackedTerm":
        """The packed term of runs ``keep`` only (a packed fit that dropped its stopped networks)."""
        return PackedTerm([self.terms[i] for i in keep])

    def _degrade(self, x: torch.Tensor) -> torch.Tensor:
        """Each image as its own term sees it: ``degrade(x_k)``, or ``x_k`` for terms without one."""
        return torch.cat([kw["degrade"](x[k : k + 1]) if kw["degrade"] is not None else x[k : k + 1]
                          for k, kw in enumerate(self._settings)])

    def fit_kwargs(self) -> Dict[str, Any]:
        """:func:`~dip_fast.core.fit.fit_packed`'s arguments for the observations: ``K`` rows each."""
        masks = [kw["mask"] for kw in self._settings]
        mask = None
        if any(m is not None for m in masks):  # a run without a mask knows every pixel
            like = self.observation[:1]
            mask = torch.cat([(m if m is not None else torch.ones_like(like)).expand_as(like) for m in masks])
        degrade = self._degrade if any(kw["degrade"] is not None for kw in self._settings) else None
        return {"observation": self.observation, "mask": mask, "degrade": degrade}
