"""dip_fast as a deepinv reconstructor: ``x_hat = DeepImagePrior()(y, physics)``.

Needs deepinv (``pip install 'dip_fast[deepinv]'``); importing this module
without it raises an ImportError that says so.  :class:`DeepImagePrior` is a
``deepinv.models.Reconstructor``, a drop-in for
``deepinv.models.DeepImagePrior``: it takes the same ``(y, physics)`` and
works in ``deepinv.test``.  Unlike deepinv's, it fits one network per batch
element (a batch of different images gets different results), trains those
networks together in one step (:mod:`dip_fast.core.packed`, through
``restore()``'s list of images), and each network keeps its own averaging,
backtracking and early stopping.  The Physics is the task
(:mod:`dip_fast.tasks.physics`): ``physics.A`` is the forward operator, the
image's shape is that of ``physics.A_adjoint(y)``, and a Gaussian noise
model's ``sigma`` sets the input perturbation and the early-stopping level.

Examples:
    >>> import torch, deepinv
    >>> from dip_fast.deepinv import DeepImagePrior
    >>> physics = deepinv.physics.Denoising(deepinv.physics.GaussianNoise(0.1))
    >>> y = physics(torch.rand(2, 1, 16, 16))
    >>> model = DeepImagePrior(preset="quick", iterations=2, device="cpu")
    >>> x_hat = model(y, physics)
    >>> tuple(x_hat.shape), [info.steps for info in model.last_info]
    ((2, 1, 16, 16), [2, 2])
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .api import RestoreInfo, restore
from .tasks.physics import PhysicsOperator, gaussian_sigma, require_deepinv

_deepinv = require_deepinv("dip_fast.deepinv")

__all__ = ["DeepImagePrior"]


class DeepImagePrior(_deepinv.models.Reconstructor):
    """Deep Image Prior reconstruction of a deepinv measurement, one network per batch element.

    ``model(y, physics)`` with ``y`` of shape ``(B, C_y, H_y, W_y)`` returns
    the ``(B, C, H, W)`` estimates, in ``y``'s dtype and on its device:
    element ``b`` is what ``dip_fast.restore(y[b:b+1], task=physics, ...)``
    returns with the same settings and seed.  The elements are restored as
    one list (trained in packs of up to ``pack`` networks per step).  A
    Physics whose parameters differ per element (one mask per image), or
    whose Gaussian sigma does, is restored element by element instead, each
    with its own operator (``A`` sees the image repeated ``B`` times and
    keeps element ``b``; ``B`` times the operator's cost).

    Keyword arguments are ``restore()``'s (see :func:`dip_fast.restore`):

    Args:
        preset: ``'auto'`` (``'paper'`` on a GPU, ``'fast'`` on the CPU),
            ``'paper'``, ``'fast'``, ``'quick'``, or a
            :class:`dip_fast.tasks.Preset` for task ``'physics'``.
        iterations: the most optimisation steps (default: the preset's;
            with early stopping, 1.5 times it).
        stop: ``'auto'``: ``'early'`` when the Physics has a Gaussian noise
            model with ``sigma > 0`` (the discrepancy rule with that level),
            else ``'never'``; or ``'early'`` / ``'never'``.
        restarts: independent runs per element, averaged.
        seed: seeds each element's run (every element gets the same seed,
            as ``restore()`` of a list does); None draws one.
        sigma: the noise level in 0-255 units of the measurement, instead of
            the Physics's.
        output_shape: ``(C, H, W)`` of the image, needed for a non-linear
            Physics (a linear one's adjoint gives it).
        device: where to run (default: ``y``'s device).
        progress, backend, max_time, num_threads, deterministic, step_mode,
        precision, pack: as in ``restore()``.

    Attributes:
        last_info: the :class:`dip_fast.RestoreInfo` of each element of the
            last call (steps, stopping, timing, PSNR against ``x_gt`` when
            that was given).
    """

    def __init__(self, *, preset: Any = "auto", iterations: Optional[int] = None, stop: str = "auto",
                 restarts: int = 1, seed: Optional[int] = 0, sigma: Optional[float] = None,
                 output_shape: Optional[Tuple[int, int, int]] = None,
                 device: Union[str, torch.device, None] = None, progress: bool = False, backend: str = "fast",
                 max_time: Optional[float] = None, num_threads: Optional[int] = None, deterministic: bool = False,
                 step_mode: str = "auto", precision: str = "auto", pack: Union[int, str] = "auto") -> None:
        super().__init__()
        self.options = dict(preset=preset, iterations=iterations, stop=stop, restarts=restarts, seed=seed,
                            output_shape=output_shape, progress=progress, backend=backend, max_time=max_time,
                            num_threads=num_threads, deterministic=deterministic, step_mode=step_mode,
                            precision=precision, pack=pack)
        self.sigma = sigma
        self.device = device
        self.last_info: List[RestoreInfo] = []

    def forward(self, y: torch.Tensor, physics: Any, x_gt: Optional[torch.Tensor] = None,
                **kwargs: Any) -> torch.Tensor:
        """Reconstruct each element of the measurement ``y`` under ``physics``.

        Args:
            y: the measurements, ``(B, C_y, H_y, W_y)``.
            physics: a ``deepinv.physics.Physics``.
            x_gt: optional clean images ``(B, C, H, W)``, only for the PSNR in :attr:`last_info`.
            kwargs: other keyword arguments deepinv passes, ignored.

        Raises:
            TypeError: ``y`` is not a tensor or ``physics`` not a deepinv Physics.
            ValueError: ``y`` is not 4-D, or bad settings (as ``restore()`` says).
        """
        if not isinstance(physics, _deepinv.physics.Physics):
            raise TypeError(f"physics must be a deepinv.physics.Physics, got {type(physics).__name__}")
        if not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise ValueError(f"y must be a (B, C, H, W) tensor, got "
                             f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
        batch = y.shape[0]
        device = self.device if self.device is not None else y.device
        options = dict(self.options, device=device, return_info=True)
        truths = [x_gt[b : b + 1] for b in range(batch)] if x_gt is not None else None
        with torch.enable_grad():  # deepinv's test loop calls models under no_grad; DIP fits a network
            results = self._restore(y, physics, truths, options)
        self.last_info = [info for _, info in results]
        return torch.cat([out for out, _ in results])

    def _restore(self, y: torch.Tensor, physics: Any, truths: Optional[List[torch.Tensor]],
                 options: Dict[str, Any]) -> List[Tuple[torch.Tensor, RestoreInfo]]:
        """``restore()`` of each element: one list (packed), or one by one for a Physics that differs per element."""
        batch = y.shape[0]
        if self._per_element(physics, y):
            results = []
            for b in range(batch):
                operator = PhysicsOperator(physics, b, batch)
                sigma = self.sigma if self.sigma is not None else operator.sigma
                results.append(restore(y[b : b + 1], operator, sigma=sigma,
                                       ground_truth=truths[b] if truths is not None else None, **options))
        else:
            results = restore([y[b : b + 1] for b in range(batch)], PhysicsOperator(physics), sigma=self.sigma,
                              ground_truth=truths, **options)
        return results

    def _per_element(self, physics: Any, y: torch.Tensor) -> bool:
        """Whether the Physics's parameters (or its noise level) differ per element of the batch."""
        if y.shape[0] == 1:
            return False
        try:
            gaussian_sigma(physics)
        except ValueError:
            return True  # a sigma per element
        one = y[:1].detach()
        with torch.no_grad():
            if isinstance(physics, _deepinv.physics.LinearPhysics):
                return physics.A_adjoint(one).shape[0] != 1
            shape = self.options["output_shape"]
            if shape is None:
                return False  # restore() asks for output_shape
            return physics.A(one.new_zeros(1, *shape)).shape[0] != 1
