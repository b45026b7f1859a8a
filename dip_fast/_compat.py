"""Old module paths kept for one release: ``dip_fast.fit`` is now ``dip_fast.core.fit``, and so on.

Importing an old path gives the new module itself (so ``isinstance`` checks and
monkeypatching still see one module) with a :class:`DeprecationWarning` that
names the new path. The aliases go in the release after 0.x's next.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Dict

#: Old top-level module name -> the module that replaced it.
MOVED: Dict[str, str] = {
    **{f"dip_fast.{name}": f"dip_fast.core.{name}" for name in (
        "auto_step", "conv", "cpu_features", "early_stop", "fit", "memory", "metrics", "nets",
        "networks", "packed", "step")},
    **{f"dip_fast.{name}": f"dip_fast.pipeline.{name}" for name in (
        "degenerate", "many", "monitor", "noise_level", "observation", "request", "tiles")},
    **{f"dip_fast.{name}": f"dip_fast.apps.{name}" for name in ("batch", "cli", "demo")},
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, new_name: str) -> None:
        self.new_name = new_name

    def create_module(self, spec):  # the new module object itself, not a copy
        return importlib.import_module(self.new_name)

    def exec_module(self, module) -> None:  # already executed under its new name
        pass


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of :data:`MOVED` and warns once per import."""

    def find_spec(self, fullname, path=None, target=None):
        new_name = MOVED.get(fullname)
        if new_name is None:
            return None
        warnings.warn(f"{fullname} moved to {new_name}; the old path goes in a later release",
                      DeprecationWarning, stacklevel=3)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new_name))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedModuleFinder())
