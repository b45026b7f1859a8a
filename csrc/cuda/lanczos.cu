// CUDA kernels of the separable filter-and-decimate op pair
// (lanczos_downsample, lanczos_downsample_backward). Same math as the CPU
// file, element by element (csrc/common/lanczos.h).
//
// Forward, one block per tile of kFwdRows x tile_cols outputs of one plane:
//   1. vertical pass into shared memory: for the tile's output rows and the
//      (tile_cols - 1) * f + K padded input columns they read, one thread per
//      value, lanczos::forward_tap_sum down a column (consecutive threads read
//      consecutive columns: coalesced; the clamp is the replication pad);
//   2. strided horizontal pass from shared memory, one thread per output.
//   The intermediate never leaves the SM: x is read from memory once (its
//   K / f-fold reuse between neighbouring output rows and the horizontal halo
//   come from L1/L2) and y is written once.
//
// Backward, one block per tile of kBwdRows x kBwdCols input pixels:
//   1. transposed horizontal pass into shared memory: the rows of the
//      intermediate gradient that touch the tile, lanczos::backward_tap_sum
//      along each grad_out row (a gather over the outputs touching a column);
//   2. transposed vertical pass from shared memory: each input pixel gathers
//      the intermediate rows touching it, edge pixels collecting the
//      replicated border.
//   Every grad_x element is written by exactly one thread with a fixed
//   summation order: no atomics, bitwise deterministic run to run.
//
// Any strides: x and grad_out are made dense in their working memory format
// (NCHW or channels_last) and indexed through their strides. Accumulation in
// float for float / half / bfloat16, double for double. Blocks loop over the
// planes (grid z), so any N * C works. Launched on the current stream, no
// host synchronisation.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/alloc.h"
#include "../common/checks.h"
#include "../common/lanczos.h"
#include "../common/lanczos_checks.h"

namespace dip_fast {
namespace {

using lanczos::backward_tap_sum;
using lanczos::clamp_index;
using lanczos::forward_tap_sum;
using lanczos::output_size;
using lanczos::touching_outputs;

constexpr int kThreads = 256;
constexpr int kFwdRows = 8;    // output rows per forward tile
constexpr int kFwdCols = 32;   // output columns per forward tile (fewer if shared memory is short)
constexpr int kBwdRows = 32;   // input rows per backward tile
constexpr int kBwdCols = 32;   // input columns per backward tile
constexpr int64_t kMaxGridZ = 65535;
constexpr size_t kMaxShared = 48 * 1024;  // without opting in to more

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

struct Shape {
  int64_t C, planes, H, W, Ho, Wo;
  int K, f, pad;
};

template <typename scalar_t, typename acc_t>
__global__ void lanczos_forward_kernel(const scalar_t* __restrict__ x, Strides xs, scalar_t* __restrict__ y,
                                       Strides ys, const acc_t* __restrict__ taps_g, Shape s, int tile_cols) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* taps = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* tile = taps + s.K;
  const int tcols = (tile_cols - 1) * s.f + s.K;  // padded input columns the tile reads
  for (int t = threadIdx.x; t < s.K; t += blockDim.x) taps[t] = taps_g[t];
  const int64_t j0 = int64_t(blockIdx.x) * tile_cols, i0 = int64_t(blockIdx.y) * kFwdRows;
  const int64_t q0 = j0 * s.f - s.pad;  // first padded column
  for (int64_t plane = blockIdx.z; plane < s.planes; plane += gridDim.z) {
    const int64_t n = plane / s.C, c = plane % s.C;
    const scalar_t* xp = x + n * xs.n + c * xs.c;
    __syncthreads();  // taps loaded; the previous plane's tile consumed
    for (int idx = threadIdx.x; idx < kFwdRows * tcols; idx += blockDim.x) {
      const int r = idx / tcols, col = idx - r * tcols;
      const int64_t i = i0 + r;
      if (i < s.Ho) {
        const int64_t w = clamp_index(q0 + col, s.W);
        tile[idx] = forward_tap_sum<acc_t>(xp + w * xs.w, xs.h, s.H, i, taps, s.K, s.f, s.pad);
      }
    }
    __syncthreads();
    scalar_t* yp = y + n * ys.n + c * ys.c;
    for (int idx = threadIdx.x; idx < kFwdRows * tile_cols; idx += blockDim.x) {
      const int r = idx / tile_cols, cc = idx - r * tile_cols;
      const int64_t i = i0 + r, j = j0 + cc;
      if (i < s.Ho && j < s.Wo) {
        // The tile row already holds the padded columns: no clamp triggers.
        const acc_t v = forward_tap_sum<acc_t>(tile + r * tcols, 1, tcols, cc, taps, s.K, s.f, 0);
        yp[i * ys.h + j * ys.w] = static_cast<scalar_t>(v);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void lanczos_backward_kernel(const scalar_t* __restrict__ gy, Strides gs, scalar_t* __restrict__ gx,
                                        Strides xs, const acc_t* __restrict__ taps_g, Shape s) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* taps = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* tile = taps + s.K;  // intermediate rows [i_lo, i_hi] x kBwdCols
  for (int t = threadIdx.x; t < s.K; t += blockDim.x) taps[t] = taps_g[t];
  const int64_t w0 = int64_t(blockIdx.x) * kBwdCols, h0 = int64_t(blockIdx.y) * kBwdRows;
  const int64_t h1 = h0 + kBwdRows < s.H ? h0 + kBwdRows : s.H;
  // Touching ranges grow with the input row: the tile needs [first of h0, last of h1 - 1].
  int64_t i_lo, i_hi, unused;
  touching_outputs(h0, s.H, s.Ho, s.K, s.f, s.pad, &i_lo, &unused);
  touching_outputs(h1 - 1, s.H, s.Ho, s.K, s.f, s.pad, &unused, &i_hi);
  const int64_t n_rows = i_hi >= i_lo ? i_hi - i_lo + 1 : 0;
  for (int64_t plane = blockIdx.z; plane < s.planes; plane += gridDim.z) {
    const int64_t n = plane / s.C, c = plane % s.C;
    const scalar_t* gyp = gy + n * gs.n + c * gs.c;
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < n_rows * kBwdCols; idx += blockDim.x) {
      const int64_t r = idx / kBwdCols, cc = idx - r * kBwdCols;
      const int64_t w = w0 + cc;
      if (w < s.W) {
        tile[idx] = backward_tap_sum<acc_t>(gyp + (i_lo + r) * gs.h, gs.w, 0, s.Wo, w, s.W, taps, s.K, s.f, s.pad);
      }
    }
    __syncthreads();
    scalar_t* gxp = gx + n * xs.n + c * xs.c;
    for (int idx = threadIdx.x; idx < kBwdRows * kBwdCols; idx += blockDim.x) {
      const int r = idx / kBwdCols, cc = idx - r * kBwdCols;
      const int64_t h = h0 + r, w = w0 + cc;
      if (h < h1 && w < s.W) {
        const acc_t v = backward_tap_sum<acc_t>(tile + cc, kBwdCols, i_lo, s.Ho, h, s.H, taps, s.K, s.f, s.pad);
        gxp[h * xs.h + w * xs.w] = static_cast<scalar_t>(v);
      }
    }
  }
}

Shape make_shape(const at::Tensor& t, int64_t K, int64_t factor, int64_t pad, int64_t H, int64_t W) {
  Shape s;
  s.C = t.size(1);
  s.planes = t.size(0) * t.size(1);
  s.H = H;
  s.W = W;
  s.K = static_cast<int>(K);
  s.f = static_cast<int>(factor);
  s.pad = static_cast<int>(pad);
  s.Ho = output_size(H, K, factor, pad);
  s.Wo = output_size(W, K, factor, pad);
  return s;
}

at::Tensor lanczos_downsample_cuda(const at::Tensor& x, const at::Tensor& taps, int64_t factor, int64_t pad) {
  lanczos::check_args(x, "x", taps, factor, pad, at::kCUDA);
  const int64_t K = taps.numel();
  lanczos::check_extent(x.size(2), K, pad, "height");
  lanczos::check_extent(x.size(3), K, pad, "width");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = working_memory_format(x);
  const auto xc = x.contiguous(fmt);
  const auto tc = taps.contiguous();
  const Shape s = make_shape(xc, K, factor, pad, x.size(2), x.size(3));
  auto y = new_output({x.size(0), x.size(1), s.Ho, s.Wo}, x.options(), fmt);
  if (y.numel() == 0) return y;
  const size_t acc_size = x.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  // The widest tile whose intermediate fits in shared memory.
  int tile_cols = kFwdCols;
  auto shared_bytes = [&](int cols) { return acc_size * (K + size_t(kFwdRows) * ((cols - 1) * size_t(factor) + K)); };
  while (tile_cols > 1 && shared_bytes(tile_cols) > kMaxShared) tile_cols /= 2;
  TORCH_CHECK(shared_bytes(tile_cols) <= kMaxShared, "dip_fast: lanczos_downsample on CUDA supports up to ",
              kMaxShared / acc_size / (kFwdRows + 1), " taps, got ", K);
  const dim3 grid((s.Wo + tile_cols - 1) / tile_cols, (s.Ho + kFwdRows - 1) / kFwdRows,
                  std::min<int64_t>(s.planes, kMaxGridZ));
  TORCH_CHECK(grid.y <= 65535, "dip_fast: image too tall for lanczos_downsample on CUDA (", s.Ho, " output rows)");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lanczos_downsample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    lanczos_forward_kernel<scalar_t, acc_t><<<grid, kThreads, shared_bytes(tile_cols), stream>>>(
        xc.const_data_ptr<scalar_t>(), strides_of(xc), y.data_ptr<scalar_t>(), strides_of(y),
        tc.const_data_ptr<acc_t>(), s, tile_cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

at::Tensor lanczos_downsample_backward_cuda(const at::Tensor& grad_out, const at::Tensor& taps, int64_t factor,
                                            int64_t pad, int64_t height, int64_t width) {
  lanczos::check_backward_args(grad_out, taps, factor, pad, height, width, at::kCUDA);
  const int64_t K = taps.numel();
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = working_memory_format(grad_out);
  const auto gc = grad_out.contiguous(fmt);
  const auto tc = taps.contiguous();
  const Shape s = make_shape(gc, K, factor, pad, height, width);
  auto gx = new_output({grad_out.size(0), grad_out.size(1), height, width}, grad_out.options(), fmt);
  if (gx.numel() == 0) return gx;
  // The most intermediate rows a tile needs (exact, over all row tiles).
  int64_t max_rows = 1;
  for (int64_t h0 = 0; h0 < height; h0 += kBwdRows) {
    const int64_t h1 = std::min(height, h0 + kBwdRows);
    int64_t lo, hi, unused;
    touching_outputs(h0, height, s.Ho, K, factor, pad, &lo, &unused);
    touching_outputs(h1 - 1, height, s.Ho, K, factor, pad, &unused, &hi);
    max_rows = std::max(max_rows, hi - lo + 1);
  }
  const size_t acc_size = grad_out.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const size_t shared = acc_size * (K + size_t(max_rows) * kBwdCols);
  TORCH_CHECK(shared <= kMaxShared, "dip_fast: lanczos_downsample_backward on CUDA: the kernel (", K,
              " taps, factor ", factor, ") needs more shared memory than available");
  const dim3 grid((width + kBwdCols - 1) / kBwdCols, (height + kBwdRows - 1) / kBwdRows,
                  std::min<int64_t>(s.planes, kMaxGridZ));
  TORCH_CHECK(grid.y <= 65535, "dip_fast: image too tall for lanczos_downsample_backward on CUDA (", height, " rows)");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "lanczos_downsample_backward_cuda",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    lanczos_backward_kernel<scalar_t, acc_t><<<grid, kThreads, shared, stream>>>(
                                        gc.const_data_ptr<scalar_t>(), strides_of(gc), gx.data_ptr<scalar_t>(),
                                        strides_of(gx), tc.const_data_ptr<acc_t>(), s);
                                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                                  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CUDA, m) {
  m.impl("lanczos_downsample", &lanczos_downsample_cuda);
  m.impl("lanczos_downsample_backward", &lanczos_downsample_backward_cuda);
}

}  // namespace dip_fast
