"""The upsample_cat op family, upsample-and-concatenate: the join of the hourglass's two branches, in one op.

``upsample_cat(skip, deep, mode)`` returns

    torch.cat([skip, upsample2x(deep, mode)], dim=1)

with ``upsample2x`` the paper's ``nn.Upsample(scale_factor=2)`` (nearest, or
bilinear with ``align_corners=False``), written in one pass into the
concatenation buffer: the upsampled tensor is never materialised, and no
``torch.cat`` copy follows. ``groups=G`` concatenates per group, for ``G``
networks packed group-major into one module (grouped convolutions): each
group's skip channels, then its upsampled deep channels (see
:func:`upsample_cat`). The backward copies the skip channels' gradient
out and gathers the deep channels' gradient through the transposed
upsampling taps. The op is linear, so autograd saves nothing but the skip's
channel count. See ``csrc/ops/upsample_cat.cpp`` for the schemas, the
memory-pass count and the autograd formulas (C++).
"""
from __future__ import annotations

import torch

from .. import _ops
from .._checks import check_int
from .._ops import check_float_tensor, require_extension, working_memory_format

__all__ = ["upsample_cat", "UPSAMPLE_MODES"]

#: mode names accepted by :func:`upsample_cat`, and their codes in the op.
UPSAMPLE_MODES = {"nearest": 0, "bilinear": 1}


def _register() -> None:
    # groups reorders channels only: the shapes and strides do not depend on it.
    @torch.library.register_fake("dip_fast::upsample_cat")
    def _(skip, deep, mode, groups=1):
        n, cd, h, w = deep.shape
        out = deep.new_empty((n, skip.shape[1] + cd, 2 * h, 2 * w))
        return out.contiguous(memory_format=working_memory_format(deep))

    @torch.library.register_fake("dip_fast::_upsample_cat_backward")
    def _(grad_out, skip_channels, mode, groups=1):
        n, c, hh, ww = grad_out.shape
        fmt = working_memory_format(grad_out)
        grad_skip = grad_out.new_empty((n, skip_channels, hh, ww)).contiguous(memory_format=fmt)
        grad_deep = grad_out.new_empty((n, c - skip_channels, hh // 2, ww // 2)).contiguous(memory_format=fmt)
        return grad_skip, grad_deep

    # The autograd formulas (backward, and the backward's own derivative, the forward op) are C++
    # (csrc/ops/upsample_cat.cpp), like bn_act's: no Python runs per call.


_OPS = ("upsample_cat", "_upsample_cat_backward")
if _ops.has_ops(*_OPS):
    _register()


def upsample_cat(skip: torch.Tensor, deep: torch.Tensor, mode: str = "bilinear", groups: int = 1) -> torch.Tensor:
    """``torch.cat([skip, upsample2x(deep)], dim=1)`` in one pass, differentiable; per group with ``groups``.

    With ``groups=G``, ``skip`` is ``N x G*Cs x H x W`` and ``deep``
    ``N x G*Cd x H/2 x W/2``, each holding ``G`` networks' channels one
    network after the other, and the output keeps that layout::

        torch.cat([skip.view(N, G, Cs, H, W), upsample2x(deep).view(N, G, Cd, H, W)], dim=2)
             .view(N, G * (Cs + Cd), H, W)

    that is, output channels ``[g*(Cs+Cd), g*(Cs+Cd) + Cs)`` are skip channels
    ``[g*Cs, (g+1)*Cs)`` and the next ``Cd`` are ``upsample2x`` of deep
    channels ``[g*Cd, (g+1)*Cd)``. ``groups=1`` is the plain concatenation.

    Args:
        skip: ``N x G*Cs x H x W`` (``Cs`` may be 0), the skip branch's output.
        deep: ``N x G*Cd x H/2 x W/2``, the deeper level's output, same dtype and device.
        mode: ``"nearest"`` or ``"bilinear"`` (``align_corners=False``), as ``nn.Upsample(scale_factor=2)``.
        groups: ``G``, the number of packed networks: an int >= 1 dividing both channel counts.

    Returns:
        ``N x G*(Cs + Cd) x H x W``, channels_last when ``deep`` is (only) channels_last, NCHW otherwise.

    Raises:
        TypeError: ``skip`` or ``deep`` is not a floating-point tensor, or ``groups`` is not an int.
        ValueError: a bad ``mode``, mismatched shapes, dtypes or devices, or ``groups`` < 1 or not
            dividing both channel counts.
    """
    check_float_tensor(skip, "skip")
    check_float_tensor(deep, "deep")
    if mode not in UPSAMPLE_MODES:
        raise ValueError(f"mode must be one of {sorted(UPSAMPLE_MODES)}, got {mode!r}")
    if deep.dim() != 4 or deep.numel() == 0:
        raise ValueError(f"deep must be a non-empty 4-D tensor (N, C, H, W), got shape {tuple(deep.shape)}")
    n, _, h, w = deep.shape
    if skip.dim() != 4 or skip.shape[0] != n or tuple(skip.shape[2:]) != (2 * h, 2 * w):
        raise ValueError(
            f"skip must have shape ({n}, Cs, {2 * h}, {2 * w}) to match deep upsampled twice, got {tuple(skip.shape)}"
        )
    if skip.dtype != deep.dtype or skip.device != deep.device:
        raise ValueError(
            f"skip and deep must share dtype and device, got {skip.dtype} on {skip.device} and {deep.dtype} on {deep.device}"
        )
    groups = check_int(groups, "groups", minimum=1)
    if skip.shape[1] % groups or deep.shape[1] % groups:
        raise ValueError(
            f"groups={groups} must divide skip's and deep's channel counts, got {skip.shape[1]} and {deep.shape[1]}"
        )
    require_extension(*_OPS)
    return torch.ops.dip_fast.upsample_cat(skip, deep, UPSAMPLE_MODES[mode], groups)
