// The per-thread work of the CUDA kernels of bn_act, as plain functions of
// explicit indices (element e, thread t of T, channel c).
//
// csrc/cuda/bn_act.cu launches them, one CUDA thread per call;
// csrc/cpu/bn_act_emulated.cpp calls the very same functions for every index
// of the launch grid on the CPU. The emulation is compared against PyTorch in
// every CI run, so the CUDA kernels' indexing (layout decoding, pad bands,
// the pad-gradient gather, the reduction order) is tested without a GPU.
#pragma once

#include <cmath>

#include "bn_act.h"

namespace dip_fast {

struct BnActShape {
  int N, C, H, W, pad, mode;
  bool channels_last;
};

// Threads per block of the per-channel reductions (a power of two).
constexpr int kBnReduceThreads = 256;

// (n, h, w) of the e-th element of one channel, for e in [0, N*H*W).
DIP_HD void split_nhw(long long e, int H, int W, long long& n, int& h, int& w) {
  w = static_cast<int>(e % W);
  const long long t = e / W;
  h = static_cast<int>(t % H);
  n = t / H;
}


// Thread t of T: Welford triple over its share of channel c.
template <typename scalar_t, typename acc_t>
DIP_HD void bn_stats_partial(const scalar_t* x, Strides4 sx, const BnActShape& s, int c, int t, int T, acc_t& count,
                             acc_t& mean, acc_t& m2) {
  count = mean = m2 = acc_t(0);
  const long long total = static_cast<long long>(s.N) * s.H * s.W;
  for (long long e = t; e < total; e += T) {
    long long n;
    int h, w;
    split_nhw(e, s.H, s.W, n, h, w);
    welford_add<acc_t>(count, mean, m2, static_cast<acc_t>(x[offset4(sx, n, c, h, w)]));
  }
}

template <typename acc_t>
DIP_HD acc_t invstd_from(acc_t count, acc_t m2, double eps) {
  return acc_t(1) / sqrt(m2 / count + static_cast<acc_t>(eps));
}

// One element e of the padded output y (e in [0, N*C*Ho*Wo), in y's memory order).
template <typename scalar_t, typename acc_t>
DIP_HD void bn_act_normalize_element(long long e, const scalar_t* x, Strides4 sx, scalar_t* y, Strides4 sy,
                                     const BnActShape& s, const acc_t* mean, const acc_t* invstd, const acc_t* gamma,
                                     const acc_t* beta, acc_t slope) {
  long long n, c;
  int i, j;
  split_nchw(e, s.C, s.H + 2 * s.pad, s.W + 2 * s.pad, s.channels_last, n, c, i, j);
  const int si = pad_source(i, s.H, s.pad, s.mode), sj = pad_source(j, s.W, s.pad, s.mode);
  acc_t v = acc_t(0);
  if (si >= 0 && sj >= 0) {
    v = bn_act_value<acc_t>(static_cast<acc_t>(x[offset4(sx, n, c, si, sj)]), mean[c], gamma[c] * invstd[c], beta[c],
                            slope);
  }
  y[offset4(sy, n, c, i, j)] = static_cast<scalar_t>(v);
}

// Thread t of T: partial sums of dz and dz * (x - mean) over its share of channel c.
template <typename scalar_t, typename acc_t>
DIP_HD void bn_act_backward_partial(const scalar_t* dy, Strides4 sdy, const scalar_t* x, Strides4 sx,
                                    const BnActShape& s, int c, int t, int T, const acc_t* mean, const acc_t* invstd,
                                    const acc_t* gamma, const acc_t* beta, acc_t slope, acc_t& a, acc_t& b) {
  const acc_t scale = gamma[c] * invstd[c];
  const long long total = static_cast<long long>(s.N) * s.H * s.W;
  a = b = acc_t(0);
  for (long long e = t; e < total; e += T) {
    long long n;
    int h, w;
    split_nhw(e, s.H, s.W, n, h, w);
    const acc_t g = fold_pad_grad<scalar_t, acc_t>(dy, sdy, n, c, h, w, s.H, s.W, s.pad, s.mode);
    const acc_t xv = static_cast<acc_t>(x[offset4(sx, n, c, h, w)]);
    const acc_t dz = bn_act_dz<acc_t>(g, xv, mean[c], scale, beta[c], slope);
    a += dz;
    b += dz * (xv - mean[c]);
  }
}

// One element e of grad_x (e in [0, N*C*H*W), in x's memory order). sum_dz_xhat
// is sum(dz * xhat) = sum(dz * (x - mean)) * invstd.
template <typename scalar_t, typename acc_t>
DIP_HD void bn_act_dx_element(long long e, const scalar_t* dy, Strides4 sdy, const scalar_t* x, Strides4 sx,
                              scalar_t* dx, const BnActShape& s, const acc_t* mean, const acc_t* invstd,
                              const acc_t* gamma, const acc_t* beta, acc_t slope, const acc_t* sum_dz,
                              const acc_t* sum_dz_xhat) {
  long long n, c;
  int h, w;
  split_nchw(e, s.C, s.H, s.W, s.channels_last, n, c, h, w);
  const acc_t count = static_cast<acc_t>(static_cast<long long>(s.N) * s.H * s.W);
  const acc_t scale = gamma[c] * invstd[c];
  const acc_t g = fold_pad_grad<scalar_t, acc_t>(dy, sdy, n, c, h, w, s.H, s.W, s.pad, s.mode);
  const long long off = offset4(sx, n, c, h, w);
  const acc_t xv = static_cast<acc_t>(x[off]);
  const acc_t dz = bn_act_dz<acc_t>(g, xv, mean[c], scale, beta[c], slope);
  dx[off] = static_cast<scalar_t>(
      bn_dx<acc_t>(dz, (xv - mean[c]) * invstd[c], scale, sum_dz[c] / count, sum_dz_xhat[c] / count));
}

}  // namespace dip_fast
