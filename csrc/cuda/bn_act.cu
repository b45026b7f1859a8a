// CUDA kernels of the fused BatchNorm (training mode) + LeakyReLU + pad ops.
//
// Four kernels, the same math as csrc/cpu/bn_act.cpp through the helpers of
// csrc/common/bn_act.h:
//   stats      one block per channel: per-thread Welford, block merge (Chan)
//   normalize  one thread per output element (pad band included)
//   reduce     one block per channel: sum(dz), sum(dz * xhat), block sum
//   dx         one thread per input element
// The pad's gradients are gathered (fold_pad_grad), never scattered, so the
// backward uses no atomics and is deterministic. Everything runs on the
// current stream with no host synchronisation (CUDA-graph safe).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../common/alloc.h"
#include "../common/bn_act.h"
#include "../common/bn_act_checks.h"
#include "../common/bn_act_grid.h"
#include "launch.cuh"

namespace dip_fast {
namespace {

constexpr int kReduceThreads = kBnReduceThreads;
// The per-thread bodies live in csrc/common/bn_act_grid.h, shared with the
// CPU emulation that tests this file's indexing without a GPU.

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_kernel(const scalar_t* __restrict__ x, Strides4 sx, BnActShape shape, double eps,
                                acc_t* __restrict__ mean_out, acc_t* __restrict__ invstd_out) {
  const int c = blockIdx.x;
  __shared__ acc_t s_count[kReduceThreads], s_mean[kReduceThreads], s_m2[kReduceThreads];
  bn_stats_partial<scalar_t, acc_t>(x, sx, shape, c, threadIdx.x, blockDim.x, s_count[threadIdx.x],
                                    s_mean[threadIdx.x], s_m2[threadIdx.x]);
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {  // the tree the emulation replays
    if (threadIdx.x < stride) {
      const int o = threadIdx.x + stride;
      welford_merge<acc_t>(s_count[threadIdx.x], s_mean[threadIdx.x], s_m2[threadIdx.x], s_count[o], s_mean[o],
                           s_m2[o]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mean_out[c] = s_mean[0];
    invstd_out[c] = invstd_from<acc_t>(s_count[0], s_m2[0], eps);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_act_normalize_kernel(const scalar_t* __restrict__ x, Strides4 sx, scalar_t* __restrict__ y,
                                        Strides4 sy, BnActShape shape, long long total,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                        const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                        acc_t slope) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    bn_act_normalize_element<scalar_t, acc_t>(e, x, sx, y, sy, shape, mean, invstd, gamma, beta, slope);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_act_backward_reduce_kernel(const scalar_t* __restrict__ dy, Strides4 sdy,
                                              const scalar_t* __restrict__ x, Strides4 sx, BnActShape shape,
                                              const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                              const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                              acc_t slope, acc_t* __restrict__ sum_dz,
                                              acc_t* __restrict__ sum_dz_xhat) {
  const int c = blockIdx.x;
  __shared__ acc_t s_a[kReduceThreads], s_b[kReduceThreads];
  bn_act_backward_partial<scalar_t, acc_t>(dy, sdy, x, sx, shape, c, threadIdx.x, blockDim.x, mean, invstd, gamma,
                                           beta, slope, s_a[threadIdx.x], s_b[threadIdx.x]);
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      s_a[threadIdx.x] += s_a[threadIdx.x + stride];
      s_b[threadIdx.x] += s_b[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sum_dz[c] = s_a[0];
    sum_dz_xhat[c] = s_b[0] * invstd[c];
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_act_backward_dx_kernel(const scalar_t* __restrict__ dy, Strides4 sdy,
                                          const scalar_t* __restrict__ x, Strides4 sx, scalar_t* __restrict__ dx,
                                          BnActShape shape, long long total, const acc_t* __restrict__ mean,
                                          const acc_t* __restrict__ invstd, const acc_t* __restrict__ gamma,
                                          const acc_t* __restrict__ beta, acc_t slope,
                                          const acc_t* __restrict__ sum_dz, const acc_t* __restrict__ sum_dz_xhat) {
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    bn_act_dx_element<scalar_t, acc_t>(e, dy, sdy, x, sx, dx, shape, mean, invstd, gamma, beta, slope, sum_dz,
                                       sum_dz_xhat);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps, double slope,
                                                                   int64_t pad, int64_t pad_mode) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  DIP_CHECK_DEVICE(weight, at::kCUDA, "weight");
  DIP_CHECK_DEVICE(bias, at::kCUDA, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto call = bn_act_forward_call(x, weight, bias, eps, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const auto fmt = call.fmt;
  const auto &xc = call.x, &w = call.weight, &b = call.bias;
  auto y = call.y, mean = call.mean, invstd = call.invstd;
  if (g.C == 0) return {y, mean, invstd};
  const BnActShape shape = bn_act_shape(g, fmt);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_stats_kernel<scalar_t, acc_t><<<g.C, kReduceThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), strides4_of(xc), shape, eps, mean.data_ptr<acc_t>(), invstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_act_normalize_kernel<scalar_t, acc_t><<<blocks_for(y.numel()), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), strides4_of(xc), y.data_ptr<scalar_t>(), strides4_of(y), shape,
        static_cast<long long>(y.numel()), mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                                    double slope, int64_t pad, int64_t pad_mode) {
  for (const auto* t : {&grad_y, &x, &weight, &bias, &mean, &invstd}) {
    DIP_CHECK_DEVICE(*t, at::kCUDA, "every argument");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto call = bn_act_backward_call(grad_y, x, weight, bias, mean, invstd, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const auto fmt = call.fmt;
  const auto &gy = call.grad_y, &xc = call.x, &w = call.weight, &b = call.bias, &m = call.mean, &is = call.invstd;
  auto dx = call.grad_x, dw = call.grad_weight, db = call.grad_bias;
  if (g.C == 0) return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
  const BnActShape shape = bn_act_shape(g, fmt);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_act_backward_reduce_kernel<scalar_t, acc_t><<<g.C, kReduceThreads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), strides4_of(gy), xc.const_data_ptr<scalar_t>(), strides4_of(xc), shape,
        m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope), db.data_ptr<acc_t>(), dw.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_act_backward_dx_kernel<scalar_t, acc_t><<<blocks_for(dx.numel()), kThreads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), strides4_of(gy), xc.const_data_ptr<scalar_t>(), strides4_of(xc),
        dx.data_ptr<scalar_t>(), shape, static_cast<long long>(dx.numel()), m.const_data_ptr<acc_t>(),
        is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope),
        db.const_data_ptr<acc_t>(), dw.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
}

template <typename run_t, typename acc_t>
__global__ void bn_running_stats_kernel(run_t* __restrict__ running_mean, run_t* __restrict__ running_var,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd, int64_t C,
                                        double momentum, double eps, double unbias) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c < C) bn_running_update<run_t, acc_t>(running_mean[c], running_var[c], mean[c], invstd[c], momentum, eps, unbias);
}

void bn_running_stats_update_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  const at::Tensor* stats[] = {&running_mean, &running_var, &mean, &invstd};
  for (const at::Tensor* t : stats) DIP_CHECK_DEVICE(*t, at::kCUDA, "every statistic");
  bn_running_stats_check(running_mean, running_var, mean, invstd, momentum, count);
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = mean.numel();
  if (C == 0) return;
  const double unbias = count > 1 ? double(count) / double(count - 1) : 1.0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_running_stats_update_cuda", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_running_stats_update_cuda_acc", [&] {
      bn_running_stats_kernel<run_t, scalar_t><<<blocks_for(C), kThreads, 0, stream>>>(
          running_mean.data_ptr<run_t>(), running_var.data_ptr<run_t>(), mean.const_data_ptr<scalar_t>(),
          invstd.const_data_ptr<scalar_t>(), C, momentum, eps, unbias);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
  m.impl("bn_running_stats_update", &bn_running_stats_update_cuda);
}

}  // namespace dip_fast
