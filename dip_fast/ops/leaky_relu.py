"""The leaky_relu op family: fake kernels, autograd formulas and the public wrapper.

Schemas: csrc/ops/leaky_relu.cpp; kernels: csrc/cpu/leaky_relu.cpp and
csrc/cuda/leaky_relu.cu. The autograd formulas are here (Python), not in C++:
the op runs once per step, so the per-call cost of a Python formula does not
show.
"""
from __future__ import annotations

import torch

from .. import _ops
from .._ops import check_float_tensor, require_extension, working_memory_format

__all__ = ["leaky_relu"]


def _register() -> None:
    @torch.library.register_fake("dip_fast::leaky_relu")
    def _(x: torch.Tensor, slope: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=working_memory_format(x))

    @torch.library.register_fake("dip_fast::_leaky_relu_backward")
    def _(grad_out: torch.Tensor, x: torch.Tensor, slope: float) -> torch.Tensor:
        return torch.empty_like(x, memory_format=working_memory_format(x))

    def setup_context(ctx, inputs, output) -> None:
        x, slope = inputs
        ctx.save_for_backward(x)
        ctx.slope = slope

    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.dip_fast._leaky_relu_backward(grad_out, x, ctx.slope), None

    torch.library.register_autograd("dip_fast::leaky_relu", backward, setup_context=setup_context)

    # The backward op is differentiable too (for double backward / gradgradcheck):
    # it is linear in grad_out with the same mask, and piecewise constant in x.
    def setup_context_bwd(ctx, inputs, output) -> None:
        _, x, slope = inputs
        ctx.save_for_backward(x)
        ctx.slope = slope

    def backward_bwd(ctx, grad_grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return torch.ops.dip_fast._leaky_relu_backward(grad_grad, x, ctx.slope), None, None

    torch.library.register_autograd("dip_fast::_leaky_relu_backward", backward_bwd, setup_context=setup_context_bwd)


_OPS = ("leaky_relu", "_leaky_relu_backward")
if _ops.has_ops(*_OPS):
    _register()


def leaky_relu(x: torch.Tensor, slope: float = 0.2) -> torch.Tensor:
    """LeakyReLU with a configurable negative slope, differentiable.

    Matches ``torch.nn.functional.leaky_relu(x, slope)``, including the
    derivative at 0 (which is ``slope``). Works on any layout; the output is
    NCHW-contiguous unless the input is channels_last.
    """
    check_float_tensor(x, "x")
    require_extension(*_OPS)
    return torch.ops.dip_fast.leaky_relu(x, float(slope))
