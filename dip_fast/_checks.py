"""The integer-argument check, written once.

An integer argument is an ``int`` or a numpy integer (``numbers.Integral``)
and never a ``bool`` (``True`` is an ``int`` to Python, never a size here).
Callers keep their own messages and exception types through :func:`is_int`,
or raise the standard ones with :func:`check_int`.
"""
from __future__ import annotations

import numbers
from typing import Any, Optional

__all__ = ["is_int", "check_int"]


def is_int(value: Any, minimum: Optional[int] = None) -> bool:
    """True when ``value`` is an integer (not a bool), and at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return minimum is None or value >= minimum


def check_int(value: Any, name: str, minimum: Optional[int] = None) -> int:
    """``int(value)``; TypeError naming ``name`` unless an integer, ValueError when below ``minimum``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)
