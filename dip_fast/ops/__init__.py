"""Public wrappers of dip_fast's custom ops (``torch.ops.dip_fast``).

One module per op family. Each registers the family's fake kernels and
autograd formulas (when the extension is loaded) and exposes functions that
check their arguments in Python, so mistakes raise ``TypeError`` or
``ValueError`` naming the argument before any kernel runs.
"""
from __future__ import annotations

from .activation import leaky_relu

__all__ = ["leaky_relu"]
