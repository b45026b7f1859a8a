#!/usr/bin/env python
"""Call every custom op, forward and backward, on small odd shapes: a workload for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/cuda_op_driver.py

The shapes are small and odd on purpose (H and W not multiples of a vector
width, channel counts 3 and 8, a view whose storage starts one element past a
16-byte boundary) so that the kernels' scalar heads and tails, pad bands and
fallback paths run, and a few hundred launches finish in seconds even
instrumented. Both layouts, float32 and bfloat16, every pad the network uses
(0, 1) and a wide one (3).

Every result is compared with the PyTorch sequence the op replaces
(loosely: this is a workload, the op tests check accuracy), so a kernel that
silently skips elements fails here even without a sanitizer. Under a
sanitizer pass ``--no-reference``: the PyTorch sequences would run cuDNN and
other vendor kernels under the tool too, whose reports are not ours to act
on; every output and gradient is then only checked to be finite, a
reduction that reads each element, so initcheck still sees an element an op
left unwritten. Run it with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under a
sanitizer: each tensor is then its own allocation, so an access past its end
is outside any allocation, and fresh memory is uninitialised for initcheck.

``--device cpu`` runs the same calls on the CPU kernels (a dry run of the script).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from typing import Callable, List, Tuple

import torch
import torch.nn.functional as F

LAYOUTS = ("nchw", "channels_last", "offset")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Loose: bfloat16 keeps 8 bits, and the backward of BatchNorm sums over the plane.
TOL = {torch.float32: 1e-3, torch.bfloat16: 6e-2}


def make(shape: Tuple[int, ...], dtype: torch.dtype, layout: str, device: str, gen: torch.Generator) -> torch.Tensor:
    """A leaf tensor in ``layout``; "offset" is an NCHW view whose data starts one element into its storage."""
    n = 1
    for s in shape:
        n *= s
    if layout == "offset":
        buf = torch.randn(n + 1, generator=gen).to(device, dtype)
        t = buf[1:].view(shape)
    else:
        t = torch.randn(shape, generator=gen).to(device, dtype)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
    return t.detach().requires_grad_(True)


def close(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, float(want.detach().abs().max()))
    err = float((got.detach().float() - want.detach().float()).abs().max())
    if not err <= TOL[dtype] * scale:  # also catches NaN
        raise AssertionError(f"{name}: max error {err:.3g} (scale {scale:.3g})")


#: Set by --no-reference: run the fused ops alone.
REFERENCE = True


def finite(name: str, t: torch.Tensor) -> None:
    if not bool(torch.isfinite(t).all()):
        raise AssertionError(f"{name}: non-finite values")


def check(name: str, fused: Callable[..., torch.Tensor], plain: Callable[..., torch.Tensor],
          inputs: List[torch.Tensor], dtype: torch.dtype, gen: torch.Generator) -> None:
    """Forward and backward of ``fused`` against ``plain`` on the same inputs."""
    y = fused(*inputs)
    g = torch.randn(y.shape, generator=gen).to(y.device, y.dtype)
    grads = torch.autograd.grad(y, inputs, g)
    if not REFERENCE:
        for i, t in enumerate((y, *grads)):
            finite(f"{name} output {i}", t)
        return
    y_ref = plain(*inputs)
    close(f"{name} forward", y, y_ref, dtype)
    grads_ref = torch.autograd.grad(y_ref, inputs, g)
    for i, (a, b) in enumerate(zip(grads, grads_ref)):
        close(f"{name} grad {i}", a, b, dtype)


def bn_act_cases(device: str, gen: torch.Generator) -> int:
    from dip_fast.ops.bn_act import batch_norm_act

    calls = 0
    for shape in ((1, 8, 17, 19), (2, 3, 9, 6)):
        for pad in (0, 1, 3):
            for layout in LAYOUTS:
                for dname, dtype in DTYPES.items():
                    for slope in (0.2, 1.0):
                        x = make(shape, dtype, layout, device, gen)
                        c = shape[1]
                        w = (torch.rand(c, generator=gen) + 0.5).to(device).requires_grad_(True)
                        b = torch.randn(c, generator=gen).to(device).requires_grad_(True)
                        mean, var = torch.zeros(c, device=device), torch.ones(c, device=device)

                        def fused(x, w, b, pad=pad, slope=slope, mean=mean, var=var):
                            return batch_norm_act(x, w, b, slope=slope, pad=pad, running_mean=mean, running_var=var)

                        def plain(x, w, b, pad=pad, slope=slope):
                            y = F.leaky_relu(F.batch_norm(x.float(), None, None, w, b, training=True), slope)
                            return F.pad(y, [pad] * 4, mode="reflect").to(x.dtype) if pad else y.to(x.dtype)

                        check(f"bn_act {shape} pad={pad} {layout} {dname} slope={slope}", fused, plain, [x, w, b],
                              dtype, gen)
                        calls += 1
    return calls


def upsample_cat_cases(device: str, gen: torch.Generator) -> int:
    from dip_fast.ops.upsample_cat import upsample_cat
    from dip_fast.reference.skip import upsample2x

    calls = 0
    # groups=3: the packed networks' per-group join (channels given per group).
    for (cs, cd, h, w), g in itertools.product(((3, 8, 17, 19), (0, 3, 5, 4)), (1, 3)):
        for mode in ("nearest", "bilinear"):
            for layout in LAYOUTS:
                for dname, dtype in DTYPES.items():
                    deep = make((1, g * cd, h, w), dtype, layout, device, gen)
                    inputs = [deep]
                    if cs:
                        inputs.insert(0, make((1, g * cs, 2 * h, 2 * w), dtype, layout, device, gen))

                    def fused(*t, mode=mode, n=len(inputs), g=g):
                        skip = t[0] if n == 2 else t[-1].new_empty((1, 0, 2 * t[-1].shape[2], 2 * t[-1].shape[3]))
                        return upsample_cat(skip, t[-1], mode, groups=g)

                    def plain(*t, mode=mode, n=len(inputs), g=g):
                        up = upsample2x(t[-1].float(), mode).to(t[-1].dtype)
                        if n == 1:
                            return up
                        hh, ww = up.shape[2], up.shape[3]
                        parts = [t[0].reshape(1, g, -1, hh, ww), up.reshape(1, g, -1, hh, ww)]
                        return torch.cat(parts, 2).reshape(1, -1, hh, ww)

                    check(f"upsample_cat Cs={cs} deep {(1, cd, h, w)} groups={g} {mode} {layout} {dname}", fused,
                          plain, inputs, dtype, gen)
                    calls += 1
    return calls


def lanczos_cases(device: str, gen: torch.Generator) -> int:
    from dip_fast.ops.downsample import Downsample
    from dip_fast.reference.downsampler import Downsampler

    calls = 0
    for factor, size in ((4, (37, 41)), (2, (19, 23))):
        for preserve in (True, False):
            fast = Downsample(3, factor, "lanczos2", phase=0.5, preserve_size=preserve)
            ref = Downsampler(3, factor, "lanczos2", phase=0.5, preserve_size=preserve).to(device)
            for layout in LAYOUTS:
                for dname, dtype in DTYPES.items():
                    x = make((1, 3, *size), dtype, layout, device, gen)
                    check(f"lanczos x{factor} {size} preserve={preserve} {layout} {dname}", fast,
                          lambda t, ref=ref: ref(t.float()).to(t.dtype), [x], dtype, gen)
                    calls += 1
    return calls


def leaky_relu_cases(device: str, gen: torch.Generator) -> int:
    from dip_fast.ops.leaky_relu import leaky_relu

    calls = 0
    for layout in LAYOUTS:
        for dname, dtype in DTYPES.items():
            x = make((1, 8, 17, 19), dtype, layout, device, gen)
            check(f"leaky_relu {layout} {dname}", leaky_relu, lambda t: F.leaky_relu(t, 0.2), [x], dtype, gen)
            calls += 1
    return calls


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-reference", action="store_true",
                   help="run only the fused ops (for a sanitizer) and check their results are finite")
    args = p.parse_args(argv)
    global REFERENCE
    REFERENCE = not args.no_reference
    from dip_fast import _ops

    if not _ops.available():
        print(f"cuda_op_driver: extension not loaded ({_ops.LOAD_ERROR})", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("cuda_op_driver: no CUDA device (use --device cpu for a dry run)", file=sys.stderr)
        return 2
    gen = torch.Generator().manual_seed(0)
    counts = {}
    for name, fn in (("bn_act", bn_act_cases), ("upsample_cat", upsample_cat_cases),
                     ("lanczos", lanczos_cases), ("leaky_relu", leaky_relu_cases)):
        counts[name] = fn(args.device, gen)
    if args.device == "cuda":
        torch.cuda.synchronize()  # a sanitizer reports launch errors at the latest here
    what = "checked against PyTorch" if REFERENCE else "run (finite results)"
    print(f"cuda_op_driver: forward + backward {what} on {args.device}: "
          + ", ".join(f"{n} {c} cases" for n, c in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
