// Output allocation shared by every op.
//
// Tests switch on "poison" mode (dip_fast._C.set_poison_outputs(True)): every
// output is then filled with NaN before its kernel runs, so an element that a
// kernel forgets to write shows up as NaN instead of as stale memory that may
// happen to hold the right value. Off by default: it costs a memory pass.
#pragma once

#include <ATen/ATen.h>

#include <limits>

namespace dip_fast {

bool poison_outputs_enabled();     // defined in ops.cpp
void set_poison_outputs(bool on);  // defined in ops.cpp

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                             at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  auto out = at::empty(sizes, options.memory_format(fmt));
  if (poison_outputs_enabled() && out.numel() > 0) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

inline at::Tensor new_output_like(const at::Tensor& like, at::MemoryFormat fmt) {
  return new_output(like.sizes(), like.options(), fmt);
}

}  // namespace dip_fast
