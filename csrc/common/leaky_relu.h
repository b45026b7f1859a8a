// LeakyReLU and its derivative, shared by CPU and CUDA.
#pragma once

#include "macros.h"

namespace dip_fast {

// acc_t is the accumulation type (float for half/bfloat16 inputs).
template <typename acc_t>
DIP_HD acc_t leaky_relu(acc_t x, acc_t slope) {
  return x > acc_t(0) ? x : x * slope;
}

// d/dx LeakyReLU(x) * g. The derivative at 0 is taken as `slope`, matching
// torch.nn.functional.leaky_relu's backward (which tests x > 0).
template <typename acc_t>
DIP_HD acc_t leaky_relu_grad(acc_t g, acc_t x, acc_t slope) {
  return x > acc_t(0) ? g : g * slope;
}

}  // namespace dip_fast
