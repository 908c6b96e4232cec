// KV cache rows as float32: the attention kernels compute in fp32 over a float32, bfloat16,
// float16 or fp8 (e4m3fn / e5m2) cache. A float row is used in place; a bf16 row (the high 16
// bits of a float32), a float16 row (fp16_rows.h) or an fp8 row (fp8_rows.h) is widened into
// the caller's scratch, exactly. Writes round float32 to bf16 / float16 to nearest-even, as
// torch's .to() does, and to fp8 as to_cache_dtype does (saturated), so the C++ and torch
// cache writes store the same bits.
#pragma once

#include "bf16_rows.h"
#include "fp16_rows.h"
#include "fp8_rows.h"

#include <ATen/ATen.h>
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

inline const float* kv_row_as_float(const c10::Half* row, int64_t n, float* wide) {
  widen_from_fp16(wide, row, n);
  return wide;
}

inline void kv_row_store(c10::Half* dst, const float* src, int64_t n) {
  narrow_to_fp16(dst, src, n);  // round to nearest even
}

template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline const float* kv_row_as_float(const T* row, int64_t n, float* wide) {
  widen_from_fp8(wide, row, n);
  return wide;
}

template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline void kv_row_store(T* dst, const float* src, int64_t n) {
  narrow_to_fp8(dst, src, n);  // saturate, round to nearest even
}

// The cache dtypes visit_kv_cache_type knows, for the kernels' error messages.
inline constexpr const char* kKvCacheDtypes =
    "a float32, bfloat16, float16 or fp8 (e4m3fn / e5m2)";

// Calls f(T{}) with T the cache's element type (float, c10::BFloat16, c10::Half,
// c10::Float8_e4m3fn, c10::Float8_e5m2) and returns true; false (f not called) for any other
// dtype.
template <typename F>
inline bool visit_kv_cache_type(at::ScalarType type, F&& f) {
  switch (type) {
    case at::kFloat: f(float{}); return true;
    case at::kBFloat16: f(c10::BFloat16{}); return true;
    case at::kHalf: f(c10::Half{}); return true;
    case at::kFloat8_e4m3fn: f(c10::Float8_e4m3fn{}); return true;
    case at::kFloat8_e5m2: f(c10::Float8_e5m2{}); return true;
    default: return false;
  }
}

}  // namespace sluice
