// The per-thread code of the LeakyReLU CUDA kernels, shared `__host__
// __device__` with their CPU emulation (csrc/cpu/leaky_relu_emulated.cpp), so
// the emulation runs what the GPU runs: thread `thread` of block `block`, in a
// grid-stride loop over the n elements of a dense tensor on a grid of
// `blocks` blocks of `threads` threads (csrc/common/grid_stride.h). With
// kCount the emulation counts every store (each element must be written once).
// The slope arrives in double and is rounded once, to the accumulation type,
// as in the CPU kernels (a float slope would round 0.2 in float64 too).
#pragma once

#include <ATen/OpMathType.h>

#include <cstdint>

#include "leaky_relu.h"
#include "macros.h"
#include "tiling.h"

namespace dip_fast {

template <typename scalar_t, bool kCount>
DIP_HD void leaky_relu_forward_thread(const scalar_t* in, scalar_t* out, int64_t n, double slope, int64_t block,
                                      int64_t threads, int64_t blocks, int64_t thread, int* counts) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = block * threads + thread; i < n; i += threads * blocks) {
    out[i] = static_cast<scalar_t>(leaky_relu<acc_t>(static_cast<acc_t>(in[i]), static_cast<acc_t>(slope)));
    count_stores<kCount>(counts, i, 1);
  }
}

template <typename scalar_t, bool kCount>
DIP_HD void leaky_relu_backward_thread(const scalar_t* g, const scalar_t* in, scalar_t* out, int64_t n, double slope,
                                       int64_t block, int64_t threads, int64_t blocks, int64_t thread, int* counts) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = block * threads + thread; i < n; i += threads * blocks) {
    out[i] = static_cast<scalar_t>(leaky_relu_grad<acc_t>(static_cast<acc_t>(g[i]), static_cast<acc_t>(in[i]),
                                                          static_cast<acc_t>(slope)));
    count_stores<kCount>(counts, i, 1);
  }
}

}  // namespace dip_fast
