"""Loading the compiled extension, and the helpers every op family shares.

The op schemas and the CPU/CUDA kernels live in C++ (``csrc/``) and are
registered under ``torch.ops.dip_fast`` when ``dip_fast._C`` is imported, one
family per file (``csrc/ops/<family>.cpp``, whose C++ autograd kernels sit
beside the schemas). This module registers nothing itself: each family's
Python module, ``dip_fast/ops/<family>.py``, registers the family's fake
(meta) kernels (``torch.library.register_fake``, so the ops trace under
``torch.compile`` and ``torch.library.opcheck``) and, for the ops whose
autograd formula is Python, that formula (``torch.library.register_autograd``).
What is here: loading the module, :func:`has_ops` / :func:`require_extension`
(does the build register these ops?), the layout rule the fake kernels share
(:func:`working_memory_format`) and the argument check of tensor inputs.

If the extension cannot be loaded (not built, or built against another torch),
``import dip_fast`` still works: ``LOAD_ERROR`` holds the reason, the reference
backend is unaffected, and the fast backend falls back to the reference with
one warning (:func:`dip_fast.core.nets.skip`).

The environment variable ``DIP_FAST_EXTENSION`` names another build of the
module to load instead of the installed one (the sanitizer build of
``scripts/sanitize_check.sh``, or any CMake build).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import Optional

import torch

_C = None
LOAD_ERROR: Optional[str] = None
#: Environment variable naming a compiled module file to load instead of ``dip_fast._C``.
EXTENSION_ENV = "DIP_FAST_EXTENSION"


def _load_extension() -> ModuleType:
    """The installed ``dip_fast._C``, or the file named by ``$DIP_FAST_EXTENSION``."""
    path = os.environ.get(EXTENSION_ENV)
    if not path:
        from . import _C as module  # type: ignore[attr-defined]

        return module
    # Registered as dip_fast._C, so that the ops' Python side sees one module whichever file it came from.
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ImportError(f"{EXTENSION_ENV}={path!r} is not a compiled module file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


try:  # pragma: no cover - exercised by both the built and the unbuilt cases
    _C = _load_extension()
except Exception as exc:  # ImportError, or an OSError / undefined symbol from a stale build
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def available() -> bool:
    """True when the compiled ops are loaded and registered."""
    return _C is not None


def working_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the kernels work in: the Python twin of the C++ rule in csrc/common/checks.h."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


#: The ops the fused network (dip_fast.core.nets.FastSkipNet) needs; without them it falls back to the reference.
FAST_NETWORK_OPS = (
    "bn_act", "_bn_act_backward", "bn_act_running_stats_update", "upsample_cat", "_upsample_cat_backward"
)

def has_ops(*names: str) -> bool:
    """True when the extension is loaded and registers every op in ``names``.

    A stale build can load yet lack newer ops; each op family checks its own
    ops before registering Python kernels for them.
    """
    return _C is not None and all(hasattr(torch.ops.dip_fast, name) for name in names)


def require_extension(*names: str) -> None:
    """Raise a RuntimeError saying why, when the compiled ops (or the named ones) are missing."""
    if _C is None:
        raise RuntimeError(f"dip_fast's compiled ops are not available ({LOAD_ERROR})")
    missing = [name for name in names if not hasattr(torch.ops.dip_fast, name)]
    if missing:
        raise RuntimeError(f"dip_fast's compiled extension lacks {missing}: rebuild it (pip install -e .)")


def check_float_tensor(x: object, name: str) -> None:
    """TypeError naming ``name`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
