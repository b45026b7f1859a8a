// Per-thread work of the CUDA kernels of upsample_cat over the tilings of
// csrc/common/tiling.h, as plain functions of (block, thread) indices:
// csrc/cuda/upsample_cat.cu launches them, csrc/cpu/upsample_cat_emulated.cpp
// replays every block and thread of the same plan on the CPU (tests).
//
// All tensors are dense in the working layout, so:
// - forward: a skip plane (NCHW) or the skip channels of a pixel
//   (channels_last) are vector copies; a deep output gathers its 1 (nearest)
//   or 4 (bilinear) source values;
// - backward: grad_skip is a vector copy of grad_out's skip channels (each
//   group's first Cs);
//   grad_deep gathers the <= 4 x 4 output gradients that read each element
//   (the transposed taps): no atomics, deterministic.
#pragma once

#include "tiling.h"
#include "upsample_cat.h"

namespace dip_fast {

// Shapes (UpsampleCatShape): out / grad_out (N, G * (Cs + Cd), H, W), skip
// (N, G * Cs, H, W), deep (N, G * Cd, H / 2, W / 2); Cs and Cd per group.
// NCHW shapes have the groups folded into N (G = 1), so the NCHW functions
// below index one group per image; the channels_last ones place a channel
// vector in its group with one of the divisors (a multiply-high, once per
// thread: a vector never straddles a group, see upsample_cat_runs).
struct UpsampleCatDims {
  int N, G, Cs, Cd, H, W, mode;
  FastDivmod by_group_C;  // channel of out -> (group, channel within the group's Cs + Cd)
  FastDivmod by_Cs;       // channel of grad_skip -> (group, channel within the group's Cs)
  FastDivmod by_Cd;       // channel of grad_deep -> (group, channel within the group's Cd)
};

// The upsampled values at output (h, w) of L consecutive channels of deep (dp:
// their first element at pixel (0, 0); dstride: the element stride between
// deep pixels, 1 in NCHW, G * Cd in channels_last). Each source is read as one
// L-element pack.
template <typename scalar_t, typename acc_t, int L>
DIP_HD void upsample_values(const scalar_t* dp, int h, int w, int hd, int wd, int dstride, int mode, acc_t* out) {
  int r0, r1, q0, q1;
  acc_t a0, a1, b0, b1;
  upsample_taps<acc_t>(h, hd, mode, r0, r1, a0, a1);
  upsample_taps<acc_t>(w, wd, mode, q0, q1, b0, b1);
  const Pack<scalar_t, L> p00 = load_pack<scalar_t, L>(dp + (r0 * wd + q0) * dstride);
  const Pack<scalar_t, L> p01 = load_pack<scalar_t, L>(dp + (r0 * wd + q1) * dstride);
  const Pack<scalar_t, L> p10 = load_pack<scalar_t, L>(dp + (r1 * wd + q0) * dstride);
  const Pack<scalar_t, L> p11 = load_pack<scalar_t, L>(dp + (r1 * wd + q1) * dstride);
  DIP_UNROLL for (int l = 0; l < L; ++l) {
    const acc_t top = b0 * static_cast<acc_t>(p00.v[l]) + b1 * static_cast<acc_t>(p01.v[l]);
    const acc_t bottom = b0 * static_cast<acc_t>(p10.v[l]) + b1 * static_cast<acc_t>(p11.v[l]);
    out[l] = a0 * top + a1 * bottom;
  }
}

// Slot k (0..3) of the outputs that read source index i of a dimension
// upsampled from n to 2n: output o = 2i - 1 + k with its weight, or false when
// o is outside the output or does not read i. Every output that reads i lies
// in [2i - 1, 2i + 2] (bilinear: taps at (2o - 1) / 4 and one above; nearest:
// 2i and 2i + 1), so these are the outputs of upsample_preimage, in the same
// ascending order. Fixed slots let the GPU keep them in registers.
template <typename acc_t>
DIP_HD bool upsample_preimage_slot(int i, int n, int mode, int k, int& o, acc_t& weight) {
  o = 2 * i - 1 + k;
  if (o < 0 || o > 2 * n - 1) return false;
  int i0, i1;
  acc_t l0, l1;
  upsample_taps<acc_t>(o, n, mode, i0, i1, l0, l1);
  weight = (i0 == i ? l0 : acc_t(0)) + (i1 == i ? l1 : acc_t(0));
  return weight != acc_t(0);
}

// The gradients reaching deep element (i, j) of L consecutive channels, from
// grad_out (gp: those channels' first element at pixel (0, 0); gstride: the
// element stride between grad_out pixels): the weighted sum of the <= 4 x 4
// outputs that read it, each read as one L-element pack, in ascending order.
template <typename scalar_t, typename acc_t, int L>
DIP_HD void upsample_grad_values(const scalar_t* gp, int i, int j, int H, int W, int gstride, int mode, acc_t* out) {
  DIP_UNROLL for (int l = 0; l < L; ++l) out[l] = acc_t(0);
  // Not unrolled: no array is indexed by a or b, and the full unroll (16
  // predicated pack loads per element, per vector slot) made ptxas spill.
  DIP_NO_UNROLL for (int a = 0; a < 4; ++a) {
    int r;
    acc_t wr;
    if (!upsample_preimage_slot<acc_t>(i, H / 2, mode, a, r, wr)) continue;
    DIP_NO_UNROLL for (int b = 0; b < 4; ++b) {
      int q;
      acc_t wc;
      if (!upsample_preimage_slot<acc_t>(j, W / 2, mode, b, q, wc)) continue;
      const acc_t w = wr * wc;  // exact: the weights are multiples of 1/4
      const Pack<scalar_t, L> p = load_pack<scalar_t, L>(gp + (r * W + q) * gstride);
      DIP_UNROLL for (int l = 0; l < L; ++l) out[l] += w * static_cast<acc_t>(p.v[l]);
    }
  }
}

// Forward, NCHW, tiling over out (C = Cs + Cd planes of H x W per image; G = 1).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void upsample_cat_forward_thread_nchw(const scalar_t* skip, const scalar_t* deep, scalar_t* out,
                                             const Tiling& g, const UpsampleCatDims& d, int block, int t,
                                             int* counts) {
  uint32_t plane, q, n, c;
  g.by_tiles.divmod(static_cast<uint32_t>(block), plane, q);
  g.by_C.divmod(plane, n, c);
  const int len = d.H * d.W, hd = d.H / 2, wd = d.W / 2;
  scalar_t* op = out + static_cast<long long>(plane) * len;
  const int base = static_cast<int>(q) * g.tile + t * V;
  if (static_cast<int>(c) < d.Cs) {  // a skip plane: a vector copy
    const scalar_t* sp = skip + (static_cast<long long>(n) * d.Cs + c) * len;
    Pack<scalar_t, V> p[kTileUnroll]{};
    load_slot_packs(sp, base, g.threads * V, len, 1, p);
    DIP_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
      const int e = base + u * g.threads * V;
      if (e >= len) continue;
      store_pack<scalar_t, V>(op + e, p[u]);
      count_stores<kCount>(counts, static_cast<long long>(plane) * len + e, V);
    }
    return;
  }
  const scalar_t* dp = deep + (static_cast<long long>(n) * d.Cd + (static_cast<int>(c) - d.Cs)) * hd * wd;
  DIP_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e >= len) continue;
    uint32_t h0, w0;
    g.by_cols.divmod(static_cast<uint32_t>(e), h0, w0);
    int h = static_cast<int>(h0), w = static_cast<int>(w0);
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      acc_t v;
      upsample_values<scalar_t, acc_t, 1>(dp, h, w, hd, wd, 1, d.mode, &v);
      o.v[l] = static_cast<scalar_t>(v);
      if (++w == d.W) {
        w = 0;
        ++h;
      }
    }
    store_pack<scalar_t, V>(op + e, o);
    count_stores<kCount>(counts, static_cast<long long>(plane) * len + e, V);
  }
}

// Forward, channels_last, tiling over out rows (n, h); V divides Cs and Cd.
// Out channel c of group grp is skip channel c - grp * Cd or deep channel
// c - (grp + 1) * Cs (the other groups' channels of the other tensor precede it).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void upsample_cat_forward_thread_cl(const scalar_t* skip, const scalar_t* deep, scalar_t* out,
                                           const Tiling& g, const UpsampleCatDims& d, int block, int group, int t,
                                           int* counts) {
  uint32_t r, cvl, row, q, n, h;
  g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
  const int cv = group * g.Cb + static_cast<int>(cvl);
  if (cv >= g.Cv) return;
  g.by_tiles.divmod(static_cast<uint32_t>(block), row, q);
  g.by_rows.divmod(row, n, h);
  // Element strides between pixels of out, skip and deep: all groups' channels.
  const int C = d.G * (d.Cs + d.Cd), skip_stride = d.G * d.Cs, deep_stride = d.G * d.Cd;
  const int c = cv * V, hd = d.H / 2, wd = d.W / 2;
  uint32_t grp, cg;
  d.by_group_C.divmod(static_cast<uint32_t>(c), grp, cg);
  const long long first_pixel = static_cast<long long>(row) * d.W;
  const int j0 = static_cast<int>(q) * g.tile + static_cast<int>(r);
  if (static_cast<int>(cg) < d.Cs) {
    const int cs = c - static_cast<int>(grp) * d.Cd;
    Pack<scalar_t, V> p[kTileUnroll]{};
    load_slot_packs(skip + first_pixel * skip_stride + cs, j0, g.R, d.W, skip_stride, p);
    DIP_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
      const int j = j0 + u * g.R;
      if (j >= d.W) continue;
      store_pack<scalar_t, V>(out + (first_pixel + j) * C + c, p[u]);
      count_stores<kCount>(counts, (first_pixel + j) * C + c, V);
    }
    return;
  }
  const int cd = c - (static_cast<int>(grp) + 1) * d.Cs;
  const scalar_t* dimg = deep + static_cast<long long>(n) * hd * wd * deep_stride + cd;
  DIP_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
    const int j = j0 + u * g.R;
    if (j >= d.W) continue;
    acc_t v[V];
    upsample_values<scalar_t, acc_t, V>(dimg, static_cast<int>(h), j, hd, wd, deep_stride, d.mode, v);
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) o.v[l] = static_cast<scalar_t>(v[l]);
    store_pack<scalar_t, V>(out + (first_pixel + j) * C + c, o);
    count_stores<kCount>(counts, (first_pixel + j) * C + c, V);
  }
}

// grad_skip, NCHW: tiling over grad_skip (Cs planes of H x W).
template <typename scalar_t, int V, bool kCount>
DIP_HD void upsample_cat_grad_skip_thread_nchw(const scalar_t* grad, scalar_t* grad_skip, const Tiling& g,
                                               const UpsampleCatDims& d, int block, int t, int* counts) {
  uint32_t plane, q, n, c;
  g.by_tiles.divmod(static_cast<uint32_t>(block), plane, q);
  g.by_C.divmod(plane, n, c);
  const int len = d.H * d.W;
  const scalar_t* gp = grad + (static_cast<long long>(n) * (d.Cs + d.Cd) + c) * len;
  scalar_t* sp = grad_skip + static_cast<long long>(plane) * len;
  const int base = static_cast<int>(q) * g.tile + t * V;
  Pack<scalar_t, V> p[kTileUnroll]{};
  load_slot_packs(gp, base, g.threads * V, len, 1, p);
  DIP_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e >= len) continue;
    store_pack<scalar_t, V>(sp + e, p[u]);
    count_stores<kCount>(counts, static_cast<long long>(plane) * len + e, V);
  }
}

// grad_skip, channels_last: tiling over grad_skip rows (C = G * Cs); channel c
// of group grp is grad_out channel c + grp * Cd.
template <typename scalar_t, int V, bool kCount>
DIP_HD void upsample_cat_grad_skip_thread_cl(const scalar_t* grad, scalar_t* grad_skip, const Tiling& g,
                                             const UpsampleCatDims& d, int block, int group, int t, int* counts) {
  uint32_t r, cvl, row, q;
  g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
  const int cv = group * g.Cb + static_cast<int>(cvl);
  if (cv >= g.Cv) return;
  g.by_tiles.divmod(static_cast<uint32_t>(block), row, q);
  const int C = d.G * (d.Cs + d.Cd), skip_stride = d.G * d.Cs, c = cv * V;  // C: grad_out's pixel stride
  const int grp = static_cast<int>(d.by_Cs.div(static_cast<uint32_t>(c)));
  const long long first_pixel = static_cast<long long>(row) * d.W;
  const int j0 = static_cast<int>(q) * g.tile + static_cast<int>(r);
  Pack<scalar_t, V> p[kTileUnroll]{};
  load_slot_packs(grad + first_pixel * C + c + grp * d.Cd, j0, g.R, d.W, C, p);
  DIP_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
    const int j = j0 + u * g.R;
    if (j >= d.W) continue;
    store_pack<scalar_t, V>(grad_skip + (first_pixel + j) * skip_stride + c, p[u]);
    count_stores<kCount>(counts, (first_pixel + j) * skip_stride + c, V);
  }
}

// grad_deep, NCHW: tiling over grad_deep (Cd planes of H/2 x W/2).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void upsample_cat_grad_deep_thread_nchw(const scalar_t* grad, scalar_t* grad_deep, const Tiling& g,
                                               const UpsampleCatDims& d, int block, int t, int* counts) {
  uint32_t plane, q, n, cd;
  g.by_tiles.divmod(static_cast<uint32_t>(block), plane, q);
  g.by_C.divmod(plane, n, cd);
  const int len = g.rows * g.cols;
  const scalar_t* gp = grad + (static_cast<long long>(n) * (d.Cs + d.Cd) + d.Cs + cd) * d.H * d.W;
  scalar_t* dp = grad_deep + static_cast<long long>(plane) * len;
  const int base = static_cast<int>(q) * g.tile + t * V;
  // Rolled: each slot already gathers up to 16 values, enough loads in
  // flight; unrolled, ptxas spilled.
  DIP_NO_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e >= len) continue;
    uint32_t i0, j0;
    g.by_cols.divmod(static_cast<uint32_t>(e), i0, j0);
    int i = static_cast<int>(i0), j = static_cast<int>(j0);
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      acc_t v;
      upsample_grad_values<scalar_t, acc_t, 1>(gp, i, j, d.H, d.W, 1, d.mode, &v);
      o.v[l] = static_cast<scalar_t>(v);
      if (++j == g.cols) {
        j = 0;
        ++i;
      }
    }
    store_pack<scalar_t, V>(dp + e, o);
    count_stores<kCount>(counts, static_cast<long long>(plane) * len + e, V);
  }
}

// grad_deep, channels_last: tiling over grad_deep rows (n, i) (C = G * Cd);
// channel c of group grp is grad_out channel c + (grp + 1) * Cs.
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void upsample_cat_grad_deep_thread_cl(const scalar_t* grad, scalar_t* grad_deep, const Tiling& g,
                                             const UpsampleCatDims& d, int block, int group, int t, int* counts) {
  uint32_t r, cvl, row, q, n, i;
  g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
  const int cv = group * g.Cb + static_cast<int>(cvl);
  if (cv >= g.Cv) return;
  g.by_tiles.divmod(static_cast<uint32_t>(block), row, q);
  g.by_rows.divmod(row, n, i);
  const int C = d.G * (d.Cs + d.Cd), deep_stride = d.G * d.Cd, c = cv * V;  // C: grad_out's pixel stride
  const int grp = static_cast<int>(d.by_Cd.div(static_cast<uint32_t>(c)));
  const scalar_t* gimg = grad + static_cast<long long>(n) * d.H * d.W * C + c + (grp + 1) * d.Cs;
  const long long first_pixel = static_cast<long long>(row) * g.cols;
  const int j0 = static_cast<int>(q) * g.tile + static_cast<int>(r);
  // Rolled: each slot already gathers up to 16 values, enough loads in
  // flight; unrolled, ptxas spilled.
  DIP_NO_UNROLL for (int u = 0; u < kTileUnroll; ++u) {
    const int j = j0 + u * g.R;
    if (j >= g.cols) continue;
    acc_t v[V];
    upsample_grad_values<scalar_t, acc_t, V>(gimg, static_cast<int>(i), j, d.H, d.W, C, d.mode, v);
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) o.v[l] = static_cast<scalar_t>(v[l]);
    store_pack<scalar_t, V>(grad_deep + (first_pixel + j) * deep_stride + c, o);
    count_stores<kCount>(counts, (first_pixel + j) * deep_stride + c, V);
  }
}

}  // namespace dip_fast
