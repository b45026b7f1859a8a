// CPU kernels of upsample_cat: out = cat([skip, upsample2x(deep)], dim=1)
// written in one pass, and its backward (the skip channels' gradient copied
// out, the deep channels' gradient gathered through the transposed taps).
// With G groups the concatenation is per group (UpsampleCatShape): NCHW
// shapes arrive with the groups folded into the batch, so the NCHW loops are
// those of G = 1; the channels_last loops walk the G groups of each pixel.
//
// Two loop orders, each with a unit-stride inner loop:
//   NCHW           one task per channel plane; bilinear is separable, so each
//                  source row is interpolated along W once (into a small
//                  per-task buffer) and every output row is a blend of two
//                  of those rows. The backward does the transpose: rows
//                  first (into the buffer), then columns.
//   channels_last  one task per output (forward) or source (backward) row;
//                  the inner loop runs along the channels of a pixel.
// The taps and their transpose come from csrc/common/upsample_cat.h, which
// the CUDA kernels use too.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "store.h"
#include "../common/upsample_cat.h"
#include "../common/upsample_cat_checks.h"

namespace dip_fast {
namespace {

// Up to 4 source indices and weights per output (forward: 2 used) or per
// source index (backward): padded with weight 0 so inner loops have a fixed trip count.
template <typename acc_t>
struct TapTable {
  std::vector<int> index;  // n_out x 4
  std::vector<acc_t> weight;
};

template <typename acc_t>
TapTable<acc_t> forward_taps(int n_out, int mode) {
  TapTable<acc_t> t{std::vector<int>(4 * n_out, 0), std::vector<acc_t>(4 * n_out, acc_t(0))};
  for (int o = 0; o < n_out; ++o) {
    upsample_taps<acc_t>(o, n_out / 2, mode, t.index[4 * o], t.index[4 * o + 1], t.weight[4 * o], t.weight[4 * o + 1]);
  }
  return t;
}

template <typename acc_t>
TapTable<acc_t> backward_taps(int n_in, int mode) {
  TapTable<acc_t> t{std::vector<int>(4 * n_in, 0), std::vector<acc_t>(4 * n_in, acc_t(0))};
  for (int i = 0; i < n_in; ++i) {
    const int k = upsample_preimage<acc_t>(i, n_in, mode, &t.index[4 * i], &t.weight[4 * i]);
    for (int j = k; j < 4; ++j) t.index[4 * i + j] = t.index[4 * i];  // weight 0, any valid index
  }
  return t;
}

int64_t plane_grain(int64_t plane_elements) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, plane_elements)); }

// ---------------------------------------------------------------- forward ---

// Output planes [p0, p1) (plane p = channel p % C of image p / C).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void forward_nchw_planes(const scalar_t* skip, const scalar_t* deep, scalar_t* out,
                                        const UpsampleCatShape& s, const TapTable<acc_t>& rows,
                                        const TapTable<acc_t>& cols, int64_t p0, int64_t p1) {
  const int C = s.Cs + s.Cd, H = s.H, W = s.W, h = H / 2, w = W / 2;
  const int64_t plane = int64_t(H) * W;
  std::vector<acc_t> interp(int64_t(h) * W);  // each source row interpolated along W
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / C, c = p % C;
    scalar_t* o = out + p * plane;
    if (c < s.Cs) {
      std::memcpy(o, skip + (n * s.Cs + c) * plane, sizeof(scalar_t) * plane);
      continue;
    }
    const scalar_t* src = deep + (n * s.Cd + (c - s.Cs)) * int64_t(h) * w;
    for (int i = 0; i < h; ++i) {
      const scalar_t* in = src + int64_t(i) * w;
      acc_t* row = interp.data() + int64_t(i) * W;
      if (s.mode == kUpsampleNearest) {  // one tap of weight 1
        for (int q = 0; q < W; ++q) row[q] = static_cast<acc_t>(in[q >> 1]);
        continue;
      }
      for (int q = 0; q < W; ++q) {
        row[q] = cols.weight[4 * q] * static_cast<acc_t>(in[cols.index[4 * q]]) +
                 cols.weight[4 * q + 1] * static_cast<acc_t>(in[cols.index[4 * q + 1]]);
      }
    }
    for (int r = 0; r < H; ++r) {
      scalar_t* orow = o + int64_t(r) * W;
      if (s.mode == kUpsampleNearest) {
        const acc_t* row = interp.data() + int64_t(r >> 1) * W;
#pragma omp simd
        for (int q = 0; q < W; ++q) store(&orow[q], row[q]);
        continue;
      }
      const acc_t a0 = rows.weight[4 * r], a1 = rows.weight[4 * r + 1];
      const acc_t* top = interp.data() + int64_t(rows.index[4 * r]) * W;
      const acc_t* bottom = interp.data() + int64_t(rows.index[4 * r + 1]) * W;
#pragma omp simd
      for (int q = 0; q < W; ++q) store(&orow[q], a0 * top[q] + a1 * bottom[q]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_nchw(const scalar_t* skip, const scalar_t* deep, scalar_t* out, const UpsampleCatShape& s) {
  const auto rows = forward_taps<acc_t>(s.H, s.mode);
  const auto cols = forward_taps<acc_t>(s.W, s.mode);
  at::parallel_for(0, int64_t(s.N) * (s.Cs + s.Cd), plane_grain(int64_t(s.H) * s.W), [&](int64_t p0, int64_t p1) {
    forward_nchw_planes<scalar_t, acc_t>(skip, deep, out, s, rows, cols, p0, p1);
  });
}

// Output rows [r0, r1) (row r = row r % H of image r / H). A pixel holds G
// groups of Cs + Cd output channels; skip and deep pixels hold G * Cs and G * Cd.
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void forward_nhwc_rows(const scalar_t* skip, const scalar_t* deep, scalar_t* out,
                                      const UpsampleCatShape& s, const TapTable<acc_t>& rows,
                                      const TapTable<acc_t>& cols, int64_t r0, int64_t r1) {
  const int G = s.G, H = s.H, W = s.W, h = H / 2, w = W / 2, Cs = s.Cs, Cd = s.Cd;
  const int64_t C = int64_t(G) * (Cs + Cd), skip_stride = int64_t(G) * Cs, deep_stride = int64_t(G) * Cd;
  for (int64_t nr = r0; nr < r1; ++nr) {
    const int64_t n = nr / H;
    const int r = static_cast<int>(nr % H);
    const acc_t a0 = rows.weight[4 * r], a1 = rows.weight[4 * r + 1];
    const scalar_t* top = deep + (n * h + rows.index[4 * r]) * int64_t(w) * deep_stride;
    const scalar_t* bottom = deep + (n * h + rows.index[4 * r + 1]) * int64_t(w) * deep_stride;
    for (int q = 0; q < W; ++q) {
      scalar_t* o = out + (nr * W + q) * C;
      const scalar_t* sk = skip + (nr * W + q) * skip_stride;
      const acc_t b0 = cols.weight[4 * q], b1 = cols.weight[4 * q + 1];
      const int64_t q0 = cols.index[4 * q] * deep_stride, q1 = cols.index[4 * q + 1] * deep_stride;
      for (int g = 0; g < G; ++g) {
        scalar_t* og = o + int64_t(g) * (Cs + Cd);
        if (Cs > 0) std::memcpy(og, sk + int64_t(g) * Cs, sizeof(scalar_t) * Cs);
        const int64_t off = int64_t(g) * Cd;  // the group's first channel in a deep pixel
        const scalar_t *t0 = top + q0 + off, *t1 = top + q1 + off, *u0 = bottom + q0 + off, *u1 = bottom + q1 + off;
        scalar_t* od = og + Cs;
#pragma omp simd
        for (int c = 0; c < Cd; ++c) {
          const acc_t t = b0 * static_cast<acc_t>(t0[c]) + b1 * static_cast<acc_t>(t1[c]);
          const acc_t u = b0 * static_cast<acc_t>(u0[c]) + b1 * static_cast<acc_t>(u1[c]);
          store(&od[c], a0 * t + a1 * u);
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_nhwc(const scalar_t* skip, const scalar_t* deep, scalar_t* out, const UpsampleCatShape& s) {
  const auto rows = forward_taps<acc_t>(s.H, s.mode);
  const auto cols = forward_taps<acc_t>(s.W, s.mode);
  const int64_t grain = std::max<int64_t>(1, 16384 / (int64_t(s.W) * s.G * (s.Cs + s.Cd)));
  at::parallel_for(0, int64_t(s.N) * s.H, grain, [&](int64_t r0, int64_t r1) {
    forward_nhwc_rows<scalar_t, acc_t>(skip, deep, out, s, rows, cols, r0, r1);
  });
}

at::Tensor upsample_cat_forward_cpu(const at::Tensor& skip, const at::Tensor& deep, int64_t mode, int64_t groups) {
  DIP_CHECK_DEVICE(skip, at::kCPU, "skip");
  DIP_CHECK_DEVICE(deep, at::kCPU, "deep");
  auto call = upsample_cat_forward_call(skip, deep, mode, groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, deep.scalar_type(), "upsample_cat_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = call.skip.const_data_ptr<scalar_t>();
    const scalar_t* dp = call.deep.const_data_ptr<scalar_t>();
    scalar_t* op = call.out.data_ptr<scalar_t>();
    if (call.shape.channels_last) {
      forward_nhwc<scalar_t, acc_t>(sp, dp, op, call.shape);
    } else {
      forward_nchw<scalar_t, acc_t>(sp, dp, op, call.shape);
    }
  });
  return call.out;
}

// --------------------------------------------------------------- backward ---

// Gradient planes [p0, p1) of grad_out, each going to grad_skip or grad_deep.
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nchw_planes(const scalar_t* grad, scalar_t* grad_skip, scalar_t* grad_deep,
                                         const UpsampleCatShape& s, const TapTable<acc_t>& rows,
                                         const TapTable<acc_t>& cols, int64_t p0, int64_t p1) {
  const int C = s.Cs + s.Cd, H = s.H, W = s.W, h = H / 2, w = W / 2;
  const int64_t plane = int64_t(H) * W;
  std::vector<acc_t> vrow(W);  // one source row's gradient, before the transpose along W
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / C, c = p % C;
    const scalar_t* g = grad + p * plane;
    if (c < s.Cs) {
      std::memcpy(grad_skip + (n * s.Cs + c) * plane, g, sizeof(scalar_t) * plane);
      continue;
    }
    scalar_t* gd = grad_deep + (n * s.Cd + (c - s.Cs)) * int64_t(h) * w;
    for (int i = 0; i < h; ++i) {
      scalar_t* out = gd + int64_t(i) * w;
      if (s.mode == kUpsampleNearest) {  // rows 2i and 2i + 1, columns 2j and 2j + 1, weight 1
        const scalar_t *g0 = g + int64_t(2 * i) * W, *g1 = g0 + W;
#pragma omp simd
        for (int j = 0; j < w; ++j) {
          store(&out[j], (static_cast<acc_t>(g0[2 * j]) + static_cast<acc_t>(g1[2 * j])) +
                             (static_cast<acc_t>(g0[2 * j + 1]) + static_cast<acc_t>(g1[2 * j + 1])));
        }
        continue;
      }
      const int* ri = &rows.index[4 * i];
      const acc_t* rw = &rows.weight[4 * i];
      const scalar_t *g0 = g + int64_t(ri[0]) * W, *g1 = g + int64_t(ri[1]) * W, *g2 = g + int64_t(ri[2]) * W,
                     *g3 = g + int64_t(ri[3]) * W;
#pragma omp simd
      for (int q = 0; q < W; ++q) {
        vrow[q] = rw[0] * static_cast<acc_t>(g0[q]) + rw[1] * static_cast<acc_t>(g1[q]) +
                  rw[2] * static_cast<acc_t>(g2[q]) + rw[3] * static_cast<acc_t>(g3[q]);
      }
#pragma omp simd
      for (int j = 0; j < w; ++j) {
        const int* ci = &cols.index[4 * j];
        const acc_t* cw = &cols.weight[4 * j];
        store(&out[j], cw[0] * vrow[ci[0]] + cw[1] * vrow[ci[1]] + cw[2] * vrow[ci[2]] + cw[3] * vrow[ci[3]]);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_nchw(const scalar_t* grad, scalar_t* grad_skip, scalar_t* grad_deep, const UpsampleCatShape& s) {
  const auto rows = backward_taps<acc_t>(s.H / 2, s.mode);
  const auto cols = backward_taps<acc_t>(s.W / 2, s.mode);
  at::parallel_for(0, int64_t(s.N) * (s.Cs + s.Cd), plane_grain(int64_t(s.H) * s.W), [&](int64_t p0, int64_t p1) {
    backward_nchw_planes<scalar_t, acc_t>(grad, grad_skip, grad_deep, s, rows, cols, p0, p1);
  });
}

// Source rows [r0, r1) of grad_deep (row r = row r % h of image r / h), channels_last:
// every group's Cd channels of a source pixel at once (acc holds G * Cd sums).
template <typename scalar_t, typename acc_t>
DIP_CPU_CLONES void backward_nhwc_rows(const scalar_t* grad, scalar_t* grad_deep, const UpsampleCatShape& s,
                                       const TapTable<acc_t>& rows, const TapTable<acc_t>& cols, int64_t r0,
                                       int64_t r1) {
  const int G = s.G, H = s.H, W = s.W, h = H / 2, w = W / 2, Cs = s.Cs, Cd = s.Cd;
  const int64_t C = int64_t(G) * (Cs + Cd), deep_stride = int64_t(G) * Cd;
  std::vector<acc_t> acc(deep_stride);
  for (int64_t ni = r0; ni < r1; ++ni) {
    const int64_t n = ni / h;
    const int i = static_cast<int>(ni % h);
    for (int j = 0; j < w; ++j) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int r = 0; r < 4; ++r) {
        const acc_t wr = rows.weight[4 * i + r];
        if (wr == acc_t(0)) continue;
        for (int q = 0; q < 4; ++q) {
          const acc_t wq = cols.weight[4 * j + q] * wr;
          if (wq == acc_t(0)) continue;
          const scalar_t* px = grad + ((n * H + rows.index[4 * i + r]) * W + cols.index[4 * j + q]) * C;
          for (int grp = 0; grp < G; ++grp) {
            const scalar_t* g = px + int64_t(grp) * (Cs + Cd) + Cs;  // the group's deep channels
            acc_t* a = acc.data() + int64_t(grp) * Cd;
#pragma omp simd
            for (int c = 0; c < Cd; ++c) a[c] += wq * static_cast<acc_t>(g[c]);
          }
        }
      }
      scalar_t* out = grad_deep + (ni * w + j) * deep_stride;
      const acc_t* a = acc.data();
#pragma omp simd
      for (int64_t c = 0; c < deep_stride; ++c) store(&out[c], a[c]);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_nhwc(const scalar_t* grad, scalar_t* grad_skip, scalar_t* grad_deep, const UpsampleCatShape& s) {
  const int G = s.G, H = s.H, W = s.W, h = H / 2, w = W / 2, Cs = s.Cs;
  const int64_t C = int64_t(G) * (Cs + s.Cd), skip_stride = int64_t(G) * Cs;
  const auto rows = backward_taps<acc_t>(h, s.mode);
  const auto cols = backward_taps<acc_t>(w, s.mode);
  if (Cs > 0) {  // each pixel: every group's first Cs channels of grad_out
    at::parallel_for(0, int64_t(s.N) * H * W, std::max<int64_t>(1, 16384 / C), [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        for (int g = 0; g < G; ++g) {
          std::memcpy(grad_skip + e * skip_stride + int64_t(g) * Cs, grad + e * C + int64_t(g) * (Cs + s.Cd),
                      sizeof(scalar_t) * Cs);
        }
      }
    });
  }
  at::parallel_for(0, int64_t(s.N) * h, std::max<int64_t>(1, 16384 / (int64_t(W) * C)), [&](int64_t r0, int64_t r1) {
    backward_nhwc_rows<scalar_t, acc_t>(grad, grad_deep, s, rows, cols, r0, r1);
  });
}

std::tuple<at::Tensor, at::Tensor> upsample_cat_backward_cpu(const at::Tensor& grad_out, int64_t skip_channels,
                                                             int64_t mode, int64_t groups) {
  DIP_CHECK_DEVICE(grad_out, at::kCPU, "grad_out");
  auto call = upsample_cat_backward_call(grad_out, skip_channels, mode, groups);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_out.scalar_type(), "upsample_cat_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = call.grad.const_data_ptr<scalar_t>();
    scalar_t* gs = call.grad_skip.data_ptr<scalar_t>();
    scalar_t* gd = call.grad_deep.data_ptr<scalar_t>();
    if (call.shape.channels_last) {
      backward_nhwc<scalar_t, acc_t>(gp, gs, gd, call.shape);
    } else {
      backward_nchw<scalar_t, acc_t>(gp, gs, gd, call.shape);
    }
  });
  return {call.grad_skip, call.grad_deep};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("upsample_cat", &upsample_cat_forward_cpu);
  m.impl("_upsample_cat_backward", &upsample_cat_backward_cpu);
}

}  // namespace dip_fast
