// CUDA kernels of the separable filter-and-decimate op pair
// (downsample, _downsample_backward): the same math as the CPU
// file through csrc/common/downsample.h. The two-phase tile design (a pass into
// shared memory, then the other axis from it) and the per-thread phases are
// in csrc/common/downsample_grid.h, the launch plans in lanczos_plan.h; both are
// shared with the CPU emulation of the grid (csrc/cpu/downsample_emulated.cpp,
// tested in CI). x and grad_out are made dense in their working memory format
// (NCHW or channels_last). Accumulation in float for float / half / bfloat16,
// double for double. Launched on the current stream, no host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/alloc.h"
#include "../common/checks.h"
#include "../common/downsample.h"
#include "../common/downsample_checks.h"
#include "../common/downsample_grid.h"
#include "../common/downsample_plan.h"

namespace dip_fast {
namespace {

// Shared memory: the taps, then the tile of intermediate values.
template <typename acc_t>
__device__ acc_t* load_taps_to_shared(const acc_t* taps_g, int K) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* taps = reinterpret_cast<acc_t*>(smem_raw);
  for (int t = threadIdx.x; t < K; t += blockDim.x) taps[t] = taps_g[t];
  return taps;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLanczosThreads) lanczos_forward_kernel(const scalar_t* __restrict__ x,
                                                                          scalar_t* __restrict__ y,
                                                                          const acc_t* __restrict__ taps_g,
                                                                          LanczosDims d) {
  acc_t* taps = load_taps_to_shared<acc_t>(taps_g, d.K);
  acc_t* tile = taps + d.K;
  for (int p = blockIdx.z; p < d.planes; p += gridDim.z) {
    __syncthreads();  // taps loaded; the previous plane's tile consumed
    lanczos_fwd_vertical_thread<scalar_t, acc_t>(x, taps, tile, d, blockIdx.x, blockIdx.y, p, threadIdx.x,
                                                 blockDim.x);
    __syncthreads();
    lanczos_fwd_horizontal_thread<scalar_t, acc_t, false>(taps, tile, y, d, blockIdx.x, blockIdx.y, p, threadIdx.x,
                                                          blockDim.x, nullptr);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kLanczosThreads) lanczos_backward_kernel(const scalar_t* __restrict__ gy,
                                                                           scalar_t* __restrict__ gx,
                                                                           const acc_t* __restrict__ taps_g,
                                                                           LanczosDims d) {
  acc_t* taps = load_taps_to_shared<acc_t>(taps_g, d.K);
  acc_t* tile = taps + d.K;
  for (int p = blockIdx.z; p < d.planes; p += gridDim.z) {
    __syncthreads();
    lanczos_bwd_horizontal_thread<scalar_t, acc_t>(gy, taps, tile, d, blockIdx.x, blockIdx.y, p, threadIdx.x,
                                                   blockDim.x);
    __syncthreads();
    lanczos_bwd_vertical_thread<scalar_t, acc_t, false>(taps, tile, gx, d, blockIdx.x, blockIdx.y, p, threadIdx.x,
                                                        blockDim.x, nullptr);
  }
}

at::Tensor downsample_cuda(const at::Tensor& x, const at::Tensor& taps, int64_t factor, int64_t pad) {
  DIP_CHECK_DEVICE(x, at::kCUDA, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const LanczosCall c = lanczos_forward_call(x, taps, factor, pad, at::kCUDA);
  const LanczosPlan& p = c.plan;
  if (c.out.numel() == 0) return c.out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "downsample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lanczos_forward_kernel<scalar_t, acc_t><<<dim3(p.grid_x, p.grid_y, p.grid_z), kLanczosThreads, p.shared_bytes,
                                              stream>>>(c.in.const_data_ptr<scalar_t>(), c.out.data_ptr<scalar_t>(),
                                                        c.taps.const_data_ptr<acc_t>(), p.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return c.out;
}

at::Tensor downsample_backward_cuda(const at::Tensor& grad_out, const at::Tensor& taps, int64_t factor,
                                            int64_t pad, int64_t height, int64_t width) {
  DIP_CHECK_DEVICE(grad_out, at::kCUDA, "grad_out");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const LanczosCall c = lanczos_backward_call(grad_out, taps, factor, pad, height, width, at::kCUDA);
  const LanczosPlan& p = c.plan;
  if (c.out.numel() == 0) return c.out;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "downsample_backward_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    lanczos_backward_kernel<scalar_t, acc_t>
                                        <<<dim3(p.grid_x, p.grid_y, p.grid_z), kLanczosThreads, p.shared_bytes,
                                           stream>>>(c.in.const_data_ptr<scalar_t>(), c.out.data_ptr<scalar_t>(),
                                                     c.taps.const_data_ptr<acc_t>(), p.d);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return c.out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("downsample", &downsample_cuda);
  m.impl("_downsample_backward", &downsample_backward_cuda);
}

}  // namespace dip_fast
