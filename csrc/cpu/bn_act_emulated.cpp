// CPU emulation of the CUDA launch grid of bn_act (tests only).
//
// Runs the per-thread functions of csrc/common/bn_act_grid.h for every block
// and thread index that csrc/cuda/bn_act.cu launches, sequentially, with the
// same shared-memory tree reductions. Comparing these ops against PyTorch
// tests the CUDA kernels' indexing on machines without a GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../common/alloc.h"
#include "../common/bn_act_checks.h"
#include "../common/bn_act_grid.h"

namespace dip_fast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_emulated(const at::Tensor& x, const at::Tensor& weight,
                                                                const at::Tensor& bias, double eps, double slope,
                                                                int64_t pad, int64_t pad_mode) {
  for (const auto* t : {&x, &weight, &bias}) DIP_CHECK_DEVICE(*t, at::kCPU, "every argument");
  const auto call = bn_act_forward_call(x, weight, bias, eps, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const auto fmt = call.fmt;
  const auto &xc = call.x, &w = call.weight, &b = call.bias;
  auto y = call.y, mean = call.mean, invstd = call.invstd;
  const BnActShape shape = bn_act_shape(g, fmt);
  constexpr int T = kBnReduceThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_forward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    acc_t* mp = mean.data_ptr<acc_t>();
    acc_t* ip = invstd.data_ptr<acc_t>();
    std::vector<acc_t> cnt(T), mu(T), m2(T);
    for (int c = 0; c < shape.C; ++c) {  // one block per channel
      for (int t = 0; t < T; ++t) bn_stats_partial<scalar_t, acc_t>(xp, strides4_of(xc), shape, c, t, T, cnt[t], mu[t], m2[t]);
      for (int stride = T / 2; stride > 0; stride /= 2) {
        for (int t = 0; t < stride; ++t) welford_merge<acc_t>(cnt[t], mu[t], m2[t], cnt[t + stride], mu[t + stride], m2[t + stride]);
      }
      mp[c] = mu[0];
      ip[c] = invstd_from<acc_t>(cnt[0], m2[0], eps);
    }
    const long long total = y.numel();
    for (long long e = 0; e < total; ++e) {
      bn_act_normalize_element<scalar_t, acc_t>(e, xp, strides4_of(xc), y.data_ptr<scalar_t>(), strides4_of(y), shape,
                                                mp, ip, w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
                                                static_cast<acc_t>(slope));
    }
  });
  return {y, mean, invstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_emulated(const at::Tensor& grad_y, const at::Tensor& x,
                                                                 const at::Tensor& weight, const at::Tensor& bias,
                                                                 const at::Tensor& mean, const at::Tensor& invstd,
                                                                 double slope, int64_t pad, int64_t pad_mode) {
  for (const auto* t : {&grad_y, &x, &weight, &bias, &mean, &invstd}) DIP_CHECK_DEVICE(*t, at::kCPU, "every argument");
  const auto call = bn_act_backward_call(grad_y, x, weight, bias, mean, invstd, pad, pad_mode);
  const BnActGeometry& g = call.g;
  const auto fmt = call.fmt;
  const auto &gy = call.grad_y, &xc = call.x, &w = call.weight, &b = call.bias, &m = call.mean, &is = call.invstd;
  auto dx = call.grad_x, dw = call.grad_weight, db = call.grad_bias;
  const BnActShape shape = bn_act_shape(g, fmt);
  constexpr int T = kBnReduceThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_act_backward_emulated", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    const acc_t *mp = m.const_data_ptr<acc_t>(), *ip = is.const_data_ptr<acc_t>();
    const acc_t *wp = w.const_data_ptr<acc_t>(), *bp = b.const_data_ptr<acc_t>();
    acc_t* sum_dz = db.data_ptr<acc_t>();
    acc_t* sum_dz_xhat = dw.data_ptr<acc_t>();
    const acc_t s = static_cast<acc_t>(slope);
    std::vector<acc_t> pa(T), pb(T);
    for (int c = 0; c < shape.C; ++c) {
      for (int t = 0; t < T; ++t) {
        bn_act_backward_partial<scalar_t, acc_t>(dyp, strides4_of(gy), xp, strides4_of(xc), shape, c, t, T, mp, ip, wp,
                                                 bp, s, pa[t], pb[t]);
      }
      for (int stride = T / 2; stride > 0; stride /= 2) {
        for (int t = 0; t < stride; ++t) {
          pa[t] += pa[t + stride];
          pb[t] += pb[t + stride];
        }
      }
      sum_dz[c] = pa[0];
      sum_dz_xhat[c] = pb[0] * ip[c];
    }
    const long long total = dx.numel();
    for (long long e = 0; e < total; ++e) {
      bn_act_dx_element<scalar_t, acc_t>(e, dyp, strides4_of(gy), xp, strides4_of(xc), dx.data_ptr<scalar_t>(), shape,
                                         mp, ip, wp, bp, s, sum_dz, sum_dz_xhat);
    }
  });
  return {dx, dw.to(weight.scalar_type()), db.to(bias.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, CPU, m) {
  m.impl("_bn_act_forward_emulated", &forward_emulated);
  m.impl("_bn_act_backward_emulated", &backward_emulated);
}

}  // namespace dip_fast
