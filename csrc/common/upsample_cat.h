// Math shared by the CPU and CUDA kernels of upsample_cat: the x2 upsampling
// taps (nearest, or bilinear with align_corners=False, as nn.Upsample does
// for the paper's network) and their transpose for the backward gather. The
// CUDA kernels' per-thread code is in upsample_cat_grid.h.
#pragma once

#include "macros.h"

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
    l1 = acc_t(q % 4) * acc_t(0.25);  // exact; a division would be a subroutine call on the GPU
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

// The shapes of one call with G groups: skip (N, G * Cs, H, W), deep
// (N, G * Cd, H/2, W/2), out / grad_out (N, G * (Cs + Cd), H, W), where group
// g's out channels are its Cs skip channels then its Cd upsampled ones (the
// packed layout of G networks side by side). Cs and Cd count one group's channels.
//
// NCHW folds the groups into the batch: (N, G * C, H, W) is (N * G, C, H, W)
// in memory, so an NCHW shape holds N * G images and G = 1, and the NCHW
// kernels never see a group. Only channels_last keeps G > 1: a pixel then
// holds all G groups' channels.
struct UpsampleCatShape {
  int N, G, Cs, Cd, H, W, mode;
  bool channels_last;  // the working layout of every tensor of the call
};

}  // namespace dip_fast
