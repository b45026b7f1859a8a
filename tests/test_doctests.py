"""The ``Examples:`` of the public API's docstrings run as doctests (tiny inputs, a few steps, the CPU)."""
from __future__ import annotations

import doctest
import importlib

import pytest

#: Modules whose docstrings carry runnable examples.
MODULES = [
    "dip_fast.api",
    "dip_fast.apps.batch",
    "dip_fast.build",
    "dip_fast.core.auto_step",
    "dip_fast.apps.cli",
    "dip_fast.core.cpu_features",
    "dip_fast.io",
    "dip_fast.pipeline.many",
    "dip_fast.core.memory",
    "dip_fast.core.networks",
    "dip_fast.pipeline.noise_level",
    "dip_fast.core.packed",
    "dip_fast.pipeline.request",
    "dip_fast.tasks.degradations",
    "dip_fast.tasks.presets",
    "dip_fast.tasks.registry",
    "dip_fast.tasks.run",
    "dip_fast.tasks.terms",
    "dip_fast.pipeline.tiles",
]

pytestmark = [pytest.mark.filterwarnings("ignore:dip_fast. the fast backend falls back"),
              pytest.mark.usefixtures("one_thread")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
