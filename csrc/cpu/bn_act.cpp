// CPU kernels of the fused BatchNorm (training mode) + LeakyReLU + pad ops.
//
// Two layouts are written out, each with a unit-stride inner loop that the
// compiler vectorises. NCHW: work is split over channels (at::parallel_for),
// so a thread owns its channels' reductions outright (deterministic, no
// merge step) and streams whole planes. channels_last: work is split over
// fixed blocks of pixels, the inner loop runs along a pixel's channels, and
// the per-block partial sums are merged per channel in block order (also
// deterministic, whatever the thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "store.h"
#include "../common/alloc.h"
#include "../common/bn_act.h"
#include "../common/bn_act_checks.h"

namespace dip_fast {
namespace {

constexpr int64_t kChunk = 2048;  // elements per Welford chunk: stays in L1 for the second read

// Reductions: SIMD lanes of acc_t within a row or chunk (`omp simd
// reduction` allows the reassociation that vectorising a sum needs), then
// totals in double across rows and chunks, so that a channel of millions of
// values keeps float rounding at the level of PyTorch's own kernels.
using red_t = double;

// Channels per parallel task: enough work per task to amortise the fork.
int64_t channel_grain(const BnActGeometry& g) {
  const int64_t per_channel = std::max<int64_t>(1, g.N * g.H * g.W);
  return std::max<int64_t>(1, 32768 / per_channel);
}

// ---------------------------------------------------------------- forward ---

template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void stats_nchw(const scalar_t* x, const BnActGeometry& g, int64_t c, double eps, acc_t& mean, acc_t& invstd) {
  double count = 0, m = 0, m2 = 0;  // merged in double; chunks are short enough for acc_t
  const int64_t hw = g.H * g.W;
  for (int64_t n = 0; n < g.N; ++n) {
    const scalar_t* plane = x + (n * g.C + c) * hw;
    for (int64_t start = 0; start < hw; start += kChunk) {
      const int64_t len = std::min(kChunk, hw - start);
      const scalar_t* chunk = plane + start;
      acc_t s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < len; ++i) s += static_cast<acc_t>(chunk[i]);
      const acc_t cm = s / acc_t(len);
      acc_t q = 0;
#pragma omp simd reduction(+ : q)
      for (int64_t i = 0; i < len; ++i) {
        const acc_t d = static_cast<acc_t>(chunk[i]) - cm;
        q += d * d;
      }
      welford_merge<double>(count, m, m2, double(len), cm, q);
    }
  }
  mean = static_cast<acc_t>(m);
  invstd = static_cast<acc_t>(1.0 / std::sqrt(m2 / count + eps));  // biased variance, as BatchNorm normalises
}

template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void normalize_nchw(const scalar_t* x, scalar_t* y, const BnActGeometry& g, int64_t c, acc_t mean, acc_t scale,
                    acc_t beta, acc_t slope) {
  const int64_t hw = g.H * g.W;
  for (int64_t n = 0; n < g.N; ++n) {
    const scalar_t* plane = x + (n * g.C + c) * hw;
    for (int64_t i = 0; i < g.Ho; ++i) {
      scalar_t* out = y + ((n * g.C + c) * g.Ho + i) * g.Wo;
      const int si = pad_source(static_cast<int>(i), static_cast<int>(g.H), g.pad, g.mode);
      if (si < 0) {
        std::fill(out, out + g.Wo, scalar_t(0));
        continue;
      }
      const scalar_t* row = plane + si * g.W;
      for (int64_t j = 0; j < g.pad; ++j) {  // left band
        const int sj = pad_source(static_cast<int>(j), static_cast<int>(g.W), g.pad, g.mode);
        out[j] = sj < 0 ? scalar_t(0)
                        : static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(row[sj]), mean, scale, beta, slope));
      }
      scalar_t* mid = out + g.pad;
#pragma omp simd
      for (int64_t w = 0; w < g.W; ++w) {
        store(&mid[w], bn_act_value<acc_t>(static_cast<acc_t>(row[w]), mean, scale, beta, slope));
      }
      for (int64_t j = g.pad + g.W; j < g.Wo; ++j) {  // right band
        const int sj = pad_source(static_cast<int>(j), static_cast<int>(g.W), g.pad, g.mode);
        out[j] = sj < 0 ? scalar_t(0)
                        : static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(row[sj]), mean, scale, beta, slope));
      }
    }
  }
}

// channels_last: a channel's values are C apart, so splitting the work by
// channel (as for NCHW) would make every thread stride through all of memory.
// Instead the pixels are cut into fixed blocks (the same blocks whatever the
// thread count, so results are deterministic); each block reduces its pixels
// for all channels with unit-stride inner loops, and the per-block partials
// are merged per channel in block order.
//
// The inner loops do not run over one pixel's C channels but over a group of
// P consecutive pixels (P * C contiguous elements), against per-channel
// parameters and accumulators repeated P times (element j is channel j % C).
// P * C is a multiple of 16 (an AVX-512 vector of float), so the loop has no
// scalar remainder (with C = 132 the 4-channel tail of every pixel ran scalar,
// with the branchy bfloat16 rounding: bfloat16 at C = 132 ran at 60% of its
// C = 128 speed), and at least 128, to amortise the loop set-up. P stays as
// small as that allows: the repeated parameters and accumulators must stay in
// L1 beside the streamed data (P = 8 at C = 132, 1056 elements, measured 1.3x
// slower in the float backward than P = 4). P depends on C only, never on the
// dtype: a bfloat16 input and its float copy sum in the same order.
int64_t group_pixels(int64_t C) {
  int64_t p = 1;
  while ((p * C) % 16 != 0) p *= 2;
  while (p * C < 128) p *= 2;
  return p;
}

// Pixels per block: about 8192 elements (a block is re-read from cache by the
// second pass of stats_nhwc), a whole number of groups.
int64_t pixel_block(int64_t C, int64_t P) {
  const int64_t b = std::max<int64_t>(16, 8192 / std::max<int64_t>(1, C));
  return (b + P - 1) / P * P;
}

// A per-channel vector repeated for the P pixels of a group.
template <typename acc_t>
std::vector<acc_t> repeat_channels(const acc_t* v, int64_t C, int64_t P) {
  std::vector<acc_t> r(P * C);
  for (int64_t p = 0; p < P; ++p) std::copy(v, v + C, r.begin() + p * C);
  return r;
}

// Adds the P copies of a repeated accumulator into its first C entries.
template <typename acc_t>
DIP_INLINE void fold_groups(acc_t* a, int64_t C, int64_t P) {
  for (int64_t p = 1; p < P; ++p) {
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) a[k] += a[p * C + k];
  }
}

// Per-channel mean and M2 of each pixel block in [b0, b1).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void stats_nhwc_blocks(const scalar_t* x, int64_t C, int64_t P, int64_t pixels, int64_t block,
                                      int64_t b0, int64_t b1, double* bmean, double* bm2) {
  const int64_t PC = P * C;
  std::vector<acc_t> sum(PC), sq(PC), mean(PC);
  acc_t *sp = sum.data(), *qp = sq.data(), *mp = mean.data();
  for (int64_t bl = b0; bl < b1; ++bl) {
    const int64_t start = bl * block, end = std::min(pixels, start + block), len = end - start;
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(sq.begin(), sq.end(), acc_t(0));
    for (int64_t p = start; p < end; p += P) {  // block means; the block stays in cache for pass 2
      const scalar_t* px = x + p * C;
      const int64_t n = std::min(P, end - p) * C;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) sp[j] += static_cast<acc_t>(px[j]);
    }
    fold_groups(sp, C, P);
    for (int64_t k = 0; k < C; ++k) sp[k] /= acc_t(len);
    for (int64_t p = 1; p < P; ++p) std::copy(sp, sp + C, mp + p * C);
    std::copy(sp, sp + C, mp);
    for (int64_t p = start; p < end; p += P) {
      const scalar_t* px = x + p * C;
      const int64_t n = std::min(P, end - p) * C;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t d = static_cast<acc_t>(px[j]) - mp[j];
        qp[j] += d * d;
      }
    }
    fold_groups(qp, C, P);
    for (int64_t k = 0; k < C; ++k) {
      bmean[bl * C + k] = mp[k];
      bm2[bl * C + k] = qp[k];
    }
  }
}

template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* x, const BnActGeometry& g, double eps, acc_t* mean, acc_t* invstd) {
  const int64_t C = g.C, pixels = g.N * g.H * g.W, P = group_pixels(C), block = pixel_block(C, P);
  const int64_t blocks = (pixels + block - 1) / block;
  std::vector<double> bmean(blocks * C), bm2(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    stats_nhwc_blocks<scalar_t, acc_t>(x, C, P, pixels, block, b0, b1, bmean.data(), bm2.data());
  });
  // welford_merge of the blocks in order, written out with the channel loop
  // innermost: the block's count and weight are shared by every channel, so
  // the loop vectorises and has no division (a scalar merge per block and
  // channel, with its division, cost about a seventh of the forward).
  std::vector<double> m(C, 0.0), m2(C, 0.0);
  double count = 0;
  for (int64_t bl = 0; bl < blocks; ++bl) {
    const double count_b = double(std::min(block, pixels - bl * block)), total = count + count_b;
    const double frac_b = count_b / total;
    const double* bm = bmean.data() + bl * C;
    const double* bq = bm2.data() + bl * C;
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) {
      const double delta = bm[k] - m[k];
      m[k] += delta * frac_b;
      m2[k] += bq[k] + delta * delta * count * frac_b;
    }
    count = total;
  }
  for (int64_t k = 0; k < C; ++k) {
    mean[k] = static_cast<acc_t>(m[k]);
    invstd[k] = static_cast<acc_t>(1.0 / std::sqrt(m2[k] / count + eps));  // biased variance, as BatchNorm normalises
  }
}

// y for `pixels` consecutive pixels of one row (x and y both contiguous there),
// a group of P pixels per inner loop.
template <typename scalar_t, typename acc_t>
DIP_INLINE void normalize_span(const scalar_t* x, scalar_t* y, int64_t pixels, int64_t C, int64_t P,
                               const acc_t* mean, const acc_t* scale, const acc_t* beta, acc_t slope) {
  for (int64_t p = 0; p < pixels; p += P) {
    const scalar_t* in = x + p * C;
    scalar_t* out = y + p * C;
    const int64_t n = std::min(P, pixels - p) * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) store(&out[j], bn_act_value<acc_t>(static_cast<acc_t>(in[j]), mean[j], scale[j], beta[j], slope));
  }
}

// Output rows [r0, r1) (pad band rows included): the interior of a row is one
// span of W pixels; only the pad's band pixels are mapped one by one.
// mean, scale and beta are repeated per group (repeat_channels).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void normalize_nhwc_rows(const scalar_t* x, scalar_t* y, const BnActGeometry& g, int64_t P,
                                        const acc_t* mean, const acc_t* scale, const acc_t* beta, acc_t slope,
                                        int64_t r0, int64_t r1) {
  const int64_t C = g.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, i = r % g.Ho;
    const int si = pad_source(static_cast<int>(i), static_cast<int>(g.H), g.pad, g.mode);
    scalar_t* out = y + r * g.Wo * C;
    if (si < 0) {
      std::memset(out, 0, sizeof(scalar_t) * g.Wo * C);  // +0 is all zero bits in every floating type
      continue;
    }
    const scalar_t* in = x + (n * g.H + si) * g.W * C;
    normalize_span<scalar_t, acc_t>(in, out + g.pad * C, g.W, C, P, mean, scale, beta, slope);
    for (int64_t j = 0; j < g.Wo; ++j) {
      if (j == g.pad) j += g.W;  // the interior, done above
      if (j >= g.Wo) break;
      const int sj = pad_source(static_cast<int>(j), static_cast<int>(g.W), g.pad, g.mode);
      if (sj < 0) {
        std::memset(out + j * C, 0, sizeof(scalar_t) * C);
      } else {
        normalize_span<scalar_t, acc_t>(in + sj * C, out + j * C, 1, C, P, mean, scale, beta, slope);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void normalize_nhwc(const scalar_t* x, scalar_t* y, const BnActGeometry& g, const acc_t* mean, const acc_t* scale,
                    const acc_t* beta, acc_t slope) {
  const int64_t C = g.C, P = group_pixels(C);
  const auto mean_r = repeat_channels(mean, C, P), scale_r = repeat_channels(scale, C, P),
             beta_r = repeat_channels(beta, C, P);
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.Wo * g.C));
  at::parallel_for(0, g.N * g.Ho, grain, [&](int64_t r0, int64_t r1) {
    normalize_nhwc_rows<scalar_t, acc_t>(x, y, g, P, mean_r.data(), scale_r.data(), beta_r.data(), slope, r0, r1);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                  const at::Tensor& bias, double eps, double slope,
                                                                  int64_t pad, int64_t pad_mode) {
  DIP_CHECK_DEVICE(x, at::kCPU, "x");
  DIP_CHECK_DEVICE(weight, at::kCPU, "weight");
  DIP_CHECK_DEVICE(bias, at::kCPU, "bias");
  const auto call = bn_act_forward_call(x, weight, bias, eps, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const auto fmt = call.fmt;
  const auto &xc = call.x, &w = call.weight, &b = call.bias;
  auto y = call.y, mean = call.mean, invstd = call.invstd;
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(slope);
    if (nhwc) {
      stats_nhwc<scalar_t, acc_t>(xp, g, eps, mp, ip);
      std::vector<acc_t> scale(g.C);
      for (int64_t c = 0; c < g.C; ++c) scale[c] = wp[c] * ip[c];
      normalize_nhwc<scalar_t, acc_t>(xp, yp, g, mp, scale.data(), bp, s);
      return;
    }
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        stats_nchw<scalar_t, acc_t>(xp, g, c, eps, mp[c], ip[c]);
        normalize_nchw<scalar_t, acc_t>(xp, yp, g, c, mp[c], wp[c] * ip[c], bp[c], s);
      }
    });
  });
  return {y, mean, invstd};
}

// --------------------------------------------------------------- backward ---

// Column pairs (source column, padded column) beyond the direct one: the
// pad's band positions that read a given source column, folded back in.
std::vector<std::pair<int, int>> extra_columns(const BnActGeometry& g) {
  std::vector<std::pair<int, int>> extra;
  int pre[3];
  for (int w = 0; w < g.W; ++w) {
    const int k = pad_preimage(w, static_cast<int>(g.W), g.pad, g.mode, pre);
    for (int t = 1; t < k; ++t) extra.emplace_back(w, pre[t]);
  }
  return extra;
}

// g_row[w] = sum of the padded gradient over every padded position that reads x[.., h, w].
template <typename scalar_t, typename acc_t>
DIP_INLINE void fold_row_nchw(const scalar_t* dy_plane, const BnActGeometry& g, int64_t h,
                   const std::vector<std::pair<int, int>>& extra, acc_t* g_row) {
  int rows[3];
  const int nr = pad_preimage(static_cast<int>(h), static_cast<int>(g.H), g.pad, g.mode, rows);
  for (int64_t w = 0; w < g.W; ++w) g_row[w] = 0;
  for (int r = 0; r < nr; ++r) {
    const scalar_t* dyr = dy_plane + rows[r] * g.Wo;
    for (int64_t w = 0; w < g.W; ++w) g_row[w] += static_cast<acc_t>(dyr[g.pad + w]);
    for (const auto& e : extra) g_row[e.first] += static_cast<acc_t>(dyr[e.second]);
  }
}

template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nchw(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g, int64_t c,
                   acc_t mean, acc_t invstd, acc_t gamma, acc_t beta, acc_t slope,
                   const std::vector<std::pair<int, int>>& extra, std::vector<acc_t>& g_row, acc_t& sum_dz_out,
                   acc_t& sum_dz_xhat_out) {
  const acc_t scale = gamma * invstd;
  const int64_t hw = g.H * g.W;
  red_t sum_dz = 0, sum_dz_xhat = 0;
  for (int64_t n = 0; n < g.N; ++n) {  // pass 1: the two reductions
    const scalar_t* dyp = dy + (n * g.C + c) * g.Ho * g.Wo;
    const scalar_t* xp = x + (n * g.C + c) * hw;
    for (int64_t h = 0; h < g.H; ++h) {
      fold_row_nchw<scalar_t, acc_t>(dyp, g, h, extra, g_row.data());
      const scalar_t* xr = xp + h * g.W;
      acc_t a = 0, b = 0;
      const acc_t* gr = g_row.data();
#pragma omp simd reduction(+ : a, b)
      for (int64_t w = 0; w < g.W; ++w) {
        const acc_t xv = static_cast<acc_t>(xr[w]);
        const acc_t dz = bn_act_dz<acc_t>(gr[w], xv, mean, scale, beta, slope);
        a += dz;
        b += dz * (xv - mean);
      }
      sum_dz += a;
      sum_dz_xhat += b;
    }
  }
  sum_dz_xhat *= invstd;
  sum_dz_out = static_cast<acc_t>(sum_dz);
  sum_dz_xhat_out = static_cast<acc_t>(sum_dz_xhat);
  const double count = double(g.N * hw);
  const acc_t mean_dz = static_cast<acc_t>(sum_dz / count), mean_dz_xhat = static_cast<acc_t>(sum_dz_xhat / count);
  const acc_t k = gamma * invstd;
  for (int64_t n = 0; n < g.N; ++n) {  // pass 2: dx
    const scalar_t* dyp = dy + (n * g.C + c) * g.Ho * g.Wo;
    const scalar_t* xp = x + (n * g.C + c) * hw;
    scalar_t* dxp = dx + (n * g.C + c) * hw;
    for (int64_t h = 0; h < g.H; ++h) {
      fold_row_nchw<scalar_t, acc_t>(dyp, g, h, extra, g_row.data());
      const scalar_t* xr = xp + h * g.W;
      scalar_t* dxr = dxp + h * g.W;
      acc_t* gr = g_row.data();
#pragma omp simd
      for (int64_t w = 0; w < g.W; ++w) gr[w] = bn_act_dz<acc_t>(gr[w], static_cast<acc_t>(xr[w]), mean, scale, beta, slope);
      // A separate loop: with the activation's select and a bfloat16 store in one body, GCC leaves it scalar.
#pragma omp simd
      for (int64_t w = 0; w < g.W; ++w) {
        store(&dxr[w], bn_dx<acc_t>(gr[w], (static_cast<acc_t>(xr[w]) - mean) * invstd, k, mean_dz, mean_dz_xhat));
      }
    }
  }
}

// The folded gradient of every channel at pixel (n, h, w), for a pixel that
// more than one padded position reads (the reflection's band): the sum of
// the 2 to 9 positions that do, accumulated in gbuf.
template <typename scalar_t, typename acc_t>
DIP_INLINE void fold_pixel_nhwc(const scalar_t* dy, const BnActGeometry& g, int64_t n, int64_t h, int64_t w,
                                acc_t* gbuf) {
  int rows[3], cols[3];
  const int nr = pad_preimage(static_cast<int>(h), static_cast<int>(g.H), g.pad, g.mode, rows);
  const int nc = pad_preimage(static_cast<int>(w), static_cast<int>(g.W), g.pad, g.mode, cols);
  const int64_t C = g.C;
  for (int64_t k = 0; k < C; ++k) gbuf[k] = 0;
  for (int r = 0; r < nr; ++r) {
    for (int q = 0; q < nc; ++q) {
      const scalar_t* src = dy + ((n * g.Ho + rows[r]) * g.Wo + cols[q]) * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) gbuf[k] += static_cast<acc_t>(src[k]);
    }
  }
}

// Per-channel constants of the channels_last backward, each repeated for the
// P pixels of a group (repeat_channels).
template <typename acc_t>
struct BackwardConsts {
  const acc_t *mean, *invstd, *scale, *beta;  // scale = gamma * invstd
  const acc_t *mean_dz, *mean_dz_xhat;        // pass 2 only
  acc_t slope;
};

// Pass 1 over `pixels` pixels whose gradient is g (contiguous, one padded
// position per pixel, or a folded buffer): a += dz, b += dz * (x - mean),
// into accumulators repeated per group.
template <typename g_t, typename scalar_t, typename acc_t>
DIP_INLINE void sums_span(const g_t* gy, const scalar_t* x, int64_t pixels, int64_t C, int64_t P,
                          const BackwardConsts<acc_t>& q, acc_t* a, acc_t* b) {
  // Locals, not q's fields: a store may alias q (a bfloat16 store is a
  // memcpy), which would reload them every element and keep the loop scalar.
  const acc_t *mean = q.mean, *scale = q.scale, *beta = q.beta;
  const acc_t slope = q.slope;
  for (int64_t p = 0; p < pixels; p += P) {
    const g_t* gp = gy + p * C;
    const scalar_t* xp = x + p * C;
    const int64_t n = std::min(P, pixels - p) * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t xv = static_cast<acc_t>(xp[j]);
      const acc_t dz = bn_act_dz<acc_t>(static_cast<acc_t>(gp[j]), xv, mean[j], scale[j], beta[j], slope);
      a[j] += dz;
      b[j] += dz * (xv - mean[j]);
    }
  }
}

// Pass 2 over the same kind of span: dx, with dz recomputed in the same loop
// (re-reading x and the gradient is cheaper than writing dz out in pass 1 and
// reading it back).
template <typename g_t, typename scalar_t, typename acc_t>
DIP_INLINE void dx_span(const g_t* gy, const scalar_t* x, scalar_t* dx, int64_t pixels, int64_t C, int64_t P,
                        const BackwardConsts<acc_t>& q) {
  const acc_t *mean = q.mean, *invstd = q.invstd, *scale = q.scale, *beta = q.beta;  // locals: see sums_span
  const acc_t *mean_dz = q.mean_dz, *mean_dz_xhat = q.mean_dz_xhat;
  const acc_t slope = q.slope;
  for (int64_t p = 0; p < pixels; p += P) {
    const g_t* gp = gy + p * C;
    const scalar_t* xp = x + p * C;
    scalar_t* out = dx + p * C;
    const int64_t n = std::min(P, pixels - p) * C;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const acc_t xv = static_cast<acc_t>(xp[j]);
      const acc_t dz = bn_act_dz<acc_t>(static_cast<acc_t>(gp[j]), xv, mean[j], scale[j], beta[j], slope);
      const acc_t xhat = (xv - mean[j]) * invstd[j];
      store(&out[j], bn_dx<acc_t>(dz, xhat, scale[j], mean_dz[j], mean_dz_xhat[j]));
    }
  }
}

// Walks source pixels [p0, p1) row by row, calling direct(gy, p, count) for
// each run of pixels that exactly one padded position reads (their gradient is
// contiguous in gy, from the padded row's interior) and folded(gbuf, p) for
// each pixel of the reflection's bands, with its gradient summed into gbuf.
// Replaces a per-pixel index decode and two pad_preimage calls per pixel.
template <typename scalar_t, typename acc_t, typename Direct, typename Folded>
DIP_INLINE void for_each_run(const scalar_t* dy, const BnActGeometry& g, const std::vector<uint8_t>& direct_col,
                             int64_t p0, int64_t p1, acc_t* gbuf, Direct&& direct, Folded&& folded) {
  int rows[3];
  for (int64_t p = p0; p < p1;) {
    const int64_t w0 = p % g.W, t = p / g.W, h = t % g.H, n = t / g.H;
    const int64_t row_end = std::min(p1, p - w0 + g.W);
    const bool direct_row = pad_preimage(static_cast<int>(h), static_cast<int>(g.H), g.pad, g.mode, rows) == 1;
    const scalar_t* gy_row = dy + ((n * g.Ho + h + g.pad) * g.Wo + g.pad) * g.C;  // source column w at gy_row + w * C
    for (int64_t w = w0; p < row_end;) {
      int64_t e = w;
      if (direct_row) {
        while (p + (e - w) < row_end && direct_col[e]) ++e;
      }
      if (e > w) {
        direct(gy_row + w * g.C, p, e - w);
        p += e - w;
        w = e;
      } else {
        fold_pixel_nhwc<scalar_t, acc_t>(dy, g, n, h, w, gbuf);
        folded(static_cast<const acc_t*>(gbuf), p);
        ++p;
        ++w;
      }
    }
  }
}

// Whether exactly one padded position reads source column w, per column.
std::vector<uint8_t> direct_columns(const BnActGeometry& g) {
  std::vector<uint8_t> d(g.W);
  int pre[3];
  for (int w = 0; w < g.W; ++w) d[w] = pad_preimage(w, static_cast<int>(g.W), g.pad, g.mode, pre) == 1;
  return d;
}

// Pass 1 of the channels_last backward for pixel blocks [b0, b1): per block
// and channel, sum(dz) and sum(dz * (x - mean)).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nhwc_sums(const scalar_t* dy, const scalar_t* x, const BnActGeometry& g, int64_t P,
                                       int64_t block, int64_t b0, int64_t b1, const std::vector<uint8_t>& direct_col,
                                       const BackwardConsts<acc_t>& q, double* ba, double* bb) {
  const int64_t C = g.C, pixels = g.N * g.H * g.W;
  std::vector<acc_t> gbuf(C), ta(P * C), tb(P * C);
  acc_t *ap = ta.data(), *bp = tb.data();
  for (int64_t bl = b0; bl < b1; ++bl) {
    std::fill(ta.begin(), ta.end(), acc_t(0));
    std::fill(tb.begin(), tb.end(), acc_t(0));
    for_each_run<scalar_t, acc_t>(
        dy, g, direct_col, bl * block, std::min(pixels, (bl + 1) * block), gbuf.data(),
        [&](const scalar_t* gy, int64_t p, int64_t count) { sums_span(gy, x + p * C, count, C, P, q, ap, bp); },
        [&](const acc_t* gf, int64_t p) { sums_span(gf, x + p * C, 1, C, P, q, ap, bp); });
    fold_groups(ap, C, P);
    fold_groups(bp, C, P);
    for (int64_t k = 0; k < C; ++k) {
      ba[bl * C + k] = ap[k];
      bb[bl * C + k] = bp[k];
    }
  }
}

// Pass 2 of the channels_last backward: dx for pixels [p0, p1).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nhwc_dx(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g,
                                     int64_t P, int64_t p0, int64_t p1, const std::vector<uint8_t>& direct_col,
                                     const BackwardConsts<acc_t>& q) {
  const int64_t C = g.C;
  std::vector<acc_t> gbuf(C);
  for_each_run<scalar_t, acc_t>(
      dy, g, direct_col, p0, p1, gbuf.data(),
      [&](const scalar_t* gy, int64_t p, int64_t count) { dx_span(gy, x + p * C, dx + p * C, count, C, P, q); },
      [&](const acc_t* gf, int64_t p) { dx_span(gf, x + p * C, dx + p * C, 1, C, P, q); });
}

// channels_last backward, over the same fixed pixel blocks as stats_nhwc:
// pass 1 reduces sum(dz) and sum(dz * (x - mean)) per block (merged per
// channel in block order, in double), pass 2 writes dx.
template <typename scalar_t, typename acc_t>
void backward_nhwc(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g, const acc_t* mean,
                   const acc_t* invstd, const acc_t* gamma, const acc_t* beta, acc_t slope, acc_t* sum_dz,
                   acc_t* sum_dz_xhat) {
  const int64_t C = g.C, pixels = g.N * g.H * g.W, P = group_pixels(C), block = pixel_block(C, P);
  const int64_t blocks = (pixels + block - 1) / block;
  std::vector<acc_t> scale(C);
  for (int64_t k = 0; k < C; ++k) scale[k] = gamma[k] * invstd[k];
  const auto mean_r = repeat_channels(mean, C, P), invstd_r = repeat_channels(invstd, C, P),
             scale_r = repeat_channels(scale.data(), C, P), beta_r = repeat_channels(beta, C, P);
  BackwardConsts<acc_t> q{mean_r.data(), invstd_r.data(), scale_r.data(), beta_r.data(), nullptr, nullptr, slope};
  const auto direct_col = direct_columns(g);
  std::vector<double> ba(blocks * C), bb(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    backward_nhwc_sums<scalar_t, acc_t>(dy, x, g, P, block, b0, b1, direct_col, q, ba.data(), bb.data());
  });
  // Block order, the channel loop innermost (it vectorises).
  std::vector<double> a(C, 0.0), b(C, 0.0);
  for (int64_t bl = 0; bl < blocks; ++bl) {
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) {
      a[k] += ba[bl * C + k];
      b[k] += bb[bl * C + k];
    }
  }
  const double count = double(pixels);
  std::vector<acc_t> mean_dz(C), mean_dz_xhat(C);
  for (int64_t k = 0; k < C; ++k) {
    b[k] *= invstd[k];
    sum_dz[k] = static_cast<acc_t>(a[k]);
    sum_dz_xhat[k] = static_cast<acc_t>(b[k]);
    mean_dz[k] = static_cast<acc_t>(a[k] / count);
    mean_dz_xhat[k] = static_cast<acc_t>(b[k] / count);
  }
  const auto mean_dz_r = repeat_channels(mean_dz.data(), C, P), mean_dz_xhat_r = repeat_channels(mean_dz_xhat.data(), C, P);
  q.mean_dz = mean_dz_r.data();
  q.mean_dz_xhat = mean_dz_xhat_r.data();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    backward_nhwc_dx<scalar_t, acc_t>(dy, x, dx, g, P, b0 * block, std::min(pixels, b1 * block), direct_col, q);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& bias,
                                                                   const at::Tensor& mean, const at::Tensor& invstd,
                                                                   double slope, int64_t pad, int64_t pad_mode) {
  for (const auto* t : {&grad_y, &x, &weight, &bias, &mean, &invstd}) {
    DIP_CHECK_DEVICE(*t, at::kCPU, "every argument");
  }
  const auto call = bn_act_backward_call(grad_y, x, weight, bias, mean, invstd, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const auto fmt = call.fmt;
  const auto &gy = call.grad_y, &xc = call.x, &w = call.weight, &b = call.bias, &m = call.mean, &is = call.invstd;
  auto dx = call.grad_x, dw = call.grad_weight, db = call.grad_bias;
  const bool nhwc = fmt == at::MemoryFormat::ChannelsLast;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    const acc_t* mp = m.const_data_ptr<acc_t>();
    const acc_t* ip = is.const_data_ptr<acc_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* bp = b.const_data_ptr<acc_t>();
    acc_t* dwp = dw.data_ptr<acc_t>();
    acc_t* dbp = db.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(slope);
    const auto extra = extra_columns(g);
    if (nhwc) {
      backward_nhwc<scalar_t, acc_t>(dyp, xp, dxp, g, mp, ip, wp, bp, s, dbp, dwp);
      return;
    }
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> g_row(g.W);
      for (int64_t c = c0; c < c1; ++c) {
        backward_nchw<scalar_t, acc_t>(dyp, xp, dxp, g, c, mp[c], ip[c], wp[c], bp[c], s, extra, g_row, dbp[c],
                                       dwp[c]);
      }
    });
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
}

void bn_running_stats_update_cpu(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                 const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  const at::Tensor* stats[] = {&running_mean, &running_var, &mean, &invstd};
  for (const at::Tensor* t : stats) DIP_CHECK_DEVICE(*t, at::kCPU, "every statistic");
  bn_running_stats_check(running_mean, running_var, mean, invstd, momentum, count);
  const double unbias = bn_running_unbias(count);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_running_stats_update", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_running_stats_update_acc", [&] {
      run_t* rm = running_mean.data_ptr<run_t>();
      run_t* rv = running_var.data_ptr<run_t>();
      const scalar_t* m = mean.const_data_ptr<scalar_t>();
      const scalar_t* is = invstd.const_data_ptr<scalar_t>();
      for (int64_t c = 0; c < mean.numel(); ++c) bn_running_update<run_t, scalar_t>(rm[c], rv[c], m[c], is[c], momentum, eps, unbias);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("bn_act", &bn_act_forward_cpu);
  m.impl("_bn_act_backward", &bn_act_backward_cpu);
  m.impl("bn_act_running_stats_update", &bn_running_stats_update_cpu);
}

}  // namespace dip_fast
