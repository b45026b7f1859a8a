// CPU kernels of the fused BatchNorm (training mode) + LeakyReLU + pad ops.
//
// Work is split over channels (at::parallel_for): every statistic is per
// channel, so a thread owns its channels' reductions outright (deterministic,
// no merge step) and, in channels_last, a contiguous slice of every pixel's
// channel vector. Two layouts are written out, each with a unit-stride inner
// loop that the compiler vectorises: NCHW (along a row) and channels_last
// (along the channels of a pixel).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

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
void stats_nchw(const scalar_t* x, const BnActGeometry& g, int64_t c, double eps, acc_t& mean, acc_t& invstd) {
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
void normalize_nchw(const scalar_t* x, scalar_t* y, const BnActGeometry& g, int64_t c, acc_t mean, acc_t scale,
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
      for (int64_t w = 0; w < g.W; ++w) {
        mid[w] = static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(row[w]), mean, scale, beta, slope));
      }
      for (int64_t j = g.pad + g.W; j < g.Wo; ++j) {  // right band
        const int sj = pad_source(static_cast<int>(j), static_cast<int>(g.W), g.pad, g.mode);
        out[j] = sj < 0 ? scalar_t(0)
                        : static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(row[sj]), mean, scale, beta, slope));
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void stats_nhwc(const scalar_t* x, const BnActGeometry& g, int64_t c0, int64_t c1, double eps, acc_t* mean,
                acc_t* invstd) {
  const int64_t cr = c1 - c0;
  const int64_t pixels = g.N * g.H * g.W;
  const int64_t block = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, cr));
  std::vector<double> m(cr, 0), m2(cr, 0);  // merged in double
  std::vector<red_t> s(cr), q(cr);
  double count = 0;
  for (int64_t start = 0; start < pixels; start += block) {
    const int64_t len = std::min(block, pixels - start);
    std::fill(s.begin(), s.end(), acc_t(0));
    std::fill(q.begin(), q.end(), acc_t(0));
    for (int64_t p = start; p < start + len; ++p) {
      const scalar_t* px = x + p * g.C + c0;
      for (int64_t k = 0; k < cr; ++k) s[k] += static_cast<red_t>(px[k]);
    }
    for (int64_t k = 0; k < cr; ++k) s[k] /= red_t(len);  // chunk means
    for (int64_t p = start; p < start + len; ++p) {
      const scalar_t* px = x + p * g.C + c0;
      for (int64_t k = 0; k < cr; ++k) {
        const red_t d = static_cast<red_t>(px[k]) - s[k];
        q[k] += d * d;
      }
    }
    for (int64_t k = 0; k < cr; ++k) {
      double cnt = count;
      welford_merge<double>(cnt, m[k], m2[k], double(len), s[k], q[k]);
    }
    count += double(len);
  }
  for (int64_t k = 0; k < cr; ++k) {
    mean[c0 + k] = static_cast<acc_t>(m[k]);
    invstd[c0 + k] = static_cast<acc_t>(1.0 / std::sqrt(m2[k] / count + eps));
  }
}

template <typename scalar_t, typename acc_t>
void normalize_nhwc(const scalar_t* x, scalar_t* y, const BnActGeometry& g, int64_t c0, int64_t c1,
                    const acc_t* mean, const acc_t* scale, const acc_t* beta, acc_t slope) {
  const int64_t cr = c1 - c0;
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t i = 0; i < g.Ho; ++i) {
      const int si = pad_source(static_cast<int>(i), static_cast<int>(g.H), g.pad, g.mode);
      for (int64_t j = 0; j < g.Wo; ++j) {
        scalar_t* out = y + ((n * g.Ho + i) * g.Wo + j) * g.C + c0;
        const int sj = pad_source(static_cast<int>(j), static_cast<int>(g.W), g.pad, g.mode);
        if (si < 0 || sj < 0) {
          std::fill(out, out + cr, scalar_t(0));
          continue;
        }
        const scalar_t* in = x + ((n * g.H + si) * g.W + sj) * g.C + c0;
        for (int64_t k = 0; k < cr; ++k) {
          out[k] = static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(in[k]), mean[k], scale[k], beta[k], slope));
        }
      }
    }
  }
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
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
      if (nhwc) {
        stats_nhwc<scalar_t, acc_t>(xp, g, c0, c1, eps, mp, ip);
        std::vector<acc_t> scale(c1 - c0);
        for (int64_t c = c0; c < c1; ++c) scale[c - c0] = wp[c] * ip[c];
        normalize_nhwc<scalar_t, acc_t>(xp, yp, g, c0, c1, mp + c0, scale.data(), bp + c0, s);
      } else {
        for (int64_t c = c0; c < c1; ++c) {
          stats_nchw<scalar_t, acc_t>(xp, g, c, eps, mp[c], ip[c]);
          normalize_nchw<scalar_t, acc_t>(xp, yp, g, c, mp[c], wp[c] * ip[c], bp[c], s);
        }
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
void fold_row_nchw(const scalar_t* dy_plane, const BnActGeometry& g, int64_t h,
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
void backward_nchw(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g, int64_t c,
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
      for (int64_t w = 0; w < g.W; ++w) {
        const acc_t xv = static_cast<acc_t>(xr[w]);
        const acc_t dz = bn_act_dz<acc_t>(g_row[w], xv, mean, scale, beta, slope);
        dxr[w] = static_cast<scalar_t>(bn_dx<acc_t>(dz, (xv - mean) * invstd, k, mean_dz, mean_dz_xhat));
      }
    }
  }
}

// gbuf[k] = folded gradient of channel c0 + k at pixel (n, h, w).
template <typename scalar_t, typename acc_t>
void fold_pixel_nhwc(const scalar_t* dy, const BnActGeometry& g, int64_t n, int64_t h, int64_t w, int64_t c0,
                     int64_t cr, acc_t* gbuf) {
  int rows[3], cols[3];
  const int nr = pad_preimage(static_cast<int>(h), static_cast<int>(g.H), g.pad, g.mode, rows);
  const int nc = pad_preimage(static_cast<int>(w), static_cast<int>(g.W), g.pad, g.mode, cols);
  const scalar_t* first = dy + ((n * g.Ho + rows[0]) * g.Wo + cols[0]) * g.C + c0;
  for (int64_t k = 0; k < cr; ++k) gbuf[k] = static_cast<acc_t>(first[k]);
  for (int r = 0; r < nr; ++r) {
    for (int q = 0; q < nc; ++q) {
      if (r == 0 && q == 0) continue;
      const scalar_t* src = dy + ((n * g.Ho + rows[r]) * g.Wo + cols[q]) * g.C + c0;
      for (int64_t k = 0; k < cr; ++k) gbuf[k] += static_cast<acc_t>(src[k]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_nhwc(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const BnActGeometry& g, int64_t c0,
                   int64_t c1, const acc_t* mean, const acc_t* invstd, const acc_t* gamma, const acc_t* beta,
                   acc_t slope, acc_t* sum_dz, acc_t* sum_dz_xhat) {
  const int64_t cr = c1 - c0;
  std::vector<acc_t> scale(cr), gbuf(cr);
  std::vector<red_t> ta(cr, 0), tb(cr, 0);
  for (int64_t k = 0; k < cr; ++k) {
    scale[k] = gamma[c0 + k] * invstd[c0 + k];
  }
  for (int64_t n = 0; n < g.N; ++n) {  // pass 1
    for (int64_t h = 0; h < g.H; ++h) {
      for (int64_t w = 0; w < g.W; ++w) {
        fold_pixel_nhwc<scalar_t, acc_t>(dy, g, n, h, w, c0, cr, gbuf.data());
        const scalar_t* xp = x + ((n * g.H + h) * g.W + w) * g.C + c0;
        for (int64_t k = 0; k < cr; ++k) {
          const acc_t xv = static_cast<acc_t>(xp[k]);
          const acc_t dz = bn_act_dz<acc_t>(gbuf[k], xv, mean[c0 + k], scale[k], beta[c0 + k], slope);
          ta[k] += dz;
          tb[k] += red_t(dz) * (red_t(xv) - red_t(mean[c0 + k]));
        }
      }
    }
  }
  const double count = double(g.N * g.H * g.W);
  std::vector<acc_t> mean_dz(cr), mean_dz_xhat(cr), kk(cr);
  for (int64_t k = 0; k < cr; ++k) {
    const double sdx = tb[k] * invstd[c0 + k];
    sum_dz[c0 + k] = static_cast<acc_t>(ta[k]);
    sum_dz_xhat[c0 + k] = static_cast<acc_t>(sdx);
    mean_dz[k] = static_cast<acc_t>(ta[k] / count);
    mean_dz_xhat[k] = static_cast<acc_t>(sdx / count);
    kk[k] = gamma[c0 + k] * invstd[c0 + k];
  }
  for (int64_t n = 0; n < g.N; ++n) {  // pass 2
    for (int64_t h = 0; h < g.H; ++h) {
      for (int64_t w = 0; w < g.W; ++w) {
        fold_pixel_nhwc<scalar_t, acc_t>(dy, g, n, h, w, c0, cr, gbuf.data());
        const int64_t off = ((n * g.H + h) * g.W + w) * g.C + c0;
        const scalar_t* xp = x + off;
        scalar_t* dxp = dx + off;
        for (int64_t k = 0; k < cr; ++k) {
          const acc_t xv = static_cast<acc_t>(xp[k]);
          const acc_t dz = bn_act_dz<acc_t>(gbuf[k], xv, mean[c0 + k], scale[k], beta[c0 + k], slope);
          dxp[k] = static_cast<scalar_t>(
              bn_dx<acc_t>(dz, (xv - mean[c0 + k]) * invstd[c0 + k], kk[k], mean_dz[k], mean_dz_xhat[k]));
        }
      }
    }
  }
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
    at::parallel_for(0, g.C, channel_grain(g), [&](int64_t c0, int64_t c1) {
      if (nhwc) {
        backward_nhwc<scalar_t, acc_t>(dyp, xp, dxp, g, c0, c1, mp, ip, wp, bp, s, dbp, dwp);
      } else {
        std::vector<acc_t> g_row(g.W);
        for (int64_t c = c0; c < c1; ++c) {
          backward_nchw<scalar_t, acc_t>(dyp, xp, dxp, g, c, mp[c], ip[c], wp[c], bp[c], s, extra, g_row, dbp[c],
                                         dwp[c]);
        }
      }
    });
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("bn_act_forward", &bn_act_forward_cpu);
  m.impl("bn_act_backward", &bn_act_backward_cpu);
}

}  // namespace dip_fast
