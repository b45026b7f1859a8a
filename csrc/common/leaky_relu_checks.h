// Argument validation and output allocation of leaky_relu, shared by the CPU,
// CUDA and emulated entry points (host code only).
#pragma once

#include <ATen/ATen.h>

#include "alloc.h"
#include "checks.h"

namespace dip_fast {

// The inputs in their working layout (NCHW or channels_last, a no-op when
// already there) and the (poisoned in tests) output in the same layout: the
// kernels walk all three linearly.
struct LeakyReluCall {
  at::Tensor grad;  // backward only
  at::Tensor x, out;
};

inline LeakyReluCall leaky_relu_forward_call(const at::Tensor& x) {
  DIP_CHECK_FLOATING(x, "x");
  const auto fmt = working_memory_format(x);
  LeakyReluCall c;
  c.x = x.contiguous(fmt);
  c.out = new_output_like(c.x, fmt);
  return c;
}

inline LeakyReluCall leaky_relu_backward_call(const at::Tensor& grad_out, const at::Tensor& x) {
  DIP_CHECK_FLOATING(x, "x");
  DIP_CHECK_SAME_DTYPE(grad_out, x, "grad_out", "x");
  DIP_CHECK_SAME_SHAPE(grad_out, x, "grad_out", "x");
  const auto fmt = working_memory_format(x);
  LeakyReluCall c;
  c.x = x.contiguous(fmt);
  c.grad = grad_out.contiguous(fmt);
  c.out = new_output_like(c.x, fmt);
  return c;
}

}  // namespace dip_fast
