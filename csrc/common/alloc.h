// Output allocation shared by every op.
//
// Tests switch on "poison" mode (dip_fast._C.set_poison_outputs(True)): every
// output is then filled with NaN before its kernel runs, so an element that a
// kernel forgets to write shows up as NaN instead of as stale memory that may
// happen to hold the right value. Off by default: it costs a memory pass.
//
// Self-contained: the switch lives here (one flag per loaded module, C++17
// inline variable), so any translation unit that allocates outputs needs
// only this header.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>

namespace dip_fast {

inline std::atomic<bool> g_poison_outputs{false};

inline bool poison_outputs_enabled() { return g_poison_outputs.load(std::memory_order_relaxed); }
inline void set_poison_outputs(bool on) { g_poison_outputs.store(on, std::memory_order_relaxed); }

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
