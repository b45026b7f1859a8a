// Storing an accumulator value into a tensor element, for the CPU kernels.
//
// static_cast<c10::BFloat16>(float) rounds through a branch on NaN that
// GCC does not vectorise, which left the bfloat16 channels_last loops scalar
// (measured 16x slower than float). This version is branch-free
// (round to nearest even, NaN kept as a quiet NaN), so loops that store
// bfloat16 vectorise like float ones. Same results as c10's conversion.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "../common/macros.h"

namespace dip_fast {

template <typename scalar_t, typename acc_t>
DIP_INLINE void store(scalar_t* p, acc_t v) {
  *p = static_cast<scalar_t>(v);
}

template <>
DIP_INLINE void store<c10::BFloat16, float>(c10::BFloat16* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = 0u - static_cast<uint32_t>(v != v);  // all ones for NaN; a mask, not a branch
  const uint16_t bits = static_cast<uint16_t>((rounded & ~nan) | (0x7FC0u & nan));
  std::memcpy(p, &bits, sizeof(bits));
}

}  // namespace dip_fast
