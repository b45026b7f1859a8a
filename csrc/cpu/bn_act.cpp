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
int64_t pixel_block(int64_t C) { return std::max<int64_t>(16, 8192 / std::max<int64_t>(1, C)); }

// Per-channel mean and M2 of each pixel block in [b0, b1).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void stats_nhwc_blocks(const scalar_t* x, int64_t C, int64_t pixels, int64_t block, int64_t b0,
                                      int64_t b1, double* bmean, double* bm2) {
  std::vector<acc_t> sum(C), sq(C);
  for (int64_t bl = b0; bl < b1; ++bl) {
    const int64_t start = bl * block, len = std::min(block, pixels - start);
    std::fill(sum.begin(), sum.end(), acc_t(0));
    std::fill(sq.begin(), sq.end(), acc_t(0));
    acc_t* sp = sum.data();
    acc_t* qp = sq.data();
    for (int64_t p = start; p < start + len; ++p) {  // block means; the block stays in cache for pass 2
      const scalar_t* px = x + p * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) sp[k] += static_cast<acc_t>(px[k]);
    }
    for (int64_t k = 0; k < C; ++k) sp[k] /= acc_t(len);
    for (int64_t p = start; p < start + len; ++p) {
      const scalar_t* px = x + p * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) {
        const acc_t d = static_cast<acc_t>(px[k]) - sp[k];
        qp[k] += d * d;
      }
    }
    for (int64_t k = 0; k < C; ++k) {
      bmean[bl * C + k] = sp[k];
      bm2[bl * C + k] = qp[k];
    }
  }
}

template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* x, const BnActGeometry& g, double eps, acc_t* mean, acc_t* invstd) {
  const int64_t C = g.C, pixels = g.N * g.H * g.W, block = pixel_block(C);
  const int64_t blocks = (pixels + block - 1) / block;
  std::vector<double> bmean(blocks * C), bm2(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    stats_nhwc_blocks<scalar_t, acc_t>(x, C, pixels, block, b0, b1, bmean.data(), bm2.data());
  });
  for (int64_t k = 0; k < C; ++k) {
    double count = 0, m = 0, m2 = 0;
    for (int64_t bl = 0; bl < blocks; ++bl) {
      welford_merge<double>(count, m, m2, double(std::min(block, pixels - bl * block)), bmean[bl * C + k],
                            bm2[bl * C + k]);
    }
    mean[k] = static_cast<acc_t>(m);
    invstd[k] = static_cast<acc_t>(1.0 / std::sqrt(m2 / count + eps));  // biased variance, as BatchNorm normalises
  }
}

// Output rows [r0, r1) (pad band rows included); per pixel, a unit-stride loop over the channels.
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void normalize_nhwc_rows(const scalar_t* x, scalar_t* y, const BnActGeometry& g, const acc_t* mean,
                                        const acc_t* scale, const acc_t* beta, acc_t slope, int64_t r0, int64_t r1) {
  const int64_t C = g.C;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t n = r / g.Ho, i = r % g.Ho;
    const int si = pad_source(static_cast<int>(i), static_cast<int>(g.H), g.pad, g.mode);
    for (int64_t j = 0; j < g.Wo; ++j) {
      scalar_t* out = y + ((n * g.Ho + i) * g.Wo + j) * C;
      const int sj = pad_source(static_cast<int>(j), static_cast<int>(g.W), g.pad, g.mode);
      if (si < 0 || sj < 0) {
        std::fill(out, out + C, scalar_t(0));
        continue;
      }
      const scalar_t* in = x + ((n * g.H + si) * g.W + sj) * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) {
        store(&out[k], bn_act_value<acc_t>(static_cast<acc_t>(in[k]), mean[k], scale[k], beta[k], slope));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void normalize_nhwc(const scalar_t* x, scalar_t* y, const BnActGeometry& g, const acc_t* mean, const acc_t* scale,
                    const acc_t* beta, acc_t slope) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.Wo * g.C));
  at::parallel_for(0, g.N * g.Ho, grain, [&](int64_t r0, int64_t r1) {
    normalize_nhwc_rows<scalar_t, acc_t>(x, y, g, mean, scale, beta, slope, r0, r1);
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

// The folded gradient of every channel at pixel (n, h, w): a pointer into dy
// when only one padded position reads the pixel (the interior), else the sum
// of the 2 to 9 positions that do, accumulated in gbuf.
template <typename scalar_t, typename acc_t>
DIP_INLINE const scalar_t* fold_pixel_nhwc(const scalar_t* dy, const BnActGeometry& g, int64_t n, int64_t h, int64_t w,
                                acc_t* gbuf, bool& folded) {
  int rows[3], cols[3];
  const int nr = pad_preimage(static_cast<int>(h), static_cast<int>(g.H), g.pad, g.mode, rows);
  const int nc = pad_preimage(static_cast<int>(w), static_cast<int>(g.W), g.pad, g.mode, cols);
  const int64_t C = g.C;
  const scalar_t* first = dy + ((n * g.Ho + rows[0]) * g.Wo + cols[0]) * C;
  folded = nr * nc > 1;
  if (!folded) return first;
  for (int64_t k = 0; k < C; ++k) gbuf[k] = static_cast<acc_t>(first[k]);
  for (int r = 0; r < nr; ++r) {
    for (int q = 0; q < nc; ++q) {
      if (r == 0 && q == 0) continue;
      const scalar_t* src = dy + ((n * g.Ho + rows[r]) * g.Wo + cols[q]) * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) gbuf[k] += static_cast<acc_t>(src[k]);
    }
  }
  return nullptr;
}

// dz of every channel at one pixel into dz[0, C).
template <typename scalar_t, typename acc_t>
DIP_INLINE void pixel_dz_nhwc(const scalar_t* dy, const scalar_t* x, const BnActGeometry& g, int64_t p, const acc_t* mean,
                   const acc_t* scale, const acc_t* beta, acc_t slope, acc_t* gbuf, acc_t* dz) {
  const int64_t C = g.C;
  const int64_t w = p % g.W, t = p / g.W, h = t % g.H, n = t / g.H;
  bool folded;
  const scalar_t* direct = fold_pixel_nhwc<scalar_t, acc_t>(dy, g, n, h, w, gbuf, folded);
  const scalar_t* xp = x + p * C;
  if (folded) {
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) dz[k] = bn_act_dz<acc_t>(gbuf[k], static_cast<acc_t>(xp[k]), mean[k], scale[k], beta[k], slope);
  } else {
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) {
      dz[k] = bn_act_dz<acc_t>(static_cast<acc_t>(direct[k]), static_cast<acc_t>(xp[k]), mean[k], scale[k], beta[k], slope);
    }
  }
}

// Pass 1 of the channels_last backward for pixel blocks [b0, b1): per block
// and channel, sum(dz) and sum(dz * (x - mean)).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nhwc_sums(const scalar_t* dy, const scalar_t* x, const BnActGeometry& g, int64_t block,
                                       int64_t b0, int64_t b1, const acc_t* mean, const acc_t* scale,
                                       const acc_t* beta, acc_t slope, double* ba, double* bb) {
  const int64_t C = g.C, pixels = g.N * g.H * g.W;
  std::vector<acc_t> gbuf(C), dz(C), ta(C), tb(C);
  for (int64_t bl = b0; bl < b1; ++bl) {
    std::fill(ta.begin(), ta.end(), acc_t(0));
    std::fill(tb.begin(), tb.end(), acc_t(0));
    acc_t *ap = ta.data(), *bp = tb.data(), *dp = dz.data();
    for (int64_t p = bl * block; p < std::min(pixels, (bl + 1) * block); ++p) {
      pixel_dz_nhwc<scalar_t, acc_t>(dy, x, g, p, mean, scale, beta, slope, gbuf.data(), dp);
      const scalar_t* xp = x + p * C;
#pragma omp simd
      for (int64_t k = 0; k < C; ++k) {
        ap[k] += dp[k];
        bp[k] += dp[k] * (static_cast<acc_t>(xp[k]) - mean[k]);
      }
    }
    for (int64_t k = 0; k < C; ++k) {
      ba[bl * C + k] = ap[k];
      bb[bl * C + k] = bp[k];
    }
  }
}

// Pass 2 of the channels_last backward: dx for pixels [p0, p1).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nhwc_dx(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g,
                                     int64_t p0, int64_t p1, const acc_t* mean, const acc_t* invstd,
                                     const acc_t* scale, const acc_t* beta, acc_t slope, const acc_t* mean_dz,
                                     const acc_t* mean_dz_xhat) {
  const int64_t C = g.C;
  std::vector<acc_t> gbuf(C), dz(C);
  acc_t* dp = dz.data();
  for (int64_t p = p0; p < p1; ++p) {
    pixel_dz_nhwc<scalar_t, acc_t>(dy, x, g, p, mean, scale, beta, slope, gbuf.data(), dp);
    const scalar_t* xp = x + p * C;
    scalar_t* out = dx + p * C;
#pragma omp simd
    for (int64_t k = 0; k < C; ++k) {
      const acc_t xhat = (static_cast<acc_t>(xp[k]) - mean[k]) * invstd[k];
      store(&out[k], bn_dx<acc_t>(dp[k], xhat, scale[k], mean_dz[k], mean_dz_xhat[k]));
    }
  }
}

// channels_last backward, over the same fixed pixel blocks as stats_nhwc:
// pass 1 reduces sum(dz) and sum(dz * (x - mean)) per block (merged per
// channel in block order, in double), pass 2 writes dx.
template <typename scalar_t, typename acc_t>
void backward_nhwc(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g, const acc_t* mean,
                   const acc_t* invstd, const acc_t* gamma, const acc_t* beta, acc_t slope, acc_t* sum_dz,
                   acc_t* sum_dz_xhat) {
  const int64_t C = g.C, pixels = g.N * g.H * g.W, block = pixel_block(C);
  const int64_t blocks = (pixels + block - 1) / block;
  std::vector<acc_t> scale(C);
  for (int64_t k = 0; k < C; ++k) scale[k] = gamma[k] * invstd[k];
  std::vector<double> ba(blocks * C), bb(blocks * C);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    backward_nhwc_sums<scalar_t, acc_t>(dy, x, g, block, b0, b1, mean, scale.data(), beta, slope, ba.data(), bb.data());
  });
  const double count = double(pixels);
  std::vector<acc_t> mean_dz(C), mean_dz_xhat(C);
  for (int64_t k = 0; k < C; ++k) {
    double a = 0, b = 0;
    for (int64_t bl = 0; bl < blocks; ++bl) {
      a += ba[bl * C + k];
      b += bb[bl * C + k];
    }
    b *= invstd[k];
    sum_dz[k] = static_cast<acc_t>(a);
    sum_dz_xhat[k] = static_cast<acc_t>(b);
    mean_dz[k] = static_cast<acc_t>(a / count);
    mean_dz_xhat[k] = static_cast<acc_t>(b / count);
  }
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    backward_nhwc_dx<scalar_t, acc_t>(dy, x, dx, g, b0 * block, std::min(pixels, b1 * block), mean, invstd,
                                      scale.data(), beta, slope, mean_dz.data(), mean_dz_xhat.data());
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
