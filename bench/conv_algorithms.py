#!/usr/bin/env python
"""Can a convolution's backward beat oneDNN's on this CPU? Measured, per shape.

The fused network leaves its convolutions to oneDNN, and they are about 80%
of a training step (``bench/README.md``, "Where the time goes"). The 3x3
stride-1 convolutions carry almost all of the FLOPs, so this script times,
for each 3x3 stride-1 shape of the paper's denoising network at a given image
size, the three products of a convolution's training step computed in
different ways, on the same inputs, interleaved:

* ``forward``:   oneDNN (``F.conv2d``), NCHW and channels_last; and as 9
  *shifted GEMMs* (below).
* ``input grad``: oneDNN's ``convolution_backward``; a *forward* convolution
  of the zero-padded output gradient with the flipped, transposed weights
  (the textbook identity, which lets oneDNN use its faster forward kernel);
  and 9 shifted GEMMs accumulated into the input gradient.
* ``weight grad``: oneDNN's ``convolution_backward``; 9 shifted GEMMs; and
  im2col (``F.unfold``) followed by one GEMM.

Shifted GEMMs: the fast network pads before each convolution, so a 3x3
convolution is "valid" on an input of width ``W + 2``. Flatten each channel
of that input; then tap ``(i, j)`` of the kernel reads the flattened input at
offset ``i * (W + 2) + j``, and the whole convolution is 9 matrix products
over strided *views* (no im2col copy), with the output computed on rows of
width ``W + 2`` whose last two columns are discarded. The GEMMs are MKL's
(``torch.mm`` / ``addmm_``).

Also timed: MKL's sgemm on 2048^3 against a oneDNN forward convolution of
the same FLOP count, which says which library runs closer to the core's
peak.

Writes ``bench/results/conv-algorithms-<device>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare  # noqa: E402  (the interleaving harness and the environment record)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def paper_shapes(size: int) -> List[Tuple[str, int, int, int]]:
    """(name, in channels, out channels, output side) of the paper network's 3x3 stride-1 convolutions.

    The denoising network (5 scales of 128 channels, 4 skip channels): at
    scale ``k`` (side ``size / 2**k``) the down path's second convolution is
    128 -> 128 at ``size / 2**(k+1)`` and the up path's is 132 -> 128 at
    ``size / 2**k`` (132 = 4 skip + 128 upsampled channels).
    """
    shapes = []
    for k in range(5):
        side = size >> k
        shapes.append((f"up.{k}.conv", 132, 128, side))
        shapes.append((f"inner.{k}.conv", 128, 128, side // 2))
    return [s for s in shapes if s[3] >= 4]


def _shifted_views(flat: torch.Tensor, width: int, length: int) -> List[torch.Tensor]:
    """The 9 views (C x length) of a flattened padded input that tap (i, j) of a 3x3 kernel reads."""
    c = flat.shape[0]
    return [flat.as_strided((c, length), (flat.stride(0), 1), i * width + j) for i in range(3) for j in range(3)]


class ConvCase:
    """One convolution shape, with every algorithm as a zero-argument callable."""

    def __init__(self, c_in: int, c_out: int, side: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.c_in, self.c_out, self.side = c_in, c_out, side
        self.x = torch.randn(1, c_in, side + 2, side + 2, generator=g)  # already padded, as in the fast network
        self.w = torch.randn(c_out, c_in, 3, 3, generator=g) * (2.0 / (9 * c_in)) ** 0.5
        self.dy = torch.randn(1, c_out, side, side, generator=g)
        self.x_cl = self.x.contiguous(memory_format=torch.channels_last)
        self.w_cl = self.w.contiguous(memory_format=torch.channels_last)
        self.dy_cl = self.dy.contiguous(memory_format=torch.channels_last)
        self.wp = side + 2
        self.length = side * self.wp - 2  # the last row's two discarded columns would run past the buffer
        self.w_flip = self.w.flip(2, 3).transpose(0, 1).contiguous()  # C_in x C_out x 3 x 3
        self.w_taps_fwd = self.w.permute(2, 3, 0, 1).reshape(9, c_out, c_in).contiguous()
        self.w_taps_bwd = self.w.permute(2, 3, 1, 0).reshape(9, c_in, c_out).contiguous()

    @property
    def gflop(self) -> float:
        """FLOPs of one of the three products (forward, input grad, weight grad)."""
        return 2.0 * self.c_in * self.c_out * 9 * self.side**2 / 1e9

    def _conv_backward(self, dy, x, w, mask):
        return torch.ops.aten.convolution_backward(dy, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, mask)

    def _dy_rows(self) -> torch.Tensor:
        """dy on rows of width W + 2 (two zero columns), flattened: the GEMMs' layout."""
        return F.pad(self.dy, (0, 2)).view(self.c_out, -1)[:, : self.length]

    def algorithms(self) -> Dict[str, Callable[[], torch.Tensor]]:
        """name -> callable; names are ``<product>/<algorithm>``."""
        def fwd_shift():
            y = torch.zeros(self.c_out, self.side * self.wp)
            out = y[:, : self.length]
            for tap, view in enumerate(_shifted_views(self.x.view(self.c_in, -1), self.wp, self.length)):
                out.addmm_(self.w_taps_fwd[tap], view)
            return y.view(1, self.c_out, self.side, self.wp)[..., : self.side]

        def dx_shift():
            dx = torch.zeros(1, self.c_in, self.side + 2, self.wp)
            dy_rows = self._dy_rows()
            for tap, view in enumerate(_shifted_views(dx.view(self.c_in, -1), self.wp, self.length)):
                view.addmm_(self.w_taps_bwd[tap], dy_rows)
            return dx

        def dw_shift():
            dy_rows = self._dy_rows()
            taps = torch.empty(9, self.c_out, self.c_in)
            for tap, view in enumerate(_shifted_views(self.x.view(self.c_in, -1), self.wp, self.length)):
                torch.mm(dy_rows, view.t(), out=taps[tap])
            return taps.view(3, 3, self.c_out, self.c_in).permute(2, 3, 0, 1)

        def dw_im2col():
            cols = F.unfold(self.x, 3)[0]  # (C_in * 9) x (H * W)
            return (self.dy.view(self.c_out, -1) @ cols.t()).view(self.c_out, self.c_in, 3, 3)

        return {
            "forward/onednn": lambda: F.conv2d(self.x, self.w),
            "forward/onednn_cl": lambda: F.conv2d(self.x_cl, self.w_cl),
            "forward/shifted_gemm": fwd_shift,
            "input_grad/onednn": lambda: self._conv_backward(self.dy, self.x, self.w, [True, False, False])[0],
            "input_grad/onednn_cl": lambda: self._conv_backward(self.dy_cl, self.x_cl, self.w_cl, [True, False, False])[0],
            "input_grad/flipped_forward": lambda: F.conv2d(F.pad(self.dy, (2, 2, 2, 2)), self.w_flip),
            "input_grad/shifted_gemm": dx_shift,
            "weight_grad/onednn": lambda: self._conv_backward(self.dy, self.x, self.w, [False, True, False])[1],
            "weight_grad/onednn_cl": lambda: self._conv_backward(self.dy_cl, self.x_cl, self.w_cl, [False, True, False])[1],
            "weight_grad/shifted_gemm": dw_shift,
            "weight_grad/im2col_gemm": dw_im2col,
        }

    def check(self) -> Dict[str, float]:
        """Relative max error of every algorithm against oneDNN NCHW (they must agree before they are timed)."""
        algos = self.algorithms()
        errors = {}
        for name, fn in algos.items():
            product = name.split("/")[0]
            ref = algos[f"{product}/onednn"]()
            err = float((fn() - ref).abs().max() / ref.abs().max())
            if err > 1e-4:
                raise AssertionError(f"{name} disagrees with oneDNN: relative error {err:.2e}")
            errors[name] = err
        return errors


def gemm_vs_conv(repeats: int) -> Dict[str, Any]:
    """MKL sgemm 2048^3 against a oneDNN 3x3 128->128 forward convolution at 128x128 (channels_last), GFLOP/s."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    case = ConvCase(128, 128, 128)
    algos = case.algorithms()
    timing = compare.interleave(
        {"sgemm_2048": lambda: a @ b, "conv_onednn_cl": algos["forward/onednn_cl"]},
        torch.device("cpu"), repeats=repeats, warmup=2, min_sample_s=0.2,
    )
    med = compare.medians(compare.kept_seconds(timing))
    return {
        "timing": timing,
        "gflops": {"sgemm_2048": 2 * 2048**3 / 1e9 / med["sgemm_2048"], "conv_onednn_cl": case.gflop / med["conv_onednn_cl"]},
    }


def measure(size: int, repeats: int, log: Callable[[str], None]) -> List[Dict[str, Any]]:
    rows = []
    for name, c_in, c_out, side in paper_shapes(size):
        case = ConvCase(c_in, c_out, side)
        errors = case.check()
        log(f"  {name}: {c_in}->{c_out} at {side}x{side}")
        timing = compare.interleave(case.algorithms(), torch.device("cpu"), repeats=repeats, warmup=2, min_sample_s=0.05)
        med = compare.medians(compare.kept_seconds(timing))
        rows.append({
            "layer": name, "c_in": c_in, "c_out": c_out, "side": side, "gflop": case.gflop,
            "median_s": med, "max_rel_error": errors, "timing": timing,
        })
    return rows


def render(result: Dict[str, Any]) -> str:
    env = result["environment"]
    lines = [
        f"# Convolution algorithms, CPU ({env['date']}, commit {env['commit']}, {env['cpu_model']}, "
        f"{env['torch_threads']} thread(s), torch {env['torch']})",
        "",
        "GFLOP/s of each algorithm (higher is better; median of clean interleaved repetitions). "
        "`cl`: channels_last. Best of each product in bold.",
        "",
    ]
    products = ("forward", "input_grad", "weight_grad")
    names = [n for n in result["rows"][0]["median_s"]] if result["rows"] else []
    lines.append("| layer | shape | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---:|" * len(names))
    for row in result["rows"]:
        rates = {n: row["gflop"] / t for n, t in row["median_s"].items()}
        best = {p: max(v for n, v in rates.items() if n.startswith(p)) for p in products}
        cells = []
        for n in names:
            v = rates[n]
            cells.append(f"**{v:.0f}**" if v == best[n.split('/')[0]] else f"{v:.0f}")
        lines.append(f"| {row['layer']} | {row['c_in']}->{row['c_out']} @ {row['side']}² | " + " | ".join(cells) + " |")
    gv = result.get("gemm_vs_conv")
    if gv:
        lines += ["", f"MKL sgemm 2048³: {gv['gflops']['sgemm_2048']:.0f} GFLOP/s; oneDNN 3x3 128->128 conv at 128² "
                  f"(channels_last): {gv['gflops']['conv_onednn_cl']:.0f} GFLOP/s."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=128, help="image side of the paper network (default 128)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON path (default results/conv-algorithms-cpu-<threads>t.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or RESULTS_DIR / f"conv-algorithms-cpu-{torch.get_num_threads()}t.json"
    log = lambda s: print(s, flush=True)  # noqa: E731
    result: Dict[str, Any] = {"environment": compare.environment(torch.device("cpu")), "size": args.size}
    result["rows"] = measure(args.size, args.repeats, log)
    result["gemm_vs_conv"] = gemm_vs_conv(args.repeats)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    md = render(result)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
