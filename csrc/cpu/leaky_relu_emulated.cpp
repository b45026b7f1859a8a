// CPU emulation of the CUDA launch grid of leaky_relu (tests only).
//
// Replays every block and thread of the grid-stride launch that
// csrc/cuda/leaky_relu.cu makes (csrc/common/grid_stride.h), calling the same
// per-thread functions (csrc/common/leaky_relu_grid.h), threads in reverse
// order. Besides the op's output, each entry point returns a trace (int64):
//   [blocks, fewest writes, most writes]
// with the writes counted per output element, so a test can check that each
// element is written exactly once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/grid_stride.h"
#include "../common/leaky_relu_checks.h"
#include "../common/leaky_relu_grid.h"

// TEST ONLY. The schemas of the emulation ops live here, beside their only
// kernels, not in csrc/ops/leaky_relu.cpp: they are no part of the op family's
// interface (private names, `_` prefix and `_emulated` suffix), and a build
// without this file (DIP_FAST_TEST_OPS=0) has none of them.
TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("_leaky_relu_emulated(Tensor x, float slope) -> (Tensor, Tensor)");
  m.def("_leaky_relu_backward_emulated(Tensor grad_out, Tensor x, float slope) -> (Tensor, Tensor)");
}

namespace dip_fast {
namespace {

at::Tensor make_trace(int64_t blocks, const std::vector<int>& counts) {
  const auto mm = std::minmax_element(counts.begin(), counts.end());
  const int64_t lo = counts.empty() ? 0 : *mm.first, hi = counts.empty() ? 0 : *mm.second;
  return at::tensor(std::vector<int64_t>{blocks, lo, hi}, at::kLong);
}

// Calls body(block, thread) for every thread of the launch over n elements
// (none for n == 0: the CUDA entry points launch nothing then).
template <typename F>
int64_t for_each_thread(int64_t n, F&& body) {
  if (n == 0) return 0;
  const int64_t blocks = blocks_for(n);
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t t = kThreads - 1; t >= 0; --t) body(b, blocks, t);
  }
  return blocks;
}

std::tuple<at::Tensor, at::Tensor> forward_emulated(const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCPU, "x");
  const LeakyReluCall c = leaky_relu_forward_call(x);
  const int64_t n = c.x.numel();
  std::vector<int> counts(static_cast<size_t>(n), 0);
  int64_t blocks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_emulated", [&] {
    const scalar_t* in = c.x.const_data_ptr<scalar_t>();
    scalar_t* out = c.out.data_ptr<scalar_t>();
    blocks = for_each_thread(n, [&](int64_t b, int64_t nb, int64_t t) {
      leaky_relu_forward_thread<scalar_t, true>(in, out, n, slope, b, kThreads, nb, t,
                                                counts.data());
    });
  });
  return {c.out, make_trace(blocks, counts)};
}

std::tuple<at::Tensor, at::Tensor> backward_emulated(const at::Tensor& grad_out, const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCPU, "x");
  DIP_CHECK_DEVICE(grad_out, at::kCPU, "grad_out");
  const LeakyReluCall c = leaky_relu_backward_call(grad_out, x);
  const int64_t n = c.x.numel();
  std::vector<int> counts(static_cast<size_t>(n), 0);
  int64_t blocks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_backward_emulated", [&] {
    const scalar_t *g = c.grad.const_data_ptr<scalar_t>(), *in = c.x.const_data_ptr<scalar_t>();
    scalar_t* out = c.out.data_ptr<scalar_t>();
    blocks = for_each_thread(n, [&](int64_t b, int64_t nb, int64_t t) {
      leaky_relu_backward_thread<scalar_t, true>(g, in, out, n, slope, b, kThreads, nb, t,
                                                 counts.data());
    });
  });
  return {c.out, make_trace(blocks, counts)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("_leaky_relu_emulated", &forward_emulated);
  m.impl("_leaky_relu_backward_emulated", &backward_emulated);
}

}  // namespace dip_fast
