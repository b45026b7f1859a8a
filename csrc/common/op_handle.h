// A typed handle to a registered op, for C++ autograd kernels that call the
// op below autograd (forward) and the family's backward op.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

namespace dip_fast {

template <typename Signature>
c10::TypedOperatorHandle<Signature> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace dip_fast
