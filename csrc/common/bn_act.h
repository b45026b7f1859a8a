// Math shared by the CPU and CUDA kernels of the fused BatchNorm (training
// mode) + LeakyReLU + pad ops: index mapping of the pad, Welford merges and
// the per-element forward and backward formulas.
#pragma once

#include <cstdint>

#include "macros.h"
#include "leaky_relu.h"

namespace dip_fast {

enum PadMode : int { kPadZeros = 0, kPadReflect = 1 };

// Source index of padded position i (0 <= i < n + 2 * pad) in a dimension of
// size n, or -1 when the position is a zero of zero padding.
// Reflection excludes the edge, like torch.nn.ReflectionPad2d (needs pad < n).
DIP_HD int pad_source(int i, int n, int pad, int mode) {
  int t = i - pad;
  if (t >= 0 && t < n) return t;
  if (mode == kPadZeros) return -1;
  return t < 0 ? -t : 2 * (n - 1) - t;
}

// The padded positions whose value is read from source index s: the inverse of
// pad_source, used to fold the pad's gradients back (gather, no atomics).
// Writes up to 3 positions into out and returns how many.
DIP_HD int pad_preimage(int s, int n, int pad, int mode, int* out) {
  int k = 0;
  out[k++] = s + pad;
  if (mode == kPadReflect) {
    if (s >= 1 && s <= pad) out[k++] = pad - s;                          // left/top band
    if (s <= n - 2 && s >= n - 1 - pad) out[k++] = 2 * (n - 1) - s + pad;  // right/bottom band
  }
  return k;
}

// Chan et al.'s merge of two partial (count, mean, M2) triples into the first.
template <typename acc_t>
DIP_HD void welford_merge(acc_t& count, acc_t& mean, acc_t& m2, acc_t count_b, acc_t mean_b, acc_t m2_b) {
  if (count_b == acc_t(0)) return;
  const acc_t total = count + count_b;
  const acc_t delta = mean_b - mean;
  const acc_t frac_b = count_b / total;
  mean += delta * frac_b;
  m2 += m2_b + delta * delta * count * frac_b;
  count = total;
}

// Adds one value to a running (count, mean, M2) triple (Welford's update).
template <typename acc_t>
DIP_HD void welford_add(acc_t& count, acc_t& mean, acc_t& m2, acc_t x) {
  count += acc_t(1);
  const acc_t delta = x - mean;
  mean += delta / count;
  m2 += delta * (x - mean);
}

// y = act((x - mean) * scale + beta), with scale = gamma * invstd folded once
// per channel. Centring first matters in float: folding the mean into a shift
// (x * scale + shift) cancels two large terms when |mean| >> std.
template <typename acc_t>
DIP_HD acc_t bn_act_value(acc_t x, acc_t mean, acc_t scale, acc_t beta, acc_t slope) {
  return leaky_relu<acc_t>((x - mean) * scale + beta, slope);
}

// The per-element part of the backward: dz = g * act'(z) with z the BatchNorm output.
template <typename acc_t>
DIP_HD acc_t bn_act_dz(acc_t g, acc_t x, acc_t mean, acc_t scale, acc_t beta, acc_t slope) {
  return leaky_relu_grad<acc_t>(g, (x - mean) * scale + beta, slope);
}

// dx = gamma * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)), written as
// dx = k * (dz - c1 - xhat * c2) with per-channel constants.
template <typename acc_t>
DIP_HD acc_t bn_dx(acc_t dz, acc_t xhat, acc_t k, acc_t mean_dz, acc_t mean_dz_xhat) {
  return k * (dz - mean_dz - xhat * mean_dz_xhat);
}

// The factor that makes the batch variance of `count` values unbiased
// (count / (count - 1)); 1 when count is 1, where no unbiased estimate exists.
inline double bn_running_unbias(int64_t count) { return count > 1 ? double(count) / double(count - 1) : 1.0; }

// nn.BatchNorm2d's training-mode update of the running statistics for one
// channel, from the batch mean and 1/std the forward computed: the batch
// variance is recovered as 1/invstd^2 - eps and made unbiased (count/(count-1)).
// In double, as PyTorch's own kernels compute the variance.
template <typename run_t, typename acc_t>
DIP_HD void bn_running_update(run_t& running_mean, run_t& running_var, acc_t mean, acc_t invstd, double momentum,
                              double eps, double unbias) {
  const double is = static_cast<double>(invstd);
  const double var = (1.0 / (is * is) - eps) * unbias;
  running_mean = static_cast<run_t>((1.0 - momentum) * static_cast<double>(running_mean) + momentum * static_cast<double>(mean));
  running_var = static_cast<run_t>((1.0 - momentum) * static_cast<double>(running_var) + momentum * var);
}

}  // namespace dip_fast
