// CUDA kernels of the LeakyReLU op pair: a grid-stride loop over the
// elements of a dense tensor, the same per-element math as the CPU file
// (csrc/common/leaky_relu.h). The per-thread loop is in
// csrc/common/leaky_relu_grid.h and the grid in csrc/common/grid_stride.h,
// both shared with the CPU emulation (csrc/cpu/leaky_relu_emulated.cpp).
// Launched on the current stream, no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/leaky_relu_checks.h"
#include "../common/grid_stride.h"
#include "../common/leaky_relu_grid.h"

namespace dip_fast {
namespace {

template <typename scalar_t>
__global__ void leaky_relu_forward_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                          int64_t n, double slope) {
  leaky_relu_forward_thread<scalar_t, false>(in, out, n, slope, blockIdx.x, blockDim.x, gridDim.x, threadIdx.x,
                                             nullptr);
}

template <typename scalar_t>
__global__ void leaky_relu_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ in,
                                           scalar_t* __restrict__ out, int64_t n, double slope) {
  leaky_relu_backward_thread<scalar_t, false>(g, in, out, n, slope, blockIdx.x, blockDim.x, gridDim.x, threadIdx.x,
                                              nullptr);
}

at::Tensor leaky_relu_forward_cuda(const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const LeakyReluCall c = leaky_relu_forward_call(x);
  const at::Tensor &xc = c.x, &y = c.out;
  const int64_t n = xc.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_forward_cuda", [&] {
    leaky_relu_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor leaky_relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  DIP_CHECK_DEVICE(grad_out, at::kCUDA, "grad_out");
  const c10::cuda::CUDAGuard guard(x.device());
  const LeakyReluCall c = leaky_relu_backward_call(grad_out, x);
  const at::Tensor &xc = c.x, &gc = c.grad, &gx = c.out;
  const int64_t n = xc.numel();
  if (n == 0) return gx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_backward_cuda", [&] {
    leaky_relu_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n, slope);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("leaky_relu", &leaky_relu_forward_cuda);
  m.impl("_leaky_relu_backward", &leaky_relu_backward_cuda);
}

}  // namespace dip_fast
