// Argument validation and output allocation of upsample_cat, shared by the
// CPU, CUDA and emulated entry points (host code only).
#pragma once

#include <ATen/ATen.h>

#include "alloc.h"
#include "checks.h"
#include "upsample_cat.h"

namespace dip_fast {

inline void upsample_cat_check_mode(int64_t mode) {
  TORCH_CHECK(mode == kUpsampleNearest || mode == kUpsampleBilinear,
              "dip_fast: upsample mode must be 0 (nearest) or 1 (bilinear), got ", mode);
}

struct UpsampleCatForwardCall {
  UpsampleCatShape shape;
  at::Tensor skip, deep;  // in the working layout
  at::Tensor out;
};

inline UpsampleCatForwardCall upsample_cat_forward_call(const at::Tensor& skip, const at::Tensor& deep, int64_t mode) {
  DIP_CHECK_FLOATING(skip, "skip");
  DIP_CHECK_FLOATING(deep, "deep");
  DIP_CHECK_DIM(skip, 4, "skip");
  DIP_CHECK_DIM(deep, 4, "deep");
  DIP_CHECK_SAME_DTYPE(skip, deep, "skip", "deep");
  TORCH_CHECK(skip.device() == deep.device(), "dip_fast: skip and deep must be on the same device, got ",
              skip.device(), " and ", deep.device());
  upsample_cat_check_mode(mode);
  const int64_t N = deep.size(0), Cd = deep.size(1), h = deep.size(2), w = deep.size(3);
  TORCH_CHECK(skip.size(0) == N && skip.size(2) == 2 * h && skip.size(3) == 2 * w,
              "dip_fast: skip must have shape [", N, ", Cs, ", 2 * h, ", ", 2 * w,
              "] (deep upsampled twice), got ", skip.sizes());
  const int64_t Cs = skip.size(1);
  TORCH_CHECK(Cd > 0 && h > 0 && w > 0, "dip_fast: deep must be non-empty, got shape ", deep.sizes());
  TORCH_CHECK(N * (Cs + Cd) * 4 * h * w < (int64_t(1) << 31), "dip_fast: the output is too large for 32-bit indexing");
  const auto fmt = working_memory_format(deep);
  auto out = new_output({N, Cs + Cd, 2 * h, 2 * w}, deep.options(), fmt);
  const UpsampleCatShape shape{static_cast<int>(N), static_cast<int>(Cs), static_cast<int>(Cd), static_cast<int>(2 * h),
                               static_cast<int>(2 * w), static_cast<int>(mode), fmt == at::MemoryFormat::ChannelsLast};
  return UpsampleCatForwardCall{shape, skip.contiguous(fmt), deep.contiguous(fmt), out};
}

struct UpsampleCatBackwardCall {
  UpsampleCatShape shape;
  at::Tensor grad;                  // in the working layout
  at::Tensor grad_skip, grad_deep;  // outputs, same layout
};

inline UpsampleCatBackwardCall upsample_cat_backward_call(const at::Tensor& grad_out, int64_t skip_channels,
                                                          int64_t mode) {
  DIP_CHECK_FLOATING(grad_out, "grad_out");
  DIP_CHECK_DIM(grad_out, 4, "grad_out");
  upsample_cat_check_mode(mode);
  const int64_t N = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  TORCH_CHECK(skip_channels >= 0 && skip_channels < C, "dip_fast: skip_channels must be in [0, ", C, "), got ",
              skip_channels);
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0 && H > 0 && W > 0, "dip_fast: grad_out's height and width must be even, got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.numel() < (int64_t(1) << 31), "dip_fast: grad_out is too large for 32-bit indexing");
  const auto fmt = working_memory_format(grad_out);
  const int64_t Cd = C - skip_channels;
  const UpsampleCatShape shape{static_cast<int>(N), static_cast<int>(skip_channels), static_cast<int>(Cd),
                               static_cast<int>(H), static_cast<int>(W), static_cast<int>(mode),
                               fmt == at::MemoryFormat::ChannelsLast};
  return UpsampleCatBackwardCall{shape, grad_out.contiguous(fmt),
                                 new_output({N, skip_channels, H, W}, grad_out.options(), fmt),
                                 new_output({N, Cd, H / 2, W / 2}, grad_out.options(), fmt)};
}

}  // namespace dip_fast
