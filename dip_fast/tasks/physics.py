"""A deepinv ``Physics`` as a task: ``restore(y, task=physics)``.

deepinv (``pip install dip_fast[deepinv]``) describes an inverse problem as a
:class:`deepinv.physics.Physics`: a forward operator ``physics.A``, for linear
physics its adjoint ``physics.A_adjoint``, and a noise model.  Passed as
``task``, a Physics becomes the ``'physics'`` task, an operator task whose
observation is a *measurement* (:attr:`~dip_fast.tasks.registry.TaskSpec.measurement`):

* the data term is ``mse(physics.A(x), y)`` (:class:`~dip_fast.tasks.terms.OperatorTerm`);
* the image's shape ``(C, H, W)`` is ``physics.A_adjoint(y)``'s for linear
  physics, or the ``output_shape`` given (required for non-linear physics);
  ``C`` may be any count (2 for MRI's real and imaginary parts);
* the noise level of a Gaussian ``physics.noise_model`` (its ``sigma``, in
  the measurement's units, times 255) is the ``sigma`` of the run unless one
  is given: it picks the input perturbation and is the level ``stop='early'``
  holds the residual to.  Other noise models give none.

deepinv is imported only when an object that looks like one of its Physics
arrives; without deepinv installed such an object is refused with an error
naming the extra to install.

Examples:
    >>> from dip_fast.tasks import physics
    >>> physics.as_operator("denoise") is None  # not a Physics: the task is looked up by name
    True
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn as nn

from .registry import LEVELS, TaskSpec, TermContext, register_task
from .terms import OperatorTerm

__all__ = ["EXTRA", "PHYSICS", "PhysicsOperator", "as_operator", "looks_like_physics", "require_deepinv"]

#: How to install the optional dependency.
EXTRA = "pip install 'dip_fast[deepinv]'"


def looks_like_physics(obj: Any) -> bool:
    """Whether ``obj`` is (or looks like) a deepinv Physics, judged without importing deepinv.

    A class of the ``deepinv`` package in its ancestry, or the duck type: a
    callable ``A`` and a ``noise_model`` attribute.
    """
    if isinstance(obj, (str, bytes)):
        return False
    if any(getattr(cls, "__module__", "").split(".")[0] == "deepinv" for cls in type(obj).__mro__):
        return True
    return callable(getattr(obj, "A", None)) and hasattr(obj, "noise_model")


def require_deepinv(what: str = "a deepinv Physics") -> Any:
    """The ``deepinv`` module, or an ImportError that says how to install it."""
    try:
        import deepinv
    except ImportError as exc:
        raise ImportError(f"{what} needs the deepinv package, which is not installed: {EXTRA}") from exc
    return deepinv


def _device_of(module: Any) -> torch.device:
    """Where a Physics keeps its tensors (the CPU when it holds none)."""
    if isinstance(module, nn.Module):
        for tensor in (*module.parameters(), *module.buffers()):
            return tensor.device
    return torch.device("cpu")


def gaussian_sigma(physics: Any, index: Optional[int] = None) -> Optional[float]:
    """The noise level of a Gaussian ``physics.noise_model`` in 0-255 units, or None (another model, or none).

    Raises:
        ValueError: a sigma that differs across the batch while ``index`` is None.
    """
    model = getattr(physics, "noise_model", None)
    deepinv = require_deepinv()
    if not isinstance(model, deepinv.physics.GaussianNoise):
        return None
    sigma = torch.as_tensor(model.sigma).detach().flatten().to("cpu", torch.float64)
    if sigma.numel() == 0:
        return None
    if index is not None and sigma.numel() > 1:
        sigma = sigma[index : index + 1]
    if bool((sigma != sigma[0]).any()):
        raise ValueError(f"task: the Physics's GaussianNoise has a sigma per batch element ({sigma.tolist()}); "
                         "restore the elements one by one, or through dip_fast.deepinv.DeepImagePrior")
    return float(sigma[0]) * 255.0


class PhysicsOperator:
    """The forward operator ``x -> physics.A(x)`` of a deepinv Physics, as an operator task runs it.

    Args:
        physics: the Physics.
        index, batch: for a Physics whose parameters differ per batch element
            (a mask per image): the element this operator stands for, of
            ``batch``.  ``A`` then sees the image repeated ``batch`` times
            and element ``index`` of its result is kept.

    Attributes:
        physics: the Physics.
        sigma: its Gaussian noise level in 0-255 units, or None.
    """

    def __init__(self, physics: Any, index: Optional[int] = None, batch: Optional[int] = None) -> None:
        self.physics = physics
        self.index, self.batch = index, batch
        self.sigma = gaussian_sigma(physics, index)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return self.physics.A(x)
        return self.physics.A(x.expand(self.batch, *x.shape[1:]))[self.index : self.index + 1]

    def __repr__(self) -> str:
        where = "" if self.index is None else f", element {self.index} of {self.batch}"
        return f"PhysicsOperator({type(self.physics).__name__}{where})"

    @property
    def linear(self) -> bool:
        """Whether the Physics is a ``deepinv.physics.LinearPhysics`` (has an adjoint)."""
        return isinstance(self.physics, require_deepinv().physics.LinearPhysics)

    def output_shape(self, observation_shape: Tuple[int, ...], dtype: torch.dtype = torch.float32
                     ) -> Tuple[int, int, int]:
        """``(C, H, W)`` of the image: that of ``A_adjoint`` of a measurement of ``observation_shape``.

        Raises:
            ValueError: a non-linear Physics (the caller must give ``output_shape``).
        """
        if not self.linear:
            raise ValueError(f"output_shape=(C, H, W) is required for the non-linear {type(self.physics).__name__}: "
                             "only a LinearPhysics has an adjoint to read the image's shape from")
        zeros = torch.zeros(self.batch or 1, *observation_shape, dtype=dtype, device=_device_of(self.physics))
        with torch.no_grad():
            shape = tuple(self.physics.A_adjoint(zeros).shape)
        if len(shape) != 4:
            raise ValueError(f"{type(self.physics).__name__}.A_adjoint gives images of shape {shape}, not "
                             "(B, C, H, W): dip_fast restores 2-D images")
        return shape[1], shape[2], shape[3]


def as_operator(task: Any) -> Optional[PhysicsOperator]:
    """``task`` as a :class:`PhysicsOperator` if it is a deepinv Physics, else None.

    Raises:
        ImportError: ``task`` looks like a Physics but deepinv is not installed.
        TypeError: it looks like one but is not a ``deepinv.physics.Physics``.
    """
    if isinstance(task, PhysicsOperator):
        return task
    if not looks_like_physics(task):
        return None
    deepinv = require_deepinv(f"task={type(task).__name__} (a deepinv Physics, by the look of it)")
    if not isinstance(task, deepinv.physics.Physics):
        if callable(task):
            return None  # a plain callable that happens to have A and noise_model: the callable task
        raise TypeError(f"task looks like a deepinv Physics but is a {type(task).__name__}, not a "
                        "deepinv.physics.Physics")
    return PhysicsOperator(task)


def _physics_term(ctx: TermContext) -> nn.Module:
    if ctx.operator is None:
        raise ValueError("task 'physics' needs a deepinv Physics")
    return OperatorTerm(ctx.observation, ctx.operator, ctx.box)


PHYSICS = register_task(TaskSpec(
    name="physics",
    make_term=_physics_term,
    presets={level: f"physics_{level}" for level in LEVELS},
    optional=("output_shape", "sigma"),
    # The discrepancy rule applies with the Physics's Gaussian sigma; it was validated on denoising only, so
    # 'auto' keeps the preset's fixed count.
    early_stop=True,
    crop_in_term=True,
    operator=True,
    measurement=True,
    label="a deepinv Physics task",
    # No tiling rule: a Physics may mix every pixel into each measured value (MRI, tomography).
))
