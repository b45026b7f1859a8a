// CUDA kernels of the fused BatchNorm (training mode) + LeakyReLU + pad ops.
//
// Three kernels a pass, planned by csrc/common/bn_act_plan.h and written in
// csrc/common/bn_act_grid.h (the design is described there):
//   forward   stats partials -> finalize (mean, invstd) -> normalize + pad
//   backward  sum(dz), sum(dz * (x - mean)) partials -> finalize -> grad_x
// The same math as csrc/cpu/bn_act.cpp through csrc/common/bn_act.h. The pad's
// gradients are gathered, never scattered: no atomics, deterministic. Everything
// runs on the current stream with no host synchronisation (CUDA-graph safe).
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
#include "../common/bn_act_plan.h"
#include "../common/grid_stride.h"
#include "../common/vector_dispatch.h"

namespace dip_fast {
namespace {

// ---------------------------------------------------------------------------
// Kernels: thin shells around the per-thread functions of bn_act_grid.h, which
// the CPU emulation (csrc/cpu/bn_act_emulated.cpp) runs over the same plan.
// ---------------------------------------------------------------------------

// Writes the block's partial of channel c (NCHW) to ws[part][c] after a fixed
// tree over the block's threads.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_stats_nchw_kernel(const scalar_t* __restrict__ x, Tiling g,
                                                                   int parts, acc_t* __restrict__ ws) {
  __shared__ acc_t s_cnt[kBnThreads], s_mean[kBnThreads], s_m2[kBnThreads];
  const int part = blockIdx.x, c = blockIdx.y, t = threadIdx.x;
  bn_stats_thread_nchw<scalar_t, acc_t, V>(x, g, parts, part, c, t, s_cnt[t], s_mean[t], s_m2[t]);
  __syncthreads();
  for (int stride = kBnThreads / 2; stride > 0; stride /= 2) {
    tree_level_welford<acc_t>(s_cnt, s_mean, s_m2, t, stride, kBnThreads, 1, 0);
    __syncthreads();
  }
  if (t == 0) {
    const int C = g.C;
    ws[part * C + c] = s_cnt[0];
    ws[(parts + part) * C + c] = s_mean[0];
    ws[(2 * parts + part) * C + c] = s_m2[0];
  }
}

// channels_last: thread (cvl, r) holds V channels; a tree over the R pixel
// lanes, then lane r == 0 writes the V channels' partials.
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_stats_cl_kernel(const scalar_t* __restrict__ x, Tiling g,
                                                                 int parts, acc_t* __restrict__ ws) {
  __shared__ acc_t s_cnt[kBnThreads * V], s_mean[kBnThreads * V], s_m2[kBnThreads * V];
  const int part = blockIdx.x, t = threadIdx.x;
  uint32_t r, cvl;
  g.by_Cb.divmod(t, r, cvl);
  const int cv = blockIdx.y * g.Cb + static_cast<int>(cvl);
  const int width = g.Cb * V, slot = static_cast<int>(r) * width + static_cast<int>(cvl) * V;
  acc_t cnt, mean[V], m2[V];
  bn_stats_thread_cl<scalar_t, acc_t, V>(x, g, parts, part, cv, static_cast<int>(r), cnt, mean, m2);
  for (int l = 0; l < V; ++l) {
    s_cnt[slot + l] = cnt;
    s_mean[slot + l] = mean[l];
    s_m2[slot + l] = m2[l];
  }
  __syncthreads();
  for (int stride = bn_pow2_ceil(g.R) / 2; stride > 0; stride /= 2) {
    for (int l = 0; l < V; ++l) {
      tree_level_welford<acc_t>(s_cnt, s_mean, s_m2, static_cast<int>(r), stride, g.R, width,
                                static_cast<int>(cvl) * V + l);
    }
    __syncthreads();
  }
  if (r == 0 && cv < g.Cv) {
    for (int l = 0; l < V; ++l) {
      const int c = cv * V + l;
      ws[part * g.C + c] = s_cnt[slot + l];
      ws[(parts + part) * g.C + c] = s_mean[slot + l];
      ws[(2 * parts + part) * g.C + c] = s_m2[slot + l];
    }
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_backward_nchw_kernel(const scalar_t* __restrict__ dy,
                                                                      const scalar_t* __restrict__ x, Tiling g,
                                                                      int pad, int mode, int parts,
                                                                      BnBackwardConsts<acc_t> k,
                                                                      acc_t* __restrict__ ws) {
  __shared__ acc_t s_a[kBnThreads], s_b[kBnThreads];
  const int part = blockIdx.x, c = blockIdx.y, t = threadIdx.x;
  bn_backward_thread_nchw<scalar_t, acc_t, V>(dy, x, g, pad, mode, parts, part, c, t, k, s_a[t], s_b[t]);
  __syncthreads();
  for (int stride = kBnThreads / 2; stride > 0; stride /= 2) {
    tree_level_sum<acc_t>(s_a, s_b, t, stride, kBnThreads, 1, 0);
    __syncthreads();
  }
  if (t == 0) {
    ws[part * g.C + c] = s_a[0];
    ws[(parts + part) * g.C + c] = s_b[0];
  }
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_backward_cl_kernel(const scalar_t* __restrict__ dy,
                                                                    const scalar_t* __restrict__ x, Tiling g,
                                                                    int pad, int mode, int parts,
                                                                    BnBackwardConsts<acc_t> k,
                                                                    acc_t* __restrict__ ws) {
  __shared__ acc_t s_a[kBnThreads * V], s_b[kBnThreads * V];
  const int part = blockIdx.x, t = threadIdx.x;
  uint32_t r, cvl;
  g.by_Cb.divmod(t, r, cvl);
  const int cv = blockIdx.y * g.Cb + static_cast<int>(cvl);
  const int width = g.Cb * V, slot = static_cast<int>(r) * width + static_cast<int>(cvl) * V;
  acc_t a[V], b[V];
  bn_backward_thread_cl<scalar_t, acc_t, V>(dy, x, g, pad, mode, parts, part, cv, static_cast<int>(r), k, a, b);
  for (int l = 0; l < V; ++l) {
    s_a[slot + l] = a[l];
    s_b[slot + l] = b[l];
  }
  __syncthreads();
  for (int stride = bn_pow2_ceil(g.R) / 2; stride > 0; stride /= 2) {
    for (int l = 0; l < V; ++l) {
      tree_level_sum<acc_t>(s_a, s_b, static_cast<int>(r), stride, g.R, width, static_cast<int>(cvl) * V + l);
    }
    __syncthreads();
  }
  if (r == 0 && cv < g.Cv) {
    for (int l = 0; l < V; ++l) {
      const int c = cv * V + l;
      ws[part * g.C + c] = s_a[slot + l];
      ws[(parts + part) * g.C + c] = s_b[slot + l];
    }
  }
}

// Merges the parts of kBnFinalizeChannels channels: forward, mean and invstd.
template <typename acc_t>
__global__ void __launch_bounds__(kBnFinalizeChannels * kBnFinalizeLanes)
    bn_finalize_stats_kernel(const acc_t* __restrict__ ws, int parts, int C, double eps, acc_t* __restrict__ mean_out,
                             acc_t* __restrict__ invstd_out) {
  constexpr int T = kBnFinalizeChannels * kBnFinalizeLanes;
  __shared__ acc_t s_cnt[T], s_mean[T], s_m2[T];
  const int t = threadIdx.x, ch = t / kBnFinalizeLanes, lane = t % kBnFinalizeLanes;
  const int c = blockIdx.x * kBnFinalizeChannels + ch;
  bn_finalize_lane_welford<acc_t>(ws, ws + parts * C, ws + 2 * parts * C, parts, C, c, lane, s_cnt[t], s_mean[t],
                                  s_m2[t]);
  __syncthreads();
  for (int stride = kBnFinalizeLanes / 2; stride > 0; stride /= 2) {
    tree_level_welford<acc_t>(s_cnt, s_mean, s_m2, lane, stride, kBnFinalizeLanes, 1, ch * kBnFinalizeLanes);
    __syncthreads();
  }
  if (lane == 0 && c < C) {
    mean_out[c] = s_mean[t];
    invstd_out[c] = invstd_from<acc_t>(s_cnt[t], s_m2[t], eps);
  }
}

// Backward: sum(dz) -> grad_bias, sum(dz * xhat) -> grad_weight.
template <typename acc_t>
__global__ void __launch_bounds__(kBnFinalizeChannels * kBnFinalizeLanes)
    bn_finalize_sums_kernel(const acc_t* __restrict__ ws, int parts, int C, const acc_t* __restrict__ invstd,
                            acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dz_xhat) {
  constexpr int T = kBnFinalizeChannels * kBnFinalizeLanes;
  __shared__ acc_t s_a[T], s_b[T];
  const int t = threadIdx.x, ch = t / kBnFinalizeLanes, lane = t % kBnFinalizeLanes;
  const int c = blockIdx.x * kBnFinalizeChannels + ch;
  bn_finalize_lane_sum<acc_t>(ws, ws + parts * C, parts, C, c, lane, s_a[t], s_b[t]);
  __syncthreads();
  for (int stride = kBnFinalizeLanes / 2; stride > 0; stride /= 2) {
    tree_level_sum<acc_t>(s_a, s_b, lane, stride, kBnFinalizeLanes, 1, ch * kBnFinalizeLanes);
    __syncthreads();
  }
  if (lane == 0 && c < C) {
    sum_dz[c] = s_a[t];
    sum_dz_xhat[c] = s_b[t] * invstd[c];
  }
}

// The apply kernels, one per layout (a kernel holding both paths would need the
// registers of the larger one for both).
template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_normalize_nchw_kernel(const scalar_t* __restrict__ x,
                                                                       scalar_t* __restrict__ y, Tiling g, int H,
                                                                       int W, int pad, int mode,
                                                                       BnForwardConsts<acc_t> k) {
  bn_normalize_thread_nchw<scalar_t, acc_t, V, false>(x, y, g, H, W, pad, mode, k, blockIdx.x, threadIdx.x, nullptr);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_normalize_cl_kernel(const scalar_t* __restrict__ x,
                                                                     scalar_t* __restrict__ y, Tiling g, int H, int W,
                                                                     int pad, int mode, BnForwardConsts<acc_t> k) {
  bn_normalize_thread_cl<scalar_t, acc_t, V, false>(x, y, g, H, W, pad, mode, k, blockIdx.x, blockIdx.y, threadIdx.x,
                                                     nullptr);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_dx_nchw_kernel(const scalar_t* __restrict__ dy,
                                                                const scalar_t* __restrict__ x,
                                                                scalar_t* __restrict__ dx, Tiling g, int pad, int mode,
                                                                BnDxConsts<acc_t> k) {
  bn_dx_thread_nchw<scalar_t, acc_t, V, false>(dy, x, dx, g, pad, mode, k, blockIdx.x, threadIdx.x, nullptr);
}

template <typename scalar_t, typename acc_t, int V>
__global__ void __launch_bounds__(kBnThreads) bn_dx_cl_kernel(const scalar_t* __restrict__ dy,
                                                              const scalar_t* __restrict__ x, scalar_t* __restrict__ dx,
                                                              Tiling g, int pad, int mode, BnDxConsts<acc_t> k) {
  bn_dx_thread_cl<scalar_t, acc_t, V, false>(dy, x, dx, g, pad, mode, k, blockIdx.x, blockIdx.y, threadIdx.x, nullptr);
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
  const bool cl = call.fmt == at::MemoryFormat::ChannelsLast;
  const auto &xc = call.x, &w = call.weight, &b = call.bias;
  auto y = call.y, mean = call.mean, invstd = call.invstd;
  if (g.C == 0 || g.N * g.H * g.W == 0) return {y, mean, invstd};
  const BnActPassPlan p = bn_act_plan(g, cl, static_cast<int>(x.element_size()), {&xc, &y}, /*forward=*/true);
  auto ws = bn_act_workspace(p, g.C, 3, mean.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      const dim3 rgrid(p.reduce_grid_x, p.reduce_grid_y);
      if (cl) {
        bn_stats_cl_kernel<scalar_t, acc_t, V><<<rgrid, p.reduce_threads, 0, stream>>>(xp, p.reduce, p.parts,
                                                                                      ws.data_ptr<acc_t>());
      } else {
        bn_stats_nchw_kernel<scalar_t, acc_t, V><<<rgrid, p.reduce_threads, 0, stream>>>(xp, p.reduce, p.parts,
                                                                                        ws.data_ptr<acc_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bn_finalize_stats_kernel<acc_t><<<p.finalize_grid, p.finalize_threads, 0, stream>>>(
          ws.const_data_ptr<acc_t>(), p.parts, static_cast<int>(g.C), eps, mean.data_ptr<acc_t>(),
          invstd.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const BnForwardConsts<acc_t> k{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                     w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope)};
      const dim3 agrid(p.apply_grid_x, p.apply_grid_y);
      const int H = static_cast<int>(g.H), W = static_cast<int>(g.W);
      if (cl) {
        bn_normalize_cl_kernel<scalar_t, acc_t, V><<<agrid, p.apply_threads, 0, stream>>>(
            xp, y.data_ptr<scalar_t>(), p.apply, H, W, g.pad, g.mode, k);
      } else {
        bn_normalize_nchw_kernel<scalar_t, acc_t, V><<<agrid, p.apply_threads, 0, stream>>>(
            xp, y.data_ptr<scalar_t>(), p.apply, H, W, g.pad, g.mode, k);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
  const bool cl = call.fmt == at::MemoryFormat::ChannelsLast;
  const auto &gy = call.grad_y, &xc = call.x, &w = call.weight, &b = call.bias, &m = call.mean, &is = call.invstd;
  auto dx = call.grad_x, dw = call.grad_weight, db = call.grad_bias;
  if (g.C == 0 || g.N * g.H * g.W == 0) return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
  const BnActPassPlan p = bn_act_plan(g, cl, static_cast<int>(x.element_size()), {&gy, &xc, &dx}, /*forward=*/false);
  auto ws = bn_act_workspace(p, g.C, 2, m.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const scalar_t *dyp = gy.const_data_ptr<scalar_t>(), *xp = xc.const_data_ptr<scalar_t>();
      const BnBackwardConsts<acc_t> k{m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                                      b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope)};
      const dim3 rgrid(p.reduce_grid_x, p.reduce_grid_y);
      if (cl) {
        bn_backward_cl_kernel<scalar_t, acc_t, V><<<rgrid, p.reduce_threads, 0, stream>>>(
            dyp, xp, p.reduce, g.pad, g.mode, p.parts, k, ws.data_ptr<acc_t>());
      } else {
        bn_backward_nchw_kernel<scalar_t, acc_t, V><<<rgrid, p.reduce_threads, 0, stream>>>(
            dyp, xp, p.reduce, g.pad, g.mode, p.parts, k, ws.data_ptr<acc_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      bn_finalize_sums_kernel<acc_t><<<p.finalize_grid, p.finalize_threads, 0, stream>>>(
          ws.const_data_ptr<acc_t>(), p.parts, static_cast<int>(g.C), is.const_data_ptr<acc_t>(), db.data_ptr<acc_t>(),
          dw.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const BnDxConsts<acc_t> kd{k, db.const_data_ptr<acc_t>(), dw.const_data_ptr<acc_t>(),
                                 static_cast<acc_t>(g.N * g.H * g.W)};
      const dim3 agrid(p.apply_grid_x, p.apply_grid_y);
      if (cl) {
        bn_dx_cl_kernel<scalar_t, acc_t, V><<<agrid, p.apply_threads, 0, stream>>>(dyp, xp, dx.data_ptr<scalar_t>(),
                                                                                   p.apply, g.pad, g.mode, kd);
      } else {
        bn_dx_nchw_kernel<scalar_t, acc_t, V><<<agrid, p.apply_threads, 0, stream>>>(dyp, xp, dx.data_ptr<scalar_t>(),
                                                                                     p.apply, g.pad, g.mode, kd);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
}

template <typename run_t, typename acc_t>
__global__ void bn_running_stats_kernel(run_t* __restrict__ running_mean, run_t* __restrict__ running_var,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd, int64_t C,
                                        double momentum, double eps, double unbias) {
  bn_running_stats_thread<run_t, acc_t, false>(running_mean, running_var, mean, invstd, C, momentum, eps, unbias,
                                              blockIdx.x, blockDim.x, gridDim.x, threadIdx.x, nullptr);
}

void bn_running_stats_update_cuda(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                  const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  const at::Tensor* stats[] = {&running_mean, &running_var, &mean, &invstd};
  for (const at::Tensor* t : stats) DIP_CHECK_DEVICE(*t, at::kCUDA, "every statistic");
  bn_running_stats_check(running_mean, running_var, mean, invstd, momentum, count);
  const c10::cuda::CUDAGuard guard(mean.device());
  const int64_t C = mean.numel();
  if (C == 0) return;
  const double unbias = bn_running_unbias(count);
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
  m.impl("bn_act", &bn_act_forward_cuda);
  m.impl("_bn_act_backward", &bn_act_backward_cuda);
  m.impl("bn_act_running_stats_update", &bn_running_stats_update_cuda);
}

}  // namespace dip_fast
