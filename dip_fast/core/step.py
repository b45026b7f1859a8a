"""The DIP training step, run eagerly or replayed as one CUDA graph.

At batch size 1 a GPU step of the paper's network is hundreds of small
kernels, and eager PyTorch spends longer launching them (and waiting for
the host whenever a loss is logged) than the GPU spends computing.  The
:class:`StepRunner` therefore keeps everything a step needs on the device:

* the fresh input perturbation ``z + reg_noise_std * N(0, 1)``, drawn into a
  static buffer (torch's generators advance their offsets under capture, so
  every replay draws new noise);
* forward, data term, backward and Adam (``capturable``/``fused`` on CUDA,
  so the step counter lives on the device);
* the exponential average of the outputs, the PSNR against the observation,
  the backtracking check (:class:`DeviceBacktracker`) and the early-stopping
  tracker (:class:`~dip_fast.core.early_stop.WindowedVariance` or
  :class:`~dip_fast.core.early_stop.DiscrepancyTracker`);
* a small ``stats`` vector (:data:`STAT_FIELDS`) that the caller copies into
  a log on the device and reads back every few steps.

``mode='graph'`` runs the first :data:`GRAPH_WARMUP_STEPS` steps eagerly on
a side stream (they are real steps of the run, and they let cuDNN and the
allocator settle), then captures one step into a ``torch.cuda.CUDAGraph``
and replays it.  Whether a step is a backtracking check step is a device
flag read inside the graph, so one graph serves every step.

Precision (``precision=``):

* ``'fp32'``: IEEE float32 convolutions and matmuls (cuDNN's TF32 default is
  switched off for the run);
* ``'tf32'``: TF32 tensor cores for float32 convolutions and matmuls;
* ``'bf16'``: autocast to bfloat16 and channels_last activations; weights,
  optimizer state, statistics, the average and the logs stay float32.

The previous global settings are restored when the run ends.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .early_stop import DiscrepancyTracker, WindowedVariance
from .metrics import psnr

__all__ = [
    "GRAPH_WARMUP_STEPS",
    "PRECISIONS",
    "STAT_FIELDS",
    "STEP_MODES",
    "DeviceBacktracker",
    "StepRunner",
    "StepSettings",
    "default_adam",
    "flatten_parameters",
    "precision_settings",
]

PRECISIONS = ("fp32", "tf32", "bf16")
STEP_MODES = ("eager", "graph")
#: Eager steps before the graph is captured (cuDNN autotuning and allocator warm-up).
GRAPH_WARMUP_STEPS = 3
#: Layout of :attr:`StepRunner.stats`; NaN where a value is not tracked.
STAT_FIELDS = ("loss", "psnr", "psnr_ref", "psnr_ref_avg", "backtracked", "variance", "stop_step", "residual")

LossFn = Callable[[torch.Tensor], torch.Tensor]
Flag = Union[bool, torch.Tensor]


def default_adam(params: List[torch.Tensor], lr: float, *, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam with torch's fused (single-kernel) update where it is available.

    The same update rule as the for-loop Adam, in one pass over all
    parameters instead of about ten small ops per parameter tensor: measured
    7 ms -> 2 ms per step for the paper's 2.2M-parameter network on one CPU
    core, and on a GPU it keeps the step count on the device.
    ``capturable=True`` (CUDA only) makes the update safe to capture in a CUDA graph.
    """
    extra = {"capturable": True} if capturable else {}
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, **extra)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.Adam(params, lr=lr, **extra)


@contextlib.contextmanager
def precision_settings(precision: str) -> Iterator[None]:
    """Set float32 convolution/matmul precision for ``precision`` and restore it afterwards.

    ``'fp32'`` asks for IEEE float32 (cuDNN otherwise defaults to TF32 for
    convolutions); ``'tf32'`` allows TF32; ``'bf16'`` leaves the settings
    alone (autocast decides).  These settings have no effect on the CPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    wanted = {"fp32": "ieee", "tf32": "tf32"}.get(precision)
    if wanted is None:
        yield
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision = matmul.fp32_precision = wanted
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def flatten_parameters(params: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """Make ``params`` views into one flat buffer and return it (None when they cannot share one).

    Snapshots and restores of the weights are then one kernel each instead
    of one per parameter tensor, which matters inside a CUDA graph where
    each of ~60 tiny kernels still costs microseconds.  The parameters keep
    their values, shapes and identities (optimizers holding them are
    unaffected), and so do their memory layouts: a channels_last weight
    becomes a channels_last view of its stretch of the buffer.  Parameters
    of mixed dtype or device, or not dense (overlapping or with gaps), are
    left alone.
    """
    params = list(params)
    if not params:
        return None
    first = params[0]
    if any(p.dtype != first.dtype or p.device != first.device or not _is_dense(p) for p in params):
        return None
    with torch.no_grad():
        flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        offset = 0
        for p in params:
            n = p.numel()
            view = flat[offset : offset + n].as_strided(p.shape, p.stride())
            view.copy_(p)
            p.data = view
            offset += n
    return flat


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill exactly ``numel`` consecutive slots (any dimension order)."""
    if t.numel() == 0:
        return True
    dims = sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


def _rows(t: torch.Tensor, networks: int) -> torch.Tensor:
    """``t`` (a parameter's data) as ``(K, n)``: row ``k`` is network ``k``'s slice of a packed parameter.

    Packed parameters stack the networks along their first dimension, which
    stays outermost in memory in both layouts (NCHW and channels_last), so
    each network's slice is one dense run of the storage.
    """
    if t.is_contiguous():
        return t.view(networks, -1)
    n = t.numel() // networks
    return t.as_strided((networks, n), (n, 1))


#: StepRunner settings with one entry (row, value, generator) per network, narrowed by select().
_PER_NETWORK_SETTINGS = ("reg_noise_std", "generator", "observation", "degrade", "mask", "reference",
                         "reference_view", "stop_bound")
_CANNOT = object()  # _narrow's answer for a setting that cannot be narrowed


def _narrow(value: object, keep: List[int], networks: int) -> object:
    """A per-network setting of ``networks`` networks for networks ``keep`` only (``_CANNOT`` if opaque).

    Tensors with one row per network, and sequences with one entry per
    network, are indexed; a single row or value is shared and kept; an
    object (or a bound method of one) with a ``select(keep)`` method, such
    as a packed data term, is asked for its narrowed self.  Any other
    callable might mix the networks, so it cannot be narrowed.
    """
    if value is None or isinstance(value, (int, float, torch.Generator)):
        return value  # shared (a shared generator with the perturbation on is refused by select())
    if isinstance(value, torch.Tensor):
        if value.dim() > 0 and value.shape[0] == networks:
            return value[keep]
        return value
    if isinstance(value, (list, tuple)):
        return [value[i] for i in keep] if len(value) == networks else _CANNOT
    if hasattr(value, "select"):
        return value.select(keep)
    owner = getattr(value, "__self__", None)
    if owner is not None and hasattr(owner, "select"):
        return getattr(owner.select(keep), value.__name__)
    return _CANNOT


def _rows_of(state: torch.Tensor, like: torch.Tensor, networks: int, rows: torch.Tensor) -> torch.Tensor:
    """A packed parameter's optimizer state narrowed to ``rows``, in the layout of the new parameter ``like``."""
    out = torch.empty_like(like, dtype=state.dtype)
    _rows(out, rows.numel()).copy_(_rows(state, networks).index_select(0, rows))
    return out


class DeviceBacktracker:
    """Backtracking on the device: snapshot the weights at good checks, restore them after a PSNR drop.

    At a check step, :meth:`before_update` compares the step's PSNR against
    the observation with the PSNR of the last accepted check.  A drop of
    more than ``threshold_db`` (or a NaN) marks the step as *dropped*;
    otherwise the current weights (the ones that produced the step's output)
    become the snapshot.  After the optimizer update, :meth:`after_update`
    puts the snapshot back on a dropped step, so the update is discarded.
    Adam's moments keep the dropped step's gradient (the paper's notebooks
    do not restore them either).

    With ``networks=K`` (a packed network, :mod:`dip_fast.core.packed`) every
    decision is per network: PSNRs are ``(K,)``, and a drop restores only
    that network's slice of the weights.  With ``freezing=True``,
    :meth:`freeze` holds a network's weights where they are from then on
    (its run has stopped while the others go on); ``threshold_db=None``
    keeps only that.

    All decisions are ``torch.where`` on device flags: nothing is read back
    to the host, so a check can sit inside a CUDA graph.  ``active`` is a
    Python bool (eager runs call the methods only on check steps) or a
    device bool tensor (a graph captured once for every step).
    """

    def __init__(self, params: Sequence[torch.Tensor], threshold_db: Optional[float] = 5.0,
                 networks: int = 1, freezing: bool = False) -> None:
        params = list(params)
        if not params:
            raise ValueError("backtracking needs at least one parameter")
        self.threshold_db = None if threshold_db is None else float(threshold_db)
        self.networks = networks
        self.freezing = freezing  # freeze() may be called: frozen networks are held on every step
        flat = flatten_parameters(params)
        if networks == 1:
            self._live: List[torch.Tensor] = [flat] if flat is not None else [p.detach() for p in params]
        else:  # one row per network in every parameter (the flat buffer holds parameter after parameter)
            self._live = [_rows(p.detach(), networks) for p in params]
        self._saved = [t.detach().clone() for t in self._live]
        dev = params[0].device
        self.has_snapshot = torch.zeros(networks, dtype=torch.bool, device=dev)
        self.last_psnr = torch.zeros(networks, dtype=torch.float32, device=dev)
        self.dropped = torch.zeros(networks, dtype=torch.bool, device=dev)
        self.frozen = torch.zeros(networks, dtype=torch.bool, device=dev)

    @staticmethod
    def _b(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The ``(K,)`` mask shaped to broadcast over ``t`` (rows ``(K, n)``, or any shape for one network)."""
        return mask.reshape((-1,) + (1,) * (t.dim() - 1))

    def _hold(self, mask: torch.Tensor) -> None:
        for saved, live in zip(self._saved, self._live):
            live.copy_(torch.where(self._b(mask, live), saved, live))

    @torch.no_grad()
    def before_update(self, value: torch.Tensor, active: Flag = True) -> None:
        """Decide whether the step at PSNR ``value`` (``(K,)``) is dropped; snapshot where it is accepted."""
        if active is False or self.threshold_db is None:
            self.dropped.zero_()
            return
        value = value.to(torch.float32).reshape(self.networks)
        # "not (>=)" so that a NaN PSNR counts as a drop.
        drop = self.has_snapshot & ~(value - self.last_psnr >= -self.threshold_db) & ~self.frozen
        keep = ~drop & ~torch.isnan(value) & ~self.frozen
        if isinstance(active, torch.Tensor):
            drop, keep = drop & active, keep & active
        for saved, live in zip(self._saved, self._live):
            saved.copy_(torch.where(self._b(keep, live), live, saved))
        self.last_psnr.copy_(torch.where(keep, value, self.last_psnr))
        self.has_snapshot.logical_or_(keep)
        self.dropped.copy_(drop)

    @torch.no_grad()
    def after_update(self, active: Flag = True) -> None:
        """Put the snapshot back where :meth:`before_update` dropped this step, and hold frozen networks."""
        if active is False and not self.freezing:
            return
        self._hold(self.dropped | self.frozen)

    @torch.no_grad()
    def take_rows(self, other: "DeviceBacktracker", rows: torch.Tensor) -> None:
        """Take over the snapshots and flags of networks ``rows`` of ``other`` (same parameters, more networks)."""
        parts = [theirs.view(other.networks, -1).index_select(0, rows) for theirs in other._saved]
        if len(self._saved) == len(parts):  # a snapshot per parameter, rows in memory order
            for saved, part in zip(self._saved, parts):
                _rows(saved, self.networks).copy_(part)
        else:  # one network left: one flat snapshot, its parameters after one another in memory order
            self._saved[0].copy_(torch.cat([part.reshape(-1) for part in parts]))
        for name in ("has_snapshot", "last_psnr", "dropped", "frozen"):
            getattr(self, name).copy_(getattr(other, name).index_select(0, rows))

    @torch.no_grad()
    def freeze(self, mask: torch.Tensor) -> None:
        """Hold the networks in ``mask`` (``(K,)`` bool) at their current weights from now on."""
        new = mask & ~self.frozen
        for saved, live in zip(self._saved, self._live):
            saved.copy_(torch.where(self._b(new, live), live, saved))
        self.frozen.logical_or_(mask)


def _check_step_arguments(net_input: torch.Tensor, *, reg_noise_std: Union[float, Sequence[float]],
                          generator: Any, observation: Optional[torch.Tensor],
                          backtrack_threshold_db: Optional[float], early_stop: Optional[Tuple[int, int]],
                          stop_bound: Any, precision: str, mode: str, networks: int
                          ) -> Tuple[Optional[List[float]], Optional[List[torch.Generator]]]:
    """:class:`StepRunner`'s argument checks; the per-network noise levels and generators, when given as lists."""
    stds = [float(v) for v in reg_noise_std] if isinstance(reg_noise_std, (list, tuple)) else None
    if stds is not None and len(stds) != networks:
        raise ValueError(f"reg_noise_std: got {len(stds)} values for {networks} networks")
    if min(stds) < 0 if stds is not None else reg_noise_std < 0:
        raise ValueError(f"reg_noise_std must be >= 0, got {reg_noise_std!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if mode not in STEP_MODES:
        raise ValueError(f"mode must be one of {STEP_MODES}, got {mode!r}")
    if mode == "graph" and net_input.device.type != "cuda":
        raise ValueError(f"mode='graph' needs a CUDA device, got {net_input.device}")
    if backtrack_threshold_db is not None and observation is None:
        raise ValueError("backtracking needs an observation to measure the PSNR against")
    if stop_bound is not None and observation is None:
        raise ValueError("stop_bound needs an observation to measure the residual against")
    if stop_bound is not None and early_stop is not None:
        raise ValueError("early_stop (ES-WMV) and stop_bound (the discrepancy rule) exclude each other")
    if isinstance(networks, bool) or not isinstance(networks, int) or networks < 1:
        raise ValueError(f"networks must be an integer >= 1, got {networks!r}")
    if net_input.dim() != 4 or net_input.shape[0] != 1 or net_input.shape[1] % networks:
        raise ValueError(
            f"net_input must be (1, K * C, H, W) with K = networks = {networks}, got {tuple(net_input.shape)}"
        )
    generators = list(generator) if isinstance(generator, (list, tuple)) else None
    if generators is not None and len(generators) != networks:
        raise ValueError(f"generator: got {len(generators)} generators for {networks} networks")
    return stds, generators


@dataclass(frozen=True)
class StepSettings:
    """How a :class:`StepRunner` steps: everything besides the network, its input and the data term.

    Attributes:
        lr: Adam learning rate (ignored when ``optimizer`` is given).
        reg_noise_std: std of the fresh input perturbation.
        generator: generator for the perturbation (on ``net_input``'s device).
        optimizer: a custom optimizer (for ``mode='graph'`` it must be capturable).
        exp_weight: weight of the output average (None: no average).
        observation, degrade, mask: the PSNR against the observation is
            ``psnr(degrade(out), observation, mask)``.
        reference, reference_view: the PSNR against a clean reference is
            ``psnr(reference_view(estimate), reference)``.
        backtrack_threshold_db: None disables backtracking; else the PSNR
            drop that restores the weights (needs ``observation``).
        early_stop: ``(window, patience)`` for ES-WMV, or None.
        stop_bound: the discrepancy rule instead (see
            :class:`~dip_fast.core.early_stop.DiscrepancyRule`): the first step whose
            estimate (the average, else the output) has
            ``mse(degrade(estimate), observation) <= stop_bound`` is kept; NaN
            accepts none.  Needs ``observation``; excludes ``early_stop``.
        precision: one of :data:`PRECISIONS`.
        mode: one of :data:`STEP_MODES`; ``'graph'`` needs CUDA.
        networks: ``K``, the number of networks ``net`` packs
            (:mod:`dip_fast.core.packed`).  ``net_input`` and the network's output
            are then ``(1, K * C, H, W)``, which the runner sees as ``K`` images
            ``(K, C, H, W)``: ``loss_fn`` gets those and returns the ``(K,)``
            per-network data terms (their sum is differentiated, so each
            network gets its own gradient); ``observation``, ``mask`` and
            ``reference`` have ``K`` rows (or one, shared); ``generator`` may
            be a sequence of ``K`` generators, one per network's input
            perturbation; ``stop_bound`` may be a sequence of ``K`` bounds.
            Averaging, backtracking and early stopping are per network, and a
            network whose early stopping fired is frozen (weights and
            average) while the others go on.
        verify_graph: check the first replay of a captured graph against an
            eager step from the same state (:meth:`StepRunner._verify_replay`);
            on a mismatch warn once and run eagerly.

    Example::

        >>> StepSettings(lr=0.02).mode
        'eager'
    """

    lr: float = 0.01
    reg_noise_std: Union[float, Sequence[float]] = 0.0
    generator: Optional[Union[torch.Generator, Sequence[torch.Generator]]] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    exp_weight: Optional[float] = None
    observation: Optional[torch.Tensor] = None
    degrade: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    mask: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    reference_view: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    backtrack_threshold_db: Optional[float] = None
    early_stop: Optional[Tuple[int, int]] = None
    stop_bound: Optional[Union[float, Sequence[float]]] = None
    precision: str = "fp32"
    mode: str = "eager"
    networks: int = 1
    verify_graph: bool = False


class StepRunner:
    """Runs DIP steps with all bookkeeping on the device (see the module docstring).

    Args:
        net: the generator, in training mode; optimised over its trainable parameters.
        net_input: the fixed input ``z``.
        loss_fn: the data term, ``loss_fn(out) -> scalar tensor``.
        settings: a :class:`StepSettings` (learning rate, perturbation,
            averaging, backtracking, stopping, precision, mode, packing);
            keywords override its fields, or build it when it is None, so
            ``StepRunner(net, z, loss, lr=0.02)`` works as before.
    After :meth:`step`, :attr:`out` holds the step's output (float32,
    ``(K, C, H, W)``), :attr:`average` the running average (or None) and
    :attr:`stats` the values of :data:`STAT_FIELDS`, one row per network
    (``(K, len(STAT_FIELDS))``).  These are buffers overwritten by the next
    step: clone what you keep.
    """

    def __init__(self, net: nn.Module, net_input: torch.Tensor, loss_fn: LossFn,
                 settings: Optional["StepSettings"] = None, **keywords: Any) -> None:
        settings = StepSettings(**keywords) if settings is None else dataclasses.replace(settings, **keywords)
        self.settings = settings
        (lr, reg_noise_std, generator, optimizer, exp_weight, observation, degrade, mask, reference, reference_view,
         backtrack_threshold_db, early_stop, stop_bound, precision, mode, networks,
         verify_graph) = (getattr(settings, f.name) for f in dataclasses.fields(settings))
        stds, generators = _check_step_arguments(
            net_input, reg_noise_std=reg_noise_std, generator=generator, observation=observation,
            backtrack_threshold_db=backtrack_threshold_db, early_stop=early_stop, stop_bound=stop_bound,
            precision=precision, mode=mode, networks=networks)
        # What select() needs to build the runner of some of the networks (a custom optimizer's state
        # cannot be sliced per network, so such a runner is not selected).
        self._settings = None if optimizer is not None else dict(
            lr=lr, reg_noise_std=reg_noise_std, generator=generator, exp_weight=exp_weight, observation=observation,
            degrade=degrade, mask=mask, reference=reference, reference_view=reference_view,
            backtrack_threshold_db=backtrack_threshold_db, early_stop=early_stop, stop_bound=stop_bound,
            precision=precision, mode=mode)
        self.networks = networks
        self._generators = generators
        self.net, self.loss_fn, self.mode, self.precision = net, loss_fn, mode, precision
        self.device = net_input.device
        # One std for all networks, or one per network (packed runs of different images).
        self.reg_noise_std = max(stds) if stds is not None else float(reg_noise_std)
        self._stds = (torch.tensor(stds, dtype=torch.float32, device=net_input.device).reshape(-1, 1)
                      if stds is not None and len(set(stds)) > 1 else None)
        self.generator = generator
        self.exp_weight = exp_weight
        self.observation = observation.detach() if observation is not None else None
        self.degrade, self.mask = degrade, mask
        self.reference = reference.detach() if reference is not None else None
        self.reference_view = reference_view
        if precision == "bf16" and hasattr(net, "set_channels_last"):
            net.set_channels_last()  # the fast network keeps its activations and weights channels_last
        # The input in the network's layout, so that the perturbed input needs no conversion each step.
        channels_last = precision == "bf16" or bool(getattr(net, "channels_last", False))
        z = net_input.detach()
        self.net_input = z.contiguous(memory_format=torch.channels_last) if channels_last else z
        # NCHW whatever the input's layout: the same draws for every layout (so fast and reference runs
        # with one seed see the same noise), and normal_ into a channels_last tensor takes a slow
        # strided path (measured 14 ms against 1.8 ms for 32x128x128 on 2 cores).
        self._noise = (
            torch.empty_like(self.net_input, memory_format=torch.contiguous_format) if self.reg_noise_std > 0 else None
        )
        self.params = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("net has no trainable parameters")
        # A packed network whose early stopping fires is frozen (held at its weights and average)
        # while the others go on; that needs the backtracker's snapshot store even without backtracking.
        self._freezing = networks > 1 and (early_stop is not None or stop_bound is not None)
        # Flatten before the optimizer exists so that its state is built for the final views.
        self.backtracker = (
            DeviceBacktracker(self.params, backtrack_threshold_db, networks, freezing=self._freezing)
            if backtrack_threshold_db is not None or self._freezing else None
        )
        if optimizer is None:
            optimizer = default_adam(self.params, lr, capturable=self.device.type == "cuda")
        self.optimizer = optimizer
        self.early_stop_args = early_stop
        self.stop_bound = stop_bound
        # Built on the first step, when the output shape is known.
        self.early_stop: Optional[Union[WindowedVariance, DiscrepancyTracker]] = None
        self.out: Optional[torch.Tensor] = None
        self.average: Optional[torch.Tensor] = None
        self.stats = torch.full((networks, len(STAT_FIELDS)), float("nan"), device=self.device)
        self._nan = torch.full((networks,), float("nan"), device=self.device)
        self._check = torch.zeros((), dtype=torch.bool, device=self.device)
        self._graph: Optional[torch.cuda.CUDAGraph] = None
        self._side_stream: Optional[torch.cuda.Stream] = None  # for the graph mode's warm-up steps
        self._eager_steps = 0
        # A captured graph is trusted only once a replay has matched an eager step from the same state.
        self._verify_graph = verify_graph

    # ------------------------------------------------------------------ body

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _perturbed_input(self) -> torch.Tensor:
        if self._noise is None:
            return self.net_input
        if self._generators is None:
            self._noise.normal_(generator=self.generator)
        else:  # each network's perturbation from its own generator: what it would draw alone
            rows = self._noise.view(self.networks, -1)
            for k, g in enumerate(self._generators):
                rows[k].normal_(generator=g)
        if self._stds is not None:
            return self.net_input + (self._noise.view(self.networks, -1) * self._stds).view_as(self._noise)
        return self.net_input + self.reg_noise_std * self._noise

    def _images(self, out: torch.Tensor) -> torch.Tensor:
        """The network's output ``(1, K * C, H, W)`` as the ``K`` networks' images ``(K, C, H, W)``."""
        if self.networks == 1:
            return out
        return out.reshape(self.networks, out.shape[1] // self.networks, out.shape[2], out.shape[3])

    def forward(self, x: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The output for ``x`` (default the unperturbed ``z``) at the run's precision, as float32 ``(K, C, H, W)``."""
        x = self.net_input if x is None else x
        with self._autocast():
            return self._images(self.net(x).float())

    def _allocate(self, out: torch.Tensor) -> None:
        self.out = torch.empty(out.shape, dtype=torch.float32, device=self.device)
        if self.exp_weight is not None:
            self.average = torch.empty_like(self.out)
        if self.stop_bound is not None:
            self.early_stop = DiscrepancyTracker(self.out, self.stop_bound, networks=self.networks)
        elif self.early_stop_args is not None:
            window, patience = self.early_stop_args
            self.early_stop = WindowedVariance(self.out, window=window, patience=patience, networks=self.networks)

    def _psnr_ref(self, image: torch.Tensor) -> torch.Tensor:
        if self.reference is None:
            return self._nan
        view = self.reference_view(image) if self.reference_view is not None else image
        return psnr(view, self.reference.expand_as(view), per_image=True)

    def _residual(self, image: torch.Tensor, per_pixel: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Per network, the data-term residual ``||y - A x||^2 / N`` of an estimate (all pixels: sigma^2 is per pixel).

        With ``per_pixel`` (a clip-aware discrepancy rule), also the mean of ``per_pixel(A x)``: the residual
        the rule expects there.
        """
        seen = self.degrade(image) if self.degrade is not None else image
        residual = (seen - self.observation).square().reshape(seen.shape[0], -1).mean(1)
        if per_pixel is None:
            return residual
        return residual, per_pixel(seen).reshape(seen.shape[0], -1).mean(1)

    def _data_terms(self, out: torch.Tensor) -> torch.Tensor:
        """``loss_fn``'s value: ``(K,)``, one data term per network."""
        loss = self.loss_fn(out)
        if self.networks == 1:
            if loss.numel() != 1 or loss.dim() > 1:  # (1,): a packed term narrowed to one network (select)
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            return loss.reshape(1)
        if tuple(loss.shape) != (self.networks,):
            raise ValueError(f"loss_fn must return one data term per network, shape ({self.networks},), "
                             f"got {tuple(loss.shape)}")
        return loss

    def _body(self, check: Flag) -> None:
        with self._autocast():
            out = self._images(self.net(self._perturbed_input()))
            losses = self._data_terms(out)
        # The sum: each network's parameters get the gradient of its own data term only.
        losses.sum().backward()
        with torch.no_grad():
            if self.out is None:
                self._allocate(out)
            first = self._eager_steps == 0  # a graph is captured only after eager warm-up steps
            self.out.copy_(out.detach())
            if self.average is not None:
                if first:
                    self.average.copy_(self.out)
                else:
                    # A frozen network's average stays what its early stopping saw.
                    before = self.average.clone() if self._freezing else None
                    self.average.mul_(self.exp_weight).add_(self.out, alpha=1.0 - self.exp_weight)
                    if before is not None:
                        frozen = self.backtracker.frozen.reshape(-1, 1, 1, 1)
                        self.average.copy_(torch.where(frozen, before, self.average))
            value = self._nan
            if self.observation is not None:
                seen = self.degrade(self.out) if self.degrade is not None else self.out
                value = psnr(seen, self.observation.expand_as(seen), mask=self.mask, per_image=True)
            if self.backtracker is not None:
                self.backtracker.before_update(value, check)
        self.optimizer.step()
        with torch.no_grad():
            if self.backtracker is not None:
                self.backtracker.after_update(check)
            if self.early_stop is not None:
                self.early_stop.update(self.out, self.average, self._residual)
                if self._freezing:
                    self.backtracker.freeze(self.early_stop.fired)
            es = self.early_stop
            row = [
                losses.detach().float(),
                value,
                self._psnr_ref(self.out),
                self._psnr_ref(self.average) if self.average is not None else self._nan,
                self.backtracker.dropped.float() if self.backtracker is not None else self._nan,
                es.variance.float() if es is not None else self._nan,
                es.best_step.float() if es is not None else self._nan,
                es.residual.float() if es is not None else self._nan,
            ]
            self.stats.copy_(torch.stack(row, dim=1))

    # ------------------------------------------------------------------ modes

    def _eager_step(self, check: bool) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self._body(check)
        self._eager_steps += 1

    def _capture(self) -> None:
        """Capture one step into a CUDA graph; on failure warn once and stay eager."""
        graph = torch.cuda.CUDAGraph()
        if self.generator is not None and self.generator.device.type == "cuda":
            graph.register_generator_state(self.generator)
        # Gradients must be allocated by the captured backward (from the graph's pool).
        self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize(self.device)
        try:
            with torch.cuda.graph(graph):
                self._body(self._check)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run eagerly
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(self.device)
            warnings.warn(
                f"dip_fast: CUDA graph capture of the step failed ({type(exc).__name__}: {exc}); "
                "running the step eagerly instead",
                RuntimeWarning,
                stacklevel=3,
            )
            self.mode = "eager"
            return
        self._graph = graph

    def step(self, check: bool = False) -> None:
        """Run one step; ``check`` marks a backtracking check step."""
        if self.mode == "eager":
            self._eager_step(check)
            return
        if self._graph is None and self._eager_steps < GRAPH_WARMUP_STEPS:
            # Warm-up on a side stream, as capture requires, then back.
            if self._side_stream is None:
                self._side_stream = torch.cuda.Stream(self.device)
            side = self._side_stream
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._eager_step(check)
            torch.cuda.current_stream(self.device).wait_stream(side)
            return
        if self._graph is None:
            self._capture()
            if self._graph is None:
                self._eager_step(check)
                return
            if self._verify_graph:
                self._check.fill_(bool(check))
                if not self._verify_replay(self._graph.replay, check):
                    self._graph = None
                    self.mode = "eager"
                return  # the step ran (eagerly, from the same state as the replay)
        self._check.fill_(bool(check))
        self._graph.replay()

    # ------------------------------------------------------------------ trusting a graph

    #: A replay agrees with the eager step when every value differs by at most this, relative to the
    #: largest magnitude of its tensor: rounding (reduction order, TF32) moves the values by about 1e-7 of
    #: a step's scale; a wrong replay (a stale input, a missed update) by whole updates.
    REPLAY_RTOL = 1e-5

    def _state_tensors(self) -> List[torch.Tensor]:
        """Every tensor a step may change: weights, buffers, optimizer state, average, trackers, stats."""
        found: List[torch.Tensor] = list(self.params) + list(self.net.buffers())
        for state in self.optimizer.state.values():
            found += [v for v in state.values() if torch.is_tensor(v)]
        for owner in (self, self.backtracker, self.early_stop):
            if owner is not None:
                found += [v for v in vars(owner).values() if torch.is_tensor(v)]
        unique: Dict[int, torch.Tensor] = {}
        for t in found:
            unique.setdefault(id(t), t)
        return list(unique.values())

    def _generator_states(self) -> List[Tuple[torch.Generator, torch.Tensor]]:
        gens = self._generators if self._generators is not None else [self.generator]
        return [(g, g.get_state()) for g in gens if g is not None]

    def _verify_replay(self, replay: Callable[[], None], check: bool) -> bool:
        """Run ``replay`` (one step), then the same step eagerly from the same state; True when they agree.

        The state after the eager step is kept either way. On a mismatch this
        warns once (the caller then runs eagerly).
        """
        tensors = self._state_tensors()
        saved = [t.detach().clone() for t in tensors]
        generators = self._generator_states()
        replay()
        replayed = [t.detach().clone() for t in self.params] + [self.out.detach().clone()]
        with torch.no_grad():
            for t, old in zip(tensors, saved, strict=True):
                t.copy_(old)
        for g, state in generators:
            g.set_state(state)
        self._eager_step(check)
        eager = [t.detach() for t in self.params] + [self.out.detach()]
        worst = 0.0
        for a, b in zip(replayed, eager, strict=True):
            scale = float(b.abs().max()) if b.numel() else 0.0
            diff = float((a.float() - b.float()).abs().max()) if b.numel() else 0.0
            if diff != diff:  # NaN
                worst = float("inf")
                break
            worst = max(worst, diff / max(scale, 1e-12))
        if worst <= self.REPLAY_RTOL:
            return True
        warnings.warn(
            f"dip_fast: the CUDA graph's first replay differs from the eager step by {worst:.2g} (relative; "
            f"rounding stays under {self.REPLAY_RTOL:g}); running the step eagerly instead",
            RuntimeWarning, stacklevel=4)
        return False

    @property
    def graphed(self) -> bool:
        """Whether steps are replayed from a captured CUDA graph."""
        return self._graph is not None

    # ------------------------------------------------------------------ dropping stopped networks

    def select(self, keep: Sequence[int]) -> Optional["StepRunner"]:
        """The runner of networks ``keep`` (runner rows, in order) only, going on from this one's state.

        A grouped convolution computes every group, so a network that has
        stopped costs as much as a running one while it stays in the pack;
        the packed fit drops stopped networks through this.  Weights, Adam's
        moments, the average, the stopping tracker, the backtracking
        snapshots and the perturbation generators of the kept networks carry
        over, so their next steps are the ones they would have taken (to the
        rounding of a grouped convolution with fewer groups).

        Returns None when that cannot be done exactly: one network, a custom
        optimizer, a CUDA graph (it would have to be captured again), an input
        perturbation drawn from one shared generator or the global one (the
        kept networks would draw other noise), or a per-network setting (the
        data term, ``degrade``, ``reference_view``) that cannot be narrowed to
        some networks (see :func:`_narrow`).
        """
        from .packed import select_networks  # packed imports the networks, which import the ops

        keep = [int(i) for i in keep]
        k = self.networks
        if (k == 1 or self._settings is None or self._graph is not None or self.mode == "graph"
                or self.out is None or not keep or sorted(set(keep)) != keep or keep[-1] >= k
                or (self._noise is not None and self._generators is None)):
            return None
        settings = {}
        for name, value in self._settings.items():
            narrowed = _narrow(value, keep, k) if name in _PER_NETWORK_SETTINGS else value
            if narrowed is _CANNOT:
                return None
            settings[name] = narrowed
        loss_fn = _narrow(self.loss_fn, keep, k)
        if loss_fn is _CANNOT:
            return None
        c = self.net_input.shape[1] // k
        z = self.net_input.reshape(k, c, *self.net_input.shape[2:])[keep].reshape(1, len(keep) * c,
                                                                                  *self.net_input.shape[2:])
        new = StepRunner(select_networks(self.net, keep), z.contiguous(), loss_fn, networks=len(keep), **settings)
        rows = torch.tensor(keep, device=self.device)
        with torch.no_grad():
            new._allocate(self.out.index_select(0, rows))
            new.out.copy_(self.out.index_select(0, rows))
            if self.average is not None:
                new.average.copy_(self.average.index_select(0, rows))
            if self.early_stop is not None:
                new.early_stop = self.early_stop.select(rows)
            new.stats.copy_(self.stats.index_select(0, rows))
            if self.backtracker is not None and new.backtracker is not None:
                new.backtracker.take_rows(self.backtracker, rows)
            for old_p, new_p in zip(self.params, new.params):
                state = self.optimizer.state.get(old_p)
                if state:
                    new.optimizer.state[new_p] = {
                        name: _rows_of(v, new_p, k, rows) if v.dim() > 0 else v.clone() for name, v in state.items()}
        new._eager_steps = self._eager_steps  # the average is under way: the next step is not a first
        return new
