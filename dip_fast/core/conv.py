"""Convolution with a layout-aware backward, for the fast network on CPU.

Measured with oneDNN on a 2-core AMD EPYC (torch 2.14, one thread, 3x3
128->128 convolutions of a 128x128 image; bench/README.md has the method):

==========================  ========  =========
                            NCHW      channels_last
==========================  ========  =========
stride 1: forward            54.6 ms   44.8 ms
stride 1: input gradient     59.4 ms   45.8 ms
stride 1: weight gradient    55.8 ms   57.3 ms
stride 2: forward            13.7 ms   11.7 ms
stride 2: input gradient     20.7 ms   13.2 ms
stride 2: weight gradient    16.6 ms   52.4 ms
==========================  ========  =========

channels_last wins everywhere except the weight gradient of some strided
convolutions, where oneDNN's channels_last path is slower. There, the
weight gradient can be computed on NCHW copies of its two operands. Which
strided convolutions gain was measured on the shapes the paper's network
takes (2026-12-07, AMD EPYC Zen 4; time of the detour, copies included,
over the channels_last weight gradient; under 1 means the detour wins):

===================  ============  ============  ============  ============
input (C_in @ side)  fp32, 2 thr.  fp32, 1 thr.  bf16, 2 thr.  bf16, 1 thr.
===================  ============  ============  ============  ============
32 @ 130             1.49          1.34          1.83          2.13
32 @ 258             1.75          1.12          2.03          1.84
64 @ 130             1.56          1.17          1.74          1.76
128 @ 66             1.42          1.56          1.45          1.42
128 @ 130            **0.86**      **0.58**      1.71          1.59
128 @ 258            0.99          0.96          1.44          1.40
===================  ============  ============  ============  ============

So the detour is taken only in float32, for at least 128 input channels on
at least 128x128 pixels (:func:`_nchw_weight_grad_wins`); bf16 never takes
it. (An earlier version took it for every strided convolution: at 128² it
cost the step about 6 ms in fp32 and 2 ms in bf16.)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["conv2d"]


class _StridedConvNCHWWeightGrad(torch.autograd.Function):
    """conv2d (no padding) whose weight gradient runs in NCHW layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride: int, groups: int):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.groups = stride, groups
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, 0, 1, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        s = ctx.stride
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        args = ([s, s], [0, 0], [1, 1], False, [0, 0], ctx.groups)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, weight, bias_sizes, *args, [True, False, False]
            )[0]
        if need_w or (need_b and ctx.has_bias):
            _, grad_w, grad_b = torch.ops.aten.convolution_backward(
                grad_out.contiguous(), x.contiguous(), weight.contiguous(), bias_sizes, *args,
                [False, bool(need_w), bool(need_b and ctx.has_bias)],
            )
            if grad_w is not None:
                grad_w = grad_w.contiguous(memory_format=torch.channels_last)
        return grad_x, grad_w, grad_b, None, None


#: The NCHW weight gradient of a strided float32 convolution wins from this many input channels (per group) ...
NCHW_WEIGHT_GRAD_MIN_CHANNELS = 128
#: ... on at least this many input pixels (measured: 128 @ 130x130 wins, 128 @ 66x66 and 64 @ 130x130 lose).
NCHW_WEIGHT_GRAD_MIN_PIXELS = 128 * 128


def _nchw_weight_grad_wins(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the strided convolution's weight gradient is faster on NCHW copies (see the module docstring)."""
    return (x.dtype == torch.float32 and weight.shape[1] >= NCHW_WEIGHT_GRAD_MIN_CHANNELS
            and x.shape[2] * x.shape[3] >= NCHW_WEIGHT_GRAD_MIN_PIXELS)


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with the layout-aware backward described in the module docstring.

    The special path applies only where it was measured to win: a
    channels_last float32 CPU input of at least 128 channels (per group) on
    at least 128x128 pixels, stride > 1, no padding (the fast network pads
    before its convolutions), grad mode on, no autocast.  ``groups`` is ``F.conv2d``'s
    (a packed network's convolutions are grouped, one group per network).
    """
    special = (
        stride > 1
        and padding == 0
        and x.device.type == "cpu"
        and x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")  # bf16 never gains (module docstring)
        and _nchw_weight_grad_wins(x, weight)
    )
    if special:
        return _StridedConvNCHWWeightGrad.apply(x, weight, bias, stride, groups)
    return F.conv2d(x, weight, bias, stride, padding, 1, groups)
