// Division of 32-bit indices by a divisor fixed at launch time, with a
// multiply-high and a shift instead of a hardware division (which CUDA
// emulates in software: dozens of instructions).
//
// The classic round-up method (Granlund and Montgomery, "Division by
// invariant integers using multiplication", 1994): with s = ceil(log2 d) and
// m = floor(2^32 (2^s - d) / d) + 1, the quotient of n by d is
// (mulhi(n, m) + n) >> s. The sum cannot overflow 32 bits while n < 2^31 and
// d < 2^31, which every caller guarantees (tensors are checked to have fewer
// than 2^31 elements). The host computes m and s once; the same code then runs
// on the GPU and in the CPU emulation of the launch grids, so both decode
// indices bit for bit alike.
#pragma once

#include <cstdint>

#include "macros.h"

namespace dip_fast {

struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  FastDivmod() = default;

  // Host only: the magic numbers for d (1 <= d < 2^31).
  explicit FastDivmod(uint32_t d) : divisor(d) {
    shift = 0;
    while ((uint64_t(1) << shift) < d) ++shift;
    multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << shift) - d)) / d + 1);
  }

  DIP_HD uint32_t div(uint32_t n) const {
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(n, multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(n) * multiplier) >> 32);
#endif
    return (hi + n) >> shift;
  }

  // Quotient and remainder in one call.
  DIP_HD void divmod(uint32_t n, uint32_t& q, uint32_t& r) const {
    q = div(n);
    r = n - q * divisor;
  }
};

}  // namespace dip_fast
