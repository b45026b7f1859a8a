// Launch geometry of the element-wise grid-stride CUDA kernels (leaky_relu,
// bn_act's running-statistics update), shared by the kernels' host code and
// their CPU emulation. Every such kernel is a grid-stride loop, so any grid
// size is correct; the cap only bounds the number of blocks for very large
// tensors.
#pragma once

#include <algorithm>
#include <cstdint>

namespace dip_fast {

constexpr int kThreads = 256;

inline int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

}  // namespace dip_fast
