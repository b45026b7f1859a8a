// LeakyReLU and its derivative, shared by CPU and CUDA.
#pragma once

#include "macros.h"

namespace dip_fast {

// acc_t is the accumulation type (float for half/bfloat16 inputs).
//
// Both branches are computed before the select on purpose: a multiply that
// only happens on one side of a `?:` is "speculated" by vectorisation, which
// compilers refuse under the default trapping-math rules, so the loop would
// stay scalar with an unpredictable branch per element.
template <typename acc_t>
DIP_HD acc_t leaky_relu(acc_t x, acc_t slope) {
  const acc_t negative = x * slope;
  return x > acc_t(0) ? x : negative;
}

// d/dx LeakyReLU(x) * g. The derivative at 0 is taken as `slope`, matching
// torch.nn.functional.leaky_relu's backward (which tests x > 0).
template <typename acc_t>
DIP_HD acc_t leaky_relu_grad(acc_t g, acc_t x, acc_t slope) {
  const acc_t negative = g * slope;
  return x > acc_t(0) ? g : negative;
}

}  // namespace dip_fast
