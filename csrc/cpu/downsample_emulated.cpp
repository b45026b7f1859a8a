// CPU emulation of the CUDA launch grids of downsample (tests only).
//
// Replays every block, plane and thread of the plan that csrc/cuda/downsample.cu
// launches (csrc/common/downsample_plan.h), phase by phase with a fresh shared
// tile per block, calling the same per-thread functions
// (csrc/common/downsample_grid.h), threads in reverse order within a phase.
// Besides the output, each entry point returns a trace (int64):
//   [blocks, shared bytes, fewest writes, most writes]
// with the writes counted per output element, so a test can check that each
// element is written exactly once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/downsample_checks.h"
#include "../common/downsample_grid.h"
#include "../common/downsample_plan.h"

// TEST ONLY. The schemas of the emulation ops live here, beside their only
// kernels, not in csrc/ops/downsample.cpp: they are no part of the op family's
// interface (private names, `_` prefix and `_emulated` suffix), and a build
// without this file (DIP_FAST_TEST_OPS=0) has none of them.
TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("_downsample_emulated(Tensor x, Tensor taps, int factor, int pad) -> (Tensor, Tensor)");
  m.def("_downsample_backward_emulated(Tensor grad_out, Tensor taps, int factor, int pad, int height, int width)"
        " -> (Tensor, Tensor)");
}

namespace dip_fast {
namespace {

at::Tensor make_trace(const LanczosPlan& p, const std::vector<int>& counts) {
  const auto mm = std::minmax_element(counts.begin(), counts.end());
  const int64_t lo = counts.empty() ? 0 : *mm.first, hi = counts.empty() ? 0 : *mm.second;
  const int64_t blocks = int64_t(p.grid_x) * p.grid_y * p.grid_z;
  return at::tensor(std::vector<int64_t>{blocks, static_cast<int64_t>(p.shared_bytes), lo, hi}, at::kLong);
}

// Runs phase1 then phase2 (each over all threads, in reverse) for every block
// and every plane that block loops over, with a shared tile per block.
template <typename acc_t, typename Phase1, typename Phase2>
void replay(const LanczosPlan& p, const acc_t* taps, Phase1&& phase1, Phase2&& phase2) {
  const int T = kLanczosThreads;
  std::vector<acc_t> shared(p.shared_bytes / sizeof(acc_t));
  std::copy(taps, taps + p.d.K, shared.begin());
  acc_t* tile = shared.data() + p.d.K;
  for (int bz = 0; bz < p.grid_z; ++bz) {
    for (int by = 0; by < p.grid_y; ++by) {
      for (int bx = 0; bx < p.grid_x; ++bx) {
        for (int plane = bz; plane < p.d.planes; plane += p.grid_z) {
          for (int t = T - 1; t >= 0; --t) phase1(shared.data(), tile, bx, by, plane, t, T);
          for (int t = T - 1; t >= 0; --t) phase2(shared.data(), tile, bx, by, plane, t, T);
        }
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& x, const at::Tensor& taps, int64_t factor,
                                                    int64_t pad) {
  const LanczosCall c = lanczos_forward_call(x, taps, factor, pad, at::kCPU);
  const LanczosPlan& p = c.plan;
  std::vector<int> counts(static_cast<size_t>(c.out.numel()), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "downsample_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = c.in.const_data_ptr<scalar_t>();
    scalar_t* yp = c.out.data_ptr<scalar_t>();
    replay<acc_t>(
        p, c.taps.const_data_ptr<acc_t>(),
        [&](const acc_t* tp, acc_t* tile, int bx, int by, int plane, int t, int T) {
          lanczos_fwd_vertical_thread<scalar_t, acc_t>(xp, tp, tile, p.d, bx, by, plane, t, T);
        },
        [&](const acc_t* tp, acc_t* tile, int bx, int by, int plane, int t, int T) {
          lanczos_fwd_horizontal_thread<scalar_t, acc_t, true>(tp, tile, yp, p.d, bx, by, plane, t, T, counts.data());
        });
  });
  return {c.out, make_trace(p, counts)};
}

std::tuple<at::Tensor, at::Tensor> backward_emulated(const at::Tensor& grad_out, const at::Tensor& taps,
                                                     int64_t factor, int64_t pad, int64_t height, int64_t width) {
  const LanczosCall c = lanczos_backward_call(grad_out, taps, factor, pad, height, width, at::kCPU);
  const LanczosPlan& p = c.plan;
  std::vector<int> counts(static_cast<size_t>(c.out.numel()), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(),
                                  "downsample_backward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = c.in.const_data_ptr<scalar_t>();
    scalar_t* xp = c.out.data_ptr<scalar_t>();
    replay<acc_t>(
        p, c.taps.const_data_ptr<acc_t>(),
        [&](const acc_t* tp, acc_t* tile, int bx, int by, int plane, int t, int T) {
          lanczos_bwd_horizontal_thread<scalar_t, acc_t>(gp, tp, tile, p.d, bx, by, plane, t, T);
        },
        [&](const acc_t* tp, acc_t* tile, int bx, int by, int plane, int t, int T) {
          lanczos_bwd_vertical_thread<scalar_t, acc_t, true>(tp, tile, xp, p.d, bx, by, plane, t, T, counts.data());
        });
  });
  return {c.out, make_trace(p, counts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("_downsample_emulated", &forward_emulated);
  m.impl("_downsample_backward_emulated", &backward_emulated);
}

}  // namespace dip_fast
