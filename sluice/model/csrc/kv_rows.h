// KV cache rows as float32: the attention kernels compute in fp32 over a float32 or bfloat16
// cache. A float row is used in place; a bf16 row (the high 16 bits of a float32) is widened
// into the caller's scratch, exactly. Writes round float32 to bf16 to nearest-even, as
// torch's .to(torch.bfloat16) does, so the C++ and torch cache writes store the same bits.
#pragma once

#include "bf16_rows.h"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

namespace sluice {

inline const float* kv_row_as_float(const float* row, int64_t, float*) { return row; }

inline const float* kv_row_as_float(const c10::BFloat16* row, int64_t n, float* wide) {
  widen_from_bf16(wide, row, n);
  return wide;
}

// dst[0 .. n) = src[0 .. n) stored in the cache's element type.
inline void kv_row_store(float* dst, const float* src, int64_t n) {
  std::memcpy(dst, src, n * sizeof(float));
}

inline void kv_row_store(c10::BFloat16* dst, const float* src, int64_t n) {
  narrow_to_bf16(dst, src, n);  // round to nearest even
}

}  // namespace sluice
