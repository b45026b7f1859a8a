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

namespace dip_fast {
namespace {

constexpr int kReduceThreads = 256;
constexpr int kThreads = 256;

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

// (n, h, w) of the e-th element of a channel, for e in [0, N*H*W).
__device__ __forceinline__ void split_nhw(long long e, int H, int W, long long& n, int& h, int& w) {
  w = static_cast<int>(e % W);
  const long long t = e / W;
  h = static_cast<int>(t % H);
  n = t / H;
}

template <typename scalar_t, typename acc_t>
__global__ void bn_stats_kernel(const scalar_t* __restrict__ x, Strides4 sx, int N, int H, int W, double eps,
                                acc_t* __restrict__ mean_out, acc_t* __restrict__ invstd_out) {
  const int c = blockIdx.x;
  const long long total = static_cast<long long>(N) * H * W;
  acc_t count = 0, mean = 0, m2 = 0;
  for (long long e = threadIdx.x; e < total; e += blockDim.x) {
    long long n;
    int h, w;
    split_nhw(e, H, W, n, h, w);
    welford_add<acc_t>(count, mean, m2, static_cast<acc_t>(x[offset4(sx, n, c, h, w)]));
  }
  __shared__ acc_t s_count[kReduceThreads], s_mean[kReduceThreads], s_m2[kReduceThreads];
  s_count[threadIdx.x] = count;
  s_mean[threadIdx.x] = mean;
  s_m2[threadIdx.x] = m2;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      const int o = threadIdx.x + stride;
      welford_merge<acc_t>(s_count[threadIdx.x], s_mean[threadIdx.x], s_m2[threadIdx.x], s_count[o], s_mean[o],
                           s_m2[o]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    mean_out[c] = s_mean[0];
    invstd_out[c] = acc_t(1) / sqrt(s_m2[0] / s_count[0] + static_cast<acc_t>(eps));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_act_normalize_kernel(const scalar_t* __restrict__ x, Strides4 sx, scalar_t* __restrict__ y,
                                        Strides4 sy, int N, int C, int H, int W, int pad, int mode,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                        const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                        acc_t slope) {
  const int Ho = H + 2 * pad, Wo = W + 2 * pad;
  const long long total = static_cast<long long>(N) * C * Ho * Wo;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    // Decode in the output's own layout so that consecutive threads write consecutive addresses.
    long long n, c;
    int i, j;
    if (sy.c == 1) {  // channels_last
      c = e % C;
      long long t = e / C;
      j = static_cast<int>(t % Wo);
      t /= Wo;
      i = static_cast<int>(t % Ho);
      n = t / Ho;
    } else {
      j = static_cast<int>(e % Wo);
      long long t = e / Wo;
      i = static_cast<int>(t % Ho);
      t /= Ho;
      c = t % C;
      n = t / C;
    }
    const int si = pad_source(i, H, pad, mode), sj = pad_source(j, W, pad, mode);
    acc_t v = acc_t(0);
    if (si >= 0 && sj >= 0) {
      v = bn_act_value<acc_t>(static_cast<acc_t>(x[offset4(sx, n, c, si, sj)]), mean[c], gamma[c] * invstd[c],
                              beta[c], slope);
    }
    y[offset4(sy, n, c, i, j)] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void bn_act_backward_reduce_kernel(const scalar_t* __restrict__ dy, Strides4 sdy,
                                              const scalar_t* __restrict__ x, Strides4 sx, int N, int H, int W,
                                              int pad, int mode, const acc_t* __restrict__ mean,
                                              const acc_t* __restrict__ invstd, const acc_t* __restrict__ gamma,
                                              const acc_t* __restrict__ beta, acc_t slope,
                                              acc_t* __restrict__ sum_dz, acc_t* __restrict__ sum_dz_xhat) {
  const int c = blockIdx.x;
  const acc_t scale = gamma[c] * invstd[c];
  const long long total = static_cast<long long>(N) * H * W;
  acc_t a = 0, b = 0;
  for (long long e = threadIdx.x; e < total; e += blockDim.x) {
    long long n;
    int h, w;
    split_nhw(e, H, W, n, h, w);
    const acc_t g = fold_pad_grad<scalar_t, acc_t>(dy, sdy, n, c, h, w, H, W, pad, mode);
    const acc_t xv = static_cast<acc_t>(x[offset4(sx, n, c, h, w)]);
    const acc_t dz = bn_act_dz<acc_t>(g, xv, mean[c], scale, beta[c], slope);
    a += dz;
    b += dz * (xv - mean[c]);
  }
  __shared__ acc_t s_a[kReduceThreads], s_b[kReduceThreads];
  s_a[threadIdx.x] = a;
  s_b[threadIdx.x] = b;
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
                                          int N, int C, int H, int W, int pad, int mode,
                                          const acc_t* __restrict__ mean, const acc_t* __restrict__ invstd,
                                          const acc_t* __restrict__ gamma, const acc_t* __restrict__ beta,
                                          acc_t slope, const acc_t* __restrict__ sum_dz,
                                          const acc_t* __restrict__ sum_dz_xhat) {
  const long long total = static_cast<long long>(N) * C * H * W;
  const acc_t count = static_cast<acc_t>(static_cast<long long>(N) * H * W);
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(blockDim.x) * gridDim.x) {
    long long n, c;
    int h, w;
    if (sx.c == 1) {
      c = e % C;
      long long t = e / C;
      w = static_cast<int>(t % W);
      t /= W;
      h = static_cast<int>(t % H);
      n = t / H;
    } else {
      w = static_cast<int>(e % W);
      long long t = e / W;
      h = static_cast<int>(t % H);
      t /= H;
      c = t % C;
      n = t / C;
    }
    const acc_t scale = gamma[c] * invstd[c];
    const acc_t g = fold_pad_grad<scalar_t, acc_t>(dy, sdy, n, c, h, w, H, W, pad, mode);
    const long long off = offset4(sx, n, c, h, w);
    const acc_t xv = static_cast<acc_t>(x[off]);
    const acc_t dz = bn_act_dz<acc_t>(g, xv, mean[c], scale, beta[c], slope);
    dx[off] = static_cast<scalar_t>(
        bn_dx<acc_t>(dz, (xv - mean[c]) * invstd[c], scale, sum_dz[c] / count, sum_dz_xhat[c] / count));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& bias, double eps, double slope,
                                                                   int64_t pad, int64_t pad_mode) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  DIP_CHECK_DEVICE(weight, at::kCUDA, "weight");
  DIP_CHECK_DEVICE(bias, at::kCUDA, "bias");
  const BnActGeometry g = bn_act_geometry(x, weight, bias, eps, pad, pad_mode);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = working_memory_format(x);
  const auto xc = x.contiguous(fmt);
  const auto acc_type = bn_act_acc_type(x);
  auto mean = new_output({g.C}, x.options().dtype(acc_type));
  auto invstd = new_output({g.C}, x.options().dtype(acc_type));
  auto y = new_output({g.N, g.C, g.Ho, g.Wo}, x.options(), fmt);
  const auto w = weight.to(acc_type).contiguous();
  const auto b = bias.to(acc_type).contiguous();
  if (g.C == 0) return {y, mean, invstd};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_stats_kernel<scalar_t, acc_t><<<g.C, kReduceThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), strides_of(xc), g.N, g.H, g.W, eps, mean.data_ptr<acc_t>(),
        invstd.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_act_normalize_kernel<scalar_t, acc_t><<<blocks_for(y.numel()), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), strides_of(xc), y.data_ptr<scalar_t>(), strides_of(y), g.N, g.C, g.H, g.W,
        g.pad, g.mode, mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
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
  const BnActGeometry g = bn_act_geometry(x, weight, bias, 0.0, pad, pad_mode);
  bn_act_check_backward(grad_y, x, mean, invstd, g);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = working_memory_format(x);
  const auto xc = x.contiguous(fmt);
  const auto gy = grad_y.contiguous(fmt);
  const auto acc_type = bn_act_acc_type(x);
  const auto w = weight.to(acc_type).contiguous();
  const auto b = bias.to(acc_type).contiguous();
  const auto m = mean.contiguous();
  const auto is = invstd.contiguous();
  auto dx = new_output({g.N, g.C, g.H, g.W}, x.options(), fmt);
  auto dw = new_output({g.C}, x.options().dtype(acc_type));
  auto db = new_output({g.C}, x.options().dtype(acc_type));
  if (g.C == 0) return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    bn_act_backward_reduce_kernel<scalar_t, acc_t><<<g.C, kReduceThreads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), strides_of(gy), xc.const_data_ptr<scalar_t>(), strides_of(xc), g.N, g.H,
        g.W, g.pad, g.mode, m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
        b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope), db.data_ptr<acc_t>(), dw.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    bn_act_backward_dx_kernel<scalar_t, acc_t><<<blocks_for(dx.numel()), kThreads, 0, stream>>>(
        gy.const_data_ptr<scalar_t>(), strides_of(gy), xc.const_data_ptr<scalar_t>(), strides_of(xc),
        dx.data_ptr<scalar_t>(), g.N, g.C, g.H, g.W, g.pad, g.mode, m.const_data_ptr<acc_t>(),
        is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope),
        db.const_data_ptr<acc_t>(), dw.const_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("bn_act_forward", &bn_act_forward_cuda);
  m.impl("bn_act_backward", &bn_act_backward_cuda);
}

}  // namespace dip_fast
