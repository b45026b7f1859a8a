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

inline void upsample_cat_check_groups(int64_t groups) {
  TORCH_CHECK(groups >= 1, "dip_fast: upsample_cat groups must be >= 1, got ", groups);
}

// The shape the kernels see (see UpsampleCatShape) from the tensors' sizes:
// skip_c and deep_c count all G groups' channels (G divides both), and the
// groups are folded into the batch unless the layout is channels_last.
inline UpsampleCatShape upsample_cat_shape(int64_t N, int64_t G, int64_t skip_c, int64_t deep_c, int64_t H, int64_t W,
                                           int64_t mode, bool channels_last) {
  UpsampleCatShape s{};
  s.N = static_cast<int>(channels_last ? N : N * G);
  s.G = static_cast<int>(channels_last ? G : 1);
  s.Cs = static_cast<int>(skip_c / G);
  s.Cd = static_cast<int>(deep_c / G);
  s.H = static_cast<int>(H);
  s.W = static_cast<int>(W);
  s.mode = static_cast<int>(mode);
  s.channels_last = channels_last;
  return s;
}

struct UpsampleCatForwardCall {
  UpsampleCatShape shape;
  at::Tensor skip, deep;  // in the working layout
  at::Tensor out;
};

inline UpsampleCatForwardCall upsample_cat_forward_call(const at::Tensor& skip, const at::Tensor& deep, int64_t mode,
                                                        int64_t groups) {
  DIP_CHECK_FLOATING(skip, "skip");
  DIP_CHECK_FLOATING(deep, "deep");
  DIP_CHECK_DIM(skip, 4, "skip");
  DIP_CHECK_DIM(deep, 4, "deep");
  DIP_CHECK_SAME_DTYPE(skip, deep, "skip", "deep");
  TORCH_CHECK(skip.device() == deep.device(), "dip_fast: skip and deep must be on the same device, got ",
              skip.device(), " and ", deep.device());
  upsample_cat_check_mode(mode);
  upsample_cat_check_groups(groups);
  const int64_t N = deep.size(0), Cd = deep.size(1), h = deep.size(2), w = deep.size(3);
  TORCH_CHECK(skip.size(0) == N && skip.size(2) == 2 * h && skip.size(3) == 2 * w,
              "dip_fast: skip must have shape [", N, ", Cs, ", 2 * h, ", ", 2 * w,
              "] (deep upsampled twice), got ", skip.sizes());
  const int64_t Cs = skip.size(1);
  TORCH_CHECK(Cd > 0 && h > 0 && w > 0, "dip_fast: deep must be non-empty, got shape ", deep.sizes());
  TORCH_CHECK(Cs % groups == 0, "dip_fast: upsample_cat groups (", groups, ") must divide skip's channel count, got ",
              Cs);
  TORCH_CHECK(Cd % groups == 0, "dip_fast: upsample_cat groups (", groups, ") must divide deep's channel count, got ",
              Cd);
  TORCH_CHECK(N * (Cs + Cd) * 4 * h * w < (int64_t(1) << 31), "dip_fast: the output is too large for 32-bit indexing");
  const auto fmt = working_memory_format(deep);
  auto out = new_output({N, Cs + Cd, 2 * h, 2 * w}, deep.options(), fmt);
  const UpsampleCatShape shape =
      upsample_cat_shape(N, groups, Cs, Cd, 2 * h, 2 * w, mode, fmt == at::MemoryFormat::ChannelsLast);
  return UpsampleCatForwardCall{shape, skip.contiguous(fmt), deep.contiguous(fmt), out};
}

struct UpsampleCatBackwardCall {
  UpsampleCatShape shape;
  at::Tensor grad;                  // in the working layout
  at::Tensor grad_skip, grad_deep;  // outputs, same layout
};

// skip_channels: the skip's channel count over all groups (G * Cs), as the forward's skip has.
inline UpsampleCatBackwardCall upsample_cat_backward_call(const at::Tensor& grad_out, int64_t skip_channels,
                                                          int64_t mode, int64_t groups) {
  DIP_CHECK_FLOATING(grad_out, "grad_out");
  DIP_CHECK_DIM(grad_out, 4, "grad_out");
  upsample_cat_check_mode(mode);
  upsample_cat_check_groups(groups);
  const int64_t N = grad_out.size(0), C = grad_out.size(1), H = grad_out.size(2), W = grad_out.size(3);
  TORCH_CHECK(skip_channels >= 0 && skip_channels < C, "dip_fast: skip_channels must be in [0, ", C, "), got ",
              skip_channels);
  TORCH_CHECK(skip_channels % groups == 0 && C % groups == 0, "dip_fast: upsample_cat groups (", groups,
              ") must divide skip_channels (", skip_channels, ") and grad_out's channel count (", C, ")");
  TORCH_CHECK(H % 2 == 0 && W % 2 == 0 && H > 0 && W > 0, "dip_fast: grad_out's height and width must be even, got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.numel() < (int64_t(1) << 31), "dip_fast: grad_out is too large for 32-bit indexing");
  const auto fmt = working_memory_format(grad_out);
  const int64_t Cd = C - skip_channels;
  const UpsampleCatShape shape =
      upsample_cat_shape(N, groups, skip_channels, Cd, H, W, mode, fmt == at::MemoryFormat::ChannelsLast);
  return UpsampleCatBackwardCall{shape, grad_out.contiguous(fmt),
                                 new_output({N, skip_channels, H, W}, grad_out.options(), fmt),
                                 new_output({N, Cd, H / 2, W / 2}, grad_out.options(), fmt)};
}

}  // namespace dip_fast
