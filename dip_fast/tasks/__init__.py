"""Restoration tasks: the registry, data terms, presets, degradations and the run builder.

* :mod:`~dip_fast.tasks.registry` -- one :class:`TaskSpec` per task (the
  built-in ones in :mod:`~dip_fast.tasks.builtin`);
* :mod:`~dip_fast.tasks.terms` -- the data terms ``E(x; x0)``;
* :mod:`~dip_fast.tasks.presets` -- the paper's settings (:data:`PRESETS`);
* :mod:`~dip_fast.tasks.degradations` -- noise (sigma in 0-255 units),
  masks, blur and resampling, shared by the demo, benchmarks and tests;
* :mod:`~dip_fast.tasks.run` -- network, input and data term of a run, and
  :func:`solve`.

The names below are re-exported so that ``from dip_fast import tasks;
tasks.solve(...)`` keeps working.
"""
from __future__ import annotations

from ..core.networks import NetworkSpec
from . import builtin, degradations, registry, terms  # noqa: F401  (builtin registers the tasks)
from . import physics  # noqa: F401,E402  (registers the 'physics' task, after builtin's callable task)
from .degradations import (
    MAX_KERNEL_SIZE,
    KernelLike,
    bernoulli_mask,
    blur,
    crop_to_multiple,
    make_blur_kernel,
)
from .presets import DEFAULT_NETWORK, PRESETS, Preset, _net, get_preset, preset_for, restore_presets
from .registry import CliFlag, TaskSpec, TermContext, TileRule, get_task, register_task
from .run import Backend, Run, build_network, build_run, make_data_term, make_input, solve
import torch as _torch
from typing import Optional as _Optional

from .terms import (
    Box,
    DeblurTerm,
    DenoiseTerm,
    ForwardModelTerm,
    InpaintTerm,
    Operator,
    OperatorTerm,
    PackedTerm,
    SuperResolutionTerm,
    check_operator,
    mse,
)



def __getattr__(name: str):
    """Read-only views of the registry under the names this module once kept as tables."""
    if name == "TASKS":  # tasks of the presets, callable included
        return registry.task_names()
    if name == "RESTORE_PRESETS":  # the preset per task and level
        return restore_presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_NETWORK",
    "PRESETS",
    "CliFlag",
    "DeblurTerm",
    "DenoiseTerm",
    "ForwardModelTerm",
    "InpaintTerm",
    "NetworkSpec",
    "OperatorTerm",
    "PackedTerm",
    "Preset",
    "Run",
    "SuperResolutionTerm",
    "TaskSpec",
    "TermContext",
    "TileRule",
    "bernoulli_mask",
    "blur",
    "build_network",
    "build_run",
    "check_operator",
    "crop_to_multiple",
    "get_preset",
    "get_task",
    "make_blur_kernel",
    "make_data_term",
    "make_input",
    "mse",
    "preset_for",
    "register_task",
    "restore_presets",
    "solve",
]
