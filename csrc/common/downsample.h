// Index and tap math of the separable filter-and-decimate op
// (downsample), shared by the CPU and CUDA kernels.
//
// Along one axis of length `len` the op computes, for output o,
//
//     y[o] = sum_{a < K} taps[a] * x[clamp(o * f - pad + a, 0, len - 1)]
//
// i.e. a strided 1-D correlation with K taps and stride f over the input
// replicate-padded by `pad` on both sides. Clamping the index *is* the
// replication padding: no padded copy is ever made. With pad = 0 and
// (n_out - 1) * f + K <= len the clamp never triggers and this is the plain
// "valid" strided correlation.
//
// The transpose (the input gradient along that axis) is written as a gather:
// input position u receives from every output whose window covers u,
// directly or through the clamp. For 0 < u < len - 1 that is one tap per
// output (a = u - (o * f - pad)); the edge positions u = 0 and u = len - 1
// also collect the taps that fell on the replicated border, which is exactly
// the transpose of ReplicationPad.
//
// Every function takes explicit indices so that a CPU loop and a CUDA thread
// call the same code for the same element.
#pragma once

#include <cstdint>

#include "macros.h"

namespace dip_fast {
namespace lanczos {

// Floor and ceiling of a / b for b > 0 and any sign of a.
DIP_HD int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
DIP_HD int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

DIP_HD int64_t clamp_index(int64_t q, int64_t len) { return q < 0 ? 0 : (q >= len ? len - 1 : q); }

// Output length along one axis (len + 2 * pad >= K is checked by the callers).
DIP_HD int64_t output_size(int64_t len, int64_t K, int64_t f, int64_t pad) { return (len + 2 * pad - K) / f + 1; }

// The number of padded input positions that the outputs read: (n_out - 1) * f + K.
DIP_HD int64_t padded_extent(int64_t n_out, int64_t K, int64_t f) { return (n_out - 1) * f + K; }

// Forward tap sum for output o along one axis. `src` points at input index 0
// of that axis and `stride` is the axis' element stride.
template <typename acc_t, typename load_t>
DIP_HD acc_t forward_tap_sum(const load_t* src, int64_t stride, int64_t len, int64_t o, const acc_t* taps, int64_t K,
                             int64_t f, int64_t pad) {
  const int64_t q0 = o * f - pad;
  acc_t acc = acc_t(0);
  for (int64_t a = 0; a < K; ++a) {
    acc += taps[a] * static_cast<acc_t>(src[clamp_index(q0 + a, len) * stride]);
  }
  return acc;
}

// The outputs [*o_lo, *o_hi] whose window reaches input position u (directly
// or through the clamp); empty when *o_lo > *o_hi (possible without padding
// when f > K, or past the last window).
DIP_HD void touching_outputs(int64_t u, int64_t len, int64_t n_out, int64_t K, int64_t f, int64_t pad, int64_t* o_lo,
                             int64_t* o_hi) {
  // Padded positions that clamp to u: [u, u], widened to -inf / +inf at the edges.
  int64_t lo = u == 0 ? 0 : ceil_div(u + pad - K + 1, f);
  int64_t hi = u == len - 1 ? n_out - 1 : floor_div(u + pad, f);
  *o_lo = lo < 0 ? 0 : lo;
  *o_hi = hi > n_out - 1 ? n_out - 1 : hi;
}

// Weight of input u in output o: the sum of the taps whose (padded) position
// clamps to u. A single tap (or 0) inside, a partial tap sum at the edges.
template <typename acc_t>
DIP_HD acc_t transpose_weight(int64_t u, int64_t o, int64_t len, const acc_t* taps, int64_t K, int64_t f,
                              int64_t pad) {
  const int64_t q0 = o * f - pad;
  int64_t a_lo = u == 0 ? 0 : u - q0;
  int64_t a_hi = u == len - 1 ? K - 1 : u - q0;
  if (a_lo < 0) a_lo = 0;
  if (a_hi > K - 1) a_hi = K - 1;
  acc_t w = acc_t(0);
  for (int64_t a = a_lo; a <= a_hi; ++a) w += taps[a];
  return w;
}

// Transposed tap sum (input gradient) at input position u along one axis:
// sum over the touching outputs o of transpose_weight(u, o) * g[o]. `g` holds
// outputs o_base, o_base + 1, ... at the given stride (o_base lets a caller
// pass a tile that starts at some output > 0). Summation order is fixed
// (ascending o), so the result is deterministic.
template <typename acc_t, typename load_t>
DIP_HD acc_t backward_tap_sum(const load_t* g, int64_t stride, int64_t o_base, int64_t n_out, int64_t u, int64_t len,
                              const acc_t* taps, int64_t K, int64_t f, int64_t pad) {
  int64_t o_lo, o_hi;
  touching_outputs(u, len, n_out, K, f, pad, &o_lo, &o_hi);
  acc_t acc = acc_t(0);
  for (int64_t o = o_lo; o <= o_hi; ++o) {
    acc += transpose_weight<acc_t>(u, o, len, taps, K, f, pad) * static_cast<acc_t>(g[(o - o_base) * stride]);
  }
  return acc;
}

}  // namespace lanczos
}  // namespace dip_fast
