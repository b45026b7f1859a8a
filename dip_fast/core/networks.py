"""The seam for generator networks: which architecture a preset runs, and how to build it.

A :class:`NetworkSpec` names an architecture and holds its options (the
keyword arguments of its builders besides the channel counts).  An
:class:`Architecture` entry of the registry (:func:`register_architecture`)
says how to build that architecture -- the reference builder, the fused
("fast") one if there is one -- and what the rest of the package needs to
know about it without building it: the multiple its working size must be,
the smallest size it accepts and an estimate of a run's memory.

Only the paper's hourglass, ``'skip'``, is built in.  A builder is any
callable ``builder(num_input_channels=..., num_output_channels=..., **options)``
returning an ``nn.Module`` that maps ``(1, C_in, H, W)`` to ``(1, C_out, H, W)``
for sizes that are multiples of ``size_multiple`` and at least ``min_size``.

Examples:
    >>> from dip_fast.core.networks import NetworkSpec, get_architecture
    >>> spec = NetworkSpec("skip", {"num_channels_down": [8, 8], "num_channels_up": [8, 8],
    ...                             "num_channels_skip": [2, 2]})
    >>> arch = get_architecture(spec.arch)
    >>> arch.size_multiple(spec.options), arch.min_size(spec.options)
    (4, 8)
    >>> net = arch.reference(num_input_channels=4, num_output_channels=3, **spec.options)
    >>> sum(p.numel() for p in net.parameters()) > 0
    True
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from .. import _ops
from ..reference import skip as reference_skip

__all__ = [
    "Architecture",
    "BACKENDS",
    "Builder",
    "NetworkSpec",
    "architectures",
    "check_backend",
    "as_network_spec",
    "get_architecture",
    "register_architecture",
    "resolve_backend",
]

#: Builds a network: ``builder(num_input_channels=..., num_output_channels=..., **options)``.
Builder = Callable[..., nn.Module]
#: Values of ``restore(backend=...)``.
BACKENDS = ("fast", "reference")
#: The backend name reported when ``'fast'`` was asked for but the reference runs.
FAST_FALLBACK = "reference (fast fallback)"


@dataclass(frozen=True)
class NetworkSpec(Mapping[str, Any]):
    """An architecture's name and its options (builder keyword arguments other than the channel counts).

    It reads as its options mapping too (``spec["num_channels_down"]``,
    ``dict(spec)``), so code written when a preset's network was skip's
    keyword dictionary keeps working.
    """

    arch: str = "skip"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.arch, str) or not self.arch:
            raise TypeError(f"NetworkSpec.arch must be an architecture name, got {self.arch!r}")
        # A copy of its own: presets share option dictionaries.  A plain dict, not a read-only
        # proxy, so that presets can still be copied and pickled.
        object.__setattr__(self, "options", dict(self.options))

    def __getitem__(self, key: str) -> Any:
        return self.options[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.options)

    def __len__(self) -> int:
        return len(self.options)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NetworkSpec):
            return self.arch == other.arch and dict(self.options) == dict(other.options)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # options may hold lists

    def replace(self, **changes: Any) -> "NetworkSpec":
        """A copy with some options changed."""
        return NetworkSpec(self.arch, {**self.options, **changes})


def as_network_spec(network: Union[NetworkSpec, Mapping[str, Any]]) -> NetworkSpec:
    """``network`` as a :class:`NetworkSpec`; a plain mapping is read as ``skip()``'s keyword arguments."""
    if isinstance(network, NetworkSpec):
        return network
    if isinstance(network, Mapping):
        return NetworkSpec("skip", network)
    raise TypeError(f"network must be a NetworkSpec or a mapping of skip() arguments, got {type(network).__name__}")


@dataclass(frozen=True)
class Architecture:
    """What the package needs to know about one network architecture.

    Attributes:
        name: the name a :class:`NetworkSpec` refers to.
        reference: the plain-PyTorch builder (always present).
        size_multiple: ``size_multiple(options)``: the working size's sides
            must be multiples of this (``2 ** scales`` for an hourglass).
        min_size: ``min_size(options)``: the smallest side it accepts.
        fast: ``fast(device)``: the fused builder for a device, or None when
            the architecture has none (``backend='fast'`` then runs the reference).
        fast_ready: whether the compiled ops the fused builder needs are
            loaded; without them it is reported as a fallback.
        packs: whether several networks of it train in one step
            (:mod:`dip_fast.core.packed`; the skip hourglass does).
        estimate_memory: ``estimate_memory(options, in_channels, out_channels, (H, W))``:
            peak bytes of a training step, or None when unknown; None here
            traces the reference builder on the ``meta`` device
            (:func:`dip_fast.core.memory.trace_memory`).
    """

    name: str
    reference: Builder
    size_multiple: Callable[[Mapping[str, Any]], int]
    min_size: Callable[[Mapping[str, Any]], int]
    fast: Optional[Callable[[torch.device], Builder]] = None
    fast_ready: Callable[[], bool] = lambda: True
    packs: bool = False
    estimate_memory: Optional[Callable[[Mapping[str, Any], int, int, Tuple[int, int]], Optional[int]]] = None


_ARCHITECTURES: Dict[str, Architecture] = {}


def register_architecture(arch: Architecture, *, replace: bool = False) -> Architecture:
    """Add ``arch`` to the registry (``replace=True`` to redefine a name); returns it."""
    if arch.name in _ARCHITECTURES and not replace:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    _ARCHITECTURES[arch.name] = arch
    return arch


def unregister_architecture(name: str) -> None:
    """Remove an architecture (tests that register a toy one clean up with this)."""
    _ARCHITECTURES.pop(name, None)


def get_architecture(name: str) -> Architecture:
    """The registered architecture called ``name``."""
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown network architecture {name!r}; known: {sorted(_ARCHITECTURES)}") from None


def architectures() -> Tuple[str, ...]:
    """Names of the registered architectures."""
    return tuple(_ARCHITECTURES)


def check_backend(backend: Any, allow_auto: bool = False) -> str:
    """``backend`` if it is one of :data:`BACKENDS` (or ``'auto'`` where allowed), else a ValueError."""
    choices = ("auto",) + BACKENDS if allow_auto else BACKENDS
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")
    return backend


def fast_available(arch: str = "skip") -> bool:
    """Whether ``arch`` has a fused builder and the compiled ops it needs are loaded."""
    entry = get_architecture(arch)
    return entry.fast is not None and entry.fast_ready()


def resolve_backend(backend: Any, device: torch.device, arch: str = "skip") -> Tuple[Builder, str]:
    """The builder for ``backend`` (``'fast'`` or ``'reference'``) on ``device``, and the name to report.

    ``'fast'`` is reported as ``'reference (fast fallback)'`` when the
    architecture has no fused builder or the extension lacks its ops.
    """
    check_backend(backend)
    entry = get_architecture(arch)
    if backend == "reference":
        return entry.reference, "reference"
    if entry.fast is None:
        return entry.reference, FAST_FALLBACK
    return entry.fast(device), ("fast" if entry.fast_ready() else FAST_FALLBACK)


# --------------------------------------------------------------------------
# The paper's hourglass
# --------------------------------------------------------------------------


def _skip_multiple(options: Mapping[str, Any]) -> int:
    # Every scale halves the size once: the input must divide evenly all the way down.
    return 2 ** len(options["num_channels_down"])


def _skip_fast(device: torch.device) -> Builder:
    from .nets import skip as fast_skip

    # channels_last on the CPU, where oneDNN's convolutions run faster in it (bench/README.md,
    # "Latest results: CPU"); NCHW on CUDA until a GPU run says otherwise.  restore() sets the layout
    # itself (execution_builder), from what it measured on the device.
    return partial(fast_skip, channels_last=device.type == "cpu")


def to_channels_last(net: nn.Module) -> nn.Module:
    """``net`` (in place) running in channels_last: its weights, and through them its activations.

    The fused network converts its own input and keeps its activations in
    that layout; any other module's weights are converted, which makes
    PyTorch's convolutions produce channels_last outputs, and the module is
    marked (``net.channels_last = True``) so that the step feeds it a
    channels_last input.
    """
    if hasattr(net, "set_channels_last"):
        net.set_channels_last()
    else:
        net.to(memory_format=torch.channels_last)
        net.channels_last = True
    return net


def execution_builder(backend: str, layout: str, device: torch.device, arch: str = "skip") -> Tuple[Builder, str]:
    """The builder of ``backend`` (``'fast'`` or ``'reference'``) in ``layout`` on ``device``, and its reported name.

    ``layout`` is ``'nchw'`` or ``'channels_last'`` (:data:`dip_fast.core.tuning.LAYOUTS`).

    >>> builder, name = execution_builder("reference", "channels_last", torch.device("cpu"))
    >>> net = builder(2, 3, num_channels_down=[4], num_channels_up=[4], num_channels_skip=[2])
    >>> name, net.channels_last
    ('reference', True)
    """
    builder, name = resolve_backend(backend, device, arch)
    if backend == "fast" and get_architecture(arch).fast is not None:
        builder = get_architecture(arch).fast(device)
        if isinstance(builder, partial) and "channels_last" in builder.keywords:
            builder = partial(builder.func, *builder.args, **{**builder.keywords, "channels_last": False})
    if layout == "channels_last":
        inner = builder

        def builder(*args: Any, **kwargs: Any) -> nn.Module:
            return to_channels_last(inner(*args, **kwargs))
    return builder, name


register_architecture(Architecture(
    name="skip",
    reference=reference_skip,
    size_multiple=_skip_multiple,
    # The deepest level needs 2x2 pixels for BatchNorm's batch statistics.
    min_size=lambda options: 2 * _skip_multiple(options),
    fast=_skip_fast,
    fast_ready=lambda: _ops.has_ops(*_ops.FAST_NETWORK_OPS),
    packs=True,
))
