"""Which bf16 units the CPU has, read at run time.

``precision='auto'`` on the CPU runs bf16 only where the processor computes
it natively (:mod:`dip_fast.core.auto_step`): Intel's AMX tiles (Sapphire Rapids
and later) or AVX512-BF16 (Cooper Lake, Zen 4 and later).  Elsewhere oneDNN
emulates bf16 with fp32 arithmetic plus conversions, which is slower than
fp32 itself, so fp32 stays.

The flags come from ``torch.cpu.get_capabilities()`` (cpuinfo, the library
PyTorch dispatches its own kernels with).  A torch without it reports no
bf16 units.

Example::

    >>> from dip_fast import cpu_features
    >>> cpu_features.bf16_units() in cpu_features.BF16_UNITS
    True
    >>> cpu_features.has_native_bf16() == (cpu_features.bf16_units() != "none")
    True
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

__all__ = ["BF16_UNITS", "bf16_units", "capabilities", "cpu_name", "has_native_bf16"]

#: What :func:`bf16_units` can answer, best first.
BF16_UNITS = ("AMX", "AVX512-BF16", "none")


def capabilities() -> Mapping[str, Any]:
    """The CPU's flags as torch reports them (empty where this torch cannot tell)."""
    get = getattr(getattr(torch, "cpu", None), "get_capabilities", None)
    if get is None:
        return {}
    try:
        return get()
    except Exception:  # cpuinfo failed to initialise: behave as a CPU without bf16 units
        return {}


def bf16_units() -> str:
    """``'AMX'``, ``'AVX512-BF16'`` or ``'none'``: the best native bf16 unit of this CPU."""
    caps = capabilities()
    if caps.get("amx_bf16") and caps.get("amx_tile"):
        return "AMX"
    if caps.get("avx512_bf16"):
        return "AVX512-BF16"
    return "none"


def has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AMX or AVX512-BF16)."""
    return bf16_units() != "none"


def cpu_name() -> str:
    """The processor's name as cpuinfo gives it (``'unknown'`` where it cannot tell)."""
    return str(capabilities().get("cpu_name") or "unknown")
