"""The second stage of ``restore()``: the observation, read, checked and padded for the network.

:func:`prepare_observation` checks the run fits in the device's memory
from the image's header alone, then reads the pixels once, with the mask
and the ground truth, and pads them to the working size that the network's
architecture needs.  A constant image stops here (it is its own
restoration, see ``RestoreInfo.stop_reason``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from . import degenerate
from .. import io
from ..core.memory import check_fits, estimate_memory
from ..core.networks import get_architecture
from .request import RestoreRequest
from ..tasks import check_operator

__all__ = ["Observation", "Padding", "prepare_observation"]


@dataclass(frozen=True)
class Padding:
    """How the generated image is padded: sides a multiple of ``multiple`` and at least ``minimum``.

    Both in low-resolution (observation) pixels; the network works at
    ``factor`` times that size.
    """

    multiple: int
    minimum: int
    factor: int

    @classmethod
    def for_request(cls, request: RestoreRequest) -> "Padding":
        """The padding the request's network architecture needs at its scale factor."""
        network = request.preset.network
        arch = get_architecture(network.arch)
        hr_multiple, factor = arch.size_multiple(network.options), request.factor
        # The high-resolution multiple, in low-resolution pixels (the factor may already supply some of it).
        return cls(hr_multiple // math.gcd(hr_multiple, factor), -(-arch.min_size(network.options) // factor), factor)

    def working_size(self, h: int, w: int) -> Tuple[int, int]:
        """The network's (high-resolution) working size for an image of ``h x w`` low-resolution pixels."""
        return tuple(-(-max(n, self.minimum) // self.multiple) * self.multiple * self.factor for n in (h, w))


@dataclass
class Observation:
    """A request's images, ready for the data term.

    Attributes:
        observation: the image the data term compares with: on the run's
            device, padded unless the task crops in its term.
        mask: the known-pixel mask, padded like the image, on the device.
        ground_truth: the clean image for PSNR (on the device, or on the
            CPU for a constant image).
        color: the observation as read, ``(1, C, H, W)`` on the CPU.
        alpha: the alpha channel to give back (resized to the output).
        spec: how to give the result back (the caller's kind of image).
        shape: ``(C, H, W)`` of the generated image, in low-resolution pixels.
        box: where the image lies in the padded one (``io.crop``'s box).
        padded_size: the network's working size ``(H, W)``.
        estimated_memory: the run's estimated peak bytes (0 if unknown).
        constant: the colour of a constant image (then nothing is padded), else None.
    """

    observation: torch.Tensor
    mask: Optional[torch.Tensor]
    ground_truth: Optional[torch.Tensor]
    color: torch.Tensor
    alpha: Optional[torch.Tensor]
    spec: io.ImageSpec
    shape: Tuple[int, int, int]
    box: Tuple[int, int, int, int]
    padded_size: Tuple[int, int]
    estimated_memory: int
    constant: Optional[torch.Tensor] = None


def _output_spec(spec: io.ImageSpec, c: int, h: int, w: int) -> io.ImageSpec:
    """The observation's spec for an image of another shape, without alpha (an operator task's result).

    Raises:
        ValueError: a result of other than 1 or 3 channels for an observation that comes back as a PIL image.
    """
    if spec.kind in ("pil", "path") and c not in (1, 3):
        raise ValueError(f"output_shape: a result of {c} channels cannot be given back as a PIL image (1 or 3 "
                         "channels); pass the observation as a numpy array or a torch tensor")
    layout = spec.layout
    if spec.kind == "numpy" and c != 1:
        layout = "HWC"
    changes: Dict[str, Any] = dict(height=h, width=w, channels=c, has_alpha=False, layout=layout)
    if spec.kind in ("pil", "path") and c == 3 and spec.bit_depth != 8:
        # Pillow has no 16-bit or float colour mode: such colour results come back as arrays, as for files.
        changes.update(kind="numpy", layout="HWC")
    return dataclasses.replace(spec, **changes)


def _load_ground_truth(ground_truth: io.ImageLike, want: Tuple[int, int, int]) -> torch.Tensor:
    """The clean image, which must have the output's shape ``want = (C, H, W)``."""
    gt = io.load_image(ground_truth, "ground_truth").color
    if tuple(gt.shape[1:]) != want:
        raise ValueError(
            f"ground_truth must be a clean image of the output's shape {want[1]}x{want[2]} with {want[0]} "
            f"colour channel(s), got {gt.shape[2]}x{gt.shape[3]} with {gt.shape[1]}"
        )
    return gt


@dataclass
class Measurement:
    """A measurement task's observation (see :attr:`dip_fast.tasks.registry.TaskSpec.measurement`), checked.

    Attributes:
        spec: how to give the result back (a tensor or an array, as given).
        values: ``(1, C, H, W)``, real, finite, on the CPU, in its own floating dtype (float32 for other kinds).
    """

    spec: io.ImageSpec
    values: torch.Tensor


def load_measurement(value: Any, name: str = "image") -> Measurement:
    """A measurement: a real tensor ``CxHxW``/``1xCxHxW`` or a float numpy array ``HxW``/``HxWxC``, any values.

    Unlike an image it may hold any channel count (no alpha) and any finite real values (a sinogram, k-space
    as real and imaginary channels).

    Raises:
        TypeError: another type, or a complex or integer dtype.
        ValueError: another shape, or NaN/infinite values.
    """
    if isinstance(value, torch.Tensor):
        if value.is_complex() or not value.is_floating_point():
            raise TypeError(f"{name}: a measurement tensor must be real floating point, got dtype {value.dtype}"
                            + (" (pass torch.view_as_real's channels)" if value.is_complex() else ""))
        if value.dim() not in (3, 4) or (value.dim() == 4 and value.shape[0] != 1):
            raise ValueError(f"{name}: a measurement tensor must have shape CxHxW or 1xCxHxW, got "
                             f"{tuple(value.shape)}")
        t = value.detach()
        t = (t if t.dim() == 4 else t[None]).to("cpu")
        layout = "CHW" if value.dim() == 3 else "NCHW"
        spec = io.ImageSpec("tensor", t.shape[2], t.shape[3], t.shape[1], False, value.dtype, layout=layout,
                            device=value.device)
    elif isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise TypeError(f"{name}: a measurement array must be floating point, got dtype {value.dtype}")
        if value.ndim not in (2, 3):
            raise ValueError(f"{name}: a measurement array must have shape HxW or HxWxC, got {value.shape}")
        hwc = value if value.ndim == 3 else value[:, :, None]
        t = torch.from_numpy(np.ascontiguousarray(hwc.transpose(2, 0, 1)))[None]
        spec = io.ImageSpec("numpy", t.shape[2], t.shape[3], t.shape[1], False, value.dtype,
                            layout="HW" if value.ndim == 2 else "HWC")
        t = t.to(torch.float64 if value.dtype == np.float64 else torch.float32)
    else:
        raise TypeError(f"{name}: a deepinv Physics's measurement must be a torch tensor or a numpy array, got "
                        f"{type(value).__name__}")
    if t.numel() == 0:
        raise ValueError(f"{name}: the measurement is empty (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: the measurement contains NaN or infinite values")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return Measurement(spec, t.contiguous())


def inspect_run(request: RestoreRequest, image: io.ImageLike) -> Tuple[Any, Tuple[int, int, int], Optional[int]]:
    """Before any pixel is converted: the image's source, the ``(C, H, W)`` generated and the run's estimated bytes.

    A callable's observation may be smaller than an image (its operator sets the sizes); a measurement
    task's is a :class:`Measurement`, and a linear Physics gives the image's shape (its adjoint's).
    """
    if request.task.measurement:
        source: Any = load_measurement(image)
        shape = request.output_shape or request.operator.output_shape(
            tuple(source.values.shape[1:]), source.values.dtype)
        if min(shape[1:]) < io.MIN_SIZE:
            raise ValueError(f"task: the image to recover is {shape[1]}x{shape[2]}; it must be at least "
                             f"{io.MIN_SIZE}x{io.MIN_SIZE}")
        return source, shape, run_memory(request, *shape)
    source = io.inspect_image(image, "image", min_size=1 if request.operator is not None else io.MIN_SIZE)
    c, h, w = request.output_shape or (source.spec.color_channels, source.spec.height, source.spec.width)
    return source, (c, h, w), run_memory(request, c, h, w)


def _load_measurement_truth(ground_truth: Any, want: Tuple[int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """A measurement task's clean image: a tensor or array of the output's shape ``want``."""
    gt = load_measurement(ground_truth, "ground_truth").values
    if tuple(gt.shape[1:]) != want:
        raise ValueError(f"ground_truth must be a clean image of the output's shape {want}, got "
                         f"{tuple(gt.shape[1:])}")
    return gt.to(dtype)


def _prepare_measurement(request: RestoreRequest, image: Any, mask: Any, ground_truth: Any) -> Observation:
    """:func:`prepare_observation` of a measurement task (a deepinv Physics's ``y``)."""
    source, (c, h, w), need = inspect_run(request, image)
    check_fits(need, request.device, h, w)
    if mask is not None:
        raise ValueError("mask does not apply to a deepinv Physics task: the Physics carries its own mask")
    padding = Padding.for_request(request)
    values = source.values
    gt = _load_measurement_truth(ground_truth, (c, h, w), values.dtype) if ground_truth is not None else None
    _, box = io.pad_to_multiple(values.new_zeros(1, 1, h, w), padding.multiple, padding.minimum)
    obs = values.to(request.device)
    check_operator(request.operator, (c, h, w), obs, name="task")
    return Observation(obs, None, gt.to(request.device) if gt is not None else None, values, None,
                       _output_spec(source.spec, c, h, w), (c, h, w), box, padding.working_size(h, w), need or 0)


def run_memory(request: RestoreRequest, channels: int, height: int, width: int) -> Optional[int]:
    """The estimated peak bytes of restoring a ``channels x height x width`` image (None if unknown)."""
    return estimate_memory(request.preset, channels, Padding.for_request(request).working_size(height, width))


def prepare_observation(request: RestoreRequest, image: io.ImageLike, mask: Optional[io.ImageLike] = None,
                        ground_truth: Optional[io.ImageLike] = None) -> Observation:
    """Read, check and pad the request's images (see the module docstring).

    Raises:
        ValueError, TypeError, FileNotFoundError: an unreadable or mis-sized
            image, mask or ground truth, or a run too large for the device.
    """
    if request.task.measurement:
        return _prepare_measurement(request, image, mask, ground_truth)
    operator, factor, dev = request.operator, request.factor, request.device
    source, (c, h, w), need = inspect_run(request, image)  # size and memory before the pixels are converted
    check_fits(need, dev, h, w)
    padding = Padding.for_request(request)

    loaded = io.load_image(image, "image", source=source)
    spec, color = loaded.spec, loaded.color  # a file's orientation may have changed the size
    if operator is None:
        c, h, w = color.shape[1], spec.height, spec.width
    m = io.load_mask(mask, spec.height, spec.width, color.shape[1]) if mask is not None else None
    gt = _load_ground_truth(ground_truth, (c, h * factor, w * factor)) if ground_truth is not None else None
    padded_hw = padding.working_size(h, w)
    alpha = io.resize_alpha(loaded.alpha, factor) if loaded.alpha is not None and factor > 1 else loaded.alpha
    flat = degenerate.constant_value(color, m) if operator is None else None
    if flat is not None:
        return Observation(color, m, gt, color, alpha, spec, (c, h, w), (0, 0, h, w), padded_hw, need or 0, flat)

    # The generated image before padding; a callable's only matters by its size.
    generated = color if operator is None else color.new_zeros(1, 1, h, w)
    padded, box = io.pad_to_multiple(generated, padding.multiple, padding.minimum)
    # Tasks that crop in their data term let the forward model see exactly
    # the image (their observation is not padded); the others fit the padded one.
    obs = (color if request.task.crop_in_term else padded).to(dev)
    m_pad = io.pad_to_multiple(m, padding.multiple, padding.minimum)[0].to(dev) if m is not None else None
    if operator is not None:
        check_operator(operator, (c, h, w), obs, name="task")
        spec, alpha = _output_spec(spec, c, h, w), None
    return Observation(obs, m_pad, gt.to(dev) if gt is not None else None, color, alpha, spec, (c, h, w), box,
                       padded_hw, need or 0)
