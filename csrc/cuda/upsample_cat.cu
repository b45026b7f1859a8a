// CUDA kernels of upsample_cat: thin shells around the per-thread functions of
// csrc/common/upsample_cat_grid.h over the tilings planned by
// upsample_cat_plan.h (the CPU emulation op replays the same plan in CI).
//   forward      out: skip planes / channels copied as vectors, deep values
//                blended from their 1 or 4 sources
//   grad_skip    a vector copy of grad_out's skip channels
//   grad_deep    each element: a gather of the <= 4 x 4 output gradients
//                that read it (no atomics, deterministic)
// Groups (packed networks) change no kernel's shape: NCHW folds them into the
// batch, channels_last threads place their channel vector in its group.
// Everything runs on the current stream with no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <type_traits>

#include "../common/upsample_cat_checks.h"
#include "../common/upsample_cat_grid.h"
#include "../common/upsample_cat_plan.h"
#include "../common/vector_dispatch.h"

namespace dip_fast {
namespace {

// The grad_deep gathers ask for at least 4 resident blocks per SM, which caps
// registers at 64 a thread: without the bound ptxas aimed some of their
// variants at 32 registers and spilled (make cuda-report).
constexpr int kMinBlocks = 4;

// One kernel per layout and pass; Layout selects the per-thread function.
enum class Layout { kNchw, kChannelsLast };

template <typename scalar_t, typename acc_t, int V, Layout L>
__global__ void __launch_bounds__(kTileThreads) upsample_cat_forward_kernel(const scalar_t* __restrict__ skip,
                                                                            const scalar_t* __restrict__ deep,
                                                                            scalar_t* __restrict__ out, Tiling g,
                                                                            UpsampleCatDims d) {
  if constexpr (L == Layout::kChannelsLast) {
    upsample_cat_forward_thread_cl<scalar_t, acc_t, V, false>(skip, deep, out, g, d, blockIdx.x, blockIdx.y,
                                                              threadIdx.x, nullptr);
  } else {
    upsample_cat_forward_thread_nchw<scalar_t, acc_t, V, false>(skip, deep, out, g, d, blockIdx.x, threadIdx.x,
                                                                nullptr);
  }
}

template <typename scalar_t, int V, Layout L>
__global__ void __launch_bounds__(kTileThreads) upsample_cat_grad_skip_kernel(const scalar_t* __restrict__ grad,
                                                                              scalar_t* __restrict__ grad_skip,
                                                                              Tiling g, UpsampleCatDims d) {
  if constexpr (L == Layout::kChannelsLast) {
    upsample_cat_grad_skip_thread_cl<scalar_t, V, false>(grad, grad_skip, g, d, blockIdx.x, blockIdx.y, threadIdx.x,
                                                         nullptr);
  } else {
    upsample_cat_grad_skip_thread_nchw<scalar_t, V, false>(grad, grad_skip, g, d, blockIdx.x, threadIdx.x, nullptr);
  }
}

template <typename scalar_t, typename acc_t, int V, Layout L>
__global__ void __launch_bounds__(kTileThreads, kMinBlocks) upsample_cat_grad_deep_kernel(const scalar_t* __restrict__ grad,
                                                                              scalar_t* __restrict__ grad_deep,
                                                                              Tiling g, UpsampleCatDims d) {
  if constexpr (L == Layout::kChannelsLast) {
    upsample_cat_grad_deep_thread_cl<scalar_t, acc_t, V, false>(grad, grad_deep, g, d, blockIdx.x, blockIdx.y,
                                                                threadIdx.x, nullptr);
  } else {
    upsample_cat_grad_deep_thread_nchw<scalar_t, acc_t, V, false>(grad, grad_deep, g, d, blockIdx.x, threadIdx.x,
                                                                  nullptr);
  }
}

// Calls f with std::integral_constant<Layout, L> for the tiling's layout.
template <typename F>
void with_layout(const Tiling& t, F&& f) {
  if (t.cl) {
    f(std::integral_constant<Layout, Layout::kChannelsLast>{});
  } else {
    f(std::integral_constant<Layout, Layout::kNchw>{});
  }
}

inline dim3 grid_of(const Tiling& t) {
  return dim3(static_cast<unsigned>(tiling_blocks_x(t)), static_cast<unsigned>(tiling_blocks_y(t)));
}

at::Tensor upsample_cat_forward_cuda(const at::Tensor& skip, const at::Tensor& deep, int64_t mode, int64_t groups) {
  DIP_CHECK_DEVICE(skip, at::kCUDA, "skip");
  DIP_CHECK_DEVICE(deep, at::kCUDA, "deep");
  const c10::cuda::CUDAGuard guard(deep.device());
  auto call = upsample_cat_forward_call(skip, deep, mode, groups);
  if (call.out.numel() == 0) return call.out;
  const UpsampleCatPlan p = upsample_cat_forward_plan(call);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, deep.scalar_type(), "upsample_cat_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      with_layout(p.main, [&](auto lay) {
        upsample_cat_forward_kernel<scalar_t, acc_t, V, decltype(lay)::value>
            <<<grid_of(p.main), p.main.threads, 0, stream>>>(call.skip.const_data_ptr<scalar_t>(),
                                                             call.deep.const_data_ptr<scalar_t>(),
                                                             call.out.data_ptr<scalar_t>(), p.main, p.dims);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return call.out;
}

std::tuple<at::Tensor, at::Tensor> upsample_cat_backward_cuda(const at::Tensor& grad_out, int64_t skip_channels,
                                                              int64_t mode, int64_t groups) {
  DIP_CHECK_DEVICE(grad_out, at::kCUDA, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  auto call = upsample_cat_backward_call(grad_out, skip_channels, mode, groups);
  const UpsampleCatPlan p = upsample_cat_backward_plan(call);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "upsample_cat_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      with_layout(p.main, [&](auto lay) {
        constexpr Layout L = decltype(lay)::value;
        if (call.grad_skip.numel() > 0) {
          upsample_cat_grad_skip_kernel<scalar_t, V, L><<<grid_of(p.skip), p.skip.threads, 0, stream>>>(
              call.grad.const_data_ptr<scalar_t>(), call.grad_skip.data_ptr<scalar_t>(), p.skip, p.dims);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        if (call.grad_deep.numel() > 0) {
          upsample_cat_grad_deep_kernel<scalar_t, acc_t, V, L><<<grid_of(p.main), p.main.threads, 0, stream>>>(
              call.grad.const_data_ptr<scalar_t>(), call.grad_deep.data_ptr<scalar_t>(), p.main, p.dims);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  return {call.grad_skip, call.grad_deep};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("upsample_cat", &upsample_cat_forward_cuda);
  m.impl("_upsample_cat_backward", &upsample_cat_backward_cuda);
}

}  // namespace dip_fast
