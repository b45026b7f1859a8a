// The bn_act op family: schemas and autograd.
//
// bn_act(x, weight, bias, eps, slope, pad, pad_mode) -> (y, mean, invstd)
// _bn_act_backward(grad_y, x, weight, bias, mean, invstd, slope, pad, pad_mode)
//     -> (grad_x, grad_weight, grad_bias)
//   Everything between two convolutions of the hourglass, in training mode:
//   y = pad(leaky_relu(batch_norm(x)), pad, reflect|zeros). x is the
//   convolution's output (NCHW or channels_last); y is already padded for
//   the next convolution, so no separate pad copy exists. slope = 1 is plain
//   BatchNorm (the one after each concatenation).
//   Forward: one statistics pass (chunked Welford: a chunk's mean and M2 in
//   L1, merged with Chan's formula) and one normalise+activate+pad pass
//   that writes every element of y, pad band included. PyTorch's sequence
//   reads x twice for BatchNorm, then makes a LeakyReLU pass and a pad pass:
//   4 reads + 3 writes of an activation-sized tensor against our 2 reads
//   (the second mostly from cache per channel) + 1 write.
//   Backward: pass 1 reduces sum(dz) and sum(dz * xhat), where dz is grad_y
//   with the pad's border gradients folded back (a gather over the 1 to 9
//   padded positions that copied each pixel) and the LeakyReLU mask
//   applied; pass 2 writes grad_x. 2 reads of grad_y and x + 1 write,
//   against PyTorch's pad backward (zero fill + scatter), LeakyReLU
//   backward and BatchNorm backward: 6 reads + 3 writes.
//   Saved for backward: x (the convolution's output), mean and invstd.
//   Recomputing x from y by inverting LeakyReLU and the affine map would
//   save one activation per block but divides by gamma, which loses
//   precision as gamma shrinks; at DIP's batch of one, memory is not the
//   constraint. The convolutions themselves stay with oneDNN / cuDNN.
//
// bn_act_running_stats_update(running_mean!, running_var!, mean, invstd, momentum, eps, count)
//   nn.BatchNorm2d's update of the running statistics from the batch
//   statistics bn_act returned, in one tiny kernel: in Python it
//   was ~10 ATen calls per BatchNorm (measured ~70 us of overhead each on
//   the CPU, 30 BatchNorms per step). Mutates its first two arguments and
//   returns nothing, so torch.compile functionalizes it automatically.
//
// Autograd (below, for the Autograd dispatch key, as torchvision does for its
// ops): C++ rather than torch.library.register_autograd from Python, because
// bn_act runs at every layer of the network (30 calls per step of the paper's
// network) and a Python formula costs about 40 us more per call (forward and
// backward together; measured against ATen's own BatchNorm on a small input),
// ~1.4 ms of every training step on the CPU. The Function calls the op below autograd for the forward and the
// family's compiled backward op for the backward; nothing here computes. The
// fake kernels are in Python (dip_fast/ops/bn_act.py).
//
// Kernels: csrc/cpu/bn_act.cpp, csrc/cuda/bn_act.cu (math and checks in
// csrc/common/bn_act*.h).
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>

#include "common/op_handle.h"

TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("bn_act(Tensor x, Tensor weight, Tensor bias, float eps, float slope, int pad, int pad_mode)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("_bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd,"
        " float slope, int pad, int pad_mode) -> (Tensor, Tensor, Tensor)");
  m.def("bn_act_running_stats_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean,"
        " Tensor invstd, float momentum, float eps, int count) -> ()");
}

namespace dip_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using BnActForward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                    const at::Tensor&, double, double, int64_t,
                                                                    int64_t);
using BnActBackward = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&,
                                                                     const at::Tensor&, const at::Tensor&, double,
                                                                     int64_t, int64_t);

// Saved for backward: x (the convolution's output), weight, bias and the
// batch statistics (see above for why x rather than the output).
class BnActFunction : public torch::autograd::Function<BnActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                               const at::Tensor& bias, double eps, double slope, int64_t pad, int64_t pad_mode) {
    at::AutoDispatchBelowADInplaceOrView below;
    static const auto op = op_handle<BnActForward>("dip_fast::bn_act");
    auto [y, mean, invstd] = op.call(x, weight, bias, eps, slope, pad, pad_mode);
    ctx->save_for_backward({x, weight, bias, mean, invstd});
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["pad"] = pad;
    ctx->saved_data["pad_mode"] = pad_mode;
    ctx->mark_non_differentiable({mean, invstd});
    return {y, mean, invstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<BnActBackward>("dip_fast::_bn_act_backward");
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

}  // namespace

TORCH_LIBRARY_IMPL(dip_fast, Autograd, m) { m.impl("bn_act", &bn_act_forward_autograd); }

}  // namespace dip_fast
