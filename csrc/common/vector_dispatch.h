// Host side of the vector paths (csrc/common/tiling.h): the vector width a
// launch may use, and the dispatch to the kernel instantiated for it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "tiling.h"

namespace dip_fast {

// The widest vector width that every tensor's address and every contiguous
// run (a plane's elements in NCHW, a pixel's channels in channels_last) allow.
inline int vector_width_for(int elem_size, std::initializer_list<const at::Tensor*> tensors,
                            std::initializer_list<long long> runs) {
  std::vector<uintptr_t> ptrs;
  for (const at::Tensor* t : tensors) ptrs.push_back(reinterpret_cast<uintptr_t>(t->const_data_ptr()));
  const std::vector<long long> r(runs);
  return pick_vector_width(elem_size, ptrs.data(), static_cast<int>(ptrs.size()), r.data(), static_cast<int>(r.size()));
}

// Calls f with std::integral_constant<int, V> for the planned V: the 16-byte,
// 8-byte and scalar instantiations.
template <typename scalar_t, typename F>
void with_vector_width(int V, F&& f) {
  constexpr int V16 = 16 / sizeof(scalar_t);
  constexpr int V8 = V16 / 2 > 1 ? V16 / 2 : 1;
  if (V == V16) {
    f(std::integral_constant<int, V16>{});
  } else if (V == V8) {
    f(std::integral_constant<int, V8>{});
  } else {
    TORCH_CHECK(V == 1, "dip_fast: internal error, unplanned vector width ", V);
    f(std::integral_constant<int, 1>{});
  }
}

// The grid of an element-wise kernel over a tiling, checked against CUDA's limits.
inline void check_tiling_grid(const Tiling& t, const char* op) {
  TORCH_CHECK(tiling_blocks_x(t) < (1LL << 31) && tiling_blocks_y(t) < 65536, "dip_fast: ", op,
              " input too large for the CUDA grid");
}

}  // namespace dip_fast
