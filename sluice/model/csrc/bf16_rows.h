// float32 <-> bfloat16 conversion of contiguous runs, vectorised (GCC vector extensions: the
// build's widest registers, no ISA-specific intrinsics). Narrowing rounds to nearest-even,
// bit for bit what torch's .to(torch.bfloat16) and c10::BFloat16(float) give, and makes NaN
// the canonical 0x7FC0 (c10's scalar NaN; torch's vectorised cast may store another NaN
// pattern, e.g. 0xFFFF); widening is exact (a bf16 is the high half of a float32).
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace sluice {

// dst[0 .. n) = bf16(src[0 .. n)), round to nearest-even.
inline void narrow_to_bf16(c10::BFloat16* dst, const float* src, int64_t n) {
  using u32x16 = uint32_t __attribute__((vector_size(64)));
  using u16x16 = uint16_t __attribute__((vector_size(32)));
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    u32x16 u;
    std::memcpy(&u, src + i, sizeof u);
    const u32x16 rounded = (u + (((u >> 16) & 1) + 0x7FFFu)) >> 16;
    // NaN (exponent all ones, mantissa not zero) -> 0x7FC0, as c10's round_to_nearest_even
    const u32x16 nan = reinterpret_cast<u32x16>((u & 0x7FFFFFFFu) > 0x7F800000u);
    const u32x16 bits = (rounded & ~nan) | (0x7FC0u & nan);
    const u16x16 half = __builtin_convertvector(bits, u16x16);
    std::memcpy(dst + i, &half, sizeof half);
  }
  for (; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

// 16 bf16 values at p widened exactly to float32 (their bits are the high halves).
inline float __attribute__((vector_size(64))) load16_from_bf16(const c10::BFloat16* p) {
  using u32x16 = uint32_t __attribute__((vector_size(64)));
  using u16x16 = uint16_t __attribute__((vector_size(32)));
  using f32x16 = float __attribute__((vector_size(64)));
  u16x16 half;
  std::memcpy(&half, p, sizeof half);
  const u32x16 u = __builtin_convertvector(half, u32x16) << 16;
  f32x16 f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// dst[0 .. n) = float(src[0 .. n)), exactly.
inline void widen_from_bf16(float* dst, const c10::BFloat16* src, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const auto f = load16_from_bf16(src + i);
    std::memcpy(dst + i, &f, sizeof f);
  }
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace sluice
