"""The bn_act op family, fused BatchNorm (training mode) + LeakyReLU + pad: fake kernels and wrapper.

``batch_norm_act(x, weight, bias, ...)`` computes, in two passes over ``x``,

    pad(leaky_relu(batch_norm(x, weight, bias, training=True), slope), pad, pad_mode)

which PyTorch does in five (statistics, normalise, activate, pad copy, plus the
read of each intermediate). The backward folds the pad's border gradients,
applies the LeakyReLU mask and the BatchNorm backward in two passes (one
reduction, one write of dx). ``slope=1`` gives plain BatchNorm (the paper's
BatchNorm after each concatenation has no activation).

What is saved for backward: ``x`` (the convolution's output) and the per-channel
mean and 1/std. Saving the activation instead and inverting LeakyReLU and the
affine map would spare one activation-sized buffer, but divides by gamma,
which loses precision as gamma approaches 0; at DIP's batch size of one, memory
is not the constraint, exactness is.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ops
from .._ops import check_float_tensor, require_extension, working_memory_format

__all__ = ["batch_norm_act", "PAD_MODES"]

#: pad_mode names accepted by :func:`batch_norm_act`, and their codes in the op.
PAD_MODES = {"zeros": 0, "reflect": 1}


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _register() -> None:
    @torch.library.register_fake("dip_fast::bn_act")
    def _(x, weight, bias, eps, slope, pad, pad_mode):
        n, c, h, w = x.shape
        fmt = working_memory_format(x)
        y = x.new_empty((n, c, h + 2 * pad, w + 2 * pad)).contiguous(memory_format=fmt)
        stats = x.new_empty((c,), dtype=_acc_dtype(x))
        return y, stats, stats.clone()

    @torch.library.register_fake("dip_fast::_bn_act_backward")
    def _(grad_y, x, weight, bias, mean, invstd, slope, pad, pad_mode):
        fmt = working_memory_format(x)
        return (
            torch.empty_like(x, memory_format=fmt),
            weight.new_empty(weight.shape),
            bias.new_empty(bias.shape),
        )

    # The autograd formula is C++ (csrc/ops/bn_act.cpp, beside the schemas): this op runs 30 times per training step, and a
    # Python formula costs ~40 us more per call.


_OPS = ("bn_act", "_bn_act_backward", "bn_act_running_stats_update")
if _ops.has_ops(*_OPS):
    _register()


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    eps: float = 1e-5,
    slope: float = 0.2,
    pad: int = 0,
    pad_mode: str = "reflect",
    running_mean: Optional[torch.Tensor] = None,
    running_var: Optional[torch.Tensor] = None,
    momentum: float = 0.1,
) -> torch.Tensor:
    """Training-mode BatchNorm, LeakyReLU and padding for the next convolution, fused.

    Args:
        x: ``N x C x H x W`` floating tensor (NCHW or channels_last; the output keeps channels_last).
        weight, bias: the BatchNorm affine parameters, shape ``[C]``.
        eps: added to the batch variance.
        slope: LeakyReLU's negative slope; ``1.0`` means no activation.
        pad: border added on each side, for the next convolution.
        pad_mode: ``"reflect"`` (like ``nn.ReflectionPad2d``; needs ``pad < H, W``) or ``"zeros"``.
        running_mean, running_var: updated in place like ``nn.BatchNorm2d`` does in training.
        momentum: the running statistics' update rate.

    Returns:
        ``N x C x (H + 2 pad) x (W + 2 pad)``. Differentiable with respect to x, weight and bias.
    """
    check_float_tensor(x, "x")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_float_tensor(t, name)
        if t.shape != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
    if pad_mode not in PAD_MODES:
        raise ValueError(f"pad_mode must be one of {sorted(PAD_MODES)}, got {pad_mode!r}")
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if pad_mode == "reflect" and pad >= min(x.shape[2], x.shape[3]):
        raise ValueError(f"reflection pad {pad} must be smaller than the image, got {tuple(x.shape[2:])}")
    require_extension(*_OPS)
    y, mean, invstd = torch.ops.dip_fast.bn_act(
        x, weight, bias, float(eps), float(slope), pad, PAD_MODES[pad_mode]
    )
    if running_mean is not None or running_var is not None:
        _update_running_stats(mean, invstd, eps, x, running_mean, running_var, momentum)
    return y


@torch.no_grad()
def _update_running_stats(mean, invstd, eps, x, running_mean, running_var, momentum) -> None:
    """The same update as nn.BatchNorm2d in training mode (unbiased variance in running_var), in one op."""
    count = x.shape[0] * x.shape[2] * x.shape[3]
    # The op updates both; a missing one gets a scratch buffer.
    running_mean = running_mean if running_mean is not None else torch.zeros_like(running_var)
    running_var = running_var if running_var is not None else torch.ones_like(running_mean)
    torch.ops.dip_fast.bn_act_running_stats_update(running_mean, running_var, mean, invstd, float(momentum), float(eps), count)
