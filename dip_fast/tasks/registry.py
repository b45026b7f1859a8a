"""The task registry: one frozen :class:`TaskSpec` per restoration task.

Everything that differs between tasks lives in its spec -- its names, how
its data term is made, which of ``restore()``'s task inputs it needs or
accepts, its presets per level, whether early stopping applies, its command
line.  :func:`dip_fast.restore`, the ``dip-fast`` command (its subcommands
are generated from the specs) and ``dip-fast batch`` read the registry;
outside it no code compares a task's name with a string.  The built-in
tasks are in :mod:`dip_fast.tasks.builtin`; CONTRIBUTING.md ("Add a task")
shows how to add one.

Examples:
    >>> from dip_fast.tasks import registry
    >>> registry.get_task("sr").name
    'super_resolution'
    >>> registry.get_task("inpaint").required
    ('mask',)
    >>> [spec.command for spec in registry.all_tasks() if spec.command]
    ['denoise', 'inpaint', 'sr', 'deblur', 'jpeg']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

if TYPE_CHECKING:  # only for annotations: presets import this module
    from .presets import Preset

__all__ = [
    "CliFlag",
    "INPUT_NAMES",
    "TaskSpec",
    "TermContext",
    "TileRule",
    "aliases",
    "all_tasks",
    "by_command",
    "check_preset",
    "find_task",
    "get_task",
    "register_task",
    "task_names",
    "unregister_task",
]

#: The task inputs of ``restore()`` a spec can need or accept (see :mod:`dip_fast.tasks.inputs`).
INPUT_NAMES = ("mask", "scale", "blur_kernel", "output_shape", "sigma")
#: The preset levels every spec names a preset for.
LEVELS = ("paper", "fast", "quick")


@dataclass(frozen=True)
class TermContext:
    """What a task's data term is made from (the arguments of :func:`dip_fast.tasks.make_data_term`).

    Attributes:
        preset: the run's settings (``sr_factor``, ``sr_kernel``, ...).
        observation: the degraded image, ``(C, H, W)`` or ``(1, C, H, W)``.
        mask: the known-pixel mask, for tasks that take one.
        blur_kernel: the blur kernel, for tasks that take one.
        operator: a caller's forward operator, for the operator task.
        box: ``(top, left, H, W)``: the region of the generated image the
            forward model sees (tasks with ``crop_in_term``).
    """

    preset: "Preset"
    observation: torch.Tensor
    mask: Optional[torch.Tensor] = None
    blur_kernel: Any = None
    operator: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    box: Optional[Tuple[int, int, int, int]] = None


@dataclass(frozen=True)
class CliFlag:
    """One task input as a command-line option.

    Attributes:
        input: the ``restore()`` keyword it sets (one of :data:`INPUT_NAMES`).
        flag: the option of the task's own command (``--sigma``).
        help: its help there.
        type: converts the string (``int``, ``float``; None keeps it).
        metavar: its placeholder in the help.
        required: the task's command needs it.
        is_file: it names a file that must exist before any work starts.
        batch_flag, batch_metavar, batch_help: the option in ``dip-fast batch``
            (a per-file input such as the mask becomes a folder there).
        batch_needs: for a required input, what ``dip-fast batch`` says
            after ``--task T needs FLAG`` when it is missing.
        per_file: ``dip-fast batch`` takes a folder of these, matched to
            the images by name.
    """

    input: str
    flag: str
    help: str
    type: Optional[Callable[[str], Any]] = None
    metavar: Optional[str] = None
    required: bool = False
    is_file: bool = False
    batch_flag: str = ""
    batch_metavar: Optional[str] = None
    batch_help: str = ""
    batch_needs: str = ""
    per_file: bool = False

    @property
    def batch_option(self) -> str:
        """The option's name in ``dip-fast batch``."""
        return self.batch_flag or self.flag


@dataclass(frozen=True)
class TileRule:
    """How a task's observation is restored in overlapping tiles (see :mod:`dip_fast.pipeline.tiles`).

    A task has one only if restoring a tile of its observation gives the
    matching tile of the image, which holds when its forward model is local
    (each observed pixel depends on nearby image pixels only).

    Attributes:
        split_inputs: per-pixel task inputs cut into tiles with the
            observation (the inpainting mask); the others go to every tile.
        scale_input: the task input holding the output's enlargement factor
            (super-resolution's ``scale``): output tiles are that many times
            larger, and so is the plan that blends them.
        min_overlap: ``min_overlap(inputs)``: the least overlap (one int or
            ``(rows, cols)``, in observation pixels) the task's checked
            inputs demand, e.g. the blur kernel's size; None: no demand.
        align: tile origins lie on this grid where the tile and overlap
            sizes allow (1: anywhere).
    """

    split_inputs: Tuple[str, ...] = ()
    scale_input: Optional[str] = None
    min_overlap: Optional[Callable[[Mapping[str, Any]], Union[int, Tuple[int, int]]]] = None
    align: int = 1

    def __post_init__(self) -> None:
        unknown = sorted(set(self.split_inputs + ((self.scale_input,) if self.scale_input else ())) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"TileRule: unknown inputs {unknown}; known: {INPUT_NAMES}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ValueError(f"TileRule: align must be an integer >= 1, got {self.align!r}")


@dataclass(frozen=True)
class TaskSpec:
    """Everything about one task.

    Attributes:
        name: the canonical name (``info.task``, ``Preset.task``).
        make_term: ``make_term(ctx)``: the data term (an ``nn.Module`` whose
            ``forward(x)`` is the loss and ``fit_kwargs()`` describes the
            observation, see :mod:`dip_fast.tasks.terms`) for a :class:`TermContext`.
        presets: preset name per level (``'paper'``, ``'fast'``, ``'quick'``).
        aliases: other names ``restore(task=...)`` accepts.
        required: task inputs ``restore()`` must be given (:data:`INPUT_NAMES`).
        optional: task inputs it may be given.  ``'sigma'`` here also makes
            the noise level drive the input perturbation and the stopping
            rule, estimated from the image when omitted.
        early_stop: ``stop='early'`` applies.
        auto_stop: what ``stop='auto'`` resolves to (``'early'`` or ``'never'``).
        crop_in_term: the forward model sees the generated image cropped to
            the image (the observation is not padded).
        operator: the task is a caller's forward operator, chosen by passing
            a callable as ``task`` rather than by name.
        measurement: the observation is a measurement, not an image (a
            deepinv Physics's ``y``): a tensor or array of any real values
            and any channel count, whose noise level cannot be estimated from
            it (only a given ``sigma`` sets the perturbation and the stopping
            rule); the result keeps the observation's dtype.
        adapt_preset: ``adapt_preset(preset, level, scale)``: the preset
            fitted to the request (``level`` is ``''`` for a preset given
            by name or object).
        label: how error messages name the task (default ``task='NAME'``).
        command: its ``dip-fast`` subcommand (None: not on the command line).
        summary, description, epilog: the subcommand's help texts.
        flags: the subcommand's options for the task inputs.
        tiling: how :func:`dip_fast.pipeline.tiles.tile_request` cuts the task's
            observation into tiles; None (a caller's operator, and any task
            that does not declare one): the task is not tiled.
    """

    name: str
    make_term: Callable[[TermContext], nn.Module]
    presets: Mapping[str, str]
    aliases: Tuple[str, ...] = ()
    required: Tuple[str, ...] = ()
    optional: Tuple[str, ...] = ()
    early_stop: bool = False
    auto_stop: str = "never"
    crop_in_term: bool = False
    operator: bool = False
    measurement: bool = False
    adapt_preset: Optional[Callable[["Preset", str, Optional[int]], "Preset"]] = None
    label: str = ""
    command: Optional[str] = None
    summary: str = ""
    description: str = ""
    epilog: str = ""
    flags: Tuple[CliFlag, ...] = field(default_factory=tuple)
    tiling: Optional[TileRule] = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.required + self.optional) - set(INPUT_NAMES))
        if unknown:
            raise ValueError(f"task {self.name!r}: unknown inputs {unknown}; known: {INPUT_NAMES}")
        if self.tiling is not None:
            tiled = set(self.tiling.split_inputs) | ({self.tiling.scale_input} - {None})
            foreign = sorted(tiled - set(self.required + self.optional))
            if foreign:
                raise ValueError(f"task {self.name!r}: its tiling rule names inputs it does not take: {foreign}")
        missing = sorted(set(LEVELS) - set(self.presets))
        if missing:
            raise ValueError(f"task {self.name!r}: no preset for level(s) {missing}")
        if self.measurement and not self.operator:
            raise ValueError(f"task {self.name!r}: measurement=True needs operator=True")
        if self.auto_stop not in ("early", "never") or (self.auto_stop == "early" and not self.early_stop):
            raise ValueError(f"task {self.name!r}: auto_stop must be 'never', or 'early' with early_stop=True")
        if not self.label:
            object.__setattr__(self, "label", f"task={self.name!r}")

    def accepts(self, input_name: str) -> bool:
        """Whether ``restore()`` may be given this task input for this task."""
        return input_name in self.required or input_name in self.optional


_TASKS: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec, *, replace: bool = False) -> TaskSpec:
    """Add ``spec`` to the registry (``replace=True`` to redefine a task); returns it.

    Raises:
        ValueError: its name, an alias or its command is taken by another task.
    """
    for other in _TASKS.values():
        if other.name == spec.name:
            if replace:
                continue
            raise ValueError(f"task {spec.name!r} is already registered")
        taken = {other.name, *other.aliases} & {spec.name, *spec.aliases}
        if taken:
            raise ValueError(f"task {spec.name!r}: name(s) {sorted(taken)} already belong to task {other.name!r}")
        if spec.command is not None and spec.command == other.command:
            raise ValueError(f"task {spec.name!r}: command {spec.command!r} already belongs to task {other.name!r}")
    _TASKS[spec.name] = spec
    return spec


def unregister_task(name: str) -> None:
    """Remove a task (tests that register a toy one clean up with this)."""
    _TASKS.pop(name, None)


def all_tasks() -> Tuple[TaskSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_TASKS.values())


def find_task(name: str) -> Optional[TaskSpec]:
    """The spec a name or alias selects, or None."""
    for spec in _TASKS.values():
        if name == spec.name or name in spec.aliases:
            return spec
    return None


def get_task(name: str) -> TaskSpec:
    """The spec a name or alias selects.

    Raises:
        ValueError: no task has that name.
    """
    spec = find_task(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown task {name!r}; known: {task_names()}")
    return spec


def operator_task() -> Optional[TaskSpec]:
    """The spec of a caller's forward operator (selected by passing a callable), if registered."""
    return next((spec for spec in _TASKS.values() if spec.operator and not spec.measurement), None)


def measurement_task() -> Optional[TaskSpec]:
    """The spec of a forward operator with a measurement observation (a deepinv Physics), if registered."""
    return next((spec for spec in _TASKS.values() if spec.operator and spec.measurement), None)


def task_names() -> Tuple[str, ...]:
    """The canonical names of the registered tasks."""
    return tuple(_TASKS)


def aliases() -> Dict[str, str]:
    """Every spelling ``restore(task=...)`` accepts, mapped to its canonical name."""
    return {alias: spec.name for spec in _TASKS.values() if not spec.operator for alias in (spec.name, *spec.aliases)}


def by_command(command: str) -> Optional[TaskSpec]:
    """The spec behind a ``dip-fast`` subcommand, or None."""
    return next((spec for spec in _TASKS.values() if spec.command is not None and spec.command == command), None)


def describe_choices() -> str:
    """The tasks ``restore()`` accepts, as its error message lists them."""
    named = [f"{spec.name!r}" + (f" (or {', '.join(map(repr, spec.aliases))})" if spec.aliases else "")
             for spec in _TASKS.values() if not spec.operator]
    if operator_task() is not None:
        named.append("or a callable forward operator")
    if measurement_task() is not None:
        named.append("or a deepinv Physics")
    return ", ".join(named)


def owners(input_name: str) -> str:
    """The tasks that accept a task input, as error messages name them."""
    labels = [spec.label for spec in _TASKS.values() if spec.accepts(input_name)]
    return " or ".join(labels) if labels else "no task"


def check_preset(preset: "Preset") -> "Preset":
    """``preset`` if it names a registered task (by its canonical name) and has what that task needs.

    Raises:
        ValueError: an unknown task, or a super-resolution preset without ``sr_factor``.
    """
    spec = find_task(preset.task)
    if spec is None or spec.name != preset.task:
        raise ValueError(f"preset {preset.name!r}: task must be one of {task_names()}, got {preset.task!r}")
    if "scale" in spec.required and not preset.sr_factor:
        raise ValueError(f"preset {preset.name!r}: sr_factor is required for task {preset.task!r}")
    return preset
