"""Building a run: network, input and data term from a preset, shared by ``restore()`` and :func:`solve`.

:func:`build_network` builds the preset's generator through a ``backend``
builder (the architecture's reference by default, see :mod:`dip_fast.core.networks`),
so task code never depends on which implementation runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..core.fit import FitResult, fit
from ..core.networks import Builder, get_architecture
from ..reference.noise import get_noise
from .degradations import KernelLike
from .presets import Preset, get_preset
from .registry import TermContext, get_task
from .terms import Box, Operator, OperatorTerm, SuperResolutionTerm, _as_batch, check_operator

__all__ = ["Run", "build_network", "build_run", "make_data_term", "make_input", "solve"]

#: A network builder with the signature of :func:`dip_fast.reference.skip` (kept for older callers).
Backend = Builder


def build_network(
    preset: Preset,
    num_output_channels: int = 3,
    *,
    backend: Optional[Builder] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> nn.Module:
    """Build the preset's generator with ``backend`` (default: its architecture's reference builder).

    ``backend`` is any builder taking ``num_input_channels``,
    ``num_output_channels`` and the preset's network options.
    """
    make = get_architecture(preset.network.arch).reference if backend is None else backend
    net = make(num_input_channels=preset.input_depth, num_output_channels=num_output_channels,
               **dict(preset.network.options))
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
    """The data term of the preset's task for ``observation`` (the task's spec makes it).

    Args:
        preset: its ``task`` picks the term.
        observation: the degraded image, ``(C, H, W)`` or ``(1, C, H, W)``.
        mask: inpainting: the known-pixel mask (required).
        blur_kernel: deblurring: the kernel (required; see :func:`~dip_fast.tasks.degradations.make_blur_kernel`).
        operator: ``'callable'``: the forward operator ``A`` (required).
        box: deblurring and ``'callable'``: the region of the generated image
            that the forward model sees (see :class:`~dip_fast.tasks.terms.ForwardModelTerm`).
    """
    ctx = TermContext(preset, observation, mask, blur_kernel, operator, box)
    return get_task(preset.task).make_term(ctx)


@dataclass
class Run:
    """A run ready to fit: ``fit(net, net_input, term, **fit_kwargs)``."""

    net: nn.Module
    net_input: torch.Tensor
    term: nn.Module
    fit_kwargs: Dict[str, Any] = field(default_factory=dict)


def build_run(
    preset: Preset,
    term: nn.Module,
    channels: int,
    size: Tuple[int, int],
    *,
    backend: Optional[Builder] = None,
    generator: Optional[torch.Generator] = None,
    reference: Optional[torch.Tensor] = None,
    reference_view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> Run:
    """Network (``channels`` out), input (``size``) and fit settings for ``term``, on its observation's device.

    Network and input take the observation's dtype (float32 for images; a
    float64 measurement runs in float64), drawn as float32 and converted, so
    both precisions start from the same values.
    The weights come from the global RNG (seed or fork it around this call);
    ``generator`` drives the input and its perturbations.  ``reference``
    (with ``reference_view``, how to cut an estimate to its size) adds the
    PSNR against a clean image to every step.
    """
    device, dtype = term.observation.device, term.observation.dtype
    net = build_network(preset, channels, backend=backend, device=device)
    net_input = make_input(preset, size, generator=generator, device=device)
    if dtype != net_input.dtype:
        net, net_input = net.to(dtype=dtype), net_input.to(dtype)
    kwargs: Dict[str, Any] = dict(preset.fit_kwargs())
    kwargs.update(term.fit_kwargs())
    if reference is not None:
        kwargs["reference"] = reference
        if reference_view is not None:
            kwargs["reference_view"] = reference_view
    kwargs["generator"] = generator
    return Run(net, net_input, term, kwargs)


def solve(
    preset: Union[str, Preset],
    observation: torch.Tensor,
    *,
    mask: Optional[torch.Tensor] = None,
    blur_kernel: Optional[KernelLike] = None,
    operator: Optional[Operator] = None,
    image_shape: Optional[Tuple[int, int, int]] = None,
    reference: Optional[torch.Tensor] = None,
    backend: Optional[Builder] = None,
    generator: Optional[torch.Generator] = None,
    **fit_overrides: Any,
) -> Tuple[FitResult, nn.Module]:
    """Run a preset on an observation: build network, input and data term, then :func:`~dip_fast.core.fit.fit`.

    The network is built on the observation's device and initialised from
    the global RNG (seed it with ``torch.manual_seed`` for reproducibility);
    ``generator`` drives the input ``z`` and its perturbations and must live
    on that device.  ``fit_overrides`` replace the preset's fit settings or
    add others (``max_time``, ``callback``, ...).  ``mask``, ``blur_kernel``
    and ``operator`` are as for :func:`make_data_term`; a ``'callable'``
    preset also needs ``image_shape = (C, H, W)``, the image ``operator`` takes.

    Returns:
        ``(result, net)``.

    Examples:
        >>> import torch
        >>> from dip_fast import tasks
        >>> _ = torch.manual_seed(0)
        >>> preset = tasks.get_preset("denoise_quick").with_overrides(
        ...     iterations=2, network=tasks.NetworkSpec("skip", tasks._net(
        ...         num_channels_down=[4, 4], num_channels_up=[4, 4], num_channels_skip=[2, 2])))
        >>> result, net = tasks.solve(preset, torch.rand(1, 3, 16, 16))
        >>> result.steps, tuple(result.output.shape)
        (2, (1, 3, 16, 16))
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
    ref = _as_batch(reference, "reference").to(obs.device) if reference is not None else None
    run = build_run(preset, term, channels, size, backend=backend, generator=generator, reference=ref)
    result = fit(run.net, run.net_input, run.term, **{**run.fit_kwargs, **fit_overrides})
    return result, run.net
