// Autograd kernels of the ops the fast network calls at every layer:
// bn_act_forward (30 calls per step of the paper's network) and upsample_cat
// (5 calls), registered for the Autograd dispatch key as torchvision does
// for its ops.
//
// Why C++ rather than torch.library.register_autograd from Python: the
// Python formula costs about 40 us more per call (forward and backward
// together; measured against ATen's own BatchNorm on a small input), ~1.4 ms
// of every training step on the CPU, and on a GPU the step is short enough
// for that to matter more. The ops called once per step (Lanczos,
// LeakyReLU) keep their Python formulas (dip_fast/ops/*.py). Fake kernels
// stay in Python for all ops.
//
// Each Function calls the op below autograd for the forward and the op's own
// compiled backward op for the backward; nothing here computes.
#include <torch/autograd.h>
#include <torch/library.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <tuple>

namespace dip_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

using BnActForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, double, double, int64_t,
                                                                    int64_t);
using BnActBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&, double,
                                                                     int64_t, int64_t);
using UpsampleCat = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t);
using UpsampleCatBackward = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, int64_t);

// Saved for backward: x (the convolution's output), weight, bias and the
// batch statistics (see csrc/ops.cpp for why x rather than the output).
class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, double eps, double slope, int64_t pad, int64_t pad_mode) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<BnActForward>("dip_fast::bn_act_forward");
    auto [y, mean, invstd] = op.call(x, weight, bias, eps, slope, pad, pad_mode);
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["pad_mode"] = pad_mode;
    ctx->mark_non_differentiable({mean, invstd});
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<BnActBackward>("dip_fast::bn_act_backward");
    const auto saved = ctx->get_saved_variables();
    auto [dx, dw, db] = op.call(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                ctx->saved_data["slope"].toDouble(), ctx->saved_data["pad"].toInt(),
                                ctx->saved_data["pad_mode"].toInt());
    return {dx, dw, db, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_act_forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps,
                                                                       double slope, int64_t pad, int64_t pad_mode) {
  auto out = BnActFunction::apply(x, weight, bias, eps, slope, pad, pad_mode);
  return {out[0], out[1], out[2]};
}

// upsample_cat is linear: nothing is saved but the skip's channel count.
class UpsampleCatFunction : public torch::autograd::Function<UpsampleCatFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& skip, const at::Tensor& deep, int64_t mode) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<UpsampleCat>("dip_fast::upsample_cat");
    ctx->saved_data["skip_channels"] = skip.size(1);
    ctx->saved_data["mode"] = mode;
    return op.call(skip, deep, mode);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // Through the dispatcher with autograd on: under create_graph the backward op records its own node.
    static const auto op = op_handle<UpsampleCatBackward>("dip_fast::upsample_cat_backward");
    auto [grad_skip, grad_deep] =
        op.call(grads[0], ctx->saved_data["skip_channels"].toInt(), ctx->saved_data["mode"].toInt());
    return {grad_skip, grad_deep, at::Tensor()};
  }
};

// The backward is the forward's transpose, so its own derivative is the forward op (double backward).
class UpsampleCatBackwardFunction : public torch::autograd::Function<UpsampleCatBackwardFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out, int64_t skip_channels, int64_t mode) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<UpsampleCatBackward>("dip_fast::upsample_cat_backward");
    ctx->saved_data["mode"] = mode;
    auto [grad_skip, grad_deep] = op.call(grad_out, skip_channels, mode);
    return {grad_skip, grad_deep};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<UpsampleCat>("dip_fast::upsample_cat");
    return {op.call(grads[0], grads[1], ctx->saved_data["mode"].toInt()), at::Tensor(), at::Tensor()};
  }
};

at::Tensor upsample_cat_autograd(const at::Tensor& skip, const at::Tensor& deep, int64_t mode) {
  return UpsampleCatFunction::apply(skip, deep, mode);
}

std::tuple<at::Tensor, at::Tensor> upsample_cat_backward_autograd(const at::Tensor& grad_out, int64_t skip_channels,
                                                                  int64_t mode) {
  auto out = UpsampleCatBackwardFunction::apply(grad_out, skip_channels, mode);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, Autograd, m) {
  m.impl("bn_act_forward", &bn_act_forward_autograd);
  m.impl("upsample_cat", &upsample_cat_autograd);
  m.impl("upsample_cat_backward", &upsample_cat_backward_autograd);
}

}  // namespace dip_fast
