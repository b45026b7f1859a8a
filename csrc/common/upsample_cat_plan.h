// The launch plan of upsample_cat's CUDA kernels (host code only), shared by
// csrc/cuda/upsample_cat.cu and its CPU emulation, so the emulation replays
// exactly the grids the GPU runs: a pure function of the shapes, the dtype's
// size and the pointers' alignment.
#pragma once

#include "tiling.h"
#include "upsample_cat_checks.h"
#include "upsample_cat_grid.h"
#include "vector_dispatch.h"

namespace dip_fast {

struct UpsampleCatPlan {
  int V;                 // elements per vector access, every kernel of the pass
  UpsampleCatDims dims;
  Tiling main;           // forward: over out; backward: over grad_deep
  Tiling skip;           // backward only: over grad_skip
};

inline UpsampleCatDims upsample_cat_dims(const UpsampleCatShape& s) {
  UpsampleCatDims d{s.N, s.G, s.Cs, s.Cd, s.H, s.W, s.mode, {}, {}, {}};
  d.by_group_C = FastDivmod(divisor_or_one(s.Cs + s.Cd));
  d.by_Cs = FastDivmod(divisor_or_one(s.Cs));
  d.by_Cd = FastDivmod(divisor_or_one(s.Cd));
  return d;
}

// Vectors stay inside a plane (NCHW: H x W and H/2 x W/2 both divisible by V)
// or inside one group's channels of one tensor (channels_last: V divides the
// per-group Cs and Cd, so no vector straddles a skip / deep or group boundary).
inline void upsample_cat_runs(const UpsampleCatShape& s, long long* runs) {
  if (s.channels_last) {
    runs[0] = s.Cs;
    runs[1] = s.Cd;
  } else {
    runs[0] = static_cast<long long>(s.H) * s.W;
    runs[1] = static_cast<long long>(s.H / 2) * (s.W / 2);
  }
}

inline UpsampleCatPlan upsample_cat_forward_plan(const UpsampleCatForwardCall& call) {
  const UpsampleCatShape& s = call.shape;
  UpsampleCatPlan p{};
  long long runs[2];
  upsample_cat_runs(s, runs);
  p.V = vector_width_for(static_cast<int>(call.out.element_size()), {&call.skip, &call.deep, &call.out},
                         {runs[0], runs[1]});
  p.dims = upsample_cat_dims(s);
  p.main = make_tiling(s.N, s.G * (s.Cs + s.Cd), s.H, s.W, s.channels_last, p.V);
  check_tiling_grid(p.main, "upsample_cat");
  return p;
}

inline UpsampleCatPlan upsample_cat_backward_plan(const UpsampleCatBackwardCall& call) {
  const UpsampleCatShape& s = call.shape;
  UpsampleCatPlan p{};
  long long runs[2];
  upsample_cat_runs(s, runs);
  p.V = vector_width_for(static_cast<int>(call.grad.element_size()), {&call.grad, &call.grad_skip, &call.grad_deep},
                         {runs[0], runs[1]});
  p.dims = upsample_cat_dims(s);
  p.main = make_tiling(s.N, s.G * s.Cd, s.H / 2, s.W / 2, s.channels_last, p.V);
  p.skip = make_tiling(s.N, s.G * s.Cs, s.H, s.W, s.channels_last, p.V);
  check_tiling_grid(p.main, "upsample_cat");
  check_tiling_grid(p.skip, "upsample_cat");
  return p;
}

}  // namespace dip_fast
