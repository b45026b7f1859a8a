// The upsample_cat op family: schemas and autograd.
//
// upsample_cat(skip, deep, mode, groups=1) -> out
// _upsample_cat_backward(grad_out, skip_channels, mode, groups=1) -> (grad_skip, grad_deep)
//   The join of the hourglass's two branches at each scale:
//   out = cat([skip, upsample2x(deep)], dim=1), mode 0 nearest or 1
//   bilinear (align_corners=False). With groups = G > 1 (G networks packed
//   group-major into one module, as grouped convolutions lay them out) the
//   concatenation is per group: skip (N, G*Cs, H, W) and deep
//   (N, G*Cd, H/2, W/2) give out (N, G*(Cs+Cd), H, W) =
//   cat([skip.view(N, G, Cs, H, W), up(deep).view(N, G, Cd, H, W)], dim=2)
//   .view(N, G*(Cs+Cd), H, W), and skip_channels is G*Cs. Written in one
//   pass straight into the concatenation buffer, which the fused BatchNorm
//   after it reads. PyTorch writes the upsampled tensor, then reads it (and
//   the skip) again to copy both into the torch.cat buffer: 2 reads + 2
//   writes of the deep channels at full size, against our 1 read of the
//   quarter-size input and 1 write, whatever the groups. The skip branch is
//   the one that "writes into a channel slice of the concat buffer"; doing
//   it in the consumer (this op reads both branches) instead of in the
//   producers keeps every op functional (no aliasing outputs, so autograd,
//   torch.compile and CUDA graphs need nothing special). Linear, so nothing is saved for
//   backward beyond the skip's channel count and the int arguments.
//   Backward: grad_skip is a copy of grad_out's skip channels (each group's
//   first Cs), and grad_deep gathers the <= 4 x 4 output gradients that read
//   each source pixel (separable on the CPU: along H into a row buffer,
//   then along W), 1 read of grad_out and 1 write; PyTorch's upsample
//   backward zero-fills grad_deep and scatters into it after cat's
//   backward has sliced grad_out.
//
// Autograd (below, Autograd dispatch key): C++, like bn_act's and for the
// same reason (csrc/ops/bn_act.cpp): the op runs at every level of the network
// (5 calls per step), where a Python formula's per-call cost shows. The fake
// kernels are in Python (dip_fast/ops/upsample_cat.py).
//
// Kernels: csrc/cpu/upsample_cat.cpp, csrc/cuda/upsample_cat.cu (math and
// checks in csrc/common/upsample_cat*.h).
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_handle.h"

TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("upsample_cat(Tensor skip, Tensor deep, int mode, int groups=1) -> Tensor");
  m.def("_upsample_cat_backward(Tensor grad_out, int skip_channels, int mode, int groups=1) -> (Tensor, Tensor)");
}

namespace dip_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using UpsampleCat = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t);
using UpsampleCatBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t, int64_t);

// upsample_cat is linear: nothing is saved but the skip's channel count (and the int arguments).
class UpsampleCatFunction : public torch::autograd::Function<UpsampleCatFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& skip, const at::Tensor& deep, int64_t mode,
                            int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<UpsampleCat>("dip_fast::upsample_cat");
    ctx->saved_data["skip_channels"] = skip.size(1);
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["groups"] = groups;
    return op.call(skip, deep, mode, groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Through the dispatcher with autograd on: under create_graph the backward op records its own node.
    static const auto op = op_handle<UpsampleCatBackward>("dip_fast::_upsample_cat_backward");
    auto [grad_skip, grad_deep] = op.call(grads[0], ctx->saved_data["skip_channels"].toInt(),
                                          ctx->saved_data["mode"].toInt(), ctx->saved_data["groups"].toInt());
    return {grad_skip, grad_deep, at::Tensor(), at::Tensor()};
  }
};

// The backward is the forward's transpose, so its own derivative is the forward op (double backward).
class UpsampleCatBackwardFunction : public torch::autograd::Function<UpsampleCatBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, int64_t skip_channels, int64_t mode,
                               int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<UpsampleCatBackward>("dip_fast::_upsample_cat_backward");
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["groups"] = groups;
    auto [grad_skip, grad_deep] = op.call(grad_out, skip_channels, mode, groups);
    return {grad_skip, grad_deep};
  }

  // Same groups: the transpose of the grouped gather is the grouped concatenation.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<UpsampleCat>("dip_fast::upsample_cat");
    return {op.call(grads[0], grads[1], ctx->saved_data["mode"].toInt(), ctx->saved_data["groups"].toInt()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor upsample_cat_autograd(const at::Tensor& skip, const at::Tensor& deep, int64_t mode, int64_t groups) {
  return UpsampleCatFunction::apply(skip, deep, mode, groups);
}

std::tuple<at::Tensor, at::Tensor> upsample_cat_backward_autograd(const at::Tensor& grad_out, int64_t skip_channels,
                                                                  int64_t mode, int64_t groups) {
  auto out = UpsampleCatBackwardFunction::apply(grad_out, skip_channels, mode, groups);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, Autograd, m) {
  m.impl("upsample_cat", &upsample_cat_autograd);
  m.impl("_upsample_cat_backward", &upsample_cat_backward_autograd);
}

}  // namespace dip_fast
