// The leaky_relu op family: schemas.
//
//   leaky_relu(x, slope)                     y = x > 0 ? x : slope * x
//   _leaky_relu_backward(grad_out, x, slope) dx = x > 0 ? g : slope * g
//
// One read and one write per element in each direction, the same as
// PyTorch's own kernel; it is the smallest op family that exercises both build
// paths and the registration machinery.
//
// Kernels: csrc/cpu/leaky_relu.cpp, csrc/cuda/leaky_relu.cu. Autograd: the
// formula (and the backward's own derivative) is registered from Python next
// to the fake kernels, dip_fast/ops/leaky_relu.py: the op runs once per step,
// so Python's per-call cost does not show (see csrc/ops/bn_act.cpp for the
// ops where it does).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(dip_fast, m) {
  m.def("leaky_relu(Tensor x, float slope) -> Tensor");
  m.def("_leaky_relu_backward(Tensor grad_out, Tensor x, float slope) -> Tensor");
}
