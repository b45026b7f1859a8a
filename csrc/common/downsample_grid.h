// Per-thread work of the CUDA kernels of downsample, as plain
// functions of (block, plane, thread) indices: csrc/cuda/downsample.cu launches
// them, csrc/cpu/downsample_emulated.cpp replays every block, plane and thread of
// the same plan on the CPU (tests).
//
// Forward, one block per tile of kLanczosFwdRows x tile_cols outputs of a plane:
//   1. vertical pass into shared memory: for the tile's output rows and the
//      (tile_cols - 1) * f + K padded input columns they read, one value per
//      thread slot, a tap sum down a column (consecutive threads read
//      consecutive columns; the clamp is the replication pad);
//   2. strided horizontal pass from shared memory, one output per slot.
//   The intermediate never leaves the SM: x is read from memory about once
//   and y is written once.
// Backward, one block per tile of kLanczosBwdRows x kLanczosBwdCols inputs:
//   1. transposed horizontal pass into shared memory: the rows of the
//      intermediate gradient that touch the tile (a gather along grad_out rows);
//   2. transposed vertical pass: each input gathers the intermediate rows
//      touching it, edge pixels collecting the replicated border.
//   Each grad_x element is written by one thread with a fixed summation
//   order: no atomics, deterministic.
// Tensors are dense in their working layout (NCHW or channels_last); a plane
// (n, c) is addressed by its first element and its row and column strides.
// 32-bit indices; the (row, column) of a thread slot and the (n, c) of a plane
// are decoded with FastDivmod, once per slot and once per plane.
#pragma once

#include "fast_divmod.h"
#include "downsample.h"
#include "tiling.h"

namespace dip_fast {

constexpr int kLanczosThreads = 256;
constexpr int kLanczosFwdRows = 8;   // output rows per forward tile
constexpr int kLanczosFwdCols = 32;  // output columns per forward tile (fewer if shared memory is short)
constexpr int kLanczosBwdRows = 32;  // input rows per backward tile
constexpr int kLanczosBwdCols = 32;  // input columns per backward tile

struct LanczosDims {
  int C, planes, H, W, Ho, Wo, K, f, pad;
  bool cl;
  int tile_cols, tcols;  // forward: output columns per tile, padded input columns they read
  FastDivmod by_C, by_tcols, by_tile_cols;
};

// First element and strides of plane p of a (N, C, h, w) tensor.
DIP_HD void lanczos_plane(const LanczosDims& d, int p, int h, int w, long long& base, int& row_stride,
                          int& col_stride) {
  if (!d.cl) {
    base = static_cast<long long>(p) * h * w;
    row_stride = w;
    col_stride = 1;
    return;
  }
  uint32_t n, c;
  d.by_C.divmod(static_cast<uint32_t>(p), n, c);
  base = static_cast<long long>(n) * h * w * d.C + c;
  row_stride = w * d.C;
  col_stride = d.C;
}

// Forward phase 1, thread t of T in block (bx, by), plane p.
template <typename scalar_t, typename acc_t>
DIP_HD void lanczos_fwd_vertical_thread(const scalar_t* x, const acc_t* taps, acc_t* tile, const LanczosDims& d,
                                        int bx, int by, int p, int t, int T) {
  long long base;
  int hs, ws;
  lanczos_plane(d, p, d.H, d.W, base, hs, ws);
  const scalar_t* xp = x + base;
  const int j0 = bx * d.tile_cols, i0 = by * kLanczosFwdRows;
  const int q0 = j0 * d.f - d.pad;  // first padded column of the tile
  for (int idx = t; idx < kLanczosFwdRows * d.tcols; idx += T) {
    uint32_t r, col;
    d.by_tcols.divmod(static_cast<uint32_t>(idx), r, col);
    const int i = i0 + static_cast<int>(r);
    if (i < d.Ho) {
      const int w = static_cast<int>(lanczos::clamp_index(q0 + static_cast<int>(col), d.W));
      tile[idx] = lanczos::forward_tap_sum<acc_t>(xp + static_cast<long long>(w) * ws, hs, d.H, i, taps, d.K, d.f,
                                                  d.pad);
    }
  }
}

// Forward phase 2: the strided horizontal pass from the tile to y.
template <typename scalar_t, typename acc_t, bool kCount>
DIP_HD void lanczos_fwd_horizontal_thread(const acc_t* taps, const acc_t* tile, scalar_t* y, const LanczosDims& d,
                                          int bx, int by, int p, int t, int T, int* counts) {
  long long base;
  int hs, ws;
  lanczos_plane(d, p, d.Ho, d.Wo, base, hs, ws);
  const int j0 = bx * d.tile_cols, i0 = by * kLanczosFwdRows;
  for (int idx = t; idx < kLanczosFwdRows * d.tile_cols; idx += T) {
    uint32_t r, cc;
    d.by_tile_cols.divmod(static_cast<uint32_t>(idx), r, cc);
    const int i = i0 + static_cast<int>(r), j = j0 + static_cast<int>(cc);
    if (i < d.Ho && j < d.Wo) {
      // The tile row already holds the padded columns: no clamp triggers.
      const acc_t v = lanczos::forward_tap_sum<acc_t>(tile + r * d.tcols, 1, d.tcols, cc, taps, d.K, d.f, 0);
      const long long off = base + static_cast<long long>(i) * hs + static_cast<long long>(j) * ws;
      y[off] = static_cast<scalar_t>(v);
      count_stores<kCount>(counts, off, 1);
    }
  }
}

// Backward: the intermediate rows [i_lo, i_lo + rows) that input row tile by touches.
DIP_HD void lanczos_bwd_rows(const LanczosDims& d, int by, int& i_lo, int& rows) {
  const int h0 = by * kLanczosBwdRows;
  const int h1 = h0 + kLanczosBwdRows < d.H ? h0 + kLanczosBwdRows : d.H;
  int64_t lo, hi, unused;
  lanczos::touching_outputs(h0, d.H, d.Ho, d.K, d.f, d.pad, &lo, &unused);
  lanczos::touching_outputs(h1 - 1, d.H, d.Ho, d.K, d.f, d.pad, &unused, &hi);
  i_lo = static_cast<int>(lo);
  rows = hi >= lo ? static_cast<int>(hi - lo + 1) : 0;
}

// Backward phase 1: the transposed horizontal pass of the touching grad_out rows.
template <typename scalar_t, typename acc_t>
DIP_HD void lanczos_bwd_horizontal_thread(const scalar_t* gy, const acc_t* taps, acc_t* tile, const LanczosDims& d,
                                          int bx, int by, int p, int t, int T) {
  long long base;
  int hs, ws;
  lanczos_plane(d, p, d.Ho, d.Wo, base, hs, ws);
  const scalar_t* gp = gy + base;
  int i_lo, rows;
  lanczos_bwd_rows(d, by, i_lo, rows);
  const int w0 = bx * kLanczosBwdCols;
  for (int idx = t; idx < rows * kLanczosBwdCols; idx += T) {
    const int r = idx / kLanczosBwdCols, cc = idx % kLanczosBwdCols;  // a power of two: shifts
    const int w = w0 + cc;
    if (w < d.W) {
      tile[idx] = lanczos::backward_tap_sum<acc_t>(gp + static_cast<long long>(i_lo + r) * hs, ws, 0, d.Wo, w, d.W,
                                                   taps, d.K, d.f, d.pad);
    }
  }
}

// Backward phase 2: the transposed vertical pass from the tile to grad_x.
template <typename scalar_t, typename acc_t, bool kCount>
DIP_HD void lanczos_bwd_vertical_thread(const acc_t* taps, const acc_t* tile, scalar_t* gx, const LanczosDims& d,
                                        int bx, int by, int p, int t, int T, int* counts) {
  long long base;
  int hs, ws;
  lanczos_plane(d, p, d.H, d.W, base, hs, ws);
  int i_lo, rows;
  lanczos_bwd_rows(d, by, i_lo, rows);
  const int h0 = by * kLanczosBwdRows, w0 = bx * kLanczosBwdCols;
  for (int idx = t; idx < kLanczosBwdRows * kLanczosBwdCols; idx += T) {
    const int r = idx / kLanczosBwdCols, cc = idx % kLanczosBwdCols;
    const int h = h0 + r, w = w0 + cc;
    if (h < d.H && w < d.W) {
      const acc_t v = lanczos::backward_tap_sum<acc_t>(tile + cc, kLanczosBwdCols, i_lo, d.Ho, h, d.H, taps, d.K, d.f,
                                                       d.pad);
      const long long off = base + static_cast<long long>(h) * hs + static_cast<long long>(w) * ws;
      gx[off] = static_cast<scalar_t>(v);
      count_stores<kCount>(counts, off, 1);
    }
  }
}

}  // namespace dip_fast
