"""Public wrappers of dip_fast's custom ops (``torch.ops.dip_fast``).

One module per op family, named like the family's ops and C++ files
(``leaky_relu``, ``bn_act``, ``upsample_cat``, ``downsample``; see
``csrc/module.cpp`` for the layout). Each registers the family's fake kernels
and any Python autograd formulas (when the extension is loaded) and exposes
functions that check their arguments in Python, so mistakes raise
``TypeError`` or ``ValueError`` naming the argument before any kernel runs.
"""
from __future__ import annotations

from .leaky_relu import leaky_relu
from .bn_act import batch_norm_act
from .downsample import Downsample, downsample, downsample_taps
from .upsample_cat import upsample_cat

__all__ = ["leaky_relu", "batch_norm_act", "Downsample", "downsample", "downsample_taps", "upsample_cat"]
