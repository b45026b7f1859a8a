"""Network inputs ``z`` of the Deep Image Prior paper.

The paper feeds the generator a fixed tensor: either small uniform (or
normal) noise, or, for some inpainting figures, a 2-channel coordinate grid.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = ["get_meshgrid", "get_noise"]

SpatialSize = Union[int, Sequence[int]]


def _hw(spatial_size: SpatialSize) -> Tuple[int, int]:
    if isinstance(spatial_size, int):
        h = w = spatial_size
    else:
        if len(spatial_size) != 2:
            raise ValueError(f"spatial_size must be an int or (H, W), got {spatial_size!r}")
        h, w = (int(s) for s in spatial_size)
    if h < 1 or w < 1:
        raise ValueError(f"spatial_size must be positive, got {spatial_size!r}")
    return h, w


def get_meshgrid(
    spatial_size: SpatialSize,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Return the paper's ``(2, H, W)`` coordinate grid.

    Channel 0 is the column coordinate ``x / (W - 1)``, channel 1 the row
    coordinate ``y / (H - 1)``; both run from 0 to 1 inclusive.
    """
    h, w = _hw(spatial_size)
    if h < 2 or w < 2:
        # The paper divides by (size - 1); a 1-pixel axis would give NaNs.
        raise ValueError(f"spatial_size must be at least 2x2 for a meshgrid, got {(h, w)}")
    # Compute in float64 (the paper used numpy) and round once at the end.
    xs = torch.arange(w, dtype=torch.float64) / (w - 1)
    ys = torch.arange(h, dtype=torch.float64) / (h - 1)
    grid = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w)])
    return grid.to(dtype=dtype, device=device)


def get_noise(
    input_depth: int,
    method: str,
    spatial_size: SpatialSize,
    noise_type: str = "u",
    var: float = 1.0 / 10,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Return a ``(1, input_depth, H, W)`` network input, as the paper's ``get_noise``.

    Args:
        input_depth: number of channels.
        method: ``'noise'`` (random values times ``var``) or ``'meshgrid'``
            (the :func:`get_meshgrid` grid; needs ``input_depth == 2``).
        spatial_size: ``H`` (square) or ``(H, W)``.
        noise_type: ``'u'`` for uniform on [0, 1), ``'n'`` for standard normal.
        var: scale applied to the noise (despite the name, not a variance).
        generator: optional ``torch.Generator`` for reproducible noise; it
            must live on ``device`` (noise is drawn there).
        dtype, device: of the returned tensor.

    Raises:
        ValueError: on an unknown method or noise type, or a meshgrid with
            ``input_depth != 2``.
    """
    h, w = _hw(spatial_size)
    if method == "noise":
        shape = (1, int(input_depth), h, w)
        if noise_type == "u":
            x = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        elif noise_type == "n":
            x = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        else:
            raise ValueError(f"noise_type must be 'u' or 'n', got {noise_type!r}")
        return x * var
    if method == "meshgrid":
        if input_depth != 2:
            raise ValueError(f"input_depth must be 2 for method 'meshgrid', got {input_depth!r}")
        return get_meshgrid((h, w), dtype=dtype, device=device)[None]
    raise ValueError(f"method must be 'noise' or 'meshgrid', got {method!r}")
