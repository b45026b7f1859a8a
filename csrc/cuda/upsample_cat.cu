// CUDA kernels of upsample_cat: one thread per output element, running the
// per-element functions of csrc/common/upsample_cat.h (which the CPU
// emulation op replays in the CI tests).
//   forward      each element of out: a skip value, or 4 deep values blended
//   grad_skip    each element: a copy of grad_out's skip channels
//   grad_deep    each element: a gather of the <= 4 x 4 output gradients
//                that read it (no atomics, deterministic)
// Everything runs on the current stream with no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../common/upsample_cat.h"
#include "../common/upsample_cat_checks.h"
#include "launch.cuh"

namespace dip_fast {
namespace {

template <typename scalar_t, typename acc_t>
__global__ void upsample_cat_forward_kernel(const scalar_t* __restrict__ skip, Strides4 ss,
                                            const scalar_t* __restrict__ deep, Strides4 sd, scalar_t* __restrict__ out,
                                            Strides4 so, UpsampleCatShape shape, long long total) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    upsample_cat_forward_element<scalar_t, acc_t>(e, skip, ss, deep, sd, out, so, shape);
  }
}

template <typename scalar_t>
__global__ void upsample_cat_grad_skip_kernel(const scalar_t* __restrict__ grad, Strides4 sg,
                                              scalar_t* __restrict__ grad_skip, Strides4 sgs, UpsampleCatShape shape,
                                              long long total) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    upsample_cat_grad_skip_element<scalar_t>(e, grad, sg, grad_skip, sgs, shape);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void upsample_cat_grad_deep_kernel(const scalar_t* __restrict__ grad, Strides4 sg,
                                              scalar_t* __restrict__ grad_deep, Strides4 sgd, UpsampleCatShape shape,
                                              long long total) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    upsample_cat_grad_deep_element<scalar_t, acc_t>(e, grad, sg, grad_deep, sgd, shape);
  }
}

at::Tensor upsample_cat_forward_cuda(const at::Tensor& skip, const at::Tensor& deep, int64_t mode) {
  DIP_CHECK_DEVICE(skip, at::kCUDA, "skip");
  DIP_CHECK_DEVICE(deep, at::kCUDA, "deep");
  const c10::cuda::CUDAGuard guard(deep.device());
  auto call = upsample_cat_forward_call(skip, deep, mode);
  const long long total = call.out.numel();
  if (total == 0) return call.out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, deep.scalar_type(), "upsample_cat_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    upsample_cat_forward_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
        call.skip.const_data_ptr<scalar_t>(), strides4_of(call.skip), call.deep.const_data_ptr<scalar_t>(),
        strides4_of(call.deep), call.out.data_ptr<scalar_t>(), strides4_of(call.out), call.shape, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> upsample_cat_backward_cuda(const at::Tensor& grad_out, int64_t skip_channels,
                                                              int64_t mode) {
  DIP_CHECK_DEVICE(grad_out, at::kCUDA, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  auto call = upsample_cat_backward_call(grad_out, skip_channels, mode);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "upsample_cat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const long long n_skip = call.grad_skip.numel(), n_deep = call.grad_deep.numel();
    if (n_skip > 0) {
      upsample_cat_grad_skip_kernel<scalar_t><<<blocks_for(n_skip), kThreads, 0, stream>>>(
          call.grad.const_data_ptr<scalar_t>(), strides4_of(call.grad), call.grad_skip.data_ptr<scalar_t>(),
          strides4_of(call.grad_skip), call.shape, n_skip);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (n_deep > 0) {
      upsample_cat_grad_deep_kernel<scalar_t, acc_t><<<blocks_for(n_deep), kThreads, 0, stream>>>(
          call.grad.const_data_ptr<scalar_t>(), strides4_of(call.grad), call.grad_deep.data_ptr<scalar_t>(),
          strides4_of(call.grad_deep), call.shape, n_deep);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {call.grad_skip, call.grad_deep};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("upsample_cat", &upsample_cat_forward_cuda);
  m.impl("upsample_cat_backward", &upsample_cat_backward_cuda);
}

}  // namespace dip_fast
