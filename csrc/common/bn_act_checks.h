// Argument validation and geometry of the fused BatchNorm + LeakyReLU + pad
// ops, shared by the CPU and CUDA entry points (host code only).
#pragma once

#include <ATen/ATen.h>

#include "bn_act.h"
#include "alloc.h"
#include "checks.h"

namespace dip_fast {

struct BnActGeometry {
  int64_t N, C, H, W;  // input (the convolution's output)
  int64_t Ho, Wo;      // output, padded for the next convolution
  int pad, mode;
};

// Statistics and per-channel constants are kept in float for float, half and
// bfloat16 inputs, and in double for double.
inline at::ScalarType bn_act_acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline BnActGeometry bn_act_geometry(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                     double eps, int64_t pad, int64_t pad_mode) {
  DIP_CHECK_FLOATING(x, "x");
  DIP_CHECK_DIM(x, 4, "x");
  DIP_CHECK_FLOATING(weight, "weight");
  DIP_CHECK_FLOATING(bias, "bias");
  const int64_t C = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == C, "dip_fast: weight must have shape [", C, "], got ",
              weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == C, "dip_fast: bias must have shape [", C, "], got ", bias.sizes());
  TORCH_CHECK(eps >= 0, "dip_fast: eps must be >= 0, got ", eps);
  TORCH_CHECK(pad_mode == kPadZeros || pad_mode == kPadReflect,
              "dip_fast: pad_mode must be 0 (zeros) or 1 (reflect), got ", pad_mode);
  TORCH_CHECK(pad >= 0 && pad <= 64, "dip_fast: pad must be in [0, 64], got ", pad);
  const int64_t N = x.size(0), H = x.size(2), W = x.size(3);
  TORCH_CHECK(N * H * W > 1, "dip_fast: batch statistics need more than 1 value per channel, got x of shape ",
              x.sizes());
  TORCH_CHECK(pad_mode != kPadReflect || (pad < H && pad < W),
              "dip_fast: reflection pad ", pad, " must be smaller than the image (", H, "x", W, ")");
  // The CUDA kernels index planes and rows with 32-bit integers.
  TORCH_CHECK(N * C * (H + 2 * pad) * (W + 2 * pad) < (int64_t(1) << 31),
              "dip_fast: x is too large for 32-bit indexing (the padded output needs fewer than 2^31 elements)");
  return BnActGeometry{N, C, H, W, H + 2 * pad, W + 2 * pad, static_cast<int>(pad), static_cast<int>(pad_mode)};
}

inline void bn_act_check_backward(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& invstd, const BnActGeometry& g) {
  DIP_CHECK_SAME_DTYPE(grad_y, x, "grad_y", "x");
  TORCH_CHECK(grad_y.dim() == 4 && grad_y.size(0) == g.N && grad_y.size(1) == g.C && grad_y.size(2) == g.Ho &&
                  grad_y.size(3) == g.Wo,
              "dip_fast: grad_y must have shape [", g.N, ", ", g.C, ", ", g.Ho, ", ", g.Wo, "], got ",
              grad_y.sizes());
  const auto acc = bn_act_acc_type(x);
  for (const auto* t : {&mean, &invstd}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == g.C && t->scalar_type() == acc, "dip_fast: mean and invstd must be [",
                g.C, "] tensors of dtype ", acc, ", got ", t->sizes(), " ", t->scalar_type());
  }
}

// Inputs brought to the working layout and the outputs allocated: the common
// preamble of every forward entry point (CPU, CUDA, CUDA-grid emulation).
struct BnActForwardCall {
  BnActGeometry g;
  at::MemoryFormat fmt;
  at::Tensor x, weight, bias;  // x in fmt; weight, bias in the accumulation type
  at::Tensor y, mean, invstd;  // outputs
};

inline BnActForwardCall bn_act_forward_call(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                            double eps, int64_t pad, int64_t pad_mode) {
  const BnActGeometry g = bn_act_geometry(x, weight, bias, eps, pad, pad_mode);
  const auto fmt = working_memory_format(x);
  const auto acc = bn_act_acc_type(x);
  return BnActForwardCall{g,
                          fmt,
                          x.contiguous(fmt),
                          weight.to(acc).contiguous(),
                          bias.to(acc).contiguous(),
                          new_output({g.N, g.C, g.Ho, g.Wo}, x.options(), fmt),
                          new_output({g.C}, x.options().dtype(acc)),
                          new_output({g.C}, x.options().dtype(acc))};
}

// The same for the backward entry points.
struct BnActBackwardCall {
  BnActGeometry g;
  at::MemoryFormat fmt;
  at::Tensor grad_y, x, weight, bias, mean, invstd;  // grad_y, x in fmt; the rest in the accumulation type
  at::Tensor grad_x, grad_weight, grad_bias;         // outputs (weight/bias grads in the accumulation type)
};

inline BnActBackwardCall bn_act_backward_call(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
                                              const at::Tensor& bias, const at::Tensor& mean,
                                              const at::Tensor& invstd, int64_t pad, int64_t pad_mode) {
  const BnActGeometry g = bn_act_geometry(x, weight, bias, 0.0, pad, pad_mode);
  bn_act_check_backward(grad_y, x, mean, invstd, g);
  const auto fmt = working_memory_format(x);
  const auto acc = bn_act_acc_type(x);
  return BnActBackwardCall{g,
                           fmt,
                           grad_y.contiguous(fmt),
                           x.contiguous(fmt),
                           weight.to(acc).contiguous(),
                           bias.to(acc).contiguous(),
                           mean.contiguous(),
                           invstd.contiguous(),
                           new_output({g.N, g.C, g.H, g.W}, x.options(), fmt),
                           new_output({g.C}, x.options().dtype(acc)),
                           new_output({g.C}, x.options().dtype(acc))};
}

// Arguments of bn_act_running_stats_update: running stats of one float dtype,
// batch stats in the accumulation type, all [C] and dense.
inline void bn_running_stats_check(const at::Tensor& running_mean, const at::Tensor& running_var,
                                   const at::Tensor& mean, const at::Tensor& invstd, double momentum, int64_t count) {
  DIP_CHECK_FLOATING(running_mean, "running_mean");
  DIP_CHECK_SAME_DTYPE(running_mean, running_var, "running_mean", "running_var");
  DIP_CHECK_SAME_DTYPE(mean, invstd, "mean", "invstd");
  TORCH_CHECK(mean.scalar_type() == at::kFloat || mean.scalar_type() == at::kDouble,
              "dip_fast: mean and invstd must be float32 or float64, got ", mean.scalar_type());
  const int64_t C = mean.numel();
  for (const auto* t : {&running_mean, &running_var, &mean, &invstd}) {
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C && t->is_contiguous(),
                "dip_fast: running and batch statistics must be contiguous [", C, "] tensors, got ", t->sizes());
    TORCH_CHECK(t->device() == mean.device(), "dip_fast: all statistics must be on ", mean.device(), ", got ",
                t->device());
  }
  TORCH_CHECK(momentum >= 0.0 && momentum <= 1.0, "dip_fast: momentum must be in [0, 1], got ", momentum);
  TORCH_CHECK(count >= 1, "dip_fast: count must be >= 1, got ", count);
}

}  // namespace dip_fast
