"""Pure-PyTorch reference implementation of Deep Image Prior (Ulyanov et al., CVPR 2018).

This package is the ground truth the fast backends are tested against:
the ``skip`` generator network, the fixed Lanczos/Gauss/box
``Downsampler`` and the network inputs ``get_noise``.
"""
from __future__ import annotations

from .downsampler import (
    KERNEL_TYPES,
    Downsampler,
    downsampler_padding,
    get_kernel,
    get_kernel_1d,
    resolve_kernel,
)
from .noise import get_meshgrid, get_noise
from .skip import (
    ACT_FUNS,
    DOWNSAMPLE_MODES,
    PADS,
    UPSAMPLE_MODES,
    ConvBlock,
    SkipConfig,
    SkipNet,
    center_crop_cat,
    make_act,
    skip,
)

__all__ = [
    "ACT_FUNS",
    "DOWNSAMPLE_MODES",
    "KERNEL_TYPES",
    "PADS",
    "UPSAMPLE_MODES",
    "ConvBlock",
    "Downsampler",
    "SkipConfig",
    "SkipNet",
    "center_crop_cat",
    "downsampler_padding",
    "get_kernel",
    "get_kernel_1d",
    "get_meshgrid",
    "get_noise",
    "make_act",
    "resolve_kernel",
    "skip",
]
