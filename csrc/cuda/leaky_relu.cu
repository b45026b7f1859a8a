// CUDA kernels of the LeakyReLU op pair: a grid-stride loop over the
// elements of a dense tensor, the same per-element math as the CPU file
// (csrc/common/leaky_relu.h). Launched on the current stream, no host sync.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/alloc.h"
#include "../common/checks.h"
#include "../common/leaky_relu.h"
#include "launch.cuh"

namespace dip_fast {
namespace {

template <typename scalar_t>
__global__ void leaky_relu_forward_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                          int64_t n, float slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(leaky_relu<acc_t>(static_cast<acc_t>(in[i]), static_cast<acc_t>(slope)));
  }
}

template <typename scalar_t>
__global__ void leaky_relu_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ in,
                                           scalar_t* __restrict__ out, int64_t n, float slope) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = static_cast<scalar_t>(leaky_relu_grad<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(in[i]),
                                                          static_cast<acc_t>(slope)));
  }
}

at::Tensor leaky_relu_forward_cuda(const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  DIP_CHECK_FLOATING(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = working_memory_format(x);
  const auto xc = x.contiguous(fmt);
  auto y = new_output_like(xc, fmt);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_forward_cuda", [&] {
    leaky_relu_forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), n, static_cast<float>(slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor leaky_relu_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, double slope) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  DIP_CHECK_DEVICE(grad_out, at::kCUDA, "grad_out");
  DIP_CHECK_FLOATING(x, "x");
  DIP_CHECK_SAME_DTYPE(grad_out, x, "grad_out", "x");
  DIP_CHECK_SAME_SHAPE(grad_out, x, "grad_out", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = working_memory_format(x);
  const auto xc = x.contiguous(fmt);
  const auto gc = grad_out.contiguous(fmt);
  auto gx = new_output_like(xc, fmt);
  const int64_t n = xc.numel();
  if (n == 0) return gx;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "leaky_relu_backward_cuda", [&] {
    leaky_relu_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), n,
        static_cast<float>(slope));
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
