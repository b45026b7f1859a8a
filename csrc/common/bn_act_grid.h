// Launch plans and per-thread work of the CUDA kernels of bn_act, as plain
// functions of (block, thread) indices.
//
// csrc/cuda/bn_act.cu launches them, one CUDA thread per call; the CPU
// emulation in csrc/cpu/bn_act_emulated.cpp calls the very same functions for
// every block and thread of the same plan, phase by phase, with the same
// shared-memory trees. The emulation runs in every CI build, so the kernels'
// index decoding, vector and scalar paths, pad bands, gradient fold and
// reduction order are tested without a GPU.
//
// Design (memory-bound ops; see the bandwidth table in bench/README.md):
// - Grids depend on the shape only, never on the device, so the reduction
//   tree and its rounding are a pure function of the shape.
// - Every thread issues kBnUnroll independent vector loads of 16 bytes (V
//   elements) before using them, so enough bytes are in flight per SM.
// - 32-bit indices. Block-level and vector-slot-level index decoding goes
//   through FastDivmod (a multiply-high), never a per-element division.
// - V is the widest of 16, 8 and (1 element) bytes whose alignment every
//   pointer and row length of the pass allows; a view with an odd storage
//   offset runs the same code with V = 1.
// - Reductions: per-thread partials, a fixed shared-memory tree per block, the
//   block's partial to a workspace, then a finalize kernel merges the parts
//   of each channel in a fixed order. Deterministic, no atomics, no host
//   synchronisation and no data-dependent allocation (CUDA-graph safe).
//
// Three kernels a pass: reduce (partials), finalize (per channel), apply
// (normalize in the forward, grad_x in the backward).
//
// How blocks and threads cover the tensors in each layout: csrc/common/tiling.h.
#pragma once

#include <cmath>
#include <cstdint>

#include "bn_act.h"
#include "tiling.h"

namespace dip_fast {

constexpr int kBnThreads = kTileThreads;  // threads per block (reduce and apply)
constexpr int kBnUnroll = kTileUnroll;    // independent vector loads per thread
constexpr int kBnFinalizeChannels = 8;    // channels per finalize block, 32 lanes each
constexpr int kBnFinalizeLanes = 32;
constexpr int kBnMaxParts = 1024;         // partials per channel, at most

// Work items of a reduction: NCHW, per channel (N planes x tiles); channels_last,
// in total (every row's tiles; channel groups are the grid's y).
DIP_HD int bn_reduce_items(const Tiling& t) {
  return t.cl ? t.spans * t.tiles : t.N * t.tiles;
}

// Host: how many partials per channel a reduction writes. Enough blocks to
// fill a large GPU (about 2048 in all), never more parts than work items.
inline int bn_reduce_parts(const Tiling& t) {
  const int items = bn_reduce_items(t);
  const int across = t.cl ? t.groups : t.C;  // blocks along y
  int parts = (2048 + across - 1) / across;
  if (!t.cl && parts > 64) parts = 64;
  if (parts > kBnMaxParts) parts = kBnMaxParts;
  if (parts > items) parts = items;
  return parts < 1 ? 1 : parts;
}

// ---------------------------------------------------------------------------
// Welford partials
// ---------------------------------------------------------------------------

// Statistics of V values (count V): mean and sum of squared deviations. V is
// a power of two, so the division by V is exact scaling.
template <typename acc_t, int V>
DIP_HD void pack_moments(const acc_t* v, acc_t& mean, acc_t& m2) {
  acc_t s = acc_t(0);
  DIP_UNROLL for (int l = 0; l < V; ++l) s += v[l];
  mean = s * (acc_t(1) / acc_t(V));
  m2 = acc_t(0);
  DIP_UNROLL for (int l = 0; l < V; ++l) {
    const acc_t d = v[l] - mean;
    m2 += d * d;
  }
}

// Merges triple b (index bi) into triple a (index ai) of three parallel arrays.
template <typename acc_t>
DIP_HD void welford_merge_at(acc_t* cnt, acc_t* mean, acc_t* m2, int ai, int bi) {
  welford_merge<acc_t>(cnt[ai], mean[ai], m2[ai], cnt[bi], mean[bi], m2[bi]);
}

// ---------------------------------------------------------------------------
// Reduce kernels: thread partials
// ---------------------------------------------------------------------------

// NCHW forward statistics, thread t of block (part, c): one Welford triple over
// the vector slots of the work items part, part + parts, ... of channel c.
template <typename scalar_t, typename acc_t, int V>
DIP_HD void bn_stats_thread_nchw(const scalar_t* x, const Tiling& g, int parts, int part, int c, int t,
                                 acc_t& cnt, acc_t& mean, acc_t& m2) {
  cnt = mean = m2 = acc_t(0);
  const int items = bn_reduce_items(g);
  const int plane_len = g.rows * g.cols;
  for (int k = part; k < items; k += parts) {
    uint32_t n, q;
    g.by_tiles.divmod(static_cast<uint32_t>(k), n, q);
    const scalar_t* xp = x + static_cast<long long>(static_cast<int>(n) * g.C + c) * plane_len;
    const int base = static_cast<int>(q) * g.tile + t * V;
    Pack<scalar_t, V> p[kBnUnroll]{};
    load_slot_packs(xp, base, g.threads * V, plane_len, 1, p);
    DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
      const int e = base + u * g.threads * V;
      if (e >= plane_len) continue;
      acc_t v[V], pm, pm2;
      DIP_UNROLL for (int l = 0; l < V; ++l) v[l] = static_cast<acc_t>(p[u].v[l]);
      pack_moments<acc_t, V>(v, pm, pm2);
      welford_merge<acc_t>(cnt, mean, m2, acc_t(V), pm, pm2);
    }
  }
}

// channels_last forward statistics, thread (cvl, r) of block (part, group):
// V Welford triples (one per channel of its vector, with a shared count) over
// the pixels of the work items part, part + parts, ...
template <typename scalar_t, typename acc_t, int V>
DIP_HD void bn_stats_thread_cl(const scalar_t* x, const Tiling& g, int parts, int part, int cv, int r, acc_t& cnt,
                               acc_t* mean, acc_t* m2) {
  cnt = acc_t(0);
  DIP_UNROLL for (int l = 0; l < V; ++l) mean[l] = m2[l] = acc_t(0);
  if (cv >= g.Cv) return;
  const int items = bn_reduce_items(g);
  for (int k = part; k < items; k += parts) {
    uint32_t row, q;
    g.by_tiles.divmod(static_cast<uint32_t>(k), row, q);
    const scalar_t* xr = x + static_cast<long long>(row) * g.cols * g.C + cv * V;
    const int j0 = static_cast<int>(q) * g.tile + r;
    Pack<scalar_t, V> p[kBnUnroll]{};
    load_slot_packs(xr, j0, g.R, g.cols, g.C, p);
    DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
      if (j0 + u * g.R >= g.cols) continue;
      cnt += acc_t(1);
      const acc_t inv = acc_t(1) / cnt;  // one IEEE division per pixel, shared by its V channels
      DIP_UNROLL for (int l = 0; l < V; ++l) {
        const acc_t xv = static_cast<acc_t>(p[u].v[l]);
        const acc_t d = xv - mean[l];
        mean[l] += d * inv;
        m2[l] += d * (xv - mean[l]);
      }
    }
  }
}

// Slot k (0, 1, 2) of the padded positions that read source index s: the
// same positions, in the same order, as pad_preimage, with -1 for an empty
// slot. Fixed slots (instead of a compacted array) let the GPU keep
// everything in registers: loops over k have a constant trip count.
DIP_HD int pad_preimage_slot(int s, int n, int pad, int mode, int k) {
  if (k == 0) return s + pad;
  if (mode != kPadReflect) return -1;
  if (k == 1) return (s >= 1 && s <= pad) ? pad - s : -1;                             // left/top band
  return (s <= n - 2 && s >= n - 1 - pad) ? 2 * (n - 1) - s + pad : -1;                // right/bottom band
}

// The pad's gradient reaching source (h, w) of one plane (NCHW, dy plane of
// width Wo) with the interior fast path: one read unless (h, w) lies in a
// reflection band.
template <typename scalar_t, typename acc_t>
DIP_HD acc_t fold_grad_plane(const scalar_t* dyp, int h, int w, int H, int W, int Wo, int pad, int mode) {
  const bool interior = mode == kPadZeros || (h > pad && h < H - 1 - pad && w > pad && w < W - 1 - pad);
  if (interior) return static_cast<acc_t>(dyp[(h + pad) * Wo + w + pad]);
  acc_t s = acc_t(0);
  DIP_UNROLL for (int a = 0; a < 3; ++a) {
    const int r = pad_preimage_slot(h, H, pad, mode, a);
    if (r < 0) continue;
    DIP_UNROLL for (int b = 0; b < 3; ++b) {
      const int c = pad_preimage_slot(w, W, pad, mode, b);
      if (c >= 0) s += static_cast<acc_t>(dyp[r * Wo + c]);
    }
  }
  return s;
}

// Per-channel constants of the backward.
template <typename acc_t>
struct BnBackwardConsts {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* gamma;
  const acc_t* beta;
  acc_t slope;
};

// Gradient g reaching the V source elements of an NCHW vector slot at plane
// element e: a vector load of dy when pad == 0 (same shape as x), otherwise a
// gather with one decode of (h, w) for the slot.
template <typename scalar_t, typename acc_t, int V>
DIP_HD void gather_grad_nchw(const scalar_t* dyp, const Tiling& g, int e, int pad, int mode, int Wo, acc_t* out) {
  if (pad == 0) {
    const Pack<scalar_t, V> d = load_pack<scalar_t, V>(dyp + e);
    DIP_UNROLL for (int l = 0; l < V; ++l) out[l] = static_cast<acc_t>(d.v[l]);
    return;
  }
  uint32_t h, w;
  g.by_cols.divmod(static_cast<uint32_t>(e), h, w);
  int hh = static_cast<int>(h), ww = static_cast<int>(w);
  DIP_UNROLL for (int l = 0; l < V; ++l) {
    out[l] = fold_grad_plane<scalar_t, acc_t>(dyp, hh, ww, g.rows, g.cols, Wo, pad, mode);
    if (++ww == g.cols) {
      ww = 0;
      ++hh;
    }
  }
}

// Every load of an NCHW backward thread's tile before any use: the x packs
// and the gathered gradients of its kBnUnroll vector slots.
template <typename scalar_t, typename acc_t, int V>
DIP_HD void load_x_and_grad_nchw(const scalar_t* xp, const scalar_t* dyp, const Tiling& g, int base, int len, int pad,
                                 int mode, int Wo, Pack<scalar_t, V> (&p)[kBnUnroll], acc_t (&gr)[kBnUnroll][V]) {
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e < len) {
      p[u] = load_pack<scalar_t, V>(xp + e);
      gather_grad_nchw<scalar_t, acc_t, V>(dyp, g, e, pad, mode, Wo, gr[u]);
    }
  }
}

// NCHW backward sums, thread t of block (part, c): a = sum(dz), b = sum(dz * (x - mean)).
template <typename scalar_t, typename acc_t, int V>
DIP_HD void bn_backward_thread_nchw(const scalar_t* dy, const scalar_t* x, const Tiling& g, int pad, int mode,
                                    int parts, int part, int c, int t, const BnBackwardConsts<acc_t>& k, acc_t& a,
                                    acc_t& b) {
  a = b = acc_t(0);
  const int items = bn_reduce_items(g);
  const int plane_len = g.rows * g.cols;
  const int Ho = g.rows + 2 * pad, Wo = g.cols + 2 * pad;
  const acc_t mean = k.mean[c], scale = k.gamma[c] * k.invstd[c], beta = k.beta[c];
  for (int it = part; it < items; it += parts) {
    uint32_t n, q;
    g.by_tiles.divmod(static_cast<uint32_t>(it), n, q);
    const long long plane = static_cast<long long>(n) * g.C + c;
    const scalar_t* xp = x + plane * plane_len;
    const scalar_t* dyp = dy + plane * Ho * Wo;
    const int base = static_cast<int>(q) * g.tile + t * V;
    Pack<scalar_t, V> p[kBnUnroll]{};
    acc_t gr[kBnUnroll][V];
    load_x_and_grad_nchw<scalar_t, acc_t, V>(xp, dyp, g, base, plane_len, pad, mode, Wo, p, gr);
    DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
      const int e = base + u * g.threads * V;
      if (e >= plane_len) continue;
      DIP_UNROLL for (int l = 0; l < V; ++l) {
        const acc_t xv = static_cast<acc_t>(p[u].v[l]);
        const acc_t dz = bn_act_dz<acc_t>(gr[u][l], xv, mean, scale, beta, k.slope);
        a += dz;
        b += dz * (xv - mean);
      }
    }
  }
}

// Adds the dy vectors of every padded pixel that copied source pixel (h, w) of
// one image (channels_last, dy image base dyi with row length Wo pixels).
template <typename scalar_t, typename acc_t, int V>
DIP_HD void fold_grad_cl(const scalar_t* dyi, int h, int w, int H, int W, int Wo, int C, int pad, int mode,
                         acc_t* out) {
  const bool interior = mode == kPadZeros || (h > pad && h < H - 1 - pad && w > pad && w < W - 1 - pad);
  const Pack<scalar_t, V> d0 = load_pack<scalar_t, V>(dyi + (static_cast<long long>(h + pad) * Wo + w + pad) * C);
  DIP_UNROLL for (int l = 0; l < V; ++l) out[l] = static_cast<acc_t>(d0.v[l]);
  if (interior) return;
  DIP_UNROLL for (int a = 0; a < 3; ++a) {
    const int r = pad_preimage_slot(h, H, pad, mode, a);
    if (r < 0) continue;
    DIP_UNROLL for (int b = 0; b < 3; ++b) {
      const int c = pad_preimage_slot(w, W, pad, mode, b);
      if (c < 0 || (a == 0 && b == 0)) continue;  // (0, 0) is the interior read above
      const Pack<scalar_t, V> d = load_pack<scalar_t, V>(dyi + (static_cast<long long>(r) * Wo + c) * C);
      DIP_UNROLL for (int l = 0; l < V; ++l) out[l] += static_cast<acc_t>(d.v[l]);
    }
  }
}

// channels_last backward sums, thread (cvl, r) of block (part, group): V pairs (a, b).
template <typename scalar_t, typename acc_t, int V>
DIP_HD void bn_backward_thread_cl(const scalar_t* dy, const scalar_t* x, const Tiling& g, int pad, int mode,
                                  int parts, int part, int cv, int r, const BnBackwardConsts<acc_t>& k, acc_t* a,
                                  acc_t* b) {
  DIP_UNROLL for (int l = 0; l < V; ++l) a[l] = b[l] = acc_t(0);
  if (cv >= g.Cv) return;
  const int items = bn_reduce_items(g);
  const int Ho = g.rows + 2 * pad, Wo = g.cols + 2 * pad;
  acc_t mean[V], scale[V], beta[V];
  DIP_UNROLL for (int l = 0; l < V; ++l) {
    const int c = cv * V + l;
    mean[l] = k.mean[c];
    scale[l] = k.gamma[c] * k.invstd[c];
    beta[l] = k.beta[c];
  }
  for (int it = part; it < items; it += parts) {
    uint32_t row, q, n, h;
    g.by_tiles.divmod(static_cast<uint32_t>(it), row, q);
    g.by_rows.divmod(row, n, h);
    const scalar_t* xr = x + static_cast<long long>(row) * g.cols * g.C + cv * V;
    const scalar_t* dyi = dy + static_cast<long long>(n) * Ho * Wo * g.C + cv * V;
    const int j0 = static_cast<int>(q) * g.tile + r;
    // One loop: this kernel stores nothing to global memory, so the compiler
    // is free to issue the loads of every unrolled iteration first, and no
    // array of gathered gradients has to stay live (V = 8 would spill).
    DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
      const int j = j0 + u * g.R;
      if (j >= g.cols) continue;
      const Pack<scalar_t, V> p = load_pack<scalar_t, V>(xr + static_cast<long long>(j) * g.C);
      acc_t gr[V];
      fold_grad_cl<scalar_t, acc_t, V>(dyi, static_cast<int>(h), j, g.rows, g.cols, Wo, g.C, pad, mode, gr);
      DIP_UNROLL for (int l = 0; l < V; ++l) {
        const acc_t xv = static_cast<acc_t>(p.v[l]);
        const acc_t dz = bn_act_dz<acc_t>(gr[l], xv, mean[l], scale[l], beta[l], k.slope);
        a[l] += dz;
        b[l] += dz * (xv - mean[l]);
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Shared-memory trees (the kernels and the emulation run them level by level)
// ---------------------------------------------------------------------------

// Smallest power of two >= n.
DIP_HD int bn_pow2_ceil(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

// One level of a tree over `count` slots (slot i merges slot i + stride when
// both exist), for the thread that owns slot i. Stats: Welford triples.
template <typename acc_t>
DIP_HD void tree_level_welford(acc_t* cnt, acc_t* mean, acc_t* m2, int i, int stride, int count, int width,
                               int lane) {
  if (i < stride && i + stride < count) {
    welford_merge_at<acc_t>(cnt, mean, m2, i * width + lane, (i + stride) * width + lane);
  }
}

// The same for plain sums of pairs (a, b).
template <typename acc_t>
DIP_HD void tree_level_sum(acc_t* a, acc_t* b, int i, int stride, int count, int width, int lane) {
  if (i < stride && i + stride < count) {
    a[i * width + lane] += a[(i + stride) * width + lane];
    b[i * width + lane] += b[(i + stride) * width + lane];
  }
}

// ---------------------------------------------------------------------------
// Finalize: one block per kBnFinalizeChannels channels, 32 lanes each. Lane l
// merges the parts l, l + 32, ... in order; then a tree over the 32 lanes.
// ---------------------------------------------------------------------------

// Workspace of a reduction: [parts][C] arrays (stats: cnt, mean, m2; sums: a, b).
template <typename acc_t>
DIP_HD void bn_finalize_lane_welford(const acc_t* ws_cnt, const acc_t* ws_mean, const acc_t* ws_m2, int parts, int C,
                                     int c, int lane, acc_t& cnt, acc_t& mean, acc_t& m2) {
  cnt = mean = m2 = acc_t(0);
  if (c >= C) return;
  for (int p = lane; p < parts; p += kBnFinalizeLanes) {
    welford_merge<acc_t>(cnt, mean, m2, ws_cnt[p * C + c], ws_mean[p * C + c], ws_m2[p * C + c]);
  }
}

template <typename acc_t>
DIP_HD void bn_finalize_lane_sum(const acc_t* ws_a, const acc_t* ws_b, int parts, int C, int c, int lane, acc_t& a,
                                 acc_t& b) {
  a = b = acc_t(0);
  if (c >= C) return;
  for (int p = lane; p < parts; p += kBnFinalizeLanes) {
    a += ws_a[p * C + c];
    b += ws_b[p * C + c];
  }
}

template <typename acc_t>
DIP_HD acc_t invstd_from(acc_t count, acc_t m2, double eps) {
  return acc_t(1) / sqrt(m2 / count + static_cast<acc_t>(eps));
}

// ---------------------------------------------------------------------------
// Apply kernels. kCount: the emulation counts every store (count_stores).
// ---------------------------------------------------------------------------

// Forward constants of one channel: y = act((x - mean) * scale + beta).
template <typename acc_t>
struct BnForwardConsts {
  const acc_t* mean;
  const acc_t* invstd;
  const acc_t* gamma;
  const acc_t* beta;
  acc_t slope;
};

// NCHW normalize, thread t of block b over the padded output (rows = Ho).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void bn_normalize_thread_nchw(const scalar_t* x, scalar_t* y, const Tiling& g, int H, int W, int pad,
                                     int mode, const BnForwardConsts<acc_t>& k, int block, int t, int* counts) {
  uint32_t plane, q, n, c;
  g.by_tiles.divmod(static_cast<uint32_t>(block), plane, q);
  g.by_C.divmod(plane, n, c);
  const int out_len = g.rows * g.cols;
  const scalar_t* xp = x + static_cast<long long>(plane) * H * W;
  scalar_t* yp = y + static_cast<long long>(plane) * out_len;
  const acc_t mean = k.mean[c], scale = k.gamma[c] * k.invstd[c], beta = k.beta[c];
  const int base = static_cast<int>(q) * g.tile + t * V;
  Pack<scalar_t, V> p[kBnUnroll]{};
  if (pad == 0) {  // the output is the input's shape: vector loads of x
    load_slot_packs(xp, base, g.threads * V, out_len, 1, p);
    DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
      const int e = base + u * g.threads * V;
      if (e >= out_len) continue;
      Pack<scalar_t, V> o;
      DIP_UNROLL for (int l = 0; l < V; ++l) {
        o.v[l] = static_cast<scalar_t>(bn_act_value<acc_t>(static_cast<acc_t>(p[u].v[l]), mean, scale, beta, k.slope));
      }
      store_pack<scalar_t, V>(yp + e, o);
      count_stores<kCount>(counts, static_cast<long long>(plane) * out_len + e, V);
    }
    return;
  }
  // Padded output: gather the sources of all kBnUnroll slots first (one decode
  // of (i, j) per slot), then compute and store; `inside` marks the elements
  // that are not zeros of zero padding.
  scalar_t raw[kBnUnroll][V];
  unsigned inside = 0;
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e >= out_len) continue;
    uint32_t i0, j0;
    g.by_cols.divmod(static_cast<uint32_t>(e), i0, j0);
    int i = static_cast<int>(i0), j = static_cast<int>(j0);
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      const int si = pad_source(i, H, pad, mode), sj = pad_source(j, W, pad, mode);
      raw[u][l] = scalar_t(0);
      if (si >= 0 && sj >= 0) {
        raw[u][l] = xp[si * W + sj];
        inside |= 1u << (u * V + l);
      }
      if (++j == g.cols) {
        j = 0;
        ++i;
      }
    }
  }
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e >= out_len) continue;
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      const acc_t v = (inside >> (u * V + l)) & 1u
                          ? bn_act_value<acc_t>(static_cast<acc_t>(raw[u][l]), mean, scale, beta, k.slope)
                          : acc_t(0);
      o.v[l] = static_cast<scalar_t>(v);
    }
    store_pack<scalar_t, V>(yp + e, o);
    count_stores<kCount>(counts, static_cast<long long>(plane) * out_len + e, V);
  }
}

// channels_last normalize, thread (cvl, r) of block (b, group) over output row (n, i).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void bn_normalize_thread_cl(const scalar_t* x, scalar_t* y, const Tiling& g, int H, int W, int pad, int mode,
                                   const BnForwardConsts<acc_t>& k, int block, int group, int t, int* counts) {
  uint32_t r, cvl, row, q, n, i;
  g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
  const int cv = group * g.Cb + static_cast<int>(cvl);
  if (cv >= g.Cv) return;
  g.by_tiles.divmod(static_cast<uint32_t>(block), row, q);
  g.by_rows.divmod(row, n, i);
  acc_t mean[V], scale[V], beta[V];
  DIP_UNROLL for (int l = 0; l < V; ++l) {
    const int c = cv * V + l;
    mean[l] = k.mean[c];
    scale[l] = k.gamma[c] * k.invstd[c];
    beta[l] = k.beta[c];
  }
  const int si = pad_source(static_cast<int>(i), H, pad, mode);  // uniform in the block
  const scalar_t* xr = x + (static_cast<long long>(n) * H + (si < 0 ? 0 : si)) * W * g.C + cv * V;
  const long long yrow = static_cast<long long>(row) * g.cols;
  scalar_t* yr = y + yrow * g.C + cv * V;
  const int j0 = static_cast<int>(q) * g.tile + static_cast<int>(r);
  Pack<scalar_t, V> p[kBnUnroll]{};
  int src[kBnUnroll];
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int j = j0 + u * g.R;
    src[u] = -1;
    if (j < g.cols && si >= 0) src[u] = pad_source(j, W, pad, mode);
    if (src[u] >= 0) p[u] = load_pack<scalar_t, V>(xr + static_cast<long long>(src[u]) * g.C);
  }
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int j = j0 + u * g.R;
    if (j >= g.cols) continue;
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      const acc_t v = src[u] >= 0
                          ? bn_act_value<acc_t>(static_cast<acc_t>(p[u].v[l]), mean[l], scale[l], beta[l], k.slope)
                          : acc_t(0);
      o.v[l] = static_cast<scalar_t>(v);
    }
    store_pack<scalar_t, V>(yr + static_cast<long long>(j) * g.C, o);
    count_stores<kCount>(counts, (yrow + j) * g.C + cv * V, V);
  }
}

// Backward constants of grad_x: dx = k * (dz - sum_dz / count - xhat * sum_dz_xhat / count).
template <typename acc_t>
struct BnDxConsts {
  BnBackwardConsts<acc_t> b;
  const acc_t* sum_dz;
  const acc_t* sum_dz_xhat;
  acc_t count;
};

// grad_x of one element from its gradient g: dz = g * act'(z), then
// dx = scale * (dz - mean(dz) - (x - mean) * c2), c2 = invstd * mean(dz * xhat)
// folded once per channel (one constant fewer per channel held in registers).
template <typename acc_t>
DIP_HD acc_t bn_dx_value(acc_t g, acc_t xv, acc_t mean, acc_t scale, acc_t beta, acc_t slope, acc_t mean_dz,
                         acc_t c2) {
  const acc_t dz = bn_act_dz<acc_t>(g, xv, mean, scale, beta, slope);
  return scale * (dz - mean_dz - (xv - mean) * c2);
}

// NCHW grad_x, thread t of block b over the input (rows = H).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void bn_dx_thread_nchw(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Tiling& g, int pad,
                              int mode, const BnDxConsts<acc_t>& k, int block, int t, int* counts) {
  uint32_t plane, q, n, c;
  g.by_tiles.divmod(static_cast<uint32_t>(block), plane, q);
  g.by_C.divmod(plane, n, c);
  const int len = g.rows * g.cols;
  const int Wo = g.cols + 2 * pad, Ho = g.rows + 2 * pad;
  const scalar_t* xp = x + static_cast<long long>(plane) * len;
  const scalar_t* dyp = dy + static_cast<long long>(plane) * Ho * Wo;
  scalar_t* dxp = dx + static_cast<long long>(plane) * len;
  const acc_t mean = k.b.mean[c], invstd = k.b.invstd[c], scale = k.b.gamma[c] * invstd, beta = k.b.beta[c];
  const acc_t mdz = k.sum_dz[c] / k.count, c2 = invstd * (k.sum_dz_xhat[c] / k.count);
  const int base = static_cast<int>(q) * g.tile + t * V;
  Pack<scalar_t, V> p[kBnUnroll]{};
  acc_t gr[kBnUnroll][V];
  load_x_and_grad_nchw<scalar_t, acc_t, V>(xp, dyp, g, base, len, pad, mode, Wo, p, gr);
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int e = base + u * g.threads * V;
    if (e >= len) continue;
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      o.v[l] = static_cast<scalar_t>(
          bn_dx_value<acc_t>(gr[u][l], static_cast<acc_t>(p[u].v[l]), mean, scale, beta, k.b.slope, mdz, c2));
    }
    store_pack<scalar_t, V>(dxp + e, o);
    count_stores<kCount>(counts, static_cast<long long>(plane) * len + e, V);
  }
}

// channels_last grad_x, thread (cvl, r) of block (b, group) over input row (n, h).
template <typename scalar_t, typename acc_t, int V, bool kCount>
DIP_HD void bn_dx_thread_cl(const scalar_t* dy, const scalar_t* x, scalar_t* dx, const Tiling& g, int pad, int mode,
                            const BnDxConsts<acc_t>& k, int block, int group, int t, int* counts) {
  uint32_t r, cvl, row, q, n, h;
  g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
  const int cv = group * g.Cb + static_cast<int>(cvl);
  if (cv >= g.Cv) return;
  g.by_tiles.divmod(static_cast<uint32_t>(block), row, q);
  g.by_rows.divmod(row, n, h);
  const int Ho = g.rows + 2 * pad, Wo = g.cols + 2 * pad;
  acc_t mean[V], scale[V], beta[V], mdz[V], c2[V];
  DIP_UNROLL for (int l = 0; l < V; ++l) {
    const int c = cv * V + l;
    const acc_t invstd = k.b.invstd[c];
    mean[l] = k.b.mean[c];
    scale[l] = k.b.gamma[c] * invstd;
    beta[l] = k.b.beta[c];
    mdz[l] = k.sum_dz[c] / k.count;
    c2[l] = invstd * (k.sum_dz_xhat[c] / k.count);
  }
  const long long xrow = static_cast<long long>(row) * g.cols;
  const scalar_t* xr = x + xrow * g.C + cv * V;
  scalar_t* dxr = dx + xrow * g.C + cv * V;
  const scalar_t* dyi = dy + static_cast<long long>(n) * Ho * Wo * g.C + cv * V;
  const int j0 = static_cast<int>(q) * g.tile + static_cast<int>(r);
  Pack<scalar_t, V> p[kBnUnroll]{};
  acc_t gr[kBnUnroll][V];
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int j = j0 + u * g.R;
    if (j < g.cols) {
      p[u] = load_pack<scalar_t, V>(xr + static_cast<long long>(j) * g.C);
      fold_grad_cl<scalar_t, acc_t, V>(dyi, static_cast<int>(h), j, g.rows, g.cols, Wo, g.C, pad, mode, gr[u]);
    }
  }
  DIP_UNROLL for (int u = 0; u < kBnUnroll; ++u) {
    const int j = j0 + u * g.R;
    if (j >= g.cols) continue;
    Pack<scalar_t, V> o;
    DIP_UNROLL for (int l = 0; l < V; ++l) {
      o.v[l] = static_cast<scalar_t>(bn_dx_value<acc_t>(gr[u][l], static_cast<acc_t>(p[u].v[l]), mean[l], scale[l],
                                                        beta[l], k.b.slope, mdz[l], c2[l]));
    }
    store_pack<scalar_t, V>(dxr + static_cast<long long>(j) * g.C, o);
    count_stores<kCount>(counts, (xrow + j) * g.C + cv * V, V);
  }
}

// The running-statistics update (bn_act_running_stats_update): thread `thread`
// of block `block` in a grid-stride loop over the C channels on a grid of
// `blocks` blocks of `threads` threads (csrc/common/grid_stride.h). With
// kCount the emulation counts the channels updated (each exactly once).
template <typename run_t, typename acc_t, bool kCount>
DIP_HD void bn_running_stats_thread(run_t* running_mean, run_t* running_var, const acc_t* mean, const acc_t* invstd,
                                    int64_t C, double momentum, double eps, double unbias, int64_t block,
                                    int64_t threads, int64_t blocks, int64_t thread, int* counts) {
  for (int64_t c = block * threads + thread; c < C; c += threads * blocks) {
    bn_running_update<run_t, acc_t>(running_mean[c], running_var[c], mean[c], invstd[c], momentum, eps, unbias);
    count_stores<kCount>(counts, c, 1);
  }
}

}  // namespace dip_fast
