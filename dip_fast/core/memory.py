"""How much memory a run needs, and whether the device has it -- decided before any pixel is converted.

The estimate comes from the network's architecture entry
(:mod:`dip_fast.core.networks`); by default its reference builder is traced on
the ``meta`` device (shapes only, nothing allocated), adding up the
activations autograd keeps for the backward pass, plus weights, gradients
and Adam's two moments, with a margin for transient buffers.

Examples:
    >>> from dip_fast import tasks
    >>> from dip_fast.core.memory import estimate_memory, format_bytes
    >>> preset = tasks.get_preset("denoise_quick")
    >>> estimate_memory(preset, 3, (64, 64)) < estimate_memory(preset, 3, (128, 128))
    True
    >>> format_bytes(3 * 1024**3)
    '3.0 GiB'
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .networks import get_architecture

__all__ = ["check_fits", "device_memory", "estimate_memory", "format_bytes", "trace_memory"]

# Margin on the estimated peak memory: autograd's transient gradient buffers
# and the allocator's rounding come on top of the saved activations.
_MEMORY_MARGIN = 1.5
# Results by architecture, options, channels and size: tracing takes about a
# second on the CPU, which a batch of same-sized images would otherwise pay
# for every file.
_MEMORY_ESTIMATES: Dict[str, Optional[int]] = {}


def estimate_memory(preset: Any, channels: int, size: Tuple[int, int]) -> Optional[int]:
    """Estimated peak memory in bytes of fitting ``preset``'s network at ``size`` (high-resolution ``H, W``).

    Returns None when the architecture cannot say (its network cannot be traced).
    """
    spec = preset.network
    key = repr((spec.arch, preset.input_depth, dict(spec.options), channels, tuple(size)))
    if key not in _MEMORY_ESTIMATES:
        arch = get_architecture(spec.arch)
        if arch.estimate_memory is not None:
            _MEMORY_ESTIMATES[key] = arch.estimate_memory(spec.options, preset.input_depth, channels, tuple(size))
        else:
            _MEMORY_ESTIMATES[key] = trace_memory(arch.reference, spec.options, preset.input_depth, channels, size)
    return _MEMORY_ESTIMATES[key]


def trace_memory(build: Callable[..., nn.Module], options: Mapping[str, Any], in_channels: int, channels: int,
                 size: Tuple[int, int]) -> Optional[int]:
    """Peak bytes of one training step of ``build(...)``'s network, traced on the ``meta`` device."""
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    try:
        with torch.device("meta"):
            net = build(num_input_channels=in_channels, num_output_channels=channels, **dict(options))
            z = torch.empty(1, in_channels, *size)
        net.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = net(z)
    except Exception:  # an option without meta support: no estimate rather than a false alarm
        return None
    params = sum(p.numel() * p.element_size() for p in net.parameters())
    inputs = 2 * z.numel() * z.element_size() + 4 * out.numel() * out.element_size()
    return int(_MEMORY_MARGIN * saved + 4 * params + inputs)


def device_memory(device: torch.device) -> Optional[int]:
    """Total memory of the device in bytes (physical RAM for the CPU), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: Optional[int], device: torch.device, height: int, width: int) -> None:
    """Refuse a run that needs more memory than ``device`` has (unknown amounts pass).

    Raises:
        ValueError: naming the image size, the need and the device's memory.
    """
    have = device_memory(device)
    if need is not None and have is not None and need > have:
        raise ValueError(
            f"image of {height}x{width} is too large for {device}: the run needs about "
            f"{format_bytes(need)} but the device has {format_bytes(have)}; crop or downscale it, or use a smaller preset"
        )


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units, one decimal."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"
