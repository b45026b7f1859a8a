"""dip_fast: fast Deep Image Prior restoration.

Public face: :func:`restore` (one call to restore an image), :func:`build_info`
and ``__version__``. The pure-PyTorch paper implementation is in
:mod:`dip_fast.reference`; the custom ops are in :mod:`dip_fast.ops`.
"""
from __future__ import annotations

from ._version import __version__
from . import _compat
from . import ops, reference  # noqa: F401  (public submodules)
from .build import build_info
from .api import RestoreInfo, restore

__all__ = ["__version__", "RestoreInfo", "build_info", "restore"]

_compat.install()  # old module paths (dip_fast.fit, ...) still import, with a DeprecationWarning
