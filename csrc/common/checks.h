// Argument checks used by every op, so that bad input becomes a Python
// RuntimeError naming the argument instead of a crash.
#pragma once

#include <ATen/ATen.h>


#define DIP_CHECK_DEVICE(t, dev, name)                                        \
  TORCH_CHECK((t).device().type() == (dev), "dip_fast: ", name,              \
              " must be on ", c10::DeviceTypeName(dev), ", got ",            \
              (t).device())

#define DIP_CHECK_FLOATING(t, name)                                           \
  TORCH_CHECK(at::isFloatingType((t).scalar_type()), "dip_fast: ", name,     \
              " must be a floating-point tensor, got ", (t).scalar_type())

#define DIP_CHECK_SAME_DTYPE(a, b, name_a, name_b)                            \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), "dip_fast: ", name_a,  \
              " and ", name_b, " must have the same dtype, got ",            \
              (a).scalar_type(), " and ", (b).scalar_type())

#define DIP_CHECK_SAME_SHAPE(a, b, name_a, name_b)                            \
  TORCH_CHECK((a).sizes() == (b).sizes(), "dip_fast: ", name_a, " and ",     \
              name_b, " must have the same shape, got ", (a).sizes(),        \
              " and ", (b).sizes())

#define DIP_CHECK_DIM(t, d, name)                                             \
  TORCH_CHECK((t).dim() == (d), "dip_fast: ", name, " must be ", d,          \
              "-D, got ", (t).dim(), "-D")

namespace dip_fast {

// The memory layout an op works in and returns: channels_last when the input
// is (only) channels_last-contiguous, NCHW otherwise. The fake kernels in
// dip_fast/_ops.py apply the same rule, so traced and real strides agree.
inline at::MemoryFormat working_memory_format(const at::Tensor& x) {
  if (x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

}  // namespace dip_fast
