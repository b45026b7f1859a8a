// CPU kernels of the LeakyReLU op pair (forward, backward).
//
// Elementwise, so any dense layout works: inputs are brought to their own
// suggested memory format (NCHW or channels_last, a no-op when already there)
// and walked linearly; the output keeps that layout.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/leaky_relu.h"
#include "../common/leaky_relu_checks.h"

namespace dip_fast {
namespace {

constexpr int64_t kGrain = 32768;  // elements per task: amortises the fork cost

at::Tensor leaky_relu_forward_cpu(const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCPU, "x");
  const LeakyReluCall c = leaky_relu_forward_call(x);
  const at::Tensor &xc = c.x, &y = c.out;
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    scalar_t* out = y.data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(slope);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<scalar_t>(leaky_relu<acc_t>(static_cast<acc_t>(in[i]), s));
      }
    });
  });
  return y;
}

at::Tensor leaky_relu_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCPU, "x");
  DIP_CHECK_DEVICE(grad_out, at::kCPU, "grad_out");
  const LeakyReluCall c = leaky_relu_backward_call(grad_out, x);
  const at::Tensor &xc = c.x, &gc = c.grad, &gx = c.out;
  const int64_t n = xc.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = xc.const_data_ptr<scalar_t>();
    const scalar_t* g = gc.const_data_ptr<scalar_t>();
    scalar_t* out = gx.data_ptr<scalar_t>();
    const acc_t s = static_cast<acc_t>(slope);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<scalar_t>(
            leaky_relu_grad<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(in[i]), s));
      }
    });
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("leaky_relu", &leaky_relu_forward_cpu);
  m.impl("_leaky_relu_backward", &leaky_relu_backward_cpu);
}

}  // namespace dip_fast
