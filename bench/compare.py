#!/usr/bin/env python
"""Interleaved benchmark harness: fast vs reference vs ``torch.compile(reference)``.

``make bench`` runs this file. It times one full Deep Image Prior training
step (perturbed input, forward, MSE loss, backward, Adam update) of the
paper's denoising network for each variant:

* ``fast``      -- :func:`dip_fast.core.nets.skip` (fused BatchNorm + LeakyReLU + pad), NCHW
* ``fast_cl``   -- the same network with ``channels_last=True``
* ``reference`` -- :func:`dip_fast.reference.skip`, plain PyTorch
* ``compile``   -- ``torch.compile(reference)`` (Inductor), NCHW
* on CUDA also ``reference_default`` -- the reference under PyTorch's default
  precision settings (TF32 allowed in cuDNN convolutions), which is what a user
  of the paper's code gets; ``reference`` itself runs IEEE float32 -- and, with
  ``--autotune``, ``compile_autotune`` (``mode="max-autotune"``)

Why interleaved: on a shared machine the load changes from one second to
the next, so timing all of variant A and then all of variant B measures the
load as much as the code. Here every repetition runs each variant once, in a
rotated order, and a ratio is taken between samples of the *same*
repetition; the report gives the median of those per-repetition ratios (and
their spread) after a warm-up. Repetitions in which a neighbour's burst of
work stretched any variant (more than ``--clean-tol`` over its best) are left
out of the statistics and replaced by further ones (the JSON keeps them all). Two forward-convolution probes (a 3x3
128->128 convolution at 128x128, NCHW and channels_last) ride along in the
same rotation; they measure the machine's convolution rate under the same
load, which gives the "all convolutions at forward-conv speed" bound.

Also measured (same interleaving): each custom op against the PyTorch
sequence it replaces, and optionally a ``torch.profiler`` breakdown of one
fast and one reference step (``--profile``).

Outputs: ``bench/results/<device>.json`` (raw per-repetition seconds, the
derived medians and ratios, the FLOP count, the environment) and
``bench/results/<device>.md`` (the tables printed at the end). Both are
rewritten after every size so that a run cut short keeps what it measured.

Other benchmark files (``bench/bench_*.py``, pytest-benchmark) import the
builders below, so the pytest suite and this harness time the same code.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"

# Inductor reads these when it first needs its cache, but set them before
# torch is imported anyway so no code path can see the defaults: a persistent
# cache turns the second run's multi-minute CPU compile into a cache load.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(REPO_ROOT / ".cache" / "inductor"))
os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _import_dip_fast():
    """Import dip_fast, retrying briefly: a colleague's rebuild can replace the extension under us."""
    last: Optional[BaseException] = None
    for _ in range(5):
        try:
            import dip_fast  # noqa: F401

            return dip_fast
        except ImportError as exc:  # a half-written package file
            last = exc
        for name in [m for m in sys.modules if m == "dip_fast" or m.startswith("dip_fast.")]:
            del sys.modules[name]
        time.sleep(3.0)
    raise RuntimeError(f"could not import dip_fast: {last}")


def rerun_if_extension_stale(names: Sequence[str] = ("bn_act", "_bn_act_backward"), tries: int = 10) -> bool:
    """Start this program again when the loaded extension lacks ``names``.

    An extension loaded while it was being rebuilt can miss ops; a loaded
    shared library cannot be reloaded in the same process, so the only
    remedy is a fresh one (after a pause for the build to finish). Returns
    False once ``tries`` restarts have not helped.
    """
    if _ops.has_ops(*names):
        return True
    done = int(os.environ.get("DIP_FAST_BENCH_RESTARTS", "0"))
    if done >= tries:
        return False
    print(f"dip_fast extension lacks {list(names)} ({_ops.LOAD_ERROR or 'stale or half-written build'}); "
          f"restarting in 15 s ({done + 1}/{tries})", file=sys.stderr, flush=True)
    time.sleep(15.0)
    os.environ["DIP_FAST_BENCH_RESTARTS"] = str(done + 1)
    os.execv(sys.executable, [sys.executable, *sys.argv])
    return False  # not reached


dip_fast = _import_dip_fast()
from dip_fast import _ops, reference  # noqa: E402
from dip_fast.core import nets
from dip_fast.core.host_memory import reuse_freed_memory  # noqa: E402
from dip_fast.core.networks import to_channels_last  # noqa: E402
from dip_fast.core.step import StepRunner, precision_settings  # noqa: E402

__all__ = [
    "PAPER_NETWORK",
    "CUDA_STEP_VARIANTS",
    "STEP_VARIANTS",
    "VARIANTS",
    "OpCase",
    "build_steps",
    "conv_flops",
    "conv_probe",
    "environment",
    "interleave",
    "main",
    "op_cases",
    "profile_steps",
    "sync",
]

#: The paper's default denoising network (denoising.ipynb, F16): 2,217,831 parameters.
PAPER_NETWORK: Dict[str, Any] = dict(
    num_input_channels=32,
    num_output_channels=3,
    num_channels_down=[128] * 5,
    num_channels_up=[128] * 5,
    num_channels_skip=[4] * 5,
    upsample_mode="bilinear",
    need_sigmoid=True,
    need_bias=True,
    pad="reflection",
    act_fun="LeakyReLU",
)

@dataclass(frozen=True)
class Variant:
    """How one step variant is built and run."""

    net: str  # "fast", "reference" or "compile" (torch.compile of the reference)
    channels_last: bool = False
    mode: str = "eager"  # StepRunner mode: "eager" or "graph" (one CUDA graph per step)
    precision: str = "fp32"  # StepRunner precision: "fp32" (IEEE), "tf32" or "bf16"
    label: str = ""
    torch_defaults: bool = False  # run under PyTorch's default float32 settings instead of `precision`'s
    compile_mode: Optional[str] = None  # torch.compile mode of a "compile" variant


VARIANTS: Dict[str, Variant] = {
    "fast": Variant("fast", label="fused network, NCHW, eager, fp32"),
    "fast_cl": Variant("fast", channels_last=True, label="fused network, channels_last, eager, fp32"),
    "reference": Variant("reference", label="plain PyTorch, eager, fp32"),
    "compile": Variant("compile", label="torch.compile(reference), fp32"),
    "reference_default": Variant("reference", torch_defaults=True,
                                 label="plain PyTorch, eager, PyTorch's default precision (TF32 cuDNN convolutions)"),
    "compile_autotune": Variant("compile", compile_mode="max-autotune",
                                label="torch.compile(reference, mode='max-autotune'), fp32"),
    "fast_graph": Variant("fast", mode="graph", label="fused network, one CUDA graph per step, fp32"),
    "fast_graph_tf32": Variant("fast", mode="graph", precision="tf32", label="as fast_graph, TF32 tensor cores"),
    "fast_graph_bf16": Variant("fast", mode="graph", precision="bf16",
                               label="as fast_graph, bf16 autocast + channels_last"),
    "fast_cl_bf16": Variant("fast", channels_last=True, precision="bf16",
                            label="fused network, bf16 autocast + channels_last, eager"),
    "reference_bf16": Variant("reference", precision="bf16", label="plain PyTorch, bf16 autocast, eager"),
}
#: The opt-in reduced-precision CPU variants (``--bf16``): bfloat16 convolutions where the CPU has them.
CPU_BF16_VARIANTS = ("fast_cl_bf16", "reference_bf16")
#: Step variants on the CPU, in the order tables list them.
STEP_VARIANTS = ("fast", "fast_cl", "reference", "compile")
#: Step variants on CUDA (the graph and reduced-precision ones need a GPU).
CUDA_STEP_VARIANTS = ("reference", "reference_default", "compile", "fast", "fast_graph", "fast_graph_tf32",
                      "fast_graph_bf16")
#: The variants every fast one is compared against (those present in a run).
ANCHORS = ("reference", "reference_default", "compile", "compile_autotune")

# PyTorch's float32 settings as this process found them (before any variant changed them): in a
# fresh process, cuDNN convolutions may use TF32 and matmuls may not.
_TORCH_DEFAULT_FP32 = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)

#: The project's CPU goal for the fused network: reference / fast time per step, by image size.
CPU_GOALS = {64: 1.3, 128: 1.5, 256: 1.3}

#: The denoising notebook's input perturbation (sigma = 25).
REG_NOISE_STD = 1.0 / 30.0

# Convolution probe: one 3x3, 128 -> 128 convolution at 128x128, forward only.
PROBE_CHANNELS = 128
PROBE_SIZE = 128


def sync(device: torch.device) -> None:
    """Wait for the device: CUDA work is asynchronous, a host clock alone would time the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------


def _paper_nets(variants: Sequence[str], seed: int, specs: Optional[Dict[str, Variant]] = None
                ) -> Dict[str, nn.Module]:
    """One network per variant, all with the reference network's initial weights."""
    specs = VARIANTS if specs is None else specs
    torch.manual_seed(seed)
    ref = reference.skip(**PAPER_NETWORK)
    state = ref.state_dict()
    out: Dict[str, nn.Module] = {}
    for name in variants:
        if name not in specs:
            raise ValueError(f"unknown step variant {name!r}; known: {list(specs)}")
        spec = specs[name]
        if spec.net == "fast":
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would time the reference twice
                net = nets.skip(channels_last=spec.channels_last, **PAPER_NETWORK)
        else:
            net = reference.skip(**PAPER_NETWORK)
        net.load_state_dict(state)
        if spec.net == "reference" and spec.channels_last:
            net = to_channels_last(net)  # as restore() runs the reference in that layout
        out[name] = net.train()
    return out


def variant_for(candidate: Any, label: str = "") -> Variant:
    """The step variant that runs a :class:`dip_fast.core.tuning.Candidate` (the tuned default's row)."""
    return Variant(candidate.backend, channels_last=candidate.layout == "channels_last", mode=candidate.step_mode,
                   precision=candidate.precision, label=label or candidate.label)


def tune_default(size: int, device: torch.device, seed: int = 0) -> Tuple[Any, Dict[str, Any]]:
    """The step ``restore()`` chooses with its defaults for a ``size`` x ``size`` denoising run on ``device``.

    Runs the pipeline's own tuning (:func:`dip_fast.pipeline.job.choose_execution`)
    on a synthetic noisy image, with cuDNN's benchmark mode as ``restore()``
    leaves it (PyTorch's default). Set ``XDG_CACHE_HOME`` to a fresh folder
    first for a measured choice rather than a cached one. Returns the
    :class:`~dip_fast.core.tuning.Decision` and its record for the JSON.
    """
    from dip_fast.pipeline import job as stages
    from dip_fast.pipeline.observation import prepare_observation
    from dip_fast.pipeline.request import validate_request

    rng = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    clean = torch.stack([0.5 + 0.3 * torch.sin(6 * xx + c) * torch.cos(4 * yy - c) for c in range(3)], dim=-1)
    noisy = (clean + torch.randn(clean.shape, generator=rng) * 25 / 255).clamp(0, 1).numpy()
    request = validate_request("denoise", device=str(device))
    jobs = [stages.plan_job(request, prepare_observation(request, noisy, None, None), 0)]
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False  # restore() leaves it at PyTorch's default
    try:
        t0 = time.perf_counter()
        decision = stages.choose_execution(request, jobs)
        wall = time.perf_counter() - t0
    finally:
        torch.backends.cudnn.benchmark = saved
    if device.type == "cuda":
        torch.cuda.empty_cache()
    record = {"choice": decision.choice.label, "source": decision.source, "reason": decision.reason,
              "tuning_s": decision.tuning_s, "tuning_wall_s": wall, "preset": jobs[0].preset.name,
              "iterations": jobs[0].preset.iterations,
              "candidates_ms": dict(decision.ms_per_step),
              "choice_ms_in_tuning": decision.ms_per_step.get(decision.choice.label)}
    return decision, record


def graph_verified(steps: Dict[str, "BenchStep"]) -> Dict[str, bool]:
    """Per graph variant: whether its CUDA graph was captured and its first replay matched an eager step.

    A graph that failed either runs eagerly from then on (no graph is kept),
    so its row times an eager step: the tables flag it.
    """
    return {name: step.runner.graphed for name, step in steps.items() if step.graph}


@contextlib.contextmanager
def torch_default_precision() -> Iterator[None]:
    """PyTorch's default float32 convolution and matmul settings, restored afterwards."""
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = (conv.fp32_precision, matmul.fp32_precision)
    conv.fp32_precision, matmul.fp32_precision = _TORCH_DEFAULT_FP32
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


class BenchStep:
    """One variant's training step as a no-argument callable (``runner`` is its :class:`StepRunner`)."""

    def __init__(self, runner: StepRunner, precision: str, torch_defaults: bool = False) -> None:
        self.runner, self.precision, self.torch_defaults = runner, precision, torch_defaults
        self.graph = runner.mode == "graph"  # built as a graph step (runner.mode turns eager if it fails)

    def __call__(self) -> None:
        # Precision flags are global: set them per call, since the variants take turns.
        with torch_default_precision() if self.torch_defaults else precision_settings(self.precision):
            self.runner.step()


def build_steps(
    variants: Sequence[str],
    size: int,
    device: torch.device,
    *,
    seed: int = 0,
    compile_mode: Optional[str] = None,
    specs: Optional[Dict[str, Variant]] = None,
) -> Dict[str, BenchStep]:
    """A step per variant: same weights, same ``z``, same target, same noise seed.

    Each variant owns its network, Adam state and noise generator, so
    interleaving them does not couple their trajectories. The target is a
    random image: the step's cost does not depend on the data. A step is the
    :class:`~dip_fast.core.step.StepRunner` step that ``fit`` runs, without
    averaging, backtracking or early stopping (the same work for every variant).
    A graph step is verified on its first replay against an eager step, as
    ``fit`` does (:func:`graph_verified` reads the outcome). ``specs`` maps
    names to variants (default :data:`VARIANTS`).
    """
    specs = VARIANTS if specs is None else specs
    nets_ = _paper_nets(variants, seed, specs)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    z = (torch.rand(1, PAPER_NETWORK["num_input_channels"], size, size, generator=gen) * 0.1).to(device)
    target = torch.rand(1, PAPER_NETWORK["num_output_channels"], size, size, generator=gen).to(device)
    steps: Dict[str, BenchStep] = {}
    for name, net in nets_.items():
        spec = specs[name]
        net = net.to(device)
        if spec.net == "compile":
            # dynamic=False: each size gets its own static graph, as a user
            # fitting one image would; otherwise the second size would switch
            # Inductor to dynamic shapes and time a different program.
            net = torch.compile(net, mode=spec.compile_mode or compile_mode, dynamic=False)
        noise_gen = torch.Generator(device=device).manual_seed(seed + 2)

        def loss_fn(out: torch.Tensor, _t: torch.Tensor = target) -> torch.Tensor:
            return F.mse_loss(out, _t)

        runner = StepRunner(net, z, loss_fn, lr=0.01, reg_noise_std=REG_NOISE_STD, generator=noise_gen,
                            mode=spec.mode, precision=spec.precision, verify_graph=spec.mode == "graph")
        steps[name] = BenchStep(runner, spec.precision, spec.torch_defaults)
    return steps


def peak_probe(device: torch.device) -> Dict[str, float]:
    """The card's measured dense matmul rate (TFLOP/s) per precision: the "peak" step rates are compared with.

    An 8192^3 GEMM is as close to the tensor cores' best as PyTorch gets;
    median of 10 calls after 3 warm-up calls.
    """
    if device.type != "cuda":
        return {}
    n = 8192
    out: Dict[str, float] = {}
    for label, dtype, prec in (("bf16", torch.bfloat16, "fp32"), ("tf32", torch.float32, "tf32"),
                               ("fp32", torch.float32, "fp32")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        times = []
        with precision_settings(prec):
            for i in range(13):
                sync(device)
                t0 = time.perf_counter()
                torch.mm(a, b)
                sync(device)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
        out[f"{label}_matmul_tflops"] = 2.0 * n**3 / statistics.median(times) / 1e12
        del a, b
    torch.cuda.empty_cache()
    return out


def conv_probe(device: torch.device, channels_last: bool, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> Tuple[Callable[[], None], float]:
    """A forward 3x3 128->128 convolution at 128x128 in ``dtype`` and its FLOPs (2 per multiply-add)."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(PROBE_CHANNELS, PROBE_CHANNELS, 3, padding=1).to(device, dtype)
    x = torch.randn(1, PROBE_CHANNELS, PROBE_SIZE, PROBE_SIZE, generator=gen).to(device, dtype)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    flops = 2.0 * PROBE_CHANNELS * PROBE_CHANNELS * 9 * PROBE_SIZE * PROBE_SIZE

    def run() -> None:
        with torch.no_grad():
            conv(x)

    return run, flops


def add_host_memory_option(p: argparse.ArgumentParser, default: str) -> None:
    """``--host-memory {system,reuse}``: how the benchmark's steps get their host memory (see :func:`host_memory`)."""
    p.add_argument("--host-memory", choices=("system", "reuse"), default=default,
                   help="reuse: freed host memory kept for the next step, as restore() runs "
                        "(dip_fast.core.host_memory); system: the C library's defaults, as the paper's code runs")


def host_memory(mode: str) -> ContextManager[bool]:
    """The block's host memory: ``'reuse'`` keeps freed buffers for the next step, ``'system'`` changes nothing."""
    return reuse_freed_memory() if mode == "reuse" else contextlib.nullcontext(False)


def conv_flops(size: int) -> Dict[str, Any]:
    """Convolution FLOPs of one training step of the paper network at ``size`` x ``size``.

    Counted from the shapes the network actually produces (forward hooks on
    every ``nn.Conv2d``, run on the meta device: no arithmetic is done).
    Forward: ``2 * N * C_out * H_out * W_out * C_in * k_h * k_w`` per
    convolution. Backward: the weight gradient costs the same again, and the
    input gradient too, except for the convolutions that read the network
    input ``z`` (it needs no gradient). Bias, BatchNorm, activation, pad,
    upsampling and Adam are not counted (they are O(elements), not
    O(elements x channels)).
    """
    torch.manual_seed(0)
    net = reference.skip(**PAPER_NETWORK).to("meta").train()
    layers: List[Dict[str, Any]] = []

    def hook(mod: nn.Module, inputs: Tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        x = inputs[0]
        n, cout, ho, wo = out.shape
        kh, kw = mod.kernel_size
        f = 2.0 * n * cout * ho * wo * (mod.in_channels // mod.groups) * kh * kw
        layers.append({"name": names[mod], "fwd": f, "needs_dx": bool(x.requires_grad), "out": [cout, ho, wo]})

    names = {m: n for n, m in net.named_modules()}
    handles = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        net(torch.zeros(1, PAPER_NETWORK["num_input_channels"], size, size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    fwd = sum(layer["fwd"] for layer in layers)
    bwd = sum(layer["fwd"] * (2 if layer["needs_dx"] else 1) for layer in layers)
    return {
        "size": size,
        "forward_flops": fwd,
        "backward_flops": bwd,
        "step_flops": fwd + bwd,
        "step_flops_approx_3x": 3 * fwd,
        "n_convs": len(layers),
        "largest": sorted(layers, key=lambda layer: -layer["fwd"])[:5],
    }


@dataclass
class OpCase:
    """One custom op against the PyTorch sequence it replaces, at one shape.

    ``variants`` maps a variant name to a no-argument callable; ``pairs``
    lists ``(label, fused variant, torch variant)`` whose time ratio is
    reported. ``bytes`` gives, per pair label, the bytes the pass must move
    at the least (see :data:`OP_TRAFFIC`), from which the achieved bandwidth follows.
    """

    name: str
    shape: str
    variants: Dict[str, Callable[[], Any]]
    pairs: List[Tuple[str, str, str]] = field(default_factory=list)
    bytes: Dict[str, float] = field(default_factory=dict)
    dtype: str = "fp32"


#: The memory traffic each op's pass cannot avoid, in bytes of its tensors (the same formulas as
#: the design notes on the GPU kernels). bn_act: X = input, Y = padded output. The statistics need
#: one read of x before anything can be normalised, so a forward reads x twice and writes y
#: (2X + Y); the backward reduces over dy and x, then reads both again to write dx (2Y + 3X).
#: A kernel that keeps x on chip between the passes can beat these (X + Y, Y + 2X); at the
#: large shapes it cannot. upsample_cat: S = skip, D = deep (the output is S + 4D): the forward
#: reads S and D and writes S + 4D; the backward reads the S + 4D gradient and writes S and D,
#: so both are 2S + 5D. Lanczos: X = input, Y = output; forward reads X and writes Y, the
#: backward reads dY and writes dX: X + Y each. Parameters and statistics are C-sized: left out.
OP_TRAFFIC = {
    "bn_act": "forward 2X + Y, backward 2Y + 3X (X input, Y padded output)",
    "upsample_cat": "forward 2S + 5D, forward+backward 4S + 10D (S skip, D deep)",
    "lanczos": "forward+backward 2X + 2Y (X input, Y output)",
}

#: Op dtypes by name: the activations' dtype (BatchNorm's weights stay float32, as under autocast).
OP_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> float:
    return float(math.prod(shape)) * torch.empty((), dtype=dtype).element_size()


def _torch_bn_act(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, slope: float, pad: int) -> torch.Tensor:
    """The reference network's sequence: training BatchNorm, LeakyReLU, the next conv's reflection pad."""
    y = F.batch_norm(x, None, None, w, b, training=True, eps=1e-5)
    if slope != 1.0:
        y = F.leaky_relu(y, slope)
    return F.pad(y, [pad] * 4, mode="reflect") if pad else y


#: The activation layouts the op cases run in (the CPU's fast network runs channels_last).
_LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def _layout_suffix(layout: str) -> str:
    return "" if layout == "nchw" else f" ({layout})"


def _dtype_suffix(dtype: str) -> str:
    return "" if dtype == "fp32" else f" {dtype}"


def _no_grad(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` run without autograd recording: the forward pass alone."""

    def run() -> None:
        with torch.no_grad():
            fn()

    return run


def _bn_act_cases(device: torch.device, size: int, seed: int, dtype: str = "fp32") -> List[OpCase]:
    from dip_fast.ops.bn_act import batch_norm_act

    # The three kinds of call the paper network makes at image size `size`, a deeper level (1x128x128²
    # for a 512² image: launch overhead starts to matter), and a batch of 8 of down0 (8x128x256²).
    shapes = [
        ("down0", 1, 128, size // 2, 0.2, 1),  # after down[0]: feeds inner[0]'s 3x3 conv
        ("concat0", 1, 132, size, 1.0, 1),  # BatchNorm after the level-0 concatenation: feeds up[0]
        ("up0", 1, 128, size, 0.2, 0),  # after up[0]: feeds the 1x1 conv
        ("down1", 1, 128, size // 4, 0.2, 1),  # after down[1]
        ("down0 batch 8", 8, 128, size // 2, 0.2, 1),
    ]
    act_dtype = OP_DTYPES[dtype]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cases = []
    for (label, n, c, hw, slope, pad), layout in [(s, fmt) for fmt in _LAYOUTS for s in shapes]:
        x = (torch.randn(n, c, hw, hw, generator=gen).to(device, act_dtype, memory_format=_LAYOUTS[layout])
             .requires_grad_(True))
        w = (torch.rand(c, generator=gen) + 0.5).to(device).requires_grad_(True)
        b = torch.randn(c, generator=gen).to(device).requires_grad_(True)

        def fused(x=x, w=w, b=b, slope=slope, pad=pad) -> torch.Tensor:
            return batch_norm_act(x, w, b, eps=1e-5, slope=slope, pad=pad, pad_mode="reflect")

        def plain(x=x, w=w, b=b, slope=slope, pad=pad) -> torch.Tensor:
            return _torch_bn_act(x, w, b, slope, pad)

        y_fused, y_plain = fused(), plain()
        # The gradient in the layout the network hands it over (the next convolution's input gradient).
        g = torch.randn(y_plain.shape, generator=gen).to(device, act_dtype, memory_format=_LAYOUTS[layout])
        inputs = (x, w, b)
        big_x, big_y = _nbytes(x.shape, act_dtype), _nbytes(y_plain.shape, act_dtype)

        # Backward alone: the same graph, differentiated again (retain_graph keeps it).
        def bwd(y=y_fused, g=g, inputs=inputs) -> None:
            torch.autograd.grad(y, inputs, g, retain_graph=True)

        def bwd_plain(y=y_plain, g=g, inputs=inputs) -> None:
            torch.autograd.grad(y, inputs, g, retain_graph=True)

        cases.append(
            OpCase(
                name=f"bn_act/{label}" + _layout_suffix(layout) + _dtype_suffix(dtype),
                shape=f"{n}x{c}x{hw}x{hw} slope={slope} pad={pad}",
                variants={"fused_fwd": _no_grad(fused), "torch_fwd": _no_grad(plain), "fused_bwd": bwd,
                          "torch_bwd": bwd_plain},
                pairs=[("forward", "fused_fwd", "torch_fwd"), ("backward", "fused_bwd", "torch_bwd")],
                bytes={"forward": 2 * big_x + big_y, "backward": 2 * big_y + 3 * big_x},
                dtype=dtype,
            )
        )
    return cases


def _upsample_cat_cases(device: torch.device, size: int, seed: int, dtype: str = "fp32") -> List[OpCase]:
    """upsample_cat against the reference's upsample + torch.cat, at the top level of the paper network."""
    from dip_fast.ops.upsample_cat import upsample_cat
    from dip_fast.reference.skip import upsample2x

    act_dtype = OP_DTYPES[dtype]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    cases = []
    for layout, fmt in _LAYOUTS.items():
        skip = torch.randn(1, 4, size, size, generator=gen).to(device, act_dtype, memory_format=fmt).requires_grad_(True)
        deep = (torch.randn(1, 128, size // 2, size // 2, generator=gen).to(device, act_dtype, memory_format=fmt)
                .requires_grad_(True))
        g = torch.randn(1, 132, size, size, generator=gen).to(device, act_dtype, memory_format=fmt)
        big_s, big_d = _nbytes(skip.shape, act_dtype), _nbytes(deep.shape, act_dtype)

        def fused(skip=skip, deep=deep) -> torch.Tensor:
            return upsample_cat(skip, deep, "bilinear")

        def plain(skip=skip, deep=deep) -> torch.Tensor:
            return torch.cat([skip, upsample2x(deep, "bilinear")], dim=1)

        def fb(fn=fused, g=g, inputs=(skip, deep)) -> None:
            torch.autograd.grad(fn(), inputs, g)

        def fb_plain(fn=plain, g=g, inputs=(skip, deep)) -> None:
            torch.autograd.grad(fn(), inputs, g)

        cases.append(
            OpCase(
                name="upsample_cat/level0" + _layout_suffix(layout) + _dtype_suffix(dtype),
                shape=f"skip 1x4x{size}x{size}, deep 1x128x{size // 2}x{size // 2}, bilinear",
                variants={"fused_fwd": _no_grad(fused), "torch_fwd": _no_grad(plain), "fused_fwd_bwd": fb,
                          "torch_fwd_bwd": fb_plain},
                pairs=[("forward", "fused_fwd", "torch_fwd"), ("forward+backward", "fused_fwd_bwd", "torch_fwd_bwd")],
                bytes={"forward": 2 * big_s + 5 * big_d, "forward+backward": 4 * big_s + 10 * big_d},
                dtype=dtype,
            )
        )
    return cases


def _fast_downsampler_class() -> Tuple[Optional[type], Optional[str]]:
    """The fused Lanczos downsampler module, or why there is none.

    The op is written by a colleague; it is looked up where the API module
    expects it (``dip_fast.ops.Downsample``, constructed like the reference
    ``Downsampler``), then in its module, ``dip_fast.ops.downsample``.
    """
    try:
        from dip_fast import ops
    except Exception as exc:  # pragma: no cover - import errors of a half-built tree
        return None, f"dip_fast.ops failed to import ({type(exc).__name__}: {exc})"
    cls = getattr(ops, "Downsample", None)
    if cls is None:
        try:
            # By module path: the package attribute ``dip_fast.ops.downsample`` is the function.
            mod = importlib.import_module("dip_fast.ops.downsample")
        except Exception as exc:
            return None, f"no dip_fast.ops.Downsample nor dip_fast.ops.downsample ({type(exc).__name__}: {exc})"
        cls = getattr(mod, "Downsample", None)
        if cls is None:
            return None, "dip_fast.ops.downsample has no Downsample"
    return cls, None


def _lanczos_cases(device: torch.device, size: int, seed: int) -> Tuple[List[OpCase], Optional[str]]:
    """The fused Lanczos downsampler against the reference ``Downsampler``, forward + backward.

    Shapes: the super-resolution data term (3 channels, lanczos2, phase 0.5,
    preserve_size) at x4 and x8 of a ``size`` x ``size`` output. Returns the
    cases and, when there are none, why.
    """
    cls, why = _fast_downsampler_class()
    if cls is None:
        return [], why
    from dip_fast.reference.downsampler import Downsampler

    gen = torch.Generator(device="cpu").manual_seed(seed)
    cases = []
    for factor in (4, 8):
        kwargs = dict(kernel_type="lanczos2", phase=0.5, preserve_size=True)
        ref = Downsampler(n_planes=3, factor=factor, **kwargs).to(device)
        try:
            fast = cls(3, factor, **kwargs).to(device)
        except Exception as exc:  # the constructor differs from the reference's
            return cases, f"Downsample(3, {factor}, ...) failed ({type(exc).__name__}: {exc})"
        x = torch.rand(1, 3, size, size, generator=gen).to(device).requires_grad_(True)
        try:
            y_fast = fast(x)
        except Exception as exc:  # e.g. no kernel for this device yet
            return cases, f"Downsample failed on {device.type} ({type(exc).__name__}: {str(exc).splitlines()[0]})"
        y_ref = ref(x)
        if y_fast.shape != y_ref.shape:
            return cases, f"Downsample output {tuple(y_fast.shape)} != reference {tuple(y_ref.shape)}"
        g = torch.randn(y_ref.shape, generator=gen).to(device)

        def fast_fb(x=x, g=g, mod=fast) -> None:
            torch.autograd.grad(mod(x), (x,), g)

        def ref_fb(x=x, g=g, mod=ref) -> None:
            torch.autograd.grad(mod(x), (x,), g)

        cases.append(
            OpCase(
                name=f"lanczos/x{factor}",
                shape=f"1x3x{size}x{size} lanczos2 factor={factor}",
                variants={"fused_fwd_bwd": fast_fb, "torch_fwd_bwd": ref_fb},
                pairs=[("forward+backward", "fused_fwd_bwd", "torch_fwd_bwd")],
                bytes={"forward+backward": 2 * _nbytes(x.shape, x.dtype) + 2 * _nbytes(y_ref.shape, y_ref.dtype)},
            )
        )
    return cases, None


def op_cases(device: torch.device, size: int, seed: int = 0,
             dtypes: Sequence[str] = ("fp32",)) -> Tuple[List[OpCase], List[str]]:
    """Every custom op's cases at image size ``size``, and notes on the ops that were skipped.

    ``dtypes`` are the activation dtypes of the bn_act and upsample_cat cases
    (Lanczos, the super-resolution data term, stays float32).
    """
    notes: List[str] = []
    cases: List[OpCase] = []
    for dtype in dtypes:
        if _ops.has_ops("bn_act", "_bn_act_backward"):
            cases += _bn_act_cases(device, size, seed, dtype)
        elif dtype == dtypes[0]:
            notes.append("bn_act: the extension lacks bn_act/_bn_act_backward")
        if _ops.has_ops("upsample_cat", "_upsample_cat_backward"):
            cases += _upsample_cat_cases(device, size, seed, dtype)
        elif dtype == dtypes[0]:
            notes.append("upsample_cat: the extension lacks upsample_cat/_upsample_cat_backward")
    lz, why = _lanczos_cases(device, size, seed)
    cases += lz
    if why:
        notes.append(f"lanczos: {why}")
    return cases, notes


def copy_case(device: torch.device, mib: int) -> Tuple[Callable[[], None], float]:
    """A large ``dst.copy_(src)`` and the bytes it moves (read + written): the bandwidth ops are held to.

    It should be well beyond the last-level cache (50 MB on an H200), or the
    "device" bandwidth would be the cache's.
    """
    n = mib * 2**20 // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)

    def run() -> None:
        dst.copy_(src)

    return run, 2.0 * n * 4


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------


def interleave(
    fns: Dict[str, Callable[[], Any]],
    device: torch.device,
    *,
    repeats: int,
    warmup: int,
    min_sample_s: float,
    extra_warmup: Optional[Dict[str, int]] = None,
    max_repeats: Optional[int] = None,
    clean_tol: float = 0.3,
    log: Optional[Callable[[str], None]] = None,
) -> Dict[str, Any]:
    """Time each callable, alternating between them, until ``repeats`` repetitions are clean.

    Each callable first runs ``warmup`` untimed calls (plus
    ``extra_warmup[name]``, e.g. one more for a ``torch.compile`` variant whose
    first call compiles); the last of them, timed, sets how many calls make one
    sample: at least ``min_sample_s`` seconds, so that millisecond ops are not
    timed by a single clock read. Repetition ``r`` runs every callable once,
    in an order rotated by ``r`` so that no variant always runs first (after
    an idle gap) or last.

    A repetition is *clean* when no variant's sample is more than
    ``clean_tol`` above that variant's fastest sample: on a shared machine a
    neighbour's burst of work stretches whatever runs at that moment (with
    two threads on two cores, by up to 20x), and such a repetition says
    nothing about the code. Repetitions continue until ``repeats`` are clean
    or ``max_repeats`` (default ``3 * repeats``) have run.

    Returns ``{"seconds": {name: [per-call seconds of every repetition]},
    "clean": [bool per repetition], "calls_per_sample": {name: int},
    "warmup_s": {name: seconds}}``.
    """
    names = list(fns)
    max_repeats = max(repeats, max_repeats if max_repeats is not None else 3 * repeats)
    calls: Dict[str, int] = {}
    warm_s: Dict[str, float] = {}
    for name in names:
        n_warm = max(1, warmup + (extra_warmup or {}).get(name, 0))
        t_all = time.perf_counter()
        for _ in range(n_warm):
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            dt = max(time.perf_counter() - t0, 1e-7)
        warm_s[name] = time.perf_counter() - t_all
        calls[name] = max(1, min(10_000, math.ceil(min_sample_s / dt)))
        if log:
            log(f"    warm-up {name}: {n_warm} call(s), {warm_s[name]:.1f} s; {calls[name]} call(s) per sample")
    seconds: Dict[str, List[float]] = {name: [] for name in names}
    clean: List[bool] = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample would land on whichever variant ran then
    try:
        r = 0
        while r < max_repeats:
            k = r % len(names)
            for name in names[k:] + names[:k]:
                n = calls[name]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(n):
                    fns[name]()
                sync(device)
                seconds[name].append((time.perf_counter() - t0) / n)
            gc.collect()
            r += 1
            clean = _clean_repetitions(seconds, clean_tol)
            if log:
                log("    rep %d: %s%s" % (r, ", ".join(f"{m}={seconds[m][-1] * 1e3:.2f}ms" for m in names),
                                          "" if clean[-1] else "  (disturbed)"))
            if r >= repeats and sum(clean) >= repeats:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {"seconds": seconds, "clean": clean, "calls_per_sample": calls, "warmup_s": warm_s}


def _clean_repetitions(seconds: Dict[str, List[float]], tol: float) -> List[bool]:
    """Per repetition: whether every variant's sample is within ``1 + tol`` of that variant's fastest."""
    fastest = {name: min(v) for name, v in seconds.items()}
    n = min(len(v) for v in seconds.values())
    return [all(seconds[name][i] <= fastest[name] * (1.0 + tol) for name in seconds) for i in range(n)]


def kept_seconds(timing: Dict[str, Any], minimum: int = 3) -> Dict[str, List[float]]:
    """The clean repetitions' samples, or all of them when fewer than ``minimum`` are clean."""
    clean = timing["clean"]
    if sum(clean) < minimum:
        return timing["seconds"]
    return {name: [t for t, ok in zip(v, clean) if ok] for name, v in timing["seconds"].items()}


#: Layout differences under this fraction are reported as a tie (the NCHW default then stands).
LAYOUT_TIE = 0.02


def _faster_layout(r: Optional[Dict[str, float]]) -> str:
    """``NCHW``, ``channels_last`` or ``tie``, from the per-repetition ratio t_NCHW / t_channels_last."""
    if not r:
        return "NCHW"
    if abs(r["median"] - 1.0) < LAYOUT_TIE:
        return "tie"
    return "channels_last" if r["median"] > 1.0 else "NCHW"


def ratio_stats(seconds: Dict[str, List[float]], slow: str, fast: str) -> Optional[Dict[str, float]]:
    """Speed-up of ``fast`` over ``slow``: the median of the per-repetition ratios ``t_slow / t_fast``."""
    if slow not in seconds or fast not in seconds:
        return None
    rs = [a / b for a, b in zip(seconds[slow], seconds[fast])]
    if not rs:
        return None
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "n": len(rs)}


def medians(seconds: Dict[str, List[float]]) -> Dict[str, float]:
    """Median seconds per call of each variant."""
    return {name: statistics.median(v) for name, v in seconds.items() if v}


# ---------------------------------------------------------------------------
# Profiler
# ---------------------------------------------------------------------------

# Self-time categories, first match wins. Self times add up to the total, so
# the categories partition the step without double counting.
_CATEGORIES = [
    ("convolution", re.compile(r"conv", re.I)),
    ("fused upsample-cat (dip_fast)", re.compile(r"dip_fast.*upsample_cat", re.I)),
    ("fused bn-act (dip_fast)", re.compile(r"dip_fast", re.I)),
    ("batch norm", re.compile(r"batch_norm", re.I)),
    ("leaky relu", re.compile(r"leaky_relu", re.I)),
    ("reflection pad", re.compile(r"reflection_pad|constant_pad|\bpad\b", re.I)),
    ("upsample", re.compile(r"upsample", re.I)),
    ("cat / copy / layout", re.compile(r"\bcat\b|copy|clone|contiguous|empty_like|as_strided|slice|narrow", re.I)),
    (
        "adam / grad bookkeeping",
        re.compile(r"adam|foreach|lerp|addcdiv|addcmul|sqrt|zero_|mul_|add_|div_|fill_|Optimizer", re.I),
    ),
]


def _category(name: str) -> str:
    for label, pattern in _CATEGORIES:
        if pattern.search(name):
            return label
    return "other"


def profile_steps(
    steps: Dict[str, BenchStep], device: torch.device, *, warmup: int = 1, rounds: int = 5, top: int = 12
) -> Dict[str, Any]:
    """Profile ``rounds`` steps of each variant with ``torch.profiler``, the variants taking turns.

    One profiler session per step. For each variant the step with the median
    wall time is reported (its ops add up to its total): on a shared machine
    a single profiled step may land in a burst of load (one such step took
    15x the others), and an average over steps would be that burst's. Per
    variant: the top ops by self time (CPU time on the CPU, device time on
    CUDA), a split into categories, and every round's total.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    key = "self_device_ms" if device.type == "cuda" else "self_cpu_ms"
    taken: Dict[str, List[Tuple[float, List[Dict[str, Any]]]]] = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        sync(device)
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            with profile(activities=activities) as prof:
                step()
                sync(device)
            wall = time.perf_counter() - t0
            rows = [
                {
                    "name": e.key,
                    "calls": int(e.count),
                    "self_cpu_ms": e.self_cpu_time_total / 1e3,
                    "cpu_total_ms": e.cpu_time_total / 1e3,
                    "self_device_ms": float(getattr(e, "self_device_time_total", 0.0)) / 1e3,
                }
                for e in prof.key_averages()
            ]
            taken[name].append((wall, rows))
    out: Dict[str, Any] = {}
    for name, runs in taken.items():
        order = sorted(range(len(runs)), key=lambda i: runs[i][0])
        wall, rows = runs[order[len(order) // 2]]
        total = sum(r[key] for r in rows)
        cats: Dict[str, float] = {}
        for r in rows:
            c = _category(r["name"])
            cats[c] = cats.get(c, 0.0) + r[key]
        rows = sorted(rows, key=lambda r: -r[key])
        out[name] = {
            "sort_key": key,
            "rounds": rounds,
            "total_ms": total,
            "wall_ms_under_profiler": wall * 1e3,
            "wall_ms_each": [w * 1e3 for w, _ in runs],
            "total_ms_each": [sum(r[key] for r in rs) for _, rs in runs],
            "top": rows[:top],
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        }
    return out


# ---------------------------------------------------------------------------
# Environment and reporting
# ---------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:
        return ""


def _cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except Exception:
        pass
    return platform.processor() or "unknown"


def _loadavg() -> Optional[List[float]]:
    """1, 5 and 15 minute load averages: how many runnable processes shared the cores."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on: commit, hardware, software, settings that change speed."""
    env: Dict[str, Any] = {
        "date": _dt.date.today().isoformat(),
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "dip_fast": getattr(dip_fast, "__version__", "?"),
        "device": device.type,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "extension_loaded": _ops.available(),
        "extension_error": _ops.LOAD_ERROR,
        "fast_is_fused": isinstance(_paper_nets(["fast"], 0)["fast"], nets.FastSkipNet),
    }
    env["load_average"] = _loadavg()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
            matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
        )
    return env


def _fmt_ratio(r: Optional[Dict[str, float]]) -> str:
    if not r:
        return "-"
    return f"{r['median']:.2f}x ({r['min']:.2f}-{r['max']:.2f})"


def _reps(entry: Dict[str, Any]) -> str:
    """``clean/all`` repetitions of a size or op case."""
    clean = entry.get("clean_repetitions")
    return "-" if clean is None else f"{sum(clean)}/{len(clean)}"


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v * 1e3:.1f}" if v >= 0.01 else f"{v * 1e3:.3f}")


def render_markdown(result: Dict[str, Any]) -> str:
    """The report's tables: step times and ratios per size, the conv bound, the ops, the profile."""
    env = result["environment"]
    hw = env.get("gpu") or f"{env['cpu_model']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads"
    lines = [
        f"Measured {env['date']}, commit {env['commit']}{' (+ uncommitted changes)' if env['tree_dirty'] else ''}, "
        f"{hw}, torch {env['torch']}; raw numbers: `{result['json_name']}`.",
        "",
        "Speed-ups are medians of per-repetition ratios t_other / t_fast measured in the same run "
        "(min-max over repetitions in brackets); > 1 means the fast network is faster. "
        f"At least {result['config']['repeats']} clean repetitions wanted after {result['config']['warmup']} "
        f"warm-up call(s); a repetition is clean when every sample is within "
        f"{result['config'].get('clean_tol', 0.3):.0%} of its variant's fastest (others were disturbed by "
        "other processes and are left out; the JSON keeps them).",
        "",
    ]
    steps = result.get("steps", {})
    if steps and (env["device"] != "cpu" or result["config"].get("variants") or result["config"].get("tuned")):
        lines += _render_device_steps(result)
    elif steps:
        lines += [
            "| size | fast ms | fast_cl ms | reference ms | compile ms | ref / fast | ref / fast_cl "
            "| compile / fast | compile / fast_cl | faster layout | CPU goal | clean reps |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        tie_note = False
        for size, s in steps.items():
            m = s["median_s"]
            r = s["speedup"]
            best = s.get("faster_layout", "-")
            tie_note = tie_note or best == "tie"
            goal = CPU_GOALS.get(int(size)) if env["device"] == "cpu" else None
            # Judge the layout this run found faster (not the larger of two noisy ratios); on a tie,
            # the one restore() runs on the CPU (channels_last).
            pick = r.get("reference/fast" if best == "NCHW" else "reference/fast_cl")
            got = pick["median"] if pick else None
            verdict = "-" if goal is None or got is None else f">= {goal}x: {'met' if got >= goal else 'not met'}"
            lines.append(
                f"| {size}² | {_ms(m.get('fast'))} | {_ms(m.get('fast_cl'))} | {_ms(m.get('reference'))} | "
                f"{_ms(m.get('compile'))} | {_fmt_ratio(r.get('reference/fast'))} | "
                f"{_fmt_ratio(r.get('reference/fast_cl'))} | {_fmt_ratio(r.get('compile/fast'))} | "
                f"{_fmt_ratio(r.get('compile/fast_cl'))} | {best} | {verdict} | {_reps(s)} |"
            )
        if tie_note:
            lines += ["", f"tie: the two layouts' per-repetition ratio is within {LAYOUT_TIE:.0%} of 1 "
                          "(the goal column then judges channels_last, the layout restore() runs on the CPU)."]
        lines += [
            "",
            "Convolution bound: the step's convolution FLOPs (forward + backward) at the forward-conv "
            "probe's rate (3x3 128->128 conv at 128², faster layout, measured in the same rotation).",
            "",
            "| size | conv GFLOP / step | probe GFLOP/s | bound ms | best fast ms | bound / best fast |",
            "|---|---|---|---|---|---|",
        ]
        for size, s in steps.items():
            b = s.get("conv_bound")
            if not b:
                continue
            lines.append(
                f"| {size}² | {b['step_gflop']:.2f} | {b['probe_gflops']:.0f} | {b['bound_ms']:.1f} | "
                f"{b['best_fast_ms']:.1f} | {b['efficiency'] * 100:.0f}% |"
            )
        lines.append("")
        if any("fast_cl_bf16" in s["median_s"] for s in steps.values()):
            lines += [
                "bf16 autocast (opt-in, `precision=\"bf16\"`), same rotation:",
                "",
                "| size | fast_cl_bf16 ms | reference_bf16 ms | reference (fp32) / fast_cl_bf16 "
                "| fast_cl (fp32) / fast_cl_bf16 | reference_bf16 / fast_cl_bf16 | reference (fp32) / reference_bf16 |",
                "|---|---|---|---|---|---|---|",
            ]
            for size, s in steps.items():
                m, r = s["median_s"], s["speedup"]
                if "fast_cl_bf16" not in m:
                    continue
                lines.append(
                    f"| {size}² | {_ms(m.get('fast_cl_bf16'))} | {_ms(m.get('reference_bf16'))} | "
                    f"{_fmt_ratio(r.get('reference/fast_cl_bf16'))} | {_fmt_ratio(r.get('fast_cl/fast_cl_bf16'))} | "
                    f"{_fmt_ratio(r.get('reference_bf16/fast_cl_bf16'))} | {_fmt_ratio(r.get('reference/reference_bf16'))} |"
                )
            lines.append("")
    ops = result.get("ops", {})
    if ops.get("cases"):
        lines += _render_ops(ops)
    for note in ops.get("notes", []):
        lines.append(f"Not measured: {note}.")
    if ops.get("notes"):
        lines.append("")
    prof = result.get("profile")
    if prof:
        lines += _render_profile(prof)
    return "\n".join(lines).rstrip() + "\n"


def _render_ops(ops: Dict[str, Any]) -> List[str]:
    """The op table: times, speed-up, and the bandwidth each pass reaches against a same-run copy."""
    copy = ops.get("copy", {})
    ref = copy.get("reference_gbps") or max(copy.get("gbps") or [0.0]) or None
    lines = []
    if ref:
        traffic = "; ".join(f"{k}: {v}" for k, v in ops.get("traffic", {}).items())
        lines += [f"Bandwidth: the bytes a pass must move at the least ({traffic}), over its median time. "
                  f"% copy compares that with a {copy['mib']} MiB `copy_` timed in the same run "
                  f"({ref:.0f} GB/s, read + write).", ""]
    lines += [
        "| op | shape | pass | fused ms | PyTorch ms | PyTorch / fused | MB | fused GB/s | fused % copy "
        "| PyTorch GB/s | clean reps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in ops["cases"]:
        m, gbps = case["median_s"], case.get("gbps", {})
        for label, fused, plain in case["pairs"]:
            nbytes = case.get("bytes", {}).get(label)
            share = f"{gbps[fused] / ref:.0%}" if ref and fused in gbps else "-"
            mb = f"{nbytes / 1e6:.3g}" if nbytes else "-"
            lines.append(
                f"| {case['name']} | {case['shape']} | {label} | {_ms(m.get(fused))} | {_ms(m.get(plain))} | "
                f"{_fmt_ratio(case['speedup'].get(label))} | {mb} | {_gbps(gbps.get(fused))} | {share} | "
                f"{_gbps(gbps.get(plain))} | {_reps(case)} |"
            )
    lines.append("")
    return lines


def _gbps(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _render_device_steps(result: Dict[str, Any]) -> List[str]:
    """GPU step table: every variant's time, its speed-up over each anchor measured, and its FLOP rate."""
    peak = result.get("peak", {})
    bf16 = peak.get("bf16_matmul_tflops")
    lines = [
        "Variants: " + "; ".join(f"`{name}` {spec.label}" for name, spec in VARIANTS.items()) + ".",
        "",
        "Peak (dense 8192³ matmul, same run): "
        + (", ".join(f"{k.split('_')[0]} {v:.0f} TFLOP/s" for k, v in peak.items()) if peak else "not measured")
        + ". TFLOP/s counts the step's convolution FLOPs only.",
        "",
    ]
    # One speed-up column per anchor this run measured: the IEEE fp32 reference, the reference under
    # PyTorch's defaults (what the paper's code gets), and the compiled reference.
    anchors = [a for a in ANCHORS if any(a in s["median_s"] for s in result["steps"].values())]
    lines += [
        "| size | variant | ms / step | " + " | ".join(f"{a} / variant" for a in anchors)
        + " | TFLOP/s | % of bf16 peak | graph verified | clean reps |",
        "|---|---|---|" + "---|" * len(anchors) + "---|---|---|---|",
    ]
    tuned_notes = []
    for size, s in result["steps"].items():
        m, r, tf = s["median_s"], s["speedup"], s.get("tflops", {})
        verified = s.get("graph_verified", {})
        for name in [n for n in [*VARIANTS, "tuned"] if n in m]:
            share = f"{tf[name] / bf16 * 100:.1f}%" if bf16 and name in tf else "-"
            ratios = " | ".join(_fmt_ratio(r.get(f"{a}/{name}")) for a in anchors)
            check = "-" if name not in verified else ("yes" if verified[name] else "NO (ran eagerly)")
            lines.append(
                f"| {size}² | {name} | {_ms(m.get(name))} | {ratios} | "
                f"{tf.get(name, float('nan')):.1f} | {share} | {check} | {_reps(s)} |"
            )
        t = s.get("tuned")
        if t:
            ms = t.get("choice_ms_in_tuning")
            tuned_notes.append(f"{size}²: `tuned` = {t['choice']} ({t['source']}; {t['preset']}; tuning "
                               f"{t['tuning_s']:.1f} s" + (f", {ms:.2f} ms per step of restore()'s own step" if ms else "")
                               + ")")
    lines.append("")
    if tuned_notes:
        lines += ["The tuned default, chosen by restore()'s tuning with a fresh cache and timed above on the "
                  "same step as the other rows: " + "; ".join(tuned_notes) + ".", ""]
    not_run = result.get("config", {}).get("not_run") or {}
    if not_run:
        lines += ["Not run: " + ", ".join(f"{k} ({v})" for k, v in not_run.items()) + ".", ""]
    return lines


def _render_profile(prof: Dict[str, Any]) -> List[str]:
    first = next(iter(prof["variants"].values()))
    lines = [
        f"torch.profiler at {prof['size']}²: of {first.get('rounds', 1)} profiled steps per variant "
        "(the variants taking turns, after warm-up), the one with the median wall time:",
        "",
    ]
    for name, p in prof["variants"].items():
        unit = "self device ms" if p["sort_key"] == "self_device_ms" else "self CPU ms"
        lines += [
            f"**{name}** -- {p['total_ms']:.1f} ms of {unit.split(' ms')[0]} time "
            f"({p['wall_ms_under_profiler']:.1f} ms wall under the profiler; all steps' wall ms: "
            + ", ".join(f"{w:.0f}" for w in p.get("wall_ms_each", [])) + ")",
            "",
            f"| op | calls | {unit} | share |",
            "|---|---|---|---|",
        ]
        for r in p["top"]:
            v = r[p["sort_key"]]
            lines.append(f"| `{r['name']}` | {r['calls']} | {v:.1f} | {100 * v / max(p['total_ms'], 1e-9):.1f}% |")
        lines += ["", "| category | ms | share |", "|---|---|---|"]
        for cat, v in p["categories"].items():
            lines.append(f"| {cat} | {v:.1f} | {100 * v / max(p['total_ms'], 1e-9):.1f}% |")
        lines.append("")
    return lines


def _write(result: Dict[str, Any], out: Path, markdown: bool = True) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out)  # atomic: a run killed mid-write leaves the previous complete file
    if markdown:
        out.with_suffix(".md").write_text(render_markdown(result))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Interleaved step and op benchmarks of the fast vs reference DIP network.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="image sizes (default cpu: 64 128 256; cuda: 256 512 1024)")
    p.add_argument("--repeats", type=int, default=5, help="clean timed repetitions wanted per variant (>= 5 for reported numbers)")
    p.add_argument("--max-repeats", type=int, default=None, help="stop after this many repetitions even if fewer are clean (default 3x --repeats)")
    p.add_argument("--clean-tol", type=float, default=0.3, help="a repetition is clean when every sample is within this fraction of its variant's fastest")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls per variant before timing (compile gets one more)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--min-sample-s", type=float, default=None, help="calls per sample are chosen to last at least this (default cpu 0.05, cuda 0.2)")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    p.add_argument("--compile-sizes", type=int, nargs="*", default=None, help="sizes at which to compile (default cpu: 64 128; cuda: all)")
    p.add_argument("--autotune", action="store_true",
                   help="also time torch.compile(reference, mode='max-autotune') as compile_autotune (slow to compile)")
    p.add_argument(
        "--channels-last",
        choices=("both", "only", "off"),
        default="both",
        help="fast network layouts: both (NCHW and channels_last), only channels_last, or NCHW only",
    )
    p.add_argument("--no-probe", action="store_true", help="skip the forward-conv rate probes")
    p.add_argument("--no-graph", action="store_true", help="CUDA: skip the CUDA-graph step variants")
    p.add_argument("--no-steps", action="store_true", help="skip the step benchmarks")
    p.add_argument("--variants", nargs="+", default=None, choices=sorted(VARIANTS), metavar="VARIANT",
                   help="time exactly these step variants (the graph ones are left out on the CPU); "
                        f"known: {', '.join(VARIANTS)}")
    p.add_argument("--tuned", action="store_true",
                   help="also time 'tuned': the step restore() chooses with its defaults at each size, tuned "
                        "here with a fresh cache (the choice, its tuning time and candidates go to the JSON)")
    p.add_argument("--no-ops", action="store_true", help="skip the custom-op benchmarks")
    p.add_argument("--op-size", type=int, default=None, help="image size the op shapes come from (default cpu 128, cuda 512)")
    p.add_argument("--op-dtypes", nargs="+", choices=sorted(OP_DTYPES), default=None,
                   help="activation dtypes of the bn_act and upsample_cat cases (default cpu: fp32; cuda: fp32 bf16)")
    p.add_argument("--op-filter", default=None, help="time only the op cases whose name matches this regex")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="size of the reference copy_ the op bandwidths are compared with (default cpu 256, cuda 1024)")
    p.add_argument("--bf16", action="store_true",
                   help="CPU: also time the fast and reference steps under bf16 autocast (opt-in precision)")
    p.add_argument("--profile", action="store_true", help="torch.profiler per-op breakdown of fast and reference steps (alternating)")
    p.add_argument("--profile-size", type=int, default=None, help="image size of the profiled step (default cpu 128, cuda 512)")
    p.add_argument("--profile-rounds", type=int, default=5, help="profiled steps per variant (alternating); the median one is shown")
    p.add_argument("--no-cudnn-benchmark", action="store_true", help="leave cudnn.benchmark off (the paper's code turns it on)")
    p.add_argument("--seed", type=int, default=0)
    add_host_memory_option(p, "system")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/<device>.json; the .md goes beside it)")
    p.add_argument("--no-markdown", action="store_true", help="write only the JSON (the tables are still printed)")
    p.add_argument("--quiet", action="store_true", help="no per-repetition log")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parse(argv)
    with host_memory(args.host_memory):
        return _main(args, argv)


def _main(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: use --device cpu", file=sys.stderr)
        return 2
    is_cuda = device.type == "cuda"
    sizes = args.sizes or ([256, 512, 1024] if is_cuda else [64, 128, 256])
    compile_sizes = set(args.compile_sizes if args.compile_sizes is not None else (sizes if is_cuda else [64, 128]))
    if args.no_compile:
        compile_sizes = set()
    min_sample_s = args.min_sample_s if args.min_sample_s is not None else (0.2 if is_cuda else 0.05)
    if is_cuda:
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
    if args.repeats < 5:
        print(f"note: --repeats {args.repeats} < 5; fine for a smoke test, not for reported numbers")
    out = args.out or RESULTS_DIR / f"{device.type}.json"
    log = None if args.quiet else (lambda s: print(s, flush=True))

    if not rerun_if_extension_stale():
        print(f"dip_fast's fused ops are not loaded ({_ops.LOAD_ERROR or 'stale build'}): "
              "the fast network would be the reference. Rebuild with `pip install --no-build-isolation -e .`.",
              file=sys.stderr)
        return 1

    layouts = {"both": ["fast", "fast_cl"], "only": ["fast_cl"], "off": ["fast"]}[args.channels_last]
    not_run: Dict[str, str] = {}
    if args.variants and not is_cuda:
        not_run = {v: "needs CUDA" for v in args.variants if VARIANTS[v].mode == "graph"}
    if args.tuned:
        import tempfile

        # A fresh cache: the tuning measures, as on a user's first run.
        os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="dip-fast-tuning-")
    result: Dict[str, Any] = {
        "schema": "dip_fast-bench-compare/1",
        "json_name": os.path.relpath(out, REPO_ROOT) if out.is_absolute() and REPO_ROOT in out.parents else str(out),
        "command": "bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": dict(environment(device), host_memory=args.host_memory),
        "config": {
            "sizes": sizes,
            "compile_sizes": sorted(compile_sizes),
            "compile_modes": ["default"] + (["max-autotune"] if args.autotune else []),
            "repeats": args.repeats,
            "max_repeats": args.max_repeats or 3 * args.repeats,
            "clean_tol": args.clean_tol,
            "warmup": args.warmup,
            "min_sample_s": min_sample_s,
            "network": PAPER_NETWORK,
            "reg_noise_std": REG_NOISE_STD,
            "optimizer": "Adam(lr=0.01), torch defaults",
            "probe": f"Conv2d({PROBE_CHANNELS}, {PROBE_CHANNELS}, 3, padding=1) forward at {PROBE_SIZE}x{PROBE_SIZE}",
            "variants": args.variants,
            "tuned": args.tuned,
            "not_run": not_run,
        },
        "steps": {},
    }
    env = result["environment"]
    if is_cuda and not args.no_steps:
        result["peak"] = peak_probe(device)
        print("peak matmul TFLOP/s: " + ", ".join(f"{k}={v:.0f}" for k, v in result["peak"].items()), flush=True)
    print(f"dip_fast bench: {device.type} ({env.get('gpu') or env['cpu_model']}), torch {env['torch']}, "
          f"commit {env['commit']}, {env['torch_threads']} threads -> {out}", flush=True)
    t_start = time.perf_counter()

    if not args.no_steps:
        for size in sizes:
            compiled = ["compile"] + (["compile_autotune"] if args.autotune else [])
            if args.variants:
                variants = [v for v in args.variants if v not in not_run]
            else:
                variants = list(layouts) + ["reference"] + (compiled if size in compile_sizes else [])
                if is_cuda:  # TF32 convolutions are PyTorch's CUDA default; on the CPU the flag changes nothing
                    variants.insert(variants.index("reference") + 1, "reference_default")
                if is_cuda and not args.no_graph:
                    variants += [v for v in CUDA_STEP_VARIANTS if v.startswith("fast_graph")]
                if args.bf16 and not is_cuda:
                    variants += list(CPU_BF16_VARIANTS)
            specs = dict(VARIANTS)
            tuned: Optional[Dict[str, Any]] = None
            if args.tuned:
                decision, tuned = tune_default(size, device, args.seed)
                specs["tuned"] = variant_for(decision.choice, f"restore()'s tuned default: {decision.choice.label}")
                variants.append("tuned")
                print(f"[tuned {size}x{size}] {tuned['choice']} ({tuned['source']}, tuning {tuned['tuning_s']:.1f} s; "
                      + ", ".join(f"{k} {v:.2f} ms" for k, v in tuned["candidates_ms"].items()) + ")", flush=True)
            print(f"[steps {size}x{size}] {', '.join(variants)}", flush=True)
            t0 = time.perf_counter()
            steps = build_steps(variants, size, device, seed=args.seed, specs=specs)
            fns: Dict[str, Callable[[], Any]] = dict(steps)
            probe_flops = 0.0
            if not args.no_probe:
                for cl in (False, True):
                    fn, probe_flops = conv_probe(device, cl, args.seed)
                    fns["probe_cl" if cl else "probe"] = fn
            load_before = _loadavg()
            timing = interleave(fns, device, repeats=args.repeats, warmup=args.warmup,
                                min_sample_s=min_sample_s, extra_warmup={"compile": 1, "compile_autotune": 1},
                                max_repeats=args.max_repeats, clean_tol=args.clean_tol, log=log)
            secs = kept_seconds(timing)
            med = medians(secs)
            speedup = {}
            fast_names = [v for v in variants if specs[v].net == "fast" or v == "tuned"]
            for other in ANCHORS:
                for fast in fast_names:
                    r = ratio_stats(secs, other, fast)
                    if r:
                        speedup[f"{other}/{fast}"] = r
            for slow, fast in (("reference_bf16", "fast_cl_bf16"), ("reference", "reference_bf16"),
                               ("fast_cl", "fast_cl_bf16"), ("reference", "reference_default"),
                               ("compile", "compile_autotune")):
                r = ratio_stats(secs, slow, fast)
                if r:
                    speedup[f"{slow}/{fast}"] = r
            entry: Dict[str, Any] = {
                "seconds": secs,
                "seconds_all_repetitions": timing["seconds"],
                "clean_repetitions": timing["clean"],
                "calls_per_sample": timing["calls_per_sample"],
                "warmup_s": timing["warmup_s"],
                "load_average_before": load_before,
                "load_average_after": _loadavg(),
                "median_s": med,
                "speedup": speedup,
                "flops": conv_flops(size),
                "elapsed_s": time.perf_counter() - t0,
                "graph_verified": graph_verified(steps),
            }
            if tuned is not None:
                entry["tuned"] = tuned
            entry["tflops"] = {name: entry["flops"]["step_flops"] / t / 1e12 for name, t in med.items()
                               if name in specs}
            if not set(layouts) <= set(variants):
                entry["faster_layout"] = "-"
            elif len(layouts) == 2:
                r = ratio_stats(secs, "fast", "fast_cl")
                entry["speedup"]["fast/fast_cl"] = r
                entry["faster_layout"] = _faster_layout(r)
            else:
                entry["faster_layout"] = "channels_last" if layouts == ["fast_cl"] else "NCHW"
            if not args.no_probe and set(layouts) <= set(variants):
                # Per repetition: the probe's rate in the faster layout, so the bound tracks the load.
                rates = [probe_flops / min(a, b) for a, b in zip(secs["probe"], secs["probe_cl"])]
                best_fast = [min(secs[k][i] for k in layouts) for i in range(len(secs["probe"]))]
                step_flops = entry["flops"]["step_flops"]
                eff = [step_flops / rate / t for rate, t in zip(rates, best_fast)]
                entry["conv_bound"] = {
                    "probe_flops": probe_flops,
                    "probe_gflops": statistics.median(rates) / 1e9,
                    "probe_gflops_nchw": probe_flops / med["probe"] / 1e9,
                    "probe_gflops_cl": probe_flops / med["probe_cl"] / 1e9,
                    "step_gflop": step_flops / 1e9,
                    "bound_ms": step_flops / statistics.median(rates) * 1e3,
                    "best_fast_ms": statistics.median(best_fast) * 1e3,
                    "efficiency": statistics.median(eff),
                    "efficiency_min": min(eff),
                    "efficiency_max": max(eff),
                }
            result["steps"][str(size)] = entry
            result["elapsed_s"] = time.perf_counter() - t_start
            _write(result, out, not args.no_markdown)
            del steps, fns
            gc.collect()
            if is_cuda:
                torch.cuda.empty_cache()

    if not args.no_ops:
        op_size = args.op_size or (512 if is_cuda else 128)
        print(f"[ops, shapes of a {op_size}x{op_size} image]", flush=True)
        op_dtypes = args.op_dtypes or (["fp32", "bf16"] if is_cuda else ["fp32"])
        cases, notes = op_cases(device, op_size, args.seed, op_dtypes)
        if args.op_filter:
            cases = [c for c in cases if re.search(args.op_filter, c.name)]
        copy_mib = args.copy_mib or (1024 if is_cuda else 256)
        result["ops"] = {"image_size": op_size, "dtypes": op_dtypes, "cases": [], "notes": notes,
                         "traffic": OP_TRAFFIC, "copy": {"mib": copy_mib, "gbps": []}}
        op_timing = dict(repeats=max(args.repeats, 7), warmup=args.warmup, min_sample_s=max(min_sample_s, 0.05),
                         clean_tol=args.clean_tol, log=None)

        def measure_copy() -> None:
            # Before and after the cases: the reference is the better of the two (clocks and neighbours vary).
            run, nbytes = copy_case(device, copy_mib)
            secs = kept_seconds(interleave({"copy": run}, device, **op_timing))["copy"]
            result["ops"]["copy"]["gbps"].append(nbytes / statistics.median(secs) / 1e9)
            result["ops"]["copy"]["bytes"] = nbytes
            del run
            gc.collect()
            if is_cuda:
                torch.cuda.empty_cache()

        measure_copy()
        print(f"  device copy ({copy_mib} MiB): {result['ops']['copy']['gbps'][0]:.0f} GB/s", flush=True)
        for case in cases:
            print(f"  {case.name} {case.shape}", flush=True)
            timing = interleave(case.variants, device, **op_timing)
            secs = kept_seconds(timing)
            med = medians(secs)
            result["ops"]["cases"].append({
                "name": case.name,
                "shape": case.shape,
                "dtype": case.dtype,
                "pairs": case.pairs,
                "seconds": secs,
                "seconds_all_repetitions": timing["seconds"],
                "clean_repetitions": timing["clean"],
                "calls_per_sample": timing["calls_per_sample"],
                "median_s": med,
                "speedup": {label: ratio_stats(secs, plain, fused) for label, fused, plain in case.pairs},
                "bytes": case.bytes,
                "gbps": {v: case.bytes[label] / med[v] / 1e9 for label, fused, plain in case.pairs
                         for v in (fused, plain) if label in case.bytes and med.get(v)},
            })
            _write(result, out, not args.no_markdown)
        del cases
        gc.collect()
        measure_copy()
        result["ops"]["copy"]["reference_gbps"] = max(result["ops"]["copy"]["gbps"])
        result["elapsed_s"] = time.perf_counter() - t_start
        _write(result, out, not args.no_markdown)

    if args.profile:
        psize = args.profile_size or (512 if is_cuda else 128)
        print(f"[profile {psize}x{psize}]", flush=True)
        fast_name = layouts[0]
        measured = result["steps"].get(str(psize), {})
        faster = measured.get("faster_layout")
        # Profile the layout this run found faster; without a step measurement, the one restore() uses
        # on this device (channels_last on the CPU).
        if "fast_cl" in layouts and (faster == "channels_last" or (not measured and device.type == "cpu")):
            fast_name = "fast_cl"
        steps = build_steps([fast_name, "reference"], psize, device, seed=args.seed)
        result["profile"] = {
            "size": psize,
            "variants": profile_steps(steps, device, warmup=args.warmup, rounds=args.profile_rounds),
        }
        result["elapsed_s"] = time.perf_counter() - t_start
        _write(result, out, not args.no_markdown)

    result["elapsed_s"] = time.perf_counter() - t_start
    _write(result, out, not args.no_markdown)
    print()
    print(render_markdown(result))
    print(f"total {result['elapsed_s']:.0f} s; wrote {out}" + ("" if args.no_markdown else f" and {out.with_suffix('.md')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
