"""Where a warning should point: the first frame outside the package.

A warning about a ``restore()`` call (its run time, a noise level it could
not estimate) is most useful at the line of the caller's code that made the
call.  A fixed ``stacklevel`` counts frames, and every change to the call
chain inside the package (a packed run, a tiled one) silently moves the
warning into the package; :func:`stacklevel` counts them when the warning
is issued (Python 3.12's ``skip_file_prefixes`` does this, 3.11 lacks it).
"""
from __future__ import annotations

import os
import sys

__all__ = ["stacklevel"]

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def stacklevel() -> int:
    """The ``stacklevel`` that makes a warning issued by the calling function point at the package's caller.

    1 is the calling function itself; each frame inside the package adds one.
    """
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
        frame = frame.f_back
        level += 1
    return level
