"""The task inputs of ``restore()`` -- ``scale``, ``mask``, ``blur_kernel``, ``output_shape``, ``sigma`` --
and how each is checked without touching any pixel.

A task's spec says which of these it needs or accepts
(:attr:`~dip_fast.tasks.registry.TaskSpec.required`, ``optional``); the
messages for a missing or misplaced input are built here from the registry,
so a new task gets them for free.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Dict, Tuple

import torch

from .. import io
from .degradations import make_blur_kernel
from .registry import TaskSpec, owners

__all__ = ["INPUTS", "InputSpec", "check_inputs", "check_int"]


def check_int(value: Any, name: str, minimum: int) -> int:
    """``value`` as an int of at least ``minimum``, or a TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def _check_scale(value: Any) -> int:
    scale = check_int(value, "scale", 2)
    if scale % 2:
        raise ValueError(f"scale must be even (2, 4, 8, ...): the paper's Lanczos-2 downsampler misaligns odd factors, got {scale}")
    return scale


def _check_output_shape(value: Any) -> Tuple[int, int, int]:
    """``(C, H, W)`` with any C >= 1 (an operator task's channels) and sides of at least ``io.MIN_SIZE``."""
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(
        isinstance(v, Integral) and not isinstance(v, bool) for v in value
    ):
        raise TypeError(f"output_shape must be a tuple of three integers (C, H, W), got {value!r}")
    c, h, w = (int(v) for v in value)
    if c < 1:
        raise ValueError(f"output_shape: C must be at least 1 channel, got {c}")
    if min(h, w) < io.MIN_SIZE:
        raise ValueError(f"output_shape: H and W must be at least {io.MIN_SIZE}, got {h}x{w}")
    return c, h, w


def _check_sigma(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"sigma must be a noise level >= 0 in 0-255 units, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InputSpec:
    """One task input.

    Attributes:
        name: the ``restore()`` keyword.
        missing: the message when a task needs it and it is missing
            (``{label}`` stands for the task, as its spec's ``label``).
        check: its value checked and normalised (images are only checked
            when their pixels are read).
        quote: error messages quote the value (numbers, shapes) rather than
            saying "a NAME" (images, arrays).
    """

    name: str
    missing: str
    check: Callable[[Any], Any] = lambda value: value
    quote: bool = True


#: The task inputs, in the order restore() checks them.
INPUTS: Tuple[InputSpec, ...] = (
    InputSpec("scale", "scale is required for {label} (an even integer such as 4)", _check_scale),
    InputSpec("mask", "mask is required for {label} (1/True = known pixel, same size as the image)", quote=False),
    InputSpec("blur_kernel", "blur_kernel is required for {label} ('gaussian:SIGMA', 'box:N' or a 2-D array)",
              lambda value: make_blur_kernel(value, "blur_kernel"), quote=False),
    InputSpec("output_shape", "output_shape=(C, H, W) is required for {label}: the shape of the image to recover",
              _check_output_shape),
    InputSpec("sigma", "sigma is required for {label} (a noise level in 0-255 units)", _check_sigma),
)


def check_inputs(spec: TaskSpec, values: Dict[str, Any]) -> Dict[str, Any]:
    """The task inputs checked against ``spec``: each missing one it needs, or given one it does not take, fails.

    Returns:
        The checked values by name (None for those not given).
    """
    checked: Dict[str, Any] = {}
    for entry in INPUTS:
        value = values.get(entry.name)
        if value is None:
            if entry.name in spec.required:
                raise ValueError(entry.missing.format(label=spec.label))
            checked[entry.name] = None
            continue
        if not spec.accepts(entry.name):
            got = f"{entry.name}={value!r}" if entry.quote else f"a {entry.name}"
            raise ValueError(f"{entry.name} only applies to {owners(entry.name)}, got {got} for task={spec.name!r}")
        checked[entry.name] = entry.check(value)
    return checked
