// CPU emulation of the CUDA launch grids of upsample_cat (tests only).
//
// Replays every block and thread of the plan that csrc/cuda/upsample_cat.cu
// launches (csrc/common/upsample_cat_plan.h), calling the same per-thread
// functions (csrc/common/upsample_cat_grid.h), threads in reverse order.
// Besides the op's outputs, each entry point returns a trace (int64):
//   [V, fewest writes, most writes]
// with the writes counted per output element (every output of the pass), so
// a test can check that each element is written exactly once and which
// vector width (1 = the scalar path) ran.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/upsample_cat_checks.h"
#include "../common/upsample_cat_grid.h"
#include "../common/upsample_cat_plan.h"
#include "../common/vector_dispatch.h"

// TEST ONLY. The schemas of the emulation ops live here, beside their only
// kernels, not in csrc/ops/upsample_cat.cpp: they are no part of the op family's
// interface (private names, `_` prefix and `_emulated` suffix), and a build
// without this file (DIP_FAST_TEST_OPS=0) has none of them.
TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("_upsample_cat_emulated(Tensor skip, Tensor deep, int mode, int groups=1) -> (Tensor, Tensor)");
  m.def("_upsample_cat_backward_emulated(Tensor grad_out, int skip_channels, int mode, int groups=1) -> (Tensor, Tensor, Tensor)");
}

namespace dip_fast {
namespace {

at::Tensor make_trace(int V, const std::vector<int>& counts) {
  const auto mm = std::minmax_element(counts.begin(), counts.end());
  const int64_t lo = counts.empty() ? 0 : *mm.first, hi = counts.empty() ? 0 : *mm.second;
  return at::tensor(std::vector<int64_t>{V, lo, hi}, at::kLong);
}

// Calls body(block_x, block_y, thread) for every thread of a tiling's grid.
template <typename F>
void for_each_thread(const Tiling& t, F&& body) {
  for (int by = 0; by < tiling_blocks_y(t); ++by) {
    for (long long bx = 0; bx < tiling_blocks_x(t); ++bx) {
      for (int th = t.threads - 1; th >= 0; --th) body(static_cast<int>(bx), by, th);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& skip, const at::Tensor& deep, int64_t mode,
                                                    int64_t groups) {
  DIP_CHECK_DEVICE(skip, at::kCPU, "skip");
  DIP_CHECK_DEVICE(deep, at::kCPU, "deep");
  auto call = upsample_cat_forward_call(skip, deep, mode, groups);
  const UpsampleCatPlan p = upsample_cat_forward_plan(call);
  std::vector<int> counts(static_cast<size_t>(call.out.numel()), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, deep.scalar_type(), "upsample_cat_forward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const scalar_t *sp = call.skip.const_data_ptr<scalar_t>(), *dp = call.deep.const_data_ptr<scalar_t>();
      scalar_t* op = call.out.data_ptr<scalar_t>();
      for_each_thread(p.main, [&](int bx, int by, int t) {
        if (p.main.cl) {
          upsample_cat_forward_thread_cl<scalar_t, acc_t, V, true>(sp, dp, op, p.main, p.dims, bx, by, t, counts.data());
        } else {
          upsample_cat_forward_thread_nchw<scalar_t, acc_t, V, true>(sp, dp, op, p.main, p.dims, bx, t, counts.data());
        }
      });
    });
  });
  return {call.out, make_trace(p.V, counts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(const at::Tensor& grad_out, int64_t skip_channels,
                                                                 int64_t mode, int64_t groups) {
  DIP_CHECK_DEVICE(grad_out, at::kCPU, "grad_out");
  auto call = upsample_cat_backward_call(grad_out, skip_channels, mode, groups);
  const UpsampleCatPlan p = upsample_cat_backward_plan(call);
  const long long n_skip = call.grad_skip.numel();
  std::vector<int> counts(static_cast<size_t>(n_skip + call.grad_deep.numel()), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "upsample_cat_backward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const scalar_t* gp = call.grad.const_data_ptr<scalar_t>();
      scalar_t *gs = call.grad_skip.data_ptr<scalar_t>(), *gd = call.grad_deep.data_ptr<scalar_t>();
      int* skip_counts = counts.data();
      int* deep_counts = counts.data() + n_skip;
      if (n_skip > 0) {
        for_each_thread(p.skip, [&](int bx, int by, int t) {
          if (p.skip.cl) {
            upsample_cat_grad_skip_thread_cl<scalar_t, V, true>(gp, gs, p.skip, p.dims, bx, by, t, skip_counts);
          } else {
            upsample_cat_grad_skip_thread_nchw<scalar_t, V, true>(gp, gs, p.skip, p.dims, bx, t, skip_counts);
          }
        });
      }
      for_each_thread(p.main, [&](int bx, int by, int t) {
        if (p.main.cl) {
          upsample_cat_grad_deep_thread_cl<scalar_t, acc_t, V, true>(gp, gd, p.main, p.dims, bx, by, t, deep_counts);
        } else {
          upsample_cat_grad_deep_thread_nchw<scalar_t, acc_t, V, true>(gp, gd, p.main, p.dims, bx, t, deep_counts);
        }
      });
    });
  });
  return {call.grad_skip, call.grad_deep, make_trace(p.V, counts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("_upsample_cat_emulated", &forward_emulated);
  m.impl("_upsample_cat_backward_emulated", &backward_emulated);
}

}  // namespace dip_fast
