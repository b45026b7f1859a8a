// The launch plan of one pass of the bn_act CUDA kernels (host code only),
// shared by csrc/cuda/bn_act.cu and its CPU emulation, so the emulation
// replays exactly the grids the GPU runs. A pure function of the shape, the
// dtype's size and the pointers' alignment.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>

#include "bn_act_checks.h"
#include "bn_act_grid.h"
#include "vector_dispatch.h"

namespace dip_fast {

struct BnActPassPlan {
  int V;             // elements per vector access in every kernel of the pass
  Tiling reduce;   // over the input (H x W)
  Tiling apply;    // over the output (Ho x Wo) for normalize, the input for grad_x
  int parts;         // partials per channel
  // Grids (x, y) and block sizes.
  int reduce_grid_x, reduce_grid_y, reduce_threads;
  int finalize_grid, finalize_threads;
  int apply_grid_x, apply_grid_y, apply_threads;
};

// forward: the apply kernel writes the padded output; backward: grad_x.
inline BnActPassPlan bn_act_plan(const BnActGeometry& g, bool cl, int elem_size,
                                 std::initializer_list<const at::Tensor*> tensors, bool forward) {
  // Contiguous runs every vector must stay inside: NCHW planes (input and
  // padded output); channels_last pixels (C channels).
  BnActPassPlan p{};
  p.V = cl ? vector_width_for(elem_size, tensors, {g.C}) : vector_width_for(elem_size, tensors, {g.H * g.W, g.Ho * g.Wo});
  const int N = static_cast<int>(g.N), C = static_cast<int>(g.C);
  p.reduce = make_tiling(N, C, static_cast<int>(g.H), static_cast<int>(g.W), cl, p.V);
  p.apply = forward ? make_tiling(N, C, static_cast<int>(g.Ho), static_cast<int>(g.Wo), cl, p.V) : p.reduce;
  p.parts = bn_reduce_parts(p.reduce);
  p.reduce_grid_x = p.parts;
  p.reduce_grid_y = cl ? p.reduce.groups : C;
  p.reduce_threads = p.reduce.threads;
  p.finalize_grid = (C + kBnFinalizeChannels - 1) / kBnFinalizeChannels;
  p.finalize_threads = kBnFinalizeChannels * kBnFinalizeLanes;
  p.apply_grid_x = static_cast<int>(tiling_blocks_x(p.apply));
  p.apply_grid_y = tiling_blocks_y(p.apply);
  p.apply_threads = p.apply.threads;
  check_tiling_grid(p.apply, "bn_act");
  TORCH_CHECK(p.reduce_grid_y < 65536, "dip_fast: bn_act has too many channels for the CUDA grid");
  return p;
}

// Workspace of a reduction: `arrays` arrays of [parts][C] accumulators.
inline at::Tensor bn_act_workspace(const BnActPassPlan& p, int64_t C, int arrays, const at::TensorOptions& acc) {
  return at::empty({arrays, static_cast<int64_t>(p.parts), C}, acc);
}

}  // namespace dip_fast
