// Math shared by the CPU and CUDA kernels of upsample_cat: the x2 upsampling
// taps (nearest, or bilinear with align_corners=False, as nn.Upsample does
// for the paper's network), their transpose for the backward gather, and the
// per-element functions that the CUDA kernels run (and the CPU emulation op
// replays to test them without a GPU).
#pragma once

#include "macros.h"
#include "layout.h"

namespace dip_fast {

enum UpsampleMode : int { kUpsampleNearest = 0, kUpsampleBilinear = 1 };

// The source indices and weights of output index o (0 <= o < 2n) in a
// dimension upsampled from n to 2n: out[o] = l0 * in[i0] + l1 * in[i1].
// Bilinear follows ATen's align_corners=False rule with scale 1/2: source
// coordinate (o + 0.5) / 2 - 0.5, clamped at 0; i1 = i0 + 1 except at the
// last index. The weights are 0, 0.25, 0.75 or 1: exact in every float type.
template <typename acc_t>
DIP_HD void upsample_taps(int o, int n, int mode, int& i0, int& i1, acc_t& l0, acc_t& l1) {
  if (mode == kUpsampleNearest) {
    i0 = i1 = o / 2;
    l0 = acc_t(1);
    l1 = acc_t(0);
    return;
  }
  // (o + 0.5) / 2 - 0.5 = (2o - 1) / 4: integer part and fraction without rounding.
  const int q = 2 * o - 1;
  if (q < 0) {  // clamped to 0
    i0 = 0;
    l1 = acc_t(0);
  } else {
    i0 = q / 4;
    l1 = acc_t(q % 4) / acc_t(4);
  }
  i1 = i0 < n - 1 ? i0 + 1 : i0;
  l0 = acc_t(1) - l1;
}

// The transpose of upsample_taps: the outputs that read source index i, with
// their weights (a gather, so the backward needs no atomics). Writes up to 4
// (output, weight) pairs and returns how many.
template <typename acc_t>
DIP_HD int upsample_preimage(int i, int n, int mode, int* outs, acc_t* weights) {
  int k = 0;
  const int lo = 2 * i - 2 < 0 ? 0 : 2 * i - 2;
  const int hi = 2 * i + 3 < 2 * n - 1 ? 2 * i + 3 : 2 * n - 1;
  for (int o = lo; o <= hi; ++o) {
    int i0, i1;
    acc_t l0, l1;
    upsample_taps<acc_t>(o, n, mode, i0, i1, l0, l1);
    const acc_t w = (i0 == i ? l0 : acc_t(0)) + (i1 == i ? l1 : acc_t(0));
    if (w != acc_t(0)) {
      outs[k] = o;
      weights[k] = w;
      ++k;
    }
  }
  return k;
}

// The shapes of one call: skip (N, Cs, H, W), deep (N, Cd, H/2, W/2),
// out / grad_out (N, Cs + Cd, H, W).
struct UpsampleCatShape {
  int N, Cs, Cd, H, W, mode;
  bool channels_last;  // memory order of out / grad_out, which the element index e follows
};

// Output element e of the forward: a skip value, or the upsampled deep value.
template <typename scalar_t, typename acc_t>
DIP_HD void upsample_cat_forward_element(long long e, const scalar_t* skip, Strides4 ss, const scalar_t* deep,
                                         Strides4 sd, scalar_t* out, Strides4 so, const UpsampleCatShape& s) {
  long long n, c;
  int h, w;
  split_nchw(e, s.Cs + s.Cd, s.H, s.W, s.channels_last, n, c, h, w);
  if (c < s.Cs) {
    out[offset4(so, n, c, h, w)] = skip[offset4(ss, n, c, h, w)];
    return;
  }
  const long long cd = c - s.Cs;
  int r0, r1, q0, q1;
  acc_t a0, a1, b0, b1;
  upsample_taps<acc_t>(h, s.H / 2, s.mode, r0, r1, a0, a1);
  upsample_taps<acc_t>(w, s.W / 2, s.mode, q0, q1, b0, b1);
  const acc_t top = b0 * static_cast<acc_t>(deep[offset4(sd, n, cd, r0, q0)]) +
                    b1 * static_cast<acc_t>(deep[offset4(sd, n, cd, r0, q1)]);
  const acc_t bottom = b0 * static_cast<acc_t>(deep[offset4(sd, n, cd, r1, q0)]) +
                       b1 * static_cast<acc_t>(deep[offset4(sd, n, cd, r1, q1)]);
  out[offset4(so, n, c, h, w)] = static_cast<scalar_t>(a0 * top + a1 * bottom);
}

// Element e (in grad_skip's memory order, channels_last as s.channels_last) of the skip gradient.
template <typename scalar_t>
DIP_HD void upsample_cat_grad_skip_element(long long e, const scalar_t* grad, Strides4 sg, scalar_t* grad_skip,
                                           Strides4 sgs, const UpsampleCatShape& s) {
  long long n, c;
  int h, w;
  split_nchw(e, s.Cs, s.H, s.W, s.channels_last, n, c, h, w);
  grad_skip[offset4(sgs, n, c, h, w)] = grad[offset4(sg, n, c, h, w)];
}

// Element e (in grad_deep's memory order) of the deep gradient: the weighted
// sum of the up to 4 x 4 output gradients that read it.
template <typename scalar_t, typename acc_t>
DIP_HD void upsample_cat_grad_deep_element(long long e, const scalar_t* grad, Strides4 sg, scalar_t* grad_deep,
                                           Strides4 sgd, const UpsampleCatShape& s) {
  long long n, cd;
  int i, j;
  split_nchw(e, s.Cd, s.H / 2, s.W / 2, s.channels_last, n, cd, i, j);
  int rows[4], cols[4];
  acc_t wr[4], wc[4];
  const int nr = upsample_preimage<acc_t>(i, s.H / 2, s.mode, rows, wr);
  const int nc = upsample_preimage<acc_t>(j, s.W / 2, s.mode, cols, wc);
  acc_t total = acc_t(0);
  for (int r = 0; r < nr; ++r) {
    acc_t row = acc_t(0);
    for (int q = 0; q < nc; ++q) row += wc[q] * static_cast<acc_t>(grad[offset4(sg, n, s.Cs + cd, rows[r], cols[q])]);
    total += wr[r] * row;
  }
  grad_deep[offset4(sgd, n, cd, i, j)] = static_cast<scalar_t>(total);
}

}  // namespace dip_fast
