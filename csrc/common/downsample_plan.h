// The launch plans of downsample's CUDA kernels (host code only),
// shared by csrc/cuda/downsample.cu and its CPU emulation, so the emulation
// replays exactly the grids the GPU runs.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "alloc.h"
#include "downsample_checks.h"
#include "downsample_grid.h"

namespace dip_fast {

struct LanczosPlan {
  LanczosDims d;
  int grid_x, grid_y, grid_z;  // z: planes, looped over when there are more
  size_t shared_bytes;         // taps + the tile of intermediate values
};

constexpr int kLanczosMaxGridZ = 65535;
constexpr size_t kLanczosMaxShared = 48 * 1024;  // without opting in to more

inline LanczosDims lanczos_dims(const at::Tensor& t, bool cl, int64_t K, int64_t factor, int64_t pad, int64_t H,
                                int64_t W) {
  LanczosDims d{};
  d.C = static_cast<int>(t.size(1));
  d.planes = static_cast<int>(t.size(0) * t.size(1));
  d.H = static_cast<int>(H);
  d.W = static_cast<int>(W);
  d.K = static_cast<int>(K);
  d.f = static_cast<int>(factor);
  d.pad = static_cast<int>(pad);
  d.Ho = static_cast<int>(lanczos::output_size(H, K, factor, pad));
  d.Wo = static_cast<int>(lanczos::output_size(W, K, factor, pad));
  d.cl = cl;
  d.by_C = FastDivmod(divisor_or_one(d.C));
  return d;
}

inline void lanczos_check_32bit(int64_t n, int64_t c, int64_t h, int64_t w) {
  TORCH_CHECK(n * c * h * w < (int64_t(1) << 31), "dip_fast: downsample input too large for 32-bit indexing");
}

inline LanczosPlan lanczos_forward_plan(const at::Tensor& x, bool cl, int64_t K, int64_t factor, int64_t pad) {
  lanczos_check_32bit(x.size(0), x.size(1), x.size(2) + 2 * pad, x.size(3) + 2 * pad);
  LanczosPlan p{};
  p.d = lanczos_dims(x, cl, K, factor, pad, x.size(2), x.size(3));
  const size_t acc_size = x.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  // The widest tile whose intermediate fits in shared memory.
  auto bytes = [&](int cols) { return acc_size * (K + size_t(kLanczosFwdRows) * ((cols - 1) * size_t(factor) + K)); };
  int cols = kLanczosFwdCols;
  while (cols > 1 && bytes(cols) > kLanczosMaxShared) cols /= 2;
  TORCH_CHECK(bytes(cols) <= kLanczosMaxShared, "dip_fast: downsample on CUDA supports up to ",
              kLanczosMaxShared / acc_size / (kLanczosFwdRows + 1), " taps, got ", K);
  p.d.tile_cols = cols;
  p.d.tcols = static_cast<int>((cols - 1) * factor + K);
  p.d.by_tcols = FastDivmod(static_cast<uint32_t>(p.d.tcols));
  p.d.by_tile_cols = FastDivmod(static_cast<uint32_t>(cols));
  p.shared_bytes = bytes(cols);
  p.grid_x = (p.d.Wo + cols - 1) / cols;
  p.grid_y = (p.d.Ho + kLanczosFwdRows - 1) / kLanczosFwdRows;
  p.grid_z = std::min(p.d.planes, kLanczosMaxGridZ);
  TORCH_CHECK(p.grid_y <= 65535, "dip_fast: image too tall for downsample on CUDA (", p.d.Ho, " output rows)");
  return p;
}

inline LanczosPlan lanczos_backward_plan(const at::Tensor& grad_out, bool cl, int64_t K, int64_t factor, int64_t pad,
                                         int64_t height, int64_t width) {
  lanczos_check_32bit(grad_out.size(0), grad_out.size(1), height + 2 * pad, width + 2 * pad);
  LanczosPlan p{};
  p.d = lanczos_dims(grad_out, cl, K, factor, pad, height, width);
  p.grid_x = (p.d.W + kLanczosBwdCols - 1) / kLanczosBwdCols;
  p.grid_y = (p.d.H + kLanczosBwdRows - 1) / kLanczosBwdRows;
  p.grid_z = std::min(p.d.planes, kLanczosMaxGridZ);
  // The most intermediate rows a tile needs (exact, over all row tiles).
  int max_rows = 1;
  for (int by = 0; by < p.grid_y; ++by) {
    int lo, rows;
    lanczos_bwd_rows(p.d, by, lo, rows);
    max_rows = std::max(max_rows, rows);
  }
  const size_t acc_size = grad_out.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  p.shared_bytes = acc_size * (K + size_t(max_rows) * kLanczosBwdCols);
  TORCH_CHECK(p.shared_bytes <= kLanczosMaxShared, "dip_fast: _downsample_backward on CUDA: the kernel (", K,
              " taps, factor ", factor, ") needs more shared memory than available");
  TORCH_CHECK(p.grid_y <= 65535, "dip_fast: image too tall for _downsample_backward on CUDA (", height,
              " rows)");
  return p;
}

// The checked inputs, in their working layout, the plan and the (poisoned in
// tests) output of one call: the common preamble of the CUDA entry points and
// of their emulation.
struct LanczosCall {
  at::Tensor in, taps, out;
  LanczosPlan plan;
};

inline LanczosCall lanczos_forward_call(const at::Tensor& x, const at::Tensor& taps, int64_t factor, int64_t pad,
                                        at::DeviceType device) {
  lanczos::check_args(x, "x", taps, factor, pad, device);
  const int64_t K = taps.numel();
  lanczos::check_extent(x.size(2), K, pad, "height");
  lanczos::check_extent(x.size(3), K, pad, "width");
  const auto fmt = working_memory_format(x);
  LanczosCall c;
  c.in = x.contiguous(fmt);
  c.taps = taps.contiguous();
  c.plan = lanczos_forward_plan(c.in, fmt == at::MemoryFormat::ChannelsLast, K, factor, pad);
  c.out = new_output({x.size(0), x.size(1), c.plan.d.Ho, c.plan.d.Wo}, x.options(), fmt);
  return c;
}

inline LanczosCall lanczos_backward_call(const at::Tensor& grad_out, const at::Tensor& taps, int64_t factor,
                                         int64_t pad, int64_t height, int64_t width, at::DeviceType device) {
  lanczos::check_backward_args(grad_out, taps, factor, pad, height, width, device);
  const auto fmt = working_memory_format(grad_out);
  LanczosCall c;
  c.in = grad_out.contiguous(fmt);
  c.taps = taps.contiguous();
  c.plan = lanczos_backward_plan(c.in, fmt == at::MemoryFormat::ChannelsLast, taps.numel(), factor, pad, height,
                                 width);
  c.out = new_output({grad_out.size(0), grad_out.size(1), height, width}, grad_out.options(), fmt);
  return c;
}

}  // namespace dip_fast
