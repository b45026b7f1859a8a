// CPU emulation of the CUDA launch grids of bn_act (tests only).
//
// Replays, block by block and phase by phase, the plan that csrc/cuda/bn_act.cu
// launches (csrc/common/bn_act_plan.h), calling the same per-thread functions
// (csrc/common/bn_act_grid.h) with the same shared-memory trees and the same
// finalize order, so its results are what the GPU computes, up to the
// hardware's own rounding (none: the CUDA build contracts no multiply-adds).
// Within a phase, threads run in reverse order: a thread that read another
// thread's shared slot of the same phase (a missing barrier) would then see a
// stale value and fail the comparison against PyTorch.
//
// Besides the op's outputs, each entry point returns a trace (int64):
//   [V, parts, reduce blocks, apply blocks, fewest writes, most writes]
// where the writes are counted per output element of the apply kernel, so a
// test can check that every element is written exactly once, and which vector
// width (1 = the scalar path) ran. The running-statistics update returns
//   [blocks, fewest updates, most updates]
// per channel, for its grid-stride launch (csrc/common/grid_stride.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/bn_act_checks.h"
#include "../common/bn_act_grid.h"
#include "../common/bn_act_plan.h"
#include "../common/grid_stride.h"
#include "../common/vector_dispatch.h"

// TEST ONLY. The schemas of the emulation ops live here, beside their only
// kernels, not in csrc/ops/bn_act.cpp: they are no part of the op family's
// interface (private names, `_` prefix and `_emulated` suffix), and a build
// without this file (DIP_FAST_TEST_OPS=0) has none of them.
TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("_bn_act_emulated(Tensor x, Tensor weight, Tensor bias, float eps, float slope, int pad, int pad_mode)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_bn_act_backward_emulated(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
        " Tensor invstd, float slope, int pad, int pad_mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_bn_act_running_stats_update_emulated(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean,"
        " Tensor invstd, float momentum, float eps, int count) -> Tensor");
}

namespace dip_fast {
namespace {

// Shared memory of one emulated block.
template <typename acc_t>
struct BlockShared {
  std::vector<acc_t> a, b, c;
  explicit BlockShared(size_t n) : a(n), b(n), c(n) {}
};

at::Tensor make_trace(const BnActPassPlan& p, const std::vector<int>& counts) {
  const auto mm = std::minmax_element(counts.begin(), counts.end());
  const long long lo = counts.empty() ? 0 : *mm.first, hi = counts.empty() ? 0 : *mm.second;
  const long long reduce_blocks = static_cast<long long>(p.reduce_grid_x) * p.reduce_grid_y;
  const long long apply_blocks = static_cast<long long>(p.apply_grid_x) * p.apply_grid_y;
  return at::tensor(std::vector<int64_t>{p.V, p.parts, reduce_blocks, apply_blocks, lo, hi}, at::kLong);
}

// The reduce kernel of the forward (bn_stats_*_kernel), all blocks.
template <typename scalar_t, typename acc_t, int V>
void emulate_stats(const scalar_t* x, const BnActPassPlan& p, std::vector<acc_t>& ws) {
  const Tiling& g = p.reduce;
  const int C = g.C, T = p.reduce_threads;
  for (int by = 0; by < p.reduce_grid_y; ++by) {
    for (int part = 0; part < p.reduce_grid_x; ++part) {
      BlockShared<acc_t> s(static_cast<size_t>(T) * V);
      if (!g.cl) {
        for (int t = T - 1; t >= 0; --t) {
          bn_stats_thread_nchw<scalar_t, acc_t, V>(x, g, p.parts, part, by, t, s.a[t], s.b[t], s.c[t]);
        }
        for (int stride = T / 2; stride > 0; stride /= 2) {
          for (int t = T - 1; t >= 0; --t) tree_level_welford<acc_t>(s.a.data(), s.b.data(), s.c.data(), t, stride, T, 1, 0);
        }
        ws[part * C + by] = s.a[0];
        ws[(p.parts + part) * C + by] = s.b[0];
        ws[(2 * p.parts + part) * C + by] = s.c[0];
        continue;
      }
      const int width = g.Cb * V;
      for (int t = T - 1; t >= 0; --t) {
        uint32_t r, cvl;
        g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
        const int cv = by * g.Cb + static_cast<int>(cvl);
        acc_t cnt, mean[V], m2[V];
        bn_stats_thread_cl<scalar_t, acc_t, V>(x, g, p.parts, part, cv, static_cast<int>(r), cnt, mean, m2);
        const int slot = static_cast<int>(r) * width + static_cast<int>(cvl) * V;
        for (int l = 0; l < V; ++l) {
          s.a[slot + l] = cnt;
          s.b[slot + l] = mean[l];
          s.c[slot + l] = m2[l];
        }
      }
      for (int stride = bn_pow2_ceil(g.R) / 2; stride > 0; stride /= 2) {
        for (int t = T - 1; t >= 0; --t) {
          uint32_t r, cvl;
          g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
          for (int l = 0; l < V; ++l) {
            tree_level_welford<acc_t>(s.a.data(), s.b.data(), s.c.data(), static_cast<int>(r), stride, g.R, width,
                                      static_cast<int>(cvl) * V + l);
          }
        }
      }
      for (int cvl = 0; cvl < g.Cb; ++cvl) {
        const int cv = by * g.Cb + cvl;
        if (cv >= g.Cv) continue;
        for (int l = 0; l < V; ++l) {
          const int c = cv * V + l;
          ws[part * C + c] = s.a[cvl * V + l];
          ws[(p.parts + part) * C + c] = s.b[cvl * V + l];
          ws[(2 * p.parts + part) * C + c] = s.c[cvl * V + l];
        }
      }
    }
  }
}

// The reduce kernel of the backward (bn_backward_*_kernel), all blocks.
template <typename scalar_t, typename acc_t, int V>
void emulate_backward_sums(const scalar_t* dy, const scalar_t* x, const BnActPassPlan& p, int pad, int mode,
                           const BnBackwardConsts<acc_t>& k, std::vector<acc_t>& ws) {
  const Tiling& g = p.reduce;
  const int C = g.C, T = p.reduce_threads;
  for (int by = 0; by < p.reduce_grid_y; ++by) {
    for (int part = 0; part < p.reduce_grid_x; ++part) {
      BlockShared<acc_t> s(static_cast<size_t>(T) * V);
      if (!g.cl) {
        for (int t = T - 1; t >= 0; --t) {
          bn_backward_thread_nchw<scalar_t, acc_t, V>(dy, x, g, pad, mode, p.parts, part, by, t, k, s.a[t], s.b[t]);
        }
        for (int stride = T / 2; stride > 0; stride /= 2) {
          for (int t = T - 1; t >= 0; --t) tree_level_sum<acc_t>(s.a.data(), s.b.data(), t, stride, T, 1, 0);
        }
        ws[part * C + by] = s.a[0];
        ws[(p.parts + part) * C + by] = s.b[0];
        continue;
      }
      const int width = g.Cb * V;
      for (int t = T - 1; t >= 0; --t) {
        uint32_t r, cvl;
        g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
        const int cv = by * g.Cb + static_cast<int>(cvl);
        acc_t a[V], b[V];
        bn_backward_thread_cl<scalar_t, acc_t, V>(dy, x, g, pad, mode, p.parts, part, cv, static_cast<int>(r), k, a, b);
        const int slot = static_cast<int>(r) * width + static_cast<int>(cvl) * V;
        for (int l = 0; l < V; ++l) {
          s.a[slot + l] = a[l];
          s.b[slot + l] = b[l];
        }
      }
      for (int stride = bn_pow2_ceil(g.R) / 2; stride > 0; stride /= 2) {
        for (int t = T - 1; t >= 0; --t) {
          uint32_t r, cvl;
          g.by_Cb.divmod(static_cast<uint32_t>(t), r, cvl);
          for (int l = 0; l < V; ++l) {
            tree_level_sum<acc_t>(s.a.data(), s.b.data(), static_cast<int>(r), stride, g.R, width,
                                  static_cast<int>(cvl) * V + l);
          }
        }
      }
      for (int cvl = 0; cvl < g.Cb; ++cvl) {
        const int cv = by * g.Cb + cvl;
        if (cv >= g.Cv) continue;
        for (int l = 0; l < V; ++l) {
          ws[part * C + cv * V + l] = s.a[cvl * V + l];
          ws[(p.parts + part) * C + cv * V + l] = s.b[cvl * V + l];
        }
      }
    }
  }
}

// The finalize kernels: lane partials, then the tree over 32 lanes, per block.
template <typename acc_t>
void emulate_finalize_stats(const std::vector<acc_t>& ws, const BnActPassPlan& p, int C, double eps, acc_t* mean,
                            acc_t* invstd) {
  const int T = p.finalize_threads;
  const acc_t *w0 = ws.data(), *w1 = w0 + p.parts * C, *w2 = w1 + p.parts * C;
  for (int blk = 0; blk < p.finalize_grid; ++blk) {
    BlockShared<acc_t> s(T);
    for (int t = T - 1; t >= 0; --t) {
      const int ch = t / kBnFinalizeLanes, lane = t % kBnFinalizeLanes;
      bn_finalize_lane_welford<acc_t>(w0, w1, w2, p.parts, C, blk * kBnFinalizeChannels + ch, lane, s.a[t], s.b[t],
                                      s.c[t]);
    }
    for (int stride = kBnFinalizeLanes / 2; stride > 0; stride /= 2) {
      for (int t = T - 1; t >= 0; --t) {
        const int ch = t / kBnFinalizeLanes, lane = t % kBnFinalizeLanes;
        tree_level_welford<acc_t>(s.a.data(), s.b.data(), s.c.data(), lane, stride, kBnFinalizeLanes, 1,
                                  ch * kBnFinalizeLanes);
      }
    }
    for (int ch = 0; ch < kBnFinalizeChannels; ++ch) {
      const int c = blk * kBnFinalizeChannels + ch, t = ch * kBnFinalizeLanes;
      if (c >= C) continue;
      mean[c] = s.b[t];
      invstd[c] = invstd_from<acc_t>(s.a[t], s.c[t], eps);
    }
  }
}

template <typename acc_t>
void emulate_finalize_sums(const std::vector<acc_t>& ws, const BnActPassPlan& p, int C, const acc_t* invstd,
                           acc_t* sum_dz, acc_t* sum_dz_xhat) {
  const int T = p.finalize_threads;
  const acc_t *w0 = ws.data(), *w1 = w0 + p.parts * C;
  for (int blk = 0; blk < p.finalize_grid; ++blk) {
    BlockShared<acc_t> s(T);
    for (int t = T - 1; t >= 0; --t) {
      const int ch = t / kBnFinalizeLanes, lane = t % kBnFinalizeLanes;
      bn_finalize_lane_sum<acc_t>(w0, w1, p.parts, C, blk * kBnFinalizeChannels + ch, lane, s.a[t], s.b[t]);
    }
    for (int stride = kBnFinalizeLanes / 2; stride > 0; stride /= 2) {
      for (int t = T - 1; t >= 0; --t) {
        const int ch = t / kBnFinalizeLanes, lane = t % kBnFinalizeLanes;
        tree_level_sum<acc_t>(s.a.data(), s.b.data(), lane, stride, kBnFinalizeLanes, 1, ch * kBnFinalizeLanes);
      }
    }
    for (int ch = 0; ch < kBnFinalizeChannels; ++ch) {
      const int c = blk * kBnFinalizeChannels + ch, t = ch * kBnFinalizeLanes;
      if (c >= C) continue;
      sum_dz[c] = s.a[t];
      sum_dz_xhat[c] = s.b[t] * invstd[c];
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_emulated(const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& bias, double eps,
                                                                            double slope, int64_t pad,
                                                                            int64_t pad_mode) {
  for (const auto* t : {&x, &weight, &bias}) DIP_CHECK_DEVICE(*t, at::kCPU, "every argument");
  const auto call = bn_act_forward_call(x, weight, bias, eps, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const bool cl = call.fmt == at::MemoryFormat::ChannelsLast;
  const auto &xc = call.x, &w = call.weight, &b = call.bias;
  auto y = call.y, mean = call.mean, invstd = call.invstd;
  const BnActPassPlan p = bn_act_plan(g, cl, static_cast<int>(x.element_size()), {&xc, &y}, /*forward=*/true);
  std::vector<int> counts(static_cast<size_t>(y.numel()), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_forward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const scalar_t* xp = xc.const_data_ptr<scalar_t>();
      std::vector<acc_t> ws(static_cast<size_t>(3) * p.parts * g.C);
      emulate_stats<scalar_t, acc_t, V>(xp, p, ws);
      emulate_finalize_stats<acc_t>(ws, p, static_cast<int>(g.C), eps, mean.data_ptr<acc_t>(),
                                    invstd.data_ptr<acc_t>());
      const BnForwardConsts<acc_t> k{mean.const_data_ptr<acc_t>(), invstd.const_data_ptr<acc_t>(),
                                     w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope)};
      scalar_t* yp = y.data_ptr<scalar_t>();
      for (int by = 0; by < p.apply_grid_y; ++by) {
        for (int bx = 0; bx < p.apply_grid_x; ++bx) {
          for (int t = p.apply_threads - 1; t >= 0; --t) {
            if (cl) {
              bn_normalize_thread_cl<scalar_t, acc_t, V, true>(xp, yp, p.apply, static_cast<int>(g.H),
                                                                static_cast<int>(g.W), g.pad, g.mode, k, bx, by, t,
                                                                counts.data());
            } else {
              bn_normalize_thread_nchw<scalar_t, acc_t, V, true>(xp, yp, p.apply, static_cast<int>(g.H),
                                                                  static_cast<int>(g.W), g.pad, g.mode, k, bx, t,
                                                                  counts.data());
            }
          }
        }
      }
    });
  });
  return {y, mean, invstd, make_trace(p, counts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_emulated(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
    const at::Tensor& mean, const at::Tensor& invstd, double slope, int64_t pad, int64_t pad_mode) {
  for (const auto* t : {&grad_y, &x, &weight, &bias, &mean, &invstd}) DIP_CHECK_DEVICE(*t, at::kCPU, "every argument");
  const auto call = bn_act_backward_call(grad_y, x, weight, bias, mean, invstd, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const bool cl = call.fmt == at::MemoryFormat::ChannelsLast;
  const auto &gy = call.grad_y, &xc = call.x, &w = call.weight, &b = call.bias, &m = call.mean, &is = call.invstd;
  auto dx = call.grad_x, dw = call.grad_weight, db = call.grad_bias;
  const BnActPassPlan p = bn_act_plan(g, cl, static_cast<int>(x.element_size()), {&gy, &xc, &dx}, /*forward=*/false);
  std::vector<int> counts(static_cast<size_t>(dx.numel()), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_vector_width<scalar_t>(p.V, [&](auto vw) {
      constexpr int V = decltype(vw)::value;
      const scalar_t *dyp = gy.const_data_ptr<scalar_t>(), *xp = xc.const_data_ptr<scalar_t>();
      const BnBackwardConsts<acc_t> k{m.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
                                      b.const_data_ptr<acc_t>(), static_cast<acc_t>(slope)};
      std::vector<acc_t> ws(static_cast<size_t>(2) * p.parts * g.C);
      emulate_backward_sums<scalar_t, acc_t, V>(dyp, xp, p, g.pad, g.mode, k, ws);
      emulate_finalize_sums<acc_t>(ws, p, static_cast<int>(g.C), is.const_data_ptr<acc_t>(), db.data_ptr<acc_t>(),
                                   dw.data_ptr<acc_t>());
      const BnDxConsts<acc_t> kd{k, db.const_data_ptr<acc_t>(), dw.const_data_ptr<acc_t>(),
                                 static_cast<acc_t>(g.N * g.H * g.W)};
      scalar_t* dxp = dx.data_ptr<scalar_t>();
      for (int by = 0; by < p.apply_grid_y; ++by) {
        for (int bx = 0; bx < p.apply_grid_x; ++bx) {
          for (int t = p.apply_threads - 1; t >= 0; --t) {
            if (cl) {
              bn_dx_thread_cl<scalar_t, acc_t, V, true>(dyp, xp, dxp, p.apply, g.pad, g.mode, kd, bx, by, t,
                                                        counts.data());
            } else {
              bn_dx_thread_nchw<scalar_t, acc_t, V, true>(dyp, xp, dxp, p.apply, g.pad, g.mode, kd, bx, t,
                                                          counts.data());
            }
          }
        }
      }
    });
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type()), make_trace(p, counts)};
}

at::Tensor running_stats_update_emulated(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                                         const at::Tensor& invstd, double momentum, double eps, int64_t count) {
  const at::Tensor* stats[] = {&running_mean, &running_var, &mean, &invstd};
  for (const at::Tensor* t : stats) DIP_CHECK_DEVICE(*t, at::kCPU, "every statistic");
  bn_running_stats_check(running_mean, running_var, mean, invstd, momentum, count);
  const int64_t C = mean.numel();
  std::vector<int> counts(static_cast<size_t>(C), 0);
  if (C == 0) return at::tensor(std::vector<int64_t>{0, 0, 0}, at::kLong);  // the CUDA entry point launches nothing
  const double unbias = bn_running_unbias(count);
  const int64_t blocks = blocks_for(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "bn_running_stats_emulated", [&] {
    using run_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "bn_running_stats_emulated_acc", [&] {
      run_t *rm = running_mean.data_ptr<run_t>(), *rv = running_var.data_ptr<run_t>();
      const scalar_t *m = mean.const_data_ptr<scalar_t>(), *is = invstd.const_data_ptr<scalar_t>();
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t t = kThreads - 1; t >= 0; --t) {
          bn_running_stats_thread<run_t, scalar_t, true>(rm, rv, m, is, C, momentum, eps, unbias, b, kThreads, blocks,
                                                         t, counts.data());
        }
      }
    });
  });
  const auto mm = std::minmax_element(counts.begin(), counts.end());
  return at::tensor(std::vector<int64_t>{blocks, *mm.first, *mm.second}, at::kLong);
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("_bn_act_emulated", &forward_emulated);
  m.impl("_bn_act_backward_emulated", &backward_emulated);
  m.impl("_bn_act_running_stats_update_emulated", &running_stats_update_emulated);
}

}  // namespace dip_fast
