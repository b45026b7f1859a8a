"""How a run's step is executed, chosen by timing the candidates on the user's own device.

The fast and the reference networks share their modules, initialisation and
maths; NCHW and channels_last, eager steps and CUDA-graph replay are the same
maths too. Choosing among them changes rounding, never the method, so the
product can pick whichever is fastest where it runs, as cuDNN's benchmark
mode or an FFT planner does:

* :func:`candidates` lists what may run: the fused ops or PyTorch's own
  (``backend``), ``layout``, on CUDA eager or graph replay (``step_mode``),
  and the precision: PyTorch's default (TF32 convolutions on CUDA, fp32 on the
  CPU), bf16 only where :data:`dip_fast.core.auto_step.RECORDED_PARITY` has
  shown it restores as well;
* :func:`measure` times them interleaved (one step of each in turn, so a
  change of load hits all alike) at the run's real shape and pack size, on
  copies that the run never sees: the result depends only on the choice;
* :func:`choose` keeps the :func:`baseline` (what the paper's code runs)
  unless another candidate is at least :data:`MARGIN` faster, so that timing
  noise cannot flip the choice;
* :class:`TuningCache` keeps choices per device, versions, network, shape,
  pack size and thread count in a JSON file, so the next run of the same
  kind does not time again;
* :func:`tune` puts these together under a budget of :data:`BUDGET_SHARE` of
  the run's expected time. A run too short to pay for timing uses the cache,
  else the :func:`fixed` choice, which is also what ``DIP_FAST_TUNING=off``
  and ``deterministic=True`` run.

Example (a fake clock: candidate ``b`` takes 80 units a step, the baseline 100)::

    >>> from dip_fast.core.tuning import Candidate, choose
    >>> base = Candidate("reference", "nchw", "eager", "fp32")
    >>> fast = Candidate("fast", "channels_last", "eager", "fp32")
    >>> choose({base: 100.0, fast: 80.0}, base) == fast
    True
    >>> choose({base: 100.0, fast: 97.0}, base) == base  # 3% is within noise: keep the baseline
    True
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from . import auto_step, cpu_features
from .host_memory import reuse_on
from .step import GRAPH_WARMUP_STEPS

__all__ = [
    "BACKENDS", "BUDGET_SHARE", "LAYOUTS", "MARGIN", "Candidate", "Decision", "TuningCache", "baseline",
    "candidates", "choose", "device_name", "fixed", "measure", "steps_to_tune", "tune", "tuning_enabled",
]

#: What builds the network: the fused ops, or PyTorch's own (the paper's network).
BACKENDS = ("fast", "reference")
#: The memory layout of activations and convolution weights.
LAYOUTS = ("nchw", "channels_last")
#: A candidate replaces the baseline only when at least this much faster (a fraction of its time).
MARGIN = 0.05
#: Timing may cost at most this share of the run's expected time.
BUDGET_SHARE = 0.03
#: Timed steps of every candidate below which a measurement decides nothing (the run uses the cache or the
#: fixed choice instead).
MIN_ROUNDS = 3
#: Timed steps of every candidate beyond which more rounds add little.
MAX_ROUNDS = 15
#: Environment variable: ``off`` runs the fixed choice without timing.
TUNING_ENV = "DIP_FAST_TUNING"
#: The cache file's format; another value is a foreign file.
CACHE_FORMAT = "dip_fast-tuning-1"


@dataclass(frozen=True)
class Candidate:
    """One way to run the step.

    Attributes:
        backend: ``'fast'`` (the fused ops) or ``'reference'`` (PyTorch's own ops).
        layout: ``'nchw'`` or ``'channels_last'``.
        step_mode: ``'eager'`` or ``'graph'`` (CUDA only).
        precision: ``'fp32'``, ``'tf32'`` or ``'bf16'`` (see :mod:`dip_fast.core.step`).
    """

    backend: str
    layout: str
    step_mode: str
    precision: str

    @property
    def label(self) -> str:
        """``backend/layout/step_mode/precision``, the key of ``info.execution['ms_per_step']``."""
        return f"{self.backend}/{self.layout}/{self.step_mode}/{self.precision}"

    @classmethod
    def from_label(cls, label: str) -> "Candidate":
        """The candidate a :attr:`label` names (ValueError for anything else)."""
        parts = label.split("/")
        if len(parts) != 4:
            raise ValueError(f"a candidate label has four parts, got {label!r}")
        return cls(*parts)


@dataclass
class Decision:
    """What runs, and how it was decided (``info.execution``).

    Attributes:
        choice: the candidate that runs.
        source: ``'measured'`` (timed now), ``'cache'`` (timed by an earlier run) or ``'fixed'``
            (not timed: tuning off, ``deterministic=True``, a single candidate, or a run too short to pay for it).
        ms_per_step: candidate label -> median milliseconds per step (empty when not measured).
        tuning_s: seconds spent timing in this call.
        reason: one line on why this source.
    """

    choice: Candidate
    source: str
    ms_per_step: Dict[str, float] = field(default_factory=dict)
    tuning_s: float = 0.0
    reason: str = ""

    def as_dict(self) -> Dict[str, Any]:
        """The record ``info.execution`` holds."""
        return {**asdict(self.choice), "source": self.source, "ms_per_step": dict(self.ms_per_step),
                "tuning_s": self.tuning_s, "reason": self.reason}


def _default_precision(device: torch.device) -> str:
    # PyTorch's default: cuDNN convolutions in TF32 on Ampere and later, exact fp32 on the CPU.
    return "tf32" if device.type == "cuda" else "fp32"


def baseline(device: torch.device, backend: str = "auto", step_mode: str = "auto",
             precision: str = "auto") -> Candidate:
    """What the paper's code runs (the reference network, eager, NCHW, PyTorch's precision), within the caller's fixed choices.

    >>> baseline(torch.device("cpu"))
    Candidate(backend='reference', layout='nchw', step_mode='eager', precision='fp32')
    >>> baseline(torch.device("cpu"), backend="fast").backend
    'fast'
    """
    return Candidate("reference" if backend == "auto" else backend, "nchw",
                     "eager" if step_mode == "auto" else step_mode,
                     _default_precision(device) if precision == "auto" else precision)


def fixed(device: torch.device, backend: str = "auto", step_mode: str = "auto", precision: str = "auto",
          fast_available: bool = True) -> Candidate:
    """The choice when nothing is timed: the fastest measured on the device's type before this round.

    On the CPU, the fused ops in channels_last (1.24x the reference on an AMD
    EPYC Zen 4, bench/README.md); on CUDA, the reference network (the last
    GPU run found the fused step at 0.70x of it; no GPU has timed the
    rewritten kernels since), NCHW. Step mode and precision are what the
    parity records say (:func:`dip_fast.core.auto_step.choose`): eager, TF32
    convolutions on CUDA and fp32 on the CPU, unless a record shows a faster
    variant restores as well on this kind of device.

    >>> fixed(torch.device("cpu"), precision="fp32")
    Candidate(backend='fast', layout='channels_last', step_mode='eager', precision='fp32')
    >>> fixed(torch.device("cpu"), precision="fp32", fast_available=False).backend
    'reference'
    """
    cpu = device.type == "cpu"
    if backend == "auto":
        backend = "fast" if cpu and fast_available else "reference"
    layout = "channels_last" if cpu else "nchw"
    step_mode, precision = auto_step.choose(device, step_mode, precision)
    return Candidate(backend, layout, step_mode, precision)


def _bf16_allowed(device: torch.device, native_bf16: bool,
                  records: Optional[Sequence[auto_step.ParityRecord]]) -> bool:
    if device.type == "cpu" and not native_bf16:  # emulated bf16 is slower than fp32
        return False
    table = auto_step.RECORDED_PARITY if records is None else records
    return any(r.precision == "bf16" and r.device_type == device.type and r.has_parity for r in table)


def candidates(device: torch.device, backend: str = "auto", step_mode: str = "auto", precision: str = "auto",
               *, fast_available: bool = True, native_bf16: Optional[bool] = None,
               records: Optional[Sequence[auto_step.ParityRecord]] = None) -> List[Candidate]:
    """Every way the step may run on ``device`` within the caller's fixed choices, the baseline first.

    ``'auto'`` leaves a dimension open. bf16 is open only where the parity
    records allow it on this device type (and, on the CPU, where the
    processor computes bf16 natively); graph replay only on CUDA.

    >>> [c.label for c in candidates(torch.device("cpu"), native_bf16=False)]
    ['reference/nchw/eager/fp32', 'reference/channels_last/eager/fp32', 'fast/nchw/eager/fp32', 'fast/channels_last/eager/fp32']
    """
    if native_bf16 is None:
        native_bf16 = device.type == "cpu" and cpu_features.has_native_bf16()
    if backend == "auto":
        backends = ["reference", "fast"] if fast_available else ["reference"]
    else:
        backends = [backend]
    if step_mode == "auto":
        modes = ["eager", "graph"] if device.type == "cuda" else ["eager"]
    else:
        modes = [step_mode]
    if precision == "auto":
        precisions = [_default_precision(device)]
        if _bf16_allowed(device, native_bf16, records):
            precisions.append("bf16")
    else:
        precisions = [precision]
    found = [Candidate(b, layout, m, p) for b in backends for layout in LAYOUTS for m in modes for p in precisions]
    first = baseline(device, backend, step_mode, precision)
    return [first] + [c for c in found if c != first] if first in found else found


def choose(ms_per_step: Mapping[Candidate, float], base: Candidate, margin: float = MARGIN) -> Candidate:
    """The fastest candidate if it is at least ``margin`` faster than ``base``, else ``base``.

    A candidate that failed (NaN or infinite time) never wins; a baseline that
    failed loses to any candidate that ran.
    """
    ran = {c: t for c, t in ms_per_step.items() if math.isfinite(t)}
    if not ran:
        return base
    best = min(ran, key=ran.get)
    if base not in ran:
        return best
    return best if ran[best] <= (1.0 - margin) * ran[base] else base


Step = Callable[[], None]


def measure(steps: Mapping[Candidate, Step], *, budget_s: float, warmup: Mapping[Candidate, int] | None = None,
            clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] = lambda: None,
            min_rounds: int = MIN_ROUNDS, max_rounds: int = MAX_ROUNDS,
            deadline_s: Optional[float] = None) -> Dict[Candidate, List[float]]:
    """Time one step of each candidate in turn, round after round; milliseconds per step.

    Each candidate first runs its ``warmup`` steps untimed (one by default:
    the first step allocates and builds kernels' plans; a graph needs its
    eager warm-up and capture). Rounds go on until ``max_rounds``, or until
    ``budget_s`` (from the first warm-up) is spent once ``min_rounds`` are
    done. ``deadline_s`` (from the same start) is a hard stop: no step starts
    after it, so a machine far slower than the first steps said leaves some
    candidates with fewer than ``min_rounds`` times. The order rotates each
    round. A candidate whose step raises is dropped (its time is infinite)
    with a warning.
    """
    start = clock()
    hard = math.inf if deadline_s is None else deadline_s
    times: Dict[Candidate, List[float]] = {c: [] for c in steps}
    alive = dict(steps)

    def run(candidate: Candidate, timed: bool) -> None:
        t0 = clock()
        try:
            alive[candidate]()
            sync()
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is not chosen
            warnings.warn(f"dip_fast: step candidate {candidate.label} failed while timing ({exc}); skipped",
                          RuntimeWarning, stacklevel=3)
            del alive[candidate]
            times[candidate] = [math.inf]
            return
        if timed:
            times[candidate].append((clock() - t0) * 1e3)

    for candidate in list(alive):
        for _ in range((warmup or {}).get(candidate, 1)):
            if candidate in alive and clock() - start < hard:
                run(candidate, timed=False)
    order = list(alive)
    for round_index in range(max_rounds):
        if round_index >= min_rounds and clock() - start >= budget_s:
            break
        shift = round_index % max(1, len(order))
        for candidate in order[shift:] + order[:shift]:
            if clock() - start >= hard:
                return times
            if candidate in alive:
                run(candidate, timed=True)
    return times


def medians(times: Mapping[Candidate, Sequence[float]]) -> Dict[Candidate, float]:
    """The median of each candidate's times (infinite for one that never ran)."""
    return {c: (statistics.median(t) if t else math.inf) for c, t in times.items()}


# --------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """The device's model name, for the cache key: the GPU's, or the processor's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_features.cpu_name() or platform.processor() or platform.machine()


def cache_path() -> Path:
    """``$XDG_CACHE_HOME/dip_fast/tuning.json`` (``~/.cache`` when the variable is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "dip_fast" / "tuning.json"


class TuningCache:
    """Choices by key in one JSON file, written atomically (a temporary file renamed over it).

    A file that cannot be read, is not JSON or is not this format is ignored
    with one warning and rewritten on the next :meth:`put`.

    >>> import tempfile, pathlib
    >>> cache = TuningCache(pathlib.Path(tempfile.mkdtemp()) / "tuning.json")
    >>> c = Candidate("fast", "nchw", "eager", "fp32")
    >>> cache.put("k", c, {c.label: 12.5})
    >>> cache.get("k")
    (Candidate(backend='fast', layout='nchw', step_mode='eager', precision='fp32'), {'fast/nchw/eager/fp32': 12.5})
    """

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path is not None else cache_path()
        self._warned = False

    def _load(self) -> Dict[str, Any]:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            self._warn(f"cannot read it ({exc})")
            return {}
        try:
            data = json.loads(text)
        except ValueError:
            self._warn("it is not valid JSON")
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or not isinstance(data.get("entries"), dict):
            self._warn(f"it is not a {CACHE_FORMAT} file")
            return {}
        return data["entries"]

    def _warn(self, why: str) -> None:
        if not self._warned:
            warnings.warn(f"dip_fast: ignoring the tuning cache {self.path}: {why}; it will be rewritten",
                          RuntimeWarning, stacklevel=4)
            self._warned = True

    def get(self, key: str) -> Optional[tuple]:
        """``(candidate, ms_per_step)`` stored under ``key``, or None."""
        entry = self._load().get(key)
        try:
            return Candidate.from_label(entry["choice"]), {str(k): float(v) for k, v in entry["ms_per_step"].items()}
        except (TypeError, KeyError, ValueError, AttributeError):
            return None

    def put(self, key: str, choice: Candidate, ms_per_step: Mapping[str, float]) -> None:
        """Store ``choice`` under ``key`` (a file that cannot be written only warns: the run goes on)."""
        entries = self._load()
        entries[key] = {"choice": choice.label, "ms_per_step": {k: v for k, v in ms_per_step.items()
                                                                if math.isfinite(v)}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"format": CACHE_FORMAT, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError as exc:
            warnings.warn(f"dip_fast: could not write the tuning cache {self.path} ({exc})", RuntimeWarning,
                          stacklevel=3)


def cache_key(device: torch.device, network: Any, shape: Sequence[int], networks: int, dtype: torch.dtype,
              options: Sequence[Candidate]) -> str:
    """The key of a choice: what can change which candidate is fastest.

    Device model, torch and dip_fast versions, CPU threads, the network's
    configuration, the working shape (input channels, height, width), the
    pack size, the dtype and the candidates that were open.
    """
    from .._version import __version__

    return json.dumps({
        "device": device_name(device), "torch": torch.__version__, "dip_fast": __version__,
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "network": repr(network), "shape": [int(s) for s in shape], "networks": int(networks), "dtype": str(dtype),
        "candidates": sorted(c.label for c in options),
    }, sort_keys=True)


def tuning_enabled() -> bool:
    """False when ``DIP_FAST_TUNING`` is ``off`` (or ``0``, ``false``, ``no``)."""
    return os.environ.get(TUNING_ENV, "").strip().lower() not in ("off", "0", "false", "no")


def steps_to_tune(options: Sequence[Candidate]) -> int:
    """About how many steps' time timing ``options`` costs: warm-ups, builds and :data:`MIN_ROUNDS` rounds.

    >>> steps_to_tune([Candidate("reference", "nchw", "eager", "fp32")] * 4)
    22
    """
    return len(options) * MIN_ROUNDS + sum(_warmup(c) + 1 for c in options) + 2


def tune(options: Sequence[Candidate], make_step: Callable[[Candidate], Step], *, iterations: int,
         device: torch.device, key: str, fallback: Candidate, deterministic: bool = False,
         max_time: Optional[float] = None, cache: Optional[TuningCache] = None,
         clock: Callable[[], float] = time.perf_counter, budget_share: Optional[float] = None,
         budget_s: Optional[float] = None) -> Decision:
    """Choose among ``options`` (baseline first) for a run of ``iterations`` steps (and at most ``max_time`` s).

    ``make_step(candidate)`` builds a throwaway copy of the run for that
    candidate and returns a function that runs one of its steps. The budget
    is ``budget_share`` of the run's expected time, estimated from the
    baseline's first timed step; a run too short for :data:`MIN_ROUNDS`
    rounds of every candidate reads the cache or runs ``fallback``, and one
    whose step count alone rules timing out (:func:`steps_to_tune`) builds
    nothing to find that out. ``budget_s`` times for that long whatever the
    run's length and the cache hold (``dip-fast tune``), and stores the choice.
    """
    budget_share = BUDGET_SHARE if budget_share is None else budget_share
    if len(options) == 1:
        return Decision(options[0], "fixed", reason="one candidate: the caller fixed every choice")
    if deterministic:
        return Decision(fallback, "fixed", reason="deterministic=True runs one fixed choice, untimed")
    if not tuning_enabled():
        return Decision(fallback, "fixed", reason=f"{TUNING_ENV}=off")
    cache = cache if cache is not None else TuningCache()
    stored = cache.get(key) if budget_s is None else None
    if stored is not None and stored[0] in options:
        return Decision(stored[0], "cache", stored[1], reason="timed by an earlier run of this kind")
    if budget_s is None and budget_share * iterations < steps_to_tune(options):
        return Decision(fallback, "fixed", reason=f"a run of {iterations} steps is too short to pay for timing "
                                                  f"{len(options)} candidates")
    with reuse_on(device):  # as the run will step: freed buffers reused, not faulted in afresh
        return _timed_choice(options, make_step, iterations=iterations, device=device, key=key, fallback=fallback,
                             max_time=max_time, cache=cache, clock=clock, budget_share=budget_share,
                             budget_s=budget_s)


def _timed_choice(options: Sequence[Candidate], make_step: Callable[[Candidate], Step], *, iterations: int,
                  device: torch.device, key: str, fallback: Candidate, max_time: Optional[float], cache: TuningCache,
                  clock: Callable[[], float], budget_share: float, budget_s: Optional[float]) -> Decision:
    """:func:`tune`'s timing of every candidate, once neither the cache nor a fixed choice has answered."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    start = clock()
    base = options[0]
    steps = {base: make_step(base)}
    warm = _warmup(base)
    for _ in range(warm + 1):  # the warm-up, then one step that estimates the run's cost
        t0 = clock()
        steps[base]()
        sync()
    per_step = clock() - t0
    expected = per_step * iterations if max_time is None else min(per_step * iterations, max_time)
    budget = budget_share * expected if budget_s is None else budget_s
    spent = clock() - start
    # Each further candidate costs its warm-up and build (about its steps) plus MIN_ROUNDS rounds.
    need = per_step * (len(options) * MIN_ROUNDS + sum(_warmup(c) + 1 for c in options[1:]))
    if budget_s is None and spent + need > budget:
        return Decision(fallback, "fixed", tuning_s=clock() - start,
                        reason=f"the run (about {expected:.0f} s) is too short to pay for timing "
                               f"{len(options)} candidates")
    # A run's budget is a hard deadline; dip-fast tune's (budget_s) times every candidate MIN_ROUNDS times.
    deadline = start + budget if budget_s is None else math.inf
    for candidate in options[1:]:
        if clock() >= deadline:
            break
        try:
            steps[candidate] = make_step(candidate)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built is not chosen
            warnings.warn(f"dip_fast: step candidate {candidate.label} could not be built ({exc}); skipped",
                          RuntimeWarning, stacklevel=2)
    left = deadline - clock()
    times = measure(steps, budget_s=budget - (clock() - start), clock=clock, sync=sync, deadline_s=left,
                    warmup={c: (0 if c == base else _warmup(c)) for c in steps})
    # A candidate timed fewer than MIN_ROUNDS times (the budget ran out first) decides nothing.
    ms = {c: (m if len(times[c]) >= MIN_ROUNDS else math.inf) for c, m in medians(times).items()}
    for candidate in options:
        ms.setdefault(candidate, math.inf)
    if not math.isfinite(ms[base]):
        return Decision(fallback, "fixed", tuning_s=clock() - start,
                        reason=f"the timing ran out of its {budget:.1f} s budget before the baseline had "
                               f"{MIN_ROUNDS} timed steps (a machine busier than its first steps said)")
    choice = choose(ms, base)
    labels = {c.label: t for c, t in ms.items()}
    cache.put(key, choice, labels)
    timed = sum(1 for t in ms.values() if math.isfinite(t))
    return Decision(choice, "measured", {k: v for k, v in labels.items() if math.isfinite(v)},
                    tuning_s=clock() - start, reason=f"timed {timed} of {len(options)} candidates interleaved")


def _warmup(candidate: Candidate) -> int:
    # A graph's eager warm-up steps and its capture; one step elsewhere (first-call allocations and plans).
    return GRAPH_WARMUP_STEPS + 1 if candidate.step_mode == "graph" else 1
