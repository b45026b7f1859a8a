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

channels_last wins everywhere except the weight gradient of strided
convolutions, where oneDNN's channels_last path is 3x slower. So in
channels_last the strided convolution's weight gradient is computed on NCHW
copies of its two operands (two cheap copies, ~3 ms, against a 36 ms loss),
and everything else stays channels_last.
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


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding: int,
           groups: int = 1) -> torch.Tensor:
    """``F.conv2d`` with the layout-aware backward described in the module docstring.

    The special path applies only where it was measured to win: a
    channels_last CPU input, stride > 1, no padding (the fast network pads
    before its convolutions), grad mode on.  ``groups`` is ``F.conv2d``'s
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
    )
    if special:
        if torch.is_autocast_enabled("cpu"):
            # Autocast does not reach inside a custom Function's backward: cast here, so that
            # both directions see one dtype (autograd casts the gradients back to float32).
            dt = torch.get_autocast_dtype("cpu")
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        return _StridedConvNCHWWeightGrad.apply(x, weight, bias, stride, groups)
    return F.conv2d(x, weight, bias, stride, padding, 1, groups)
