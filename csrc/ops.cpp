/*
 * dip_fast::_C — op schemas and the pybind11 module.
 *
 * Layout (after torchvision's csrc/ops and pytorch_scatter):
 *   ops.cpp        schemas for every op (TORCH_LIBRARY) and build information
 *   autograd.cpp   autograd kernels of the per-layer ops (TORCH_LIBRARY_IMPL(..., Autograd))
 *   common/        per-element math shared by CPU and CUDA (DIP_HD helpers)
 *   cpu/<op>.cpp   CPU kernels, registered with TORCH_LIBRARY_IMPL(..., CPU)
 *   cuda/<op>.cu   CUDA kernels, registered with TORCH_LIBRARY_IMPL(..., CUDA)
 *
 * Fake (meta) kernels are registered from Python (dip_fast/ops/<family>.py, with
 * torch.library.register_fake), so torch.compile can trace every op. Every
 * forward op has its own backward op, so an autograd formula is a thin
 * function calling a compiled kernel: in C++ (autograd.cpp, Autograd key)
 * for the ops the network calls at every layer (bn_act_forward,
 * upsample_cat), where Python's per-call cost shows; from Python
 * (torch.library.register_autograd) for the others.
 *
 * Ops:
 *   leaky_relu_forward(x, slope)              y = x > 0 ? x : slope * x
 *   leaky_relu_backward(grad_out, x, slope)   dx = x > 0 ? g : slope * g
 *     One read and one write per element in each direction, the same as
 *     PyTorch's own kernel; it is the smallest op that exercises both build
 *     paths and the registration machinery.
 *
 *   bn_act_forward(x, weight, bias, eps, slope, pad, pad_mode) -> (y, mean, invstd)
 *   bn_act_backward(grad_y, x, weight, bias, mean, invstd, slope, pad, pad_mode)
 *       -> (grad_x, grad_weight, grad_bias)
 *     Everything between two convolutions of the hourglass, in training mode:
 *     y = pad(leaky_relu(batch_norm(x)), pad, reflect|zeros). x is the
 *     convolution's output (NCHW or channels_last); y is already padded for
 *     the next convolution, so no separate pad copy exists. slope = 1 is plain
 *     BatchNorm (the one after each concatenation).
 *     Forward: one statistics pass (chunked Welford: a chunk's mean and M2 in
 *     L1, merged with Chan's formula) and one normalise+activate+pad pass
 *     that writes every element of y, pad band included. PyTorch's sequence
 *     reads x twice for BatchNorm, then makes a LeakyReLU pass and a pad pass:
 *     4 reads + 3 writes of an activation-sized tensor against our 2 reads
 *     (the second mostly from cache per channel) + 1 write.
 *     Backward: pass 1 reduces sum(dz) and sum(dz * xhat), where dz is grad_y
 *     with the pad's border gradients folded back (a gather over the 1 to 9
 *     padded positions that copied each pixel) and the LeakyReLU mask
 *     applied; pass 2 writes grad_x. 2 reads of grad_y and x + 1 write,
 *     against PyTorch's pad backward (zero fill + scatter), LeakyReLU
 *     backward and BatchNorm backward: 6 reads + 3 writes.
 *     Saved for backward: x (the convolution's output), mean and invstd.
 *     Recomputing x from y by inverting LeakyReLU and the affine map would
 *     save one activation per block but divides by gamma, which loses
 *     precision as gamma shrinks; at DIP's batch of one, memory is not the
 *     constraint. The convolutions themselves stay with oneDNN / cuDNN.
 *
 *   upsample_cat(skip, deep, mode) -> out
 *   upsample_cat_backward(grad_out, skip_channels, mode) -> (grad_skip, grad_deep)
 *     The join of the hourglass's two branches at each scale:
 *     out = cat([skip, upsample2x(deep)], dim=1), mode 0 nearest or 1
 *     bilinear (align_corners=False), written in one pass straight into the
 *     concatenation buffer, which the fused BatchNorm after it reads. PyTorch
 *     writes the upsampled tensor, then reads it (and the skip) again to copy
 *     both into the torch.cat buffer: 2 reads + 2 writes of the deep
 *     channels at full size, against our 1 read of the quarter-size input and
 *     1 write. The skip branch is the one that "writes into a channel slice of
 *     the concat buffer"; doing it in the consumer (this op reads both
 *     branches) instead of in the producers keeps every op functional (no
 *     aliasing outputs, so autograd, torch.compile and CUDA graphs need
 *     nothing special). Linear, so nothing is saved for backward beyond the
 *     skip's channel count. Backward: grad_skip is a copy of grad_out's first
 *     channels, and grad_deep gathers the <= 4 x 4 output gradients that read
 *     each source pixel (separable on the CPU: along H into a row buffer,
 *     then along W), 1 read of grad_out and 1 write; PyTorch's upsample
 *     backward zero-fills grad_deep and scatters into it after cat's
 *     backward has sliced grad_out.
 *
 *   bn_running_stats_update(running_mean!, running_var!, mean, invstd, momentum, eps, count)
 *     nn.BatchNorm2d's update of the running statistics from the batch
 *     statistics bn_act_forward returned, in one tiny kernel: in Python it
 *     was ~10 ATen calls per BatchNorm (measured ~70 us of overhead each on
 *     the CPU, 30 BatchNorms per step). Mutates its first two arguments and
 *     returns nothing, so torch.compile functionalizes it automatically.
 *
 *   lanczos_downsample(x, taps, factor, pad)
 *   lanczos_downsample_backward(grad_out, taps, factor, pad, height, width)
 *     The paper's fixed anti-aliasing Downsampler (Lanczos / Gauss / box) as
 *     one separable op: per channel, y = decimate_f(k * (k * replicate_pad(x)))
 *     with the 1-D kernel `taps` (K values, float32, or float64 for double
 *     input) applied down the columns then along the rows, stride `factor`,
 *     `pad` replicated pixels on every side (0: the valid correlation).
 *     Padding is index clamping, never a padded copy; the vertical pass and
 *     the strided horizontal pass are fused per output row (CPU) or per
 *     output tile (CUDA), the f-times smaller intermediate staying in a
 *     per-thread buffer / shared memory: x is read once and y written once.
 *     Linear in x, so autograd saves only `taps` (K values) and the input
 *     size. The backward op is the exact transpose (edge pixels collect the
 *     replicated border), written as a gather: grad_out read once, grad_x
 *     written once, no atomics, deterministic on CPU and CUDA. Its own
 *     derivative is the forward op (double backward).
 */
#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "common/alloc.h"

#ifndef DIP_FAST_CUDA_ARCHS
#define DIP_FAST_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(dip_fast, m) {
  m.def("leaky_relu_forward(Tensor x, float slope) -> Tensor");
  m.def("leaky_relu_backward(Tensor grad_out, Tensor x, float slope) -> Tensor");
  m.def("bn_act_forward(Tensor x, Tensor weight, Tensor bias, float eps, float slope, int pad, int pad_mode)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("bn_act_backward(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean, Tensor invstd,"
        " float slope, int pad, int pad_mode) -> (Tensor, Tensor, Tensor)");
  m.def("bn_running_stats_update(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor mean, Tensor invstd,"
        " float momentum, float eps, int count) -> ()");
  // The CUDA kernels' per-thread code run over the launch grid on the CPU (tests
  // only); the last output is the launch trace (csrc/cpu/bn_act_emulated.cpp).
  m.def("_bn_act_forward_emulated(Tensor x, Tensor weight, Tensor bias, float eps, float slope, int pad,"
        " int pad_mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("_bn_act_backward_emulated(Tensor grad_y, Tensor x, Tensor weight, Tensor bias, Tensor mean,"
        " Tensor invstd, float slope, int pad, int pad_mode) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("upsample_cat(Tensor skip, Tensor deep, int mode) -> Tensor");
  m.def("upsample_cat_backward(Tensor grad_out, int skip_channels, int mode) -> (Tensor, Tensor)");
  // Test only: the CUDA grid replayed on the CPU; the last output is the launch
  // trace [V, fewest writes, most writes] (csrc/cpu/upsample_cat_emulated.cpp).
  m.def("_upsample_cat_emulated(Tensor skip, Tensor deep, int mode) -> (Tensor, Tensor)");
  m.def("_upsample_cat_backward_emulated(Tensor grad_out, int skip_channels, int mode) -> (Tensor, Tensor, Tensor)");
  m.def("lanczos_downsample(Tensor x, Tensor taps, int factor, int pad) -> Tensor");
  m.def("lanczos_downsample_backward(Tensor grad_out, Tensor taps, int factor, int pad, SymInt height, SymInt width) -> Tensor");
  // Test only: the CUDA grid replayed on the CPU; the last output is the launch
  // trace [blocks, shared bytes, fewest writes, most writes] (csrc/cpu/lanczos_emulated.cpp).
  m.def("_lanczos_downsample_emulated(Tensor x, Tensor taps, int factor, int pad) -> (Tensor, Tensor)");
  m.def("_lanczos_downsample_backward_emulated(Tensor grad_out, Tensor taps, int factor, int pad, int height,"
        " int width) -> (Tensor, Tensor)");
}

namespace dip_fast {
namespace {
std::atomic<bool> g_poison_outputs{false};
}  // namespace
bool poison_outputs_enabled() { return g_poison_outputs.load(std::memory_order_relaxed); }
void set_poison_outputs(bool on) { g_poison_outputs.store(on, std::memory_order_relaxed); }
}  // namespace dip_fast

namespace {

bool cuda_compiled() {
#ifdef DIP_FAST_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool openmp_compiled() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

// Names of the ops registered in the dip_fast namespace, read back from the
// dispatcher so the list can never disagree with what was really registered.
std::vector<std::string> registered_ops() {
  std::vector<std::string> names;
  for (const auto& op : c10::Dispatcher::singleton().getAllOpNames()) {
    if (op.name.rfind("dip_fast::", 0) == 0) {
      names.push_back(op.name.substr(10) + (op.overload_name.empty() ? "" : "." + op.overload_name));
    }
  }
  std::sort(names.begin(), names.end());
  return names;
}

// Whether a given op has a kernel for a dispatch key ("CPU", "CUDA").
bool has_kernel(const std::string& op, const std::string& key) {
  auto handle = c10::Dispatcher::singleton().findSchema({"dip_fast::" + op, ""});
  if (!handle) return false;
  return handle->hasKernelForDispatchKey(c10::parseDispatchKey(key));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dip_fast compiled ops (registered under torch.ops.dip_fast)";
  m.def("cuda_compiled", &cuda_compiled, "True when the CUDA kernels were compiled in");
  m.def("cuda_archs", []() { return std::string(DIP_FAST_CUDA_ARCHS); },
        "The CUDA architectures the kernels were compiled for");
  m.def("openmp", &openmp_compiled, "True when the CPU kernels were compiled with OpenMP");
  m.def("parallel_info", []() { return at::get_parallel_info(); }, "ATen's threading summary");
  m.def("set_poison_outputs", &dip_fast::set_poison_outputs,
        "Fill every op output with NaN before its kernel runs (tests use this)", pybind11::arg("on"));
  m.def("poison_outputs", &dip_fast::poison_outputs_enabled, "Whether outputs are poisoned");
  m.def("registered_ops", &registered_ops, "Names of the ops in the dip_fast namespace");
  m.def("has_kernel", &has_kernel, "Whether op has a kernel for a dispatch key", pybind11::arg("op"),
        pybind11::arg("key"));
}
