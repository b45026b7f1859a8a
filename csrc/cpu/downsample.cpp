// CPU kernels of the separable filter-and-decimate op pair
// (downsample, _downsample_backward).
//
// Order of the passes: vertical first, then horizontal. Rows are the
// contiguous direction, so the vertical pass is a weighted sum of K whole
// input rows (unit stride, vectorised across the row), and it already
// decimates by f, so the strided horizontal pass only sees the f-times
// smaller intermediate. Horizontal-first would do the same number of
// multiply-adds but put the strided access on the full image.
//
// Forward, per task (one plane, 16 output rows), stage by stage:
//   1. vertical: each intermediate row = sum_a k[a] * input row
//      clamp(i f - pad + a), written into a padded row buffer whose border
//      columns replicate the edge pixels;
//   2. polyphase split of each padded row into f components
//      (phase[r][m] = row[m f + r]);
//   3. horizontal: out[j] = sum_b k[b] * phase[b % f][j + b / f], K
//      unit-stride rows combined like the vertical pass.
// Backward, per task (one plane, 16 f input rows): the grad_out rows that
// reach those input rows go through the transposed horizontal pass (per
// polyphase component gphase[r][m] = sum_s k[s f + r] * grad_out[m - s], then
// interleaved back and the padded border folded onto the edge columns), then
// each grad_x row is the weighted sum of the few (about K / f) intermediate
// rows that touch it, the weights from lanczos::transpose_weight.
// Stages run over the whole block rather than row by row, so no load waits on
// the wide vector stores that produced its data (store forwarding). Buffers
// are per task (a few tens of kB): the input is read from memory once, the
// output written once, nothing of image size is allocated besides it.
//
// The work is about 2 * (Ho * W + Ho * Wo) * K multiply-adds per plane for
// forward + backward, with one load per multiply-add in the vertical passes:
// at the paper's sizes the kernels are bound by the load and FMA ports, not by
// memory bandwidth (see bench/README.md).
//
// Layouts: NCHW works plane by plane (N * C planes of H x W); channels_last
// (NHWC) works image by image on rows of W * C interleaved values, the
// vertical pass being identical and the horizontal one stepping over pixels of
// C channels. Other layouts are first made contiguous.
//
// Parallel over (plane, block of rows) with at::parallel_for. The blocks and
// the summation order of every element are fixed, so results do not depend on
// the thread count. Accumulation is in float for float / half / bfloat16 and
// in double for double.
//
// The hot loops are compiled for several x86-64 levels (baseline, AVX2+FMA,
// AVX-512) and picked at load time (GCC target_clones), since the extension
// itself is built for the baseline ISA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/alloc.h"
#include "../common/checks.h"
#include "../common/downsample.h"
#include "../common/downsample_checks.h"
#include "../common/macros.h"  // DIP_CPU_CLONES

namespace dip_fast {
namespace {

using lanczos::clamp_index;
using lanczos::output_size;
using lanczos::padded_extent;
using lanczos::touching_outputs;
using lanczos::transpose_weight;

// GCC vector types of 64 bytes (16 floats / 8 doubles), loaded and stored
// unaligned; each target clone lowers them to its own registers (4 SSE, 2
// AVX2 or 1 AVX-512 register).
typedef float vec_f __attribute__((vector_size(64), aligned(4), may_alias));
typedef double vec_d __attribute__((vector_size(64), aligned(8), may_alias));
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = vec_f;
};
template <>
struct VecOf<double> {
  using type = vec_d;
};

// out[t] = sum_a coef[a] * rows[a][t] for t < len, float or double rows.
// The sum over a runs in ascending order for every t; blocks of 4 vectors of
// accumulators stay in registers, so each row element is loaded once.
template <typename acc_t, typename out_t>
DIP_CPU_CLONES void combine_rows_vec(const acc_t* const* rows, const acc_t* coef, int64_t nrows, int64_t len,
                                     out_t* __restrict__ out) {
  using V = typename VecOf<acc_t>::type;
  constexpr int64_t L = sizeof(V) / sizeof(acc_t);
  int64_t t0 = 0;
  for (; t0 + 4 * L <= len; t0 += 4 * L) {
    V a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t a = 0; a < nrows; ++a) {
      const acc_t c = coef[a];
      const acc_t* r = rows[a] + t0;
      a0 += c * *reinterpret_cast<const V*>(r);
      a1 += c * *reinterpret_cast<const V*>(r + L);
      a2 += c * *reinterpret_cast<const V*>(r + 2 * L);
      a3 += c * *reinterpret_cast<const V*>(r + 3 * L);
    }
    if constexpr (std::is_same_v<out_t, acc_t>) {
      *reinterpret_cast<V*>(out + t0) = a0;
      *reinterpret_cast<V*>(out + t0 + L) = a1;
      *reinterpret_cast<V*>(out + t0 + 2 * L) = a2;
      *reinterpret_cast<V*>(out + t0 + 3 * L) = a3;
    } else {
      for (int64_t t = 0; t < L; ++t) {
        out[t0 + t] = static_cast<out_t>(a0[t]);
        out[t0 + L + t] = static_cast<out_t>(a1[t]);
        out[t0 + 2 * L + t] = static_cast<out_t>(a2[t]);
        out[t0 + 3 * L + t] = static_cast<out_t>(a3[t]);
      }
    }
  }
  for (; t0 + L <= len; t0 += L) {
    V a0 = {};
    for (int64_t a = 0; a < nrows; ++a) a0 += coef[a] * *reinterpret_cast<const V*>(rows[a] + t0);
    if constexpr (std::is_same_v<out_t, acc_t>) {
      *reinterpret_cast<V*>(out + t0) = a0;
    } else {
      for (int64_t t = 0; t < L; ++t) out[t0 + t] = static_cast<out_t>(a0[t]);
    }
  }
  for (; t0 < len; ++t0) {
    acc_t acc = acc_t(0);
    for (int64_t a = 0; a < nrows; ++a) acc += coef[a] * rows[a][t0];
    out[t0] = static_cast<out_t>(acc);
  }
}

// The same for half / bfloat16 rows (converted element by element).
template <typename in_t, typename acc_t, typename out_t>
DIP_CPU_CLONES void combine_rows_convert(const in_t* const* rows, const acc_t* coef, int64_t nrows, int64_t len,
                                         out_t* __restrict__ out) {
  constexpr int64_t kBlock = 32;
  for (int64_t t0 = 0; t0 < len; t0 += kBlock) {
    const int64_t n = std::min(kBlock, len - t0);
    acc_t acc[kBlock] = {};
    for (int64_t a = 0; a < nrows; ++a) {
      const acc_t c = coef[a];
      const in_t* r = rows[a] + t0;
      for (int64_t t = 0; t < n; ++t) acc[t] += c * static_cast<acc_t>(r[t]);
    }
    for (int64_t t = 0; t < n; ++t) out[t0 + t] = static_cast<out_t>(acc[t]);
  }
}

template <typename in_t, typename acc_t, typename out_t>
void combine_rows(const in_t* const* rows, const acc_t* coef, int64_t nrows, int64_t len, out_t* out) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    combine_rows_vec<acc_t, out_t>(rows, coef, nrows, len, out);
  } else {
    combine_rows_convert<in_t, acc_t, out_t>(rows, coef, nrows, len, out);
  }
}

// Polyphase split of a row of pixels (cs values each):
//   phase[(r * M + m) * cs + c] = buf[(m * f + r) * cs + c],  r < f, m < M.
// A compile-time factor lets the compiler vectorise the strided gather; the
// loop order that vectorises best differs between small and large F.
template <int F, typename T>
DIP_CPU_CLONES void split_fixed(const T* __restrict__ buf, T* __restrict__ phase, int64_t M) {
  if constexpr (F <= 4) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < F; ++r) phase[r * M + m] = buf[m * F + r];
  } else {
    for (int64_t r = 0; r < F; ++r)
      for (int64_t m = 0; m < M; ++m) phase[r * M + m] = buf[m * F + r];
  }
}

// The inverse: buf[(m * f + r) * cs + c] = phase[(r * M + m) * cs + c].
template <int F, typename T>
DIP_CPU_CLONES void merge_fixed(const T* __restrict__ phase, T* __restrict__ buf, int64_t M) {
  if constexpr (F <= 4) {
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < F; ++r) buf[m * F + r] = phase[r * M + m];
  } else {
    for (int64_t r = 0; r < F; ++r)
      for (int64_t m = 0; m < M; ++m) buf[m * F + r] = phase[r * M + m];
  }
}

template <typename T>
void split_phases(const T* buf, T* phase, int64_t M, int64_t f, int64_t cs) {
  if (cs == 1) {
    switch (f) {
      case 2: return split_fixed<2, T>(buf, phase, M);
      case 3: return split_fixed<3, T>(buf, phase, M);
      case 4: return split_fixed<4, T>(buf, phase, M);
      case 8: return split_fixed<8, T>(buf, phase, M);
      default: break;
    }
  }
  for (int64_t r = 0; r < f; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      const T* src = buf + (m * f + r) * cs;
      T* dst = phase + (r * M + m) * cs;
      for (int64_t c = 0; c < cs; ++c) dst[c] = src[c];
    }
  }
}

template <typename T>
void merge_phases(const T* phase, T* buf, int64_t M, int64_t f, int64_t cs) {
  if (cs == 1) {
    switch (f) {
      case 2: return merge_fixed<2, T>(phase, buf, M);
      case 3: return merge_fixed<3, T>(phase, buf, M);
      case 4: return merge_fixed<4, T>(phase, buf, M);
      case 8: return merge_fixed<8, T>(phase, buf, M);
      default: break;
    }
  }
  for (int64_t r = 0; r < f; ++r) {
    for (int64_t m = 0; m < M; ++m) {
      const T* src = phase + (r * M + m) * cs;
      T* dst = buf + (m * f + r) * cs;
      for (int64_t c = 0; c < cs; ++c) dst[c] = src[c];
    }
  }
}

// Sizes of one call. A "plane" is what the kernels walk row by row: one
// (n, c) image in NCHW, one whole image n in NHWC, where each pixel has
// cs = C interleaved values (cs = 1 in NCHW). Column counts are in pixels.
struct Geometry {
  int64_t planes, H, W, cs, Ho, Wo, K, f, pad;
  int64_t Wext;  // padded columns the outputs read: (Wo - 1) * f + K
  int64_t M;     // pixels per polyphase component: ceil(Wext / f)
  int64_t S;     // taps per polyphase component, at most: ceil(K / f)
  int64_t row() const { return W * cs; }
  int64_t out_row() const { return Wo * cs; }
  // Padded intermediate row: the columns the outputs read, the whole input
  // row at offset pad, and every pixel a polyphase split touches.
  int64_t padded_row() const { return std::max({Wext, pad + W, M * f}) * cs; }
};

Geometry make_geometry(const at::Tensor& x, at::MemoryFormat fmt, int64_t K, int64_t f, int64_t pad, int64_t H,
                       int64_t W) {
  Geometry g;
  const int64_t N = x.size(0), C = x.size(1);
  const bool cl = fmt == at::MemoryFormat::ChannelsLast;
  g.planes = cl ? N : N * C;
  g.cs = cl ? C : 1;
  g.H = H;
  g.W = W;
  g.K = K;
  g.f = f;
  g.pad = pad;
  g.Ho = output_size(H, K, f, pad);
  g.Wo = output_size(W, K, f, pad);
  g.Wext = padded_extent(g.Wo, K, f);
  g.M = (g.Wext + f - 1) / f;
  g.S = (K + f - 1) / f;
  return g;
}

// Output rows per forward task; backward tasks take kRowsPerTask * f input rows.
constexpr int64_t kRowsPerTask = 16;

// Each task runs its rows stage by stage (all vertical passes, then all
// splits, then all horizontal passes) instead of row by row: a stage never
// reads what the previous instruction stream just stored, which would stall
// on store forwarding between vector stores and differently sized loads.
template <typename scalar_t>
void forward_kernel(const Geometry& g, const scalar_t* x, const at::opmath_type<scalar_t>* taps, scalar_t* y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t blocks = (g.Ho + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t in_plane = g.H * g.row(), out_plane = g.Ho * g.out_row();
  const int64_t cs = g.cs, f = g.f, K = g.K;
  const int64_t tlen = g.padded_row(), plen = f * g.M * cs;
  at::parallel_for(0, g.planes * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> vrows(K);
    std::vector<const acc_t*> hrows(K);
    std::vector<acc_t> tbuf(kRowsPerTask * tlen);                   // intermediate rows, padded
    std::vector<acc_t> phase(f == 1 ? 0 : kRowsPerTask * plen);     // their polyphase split
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks, i0 = (task % blocks) * kRowsPerTask;
      const int64_t n = std::min(g.Ho, i0 + kRowsPerTask) - i0;
      const scalar_t* xp = x + p * in_plane;
      scalar_t* yp = y + p * out_plane;
      // 1. Vertical pass: intermediate row = sum_a k[a] * input row clamp(i f - pad + a).
      for (int64_t r = 0; r < n; ++r) {
        const int64_t i = i0 + r;
        acc_t* t = tbuf.data() + r * tlen;
        for (int64_t a = 0; a < K; ++a) vrows[a] = xp + clamp_index(i * f - g.pad + a, g.H) * g.row();
        acc_t* mid = t + g.pad * cs;
        combine_rows<scalar_t, acc_t, acc_t>(vrows.data(), taps, K, g.row(), mid);
        // Replicate the edge pixels into the padded columns.
        const acc_t* last = mid + (g.W - 1) * cs;
        for (int64_t q = 0; q < g.pad; ++q)
          for (int64_t c = 0; c < cs; ++c) t[q * cs + c] = mid[c];
        for (int64_t q = g.pad + g.W; q < g.Wext; ++q)
          for (int64_t c = 0; c < cs; ++c) t[q * cs + c] = last[c];
      }
      // 2. Polyphase split, so that the strided pass becomes K unit-stride rows.
      if (f > 1) {
        for (int64_t r = 0; r < n; ++r) split_phases(tbuf.data() + r * tlen, phase.data() + r * plen, g.M, f, cs);
      }
      // 3. Horizontal pass: out[j] = sum_b k[b] * phase[b % f][j + b / f].
      for (int64_t r = 0; r < n; ++r) {
        for (int64_t b = 0; b < K; ++b) {
          hrows[b] = f == 1 ? tbuf.data() + r * tlen + b * cs
                            : phase.data() + r * plen + ((b % f) * g.M + b / f) * cs;
        }
        combine_rows<acc_t, acc_t, scalar_t>(hrows.data(), taps, K, g.out_row(), yp + (i0 + r) * g.out_row());
      }
    }
  });
}

// Transpose of the replication padding, in place on a padded gradient row
// (column q belongs to input column clamp(q - pad)): the columns left of the
// image fold onto column pad, those right of it onto column pad + W - 1, and
// image columns no output reads (q >= Wext) get nothing. Afterwards
// gbuf + pad * cs is the row's gradient, W pixels.
template <typename acc_t>
void fold_border(const Geometry& g, acc_t* gbuf) {
  const int64_t cs = g.cs, W = g.W, pad = g.pad, Wext = g.Wext;
  for (int64_t c = 0; c < cs; ++c) {
    acc_t left = acc_t(0), right = acc_t(0);
    for (int64_t q = 0; q < std::min(pad, Wext); ++q) left += gbuf[q * cs + c];
    for (int64_t q = pad + W; q < Wext; ++q) right += gbuf[q * cs + c];
    for (int64_t q = std::max(Wext, pad); q < pad + W; ++q) gbuf[q * cs + c] = acc_t(0);
    gbuf[pad * cs + c] += left;
    gbuf[(pad + W - 1) * cs + c] += right;
  }
}

template <typename scalar_t>
void backward_kernel(const Geometry& g, const scalar_t* gy, const at::opmath_type<scalar_t>* taps, scalar_t* gx) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t rows_per_task = kRowsPerTask * g.f;
  const int64_t blocks = (g.H + rows_per_task - 1) / rows_per_task;
  const int64_t in_plane = g.H * g.row(), out_plane = g.Ho * g.out_row();
  const int64_t cs = g.cs, f = g.f, K = g.K, M = g.M, S = g.S;
  // The most intermediate rows one block needs (exact, over all blocks).
  int64_t max_rows = 1;
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t h0 = blk * rows_per_task, h1 = std::min(g.H, h0 + rows_per_task);
    int64_t lo, hi, lo2, hi2;
    touching_outputs(h0, g.H, g.Ho, K, f, g.pad, &lo, &hi);
    touching_outputs(h1 - 1, g.H, g.Ho, K, f, g.pad, &lo2, &hi2);
    max_rows = std::max(max_rows, hi2 - lo + 1);
  }
  // A grad_out row with S zero pixels on both sides, so that every shifted
  // read of the polyphase accumulation stays in bounds.
  const int64_t zlen = (g.Wo + 2 * S) * cs;
  const int64_t plen = f * M * cs, glen = g.padded_row();
  at::parallel_for(0, g.planes * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gyz(max_rows * zlen, acc_t(0));
    std::vector<acc_t> gphase(max_rows * plen);
    std::vector<acc_t> gbuf(max_rows * glen);  // padded rows of the intermediate gradient
    std::vector<const acc_t*> rows(std::max(max_rows, S));
    std::vector<acc_t> coef(std::max(max_rows, S));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / blocks, h0 = (task % blocks) * rows_per_task;
      const int64_t h1 = std::min(g.H, h0 + rows_per_task);
      // Touching ranges grow monotonically with the input row, so the block
      // needs the intermediate rows [first of h0, last of h1 - 1].
      int64_t i_lo, unused, unused2, i_hi;
      touching_outputs(h0, g.H, g.Ho, K, f, g.pad, &i_lo, &unused);
      touching_outputs(h1 - 1, g.H, g.Ho, K, f, g.pad, &unused2, &i_hi);
      const int64_t n = std::max<int64_t>(i_hi - i_lo + 1, 0);
      const scalar_t* gyp = gy + p * out_plane;
      // 1. grad_out rows into the zero-bordered buffers (converted to acc_t).
      for (int64_t r = 0; r < n; ++r) {
        const scalar_t* src = gyp + (i_lo + r) * g.out_row();
        acc_t* dst = gyz.data() + r * zlen + S * cs;
        for (int64_t t = 0; t < g.out_row(); ++t) dst[t] = static_cast<acc_t>(src[t]);
      }
      // 2. Transposed horizontal pass per polyphase component:
      //    gphase[r][m] = sum_s k[s f + r] * gy[m - s].
      for (int64_t r = 0; r < n; ++r) {
        const acc_t* z = gyz.data() + r * zlen;
        for (int64_t ph = 0; ph < f; ++ph) {
          int64_t ns = 0;
          for (int64_t s = 0; s * f + ph < K; ++s, ++ns) {
            rows[ns] = z + (S - s) * cs;
            coef[ns] = taps[s * f + ph];
          }
          combine_rows<acc_t, acc_t, acc_t>(rows.data(), coef.data(), ns, M * cs,
                                            gphase.data() + r * plen + ph * M * cs);
        }
      }
      // 3. Interleave the components back into padded columns.
      for (int64_t r = 0; r < n; ++r) merge_phases(gphase.data() + r * plen, gbuf.data() + r * glen, M, f, cs);
      // 4. Fold the replicated border onto the edge columns.
      for (int64_t r = 0; r < n; ++r) fold_border(g, gbuf.data() + r * glen);
      // 5. Transposed vertical pass: each input row gathers the intermediate
      //    rows that touch it, weighted by lanczos::transpose_weight.
      scalar_t* gxp = gx + p * in_plane;
      for (int64_t h = h0; h < h1; ++h) {
        int64_t lo, hi;
        touching_outputs(h, g.H, g.Ho, K, f, g.pad, &lo, &hi);
        const int64_t m = std::max<int64_t>(hi - lo + 1, 0);
        for (int64_t k = 0; k < m; ++k) {
          coef[k] = transpose_weight<acc_t>(h, lo + k, g.H, taps, K, f, g.pad);
          rows[k] = gbuf.data() + (lo + k - i_lo) * glen + g.pad * cs;
        }
        combine_rows<acc_t, acc_t, scalar_t>(rows.data(), coef.data(), m, g.row(), gxp + h * g.row());
      }
    }
  });
}

at::Tensor downsample_cpu(const at::Tensor& x, const at::Tensor& taps, int64_t factor, int64_t pad) {
  lanczos::check_args(x, "x", taps, factor, pad, at::kCPU);
  const int64_t K = taps.numel();
  const int64_t H = x.size(2), W = x.size(3);
  lanczos::check_extent(H, K, pad, "height");
  lanczos::check_extent(W, K, pad, "width");
  const auto fmt = working_memory_format(x);
  const auto xc = x.contiguous(fmt);
  const auto tc = taps.contiguous();
  const Geometry g = make_geometry(xc, fmt, K, factor, pad, H, W);
  auto y = new_output({x.size(0), x.size(1), g.Ho, g.Wo}, x.options(), fmt);
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "downsample_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t>(g, xc.const_data_ptr<scalar_t>(), tc.const_data_ptr<acc_t>(), y.data_ptr<scalar_t>());
  });
  return y;
}

at::Tensor downsample_backward_cpu(const at::Tensor& grad_out, const at::Tensor& taps, int64_t factor,
                                           int64_t pad, int64_t height, int64_t width) {
  lanczos::check_backward_args(grad_out, taps, factor, pad, height, width, at::kCPU);
  const int64_t K = taps.numel();
  const auto fmt = working_memory_format(grad_out);
  const auto gc = grad_out.contiguous(fmt);
  const auto tc = taps.contiguous();
  const Geometry g = make_geometry(gc, fmt, K, factor, pad, height, width);
  auto gx = new_output({grad_out.size(0), grad_out.size(1), height, width}, grad_out.options(), fmt);
  if (gx.numel() == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "downsample_backward_cpu",
                                  [&] {
                                    using acc_t = at::opmath_type<scalar_t>;
                                    backward_kernel<scalar_t>(g, gc.const_data_ptr<scalar_t>(),
                                                              tc.const_data_ptr<acc_t>(), gx.data_ptr<scalar_t>());
                                  });
  return gx;
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("downsample", &downsample_cpu);
  m.impl("_downsample_backward", &downsample_backward_cpu);
}

}  // namespace dip_fast
