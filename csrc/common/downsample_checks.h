// Argument validation of the Lanczos downsampling ops, shared by the CPU and
// CUDA entry points (host code only).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"
#include "downsample.h"

namespace dip_fast {
namespace lanczos {

// The image (or gradient) `t` and the 1-D taps: device, dtype, rank, and sane factor and pad.
inline void check_args(const at::Tensor& t, const char* name, const at::Tensor& taps, int64_t factor, int64_t pad,
                       at::DeviceType device) {
  DIP_CHECK_DEVICE(t, device, name);
  DIP_CHECK_FLOATING(t, name);
  DIP_CHECK_DIM(t, 4, name);
  DIP_CHECK_DEVICE(taps, device, "taps");
  TORCH_CHECK(taps.device() == t.device(), "dip_fast: taps must be on the same device as ", name, " (", t.device(),
              "), got ", taps.device());
  DIP_CHECK_DIM(taps, 1, "taps");
  const auto want = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(taps.scalar_type() == want, "dip_fast: taps must be ", want, " for ", name, " of dtype ",
              t.scalar_type(), ", got ", taps.scalar_type());
  TORCH_CHECK(taps.numel() >= 1, "dip_fast: taps must not be empty");
  TORCH_CHECK(factor >= 1, "dip_fast: factor must be >= 1, got ", factor);
  TORCH_CHECK(pad >= 0, "dip_fast: pad must be >= 0, got ", pad);
  TORCH_CHECK(taps.numel() <= (1 << 20) && factor <= (1 << 20) && pad <= (1 << 20),
              "dip_fast: taps, factor and pad must be below 2^20");
}

inline void check_extent(int64_t len, int64_t K, int64_t pad, const char* what) {
  TORCH_CHECK(len >= 1 && len + 2 * pad >= K, "dip_fast: ", what, " ", len, " (+ 2 * pad ", pad,
              ") is smaller than the kernel (", K, " taps)");
}

// Checks of the backward op: the input size must fit the kernel and grad_out
// must have the forward's output size for it.
inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& taps, int64_t factor, int64_t pad,
                                int64_t height, int64_t width, at::DeviceType device) {
  check_args(grad_out, "grad_out", taps, factor, pad, device);
  const int64_t K = taps.numel();
  check_extent(height, K, pad, "height");
  check_extent(width, K, pad, "width");
  const int64_t Ho = output_size(height, K, factor, pad), Wo = output_size(width, K, factor, pad);
  TORCH_CHECK(grad_out.size(2) == Ho && grad_out.size(3) == Wo, "dip_fast: grad_out must be ", Ho, "x", Wo,
              " for an input of ", height, "x", width, ", got ", grad_out.size(2), "x", grad_out.size(3));
}

}  // namespace lanczos
}  // namespace dip_fast
