// fp8 KV cache elements (c10::Float8_e4m3fn, c10::Float8_e5m2) to and from float32.
//
// Widening is exact and goes through fp16 (vcvtph2ps: AVX-512F, or F16C on x86-64-v3):
//   e5m2: the byte is the high byte of the fp16 of the same value (5 exponent bits, bias 15),
//         so fp16 bits = b << 8;
//   e4m3fn: byte b = sign s, 4 exponent bits, 3 mantissa bits, bias 7. The fp16 bits
//         s << 15 | (b & 0x7F) << 7 hold the same exponent and mantissa fields in fp16's
//         positions, whose bias is 15 = 7 + 8: the fp16 is b's value times 2^-8, for normals
//         and subnormals alike, and a multiply by 256 (exact) gives the value. (0x7F / 0xFF,
//         e4m3fn's NaN, would widen to 480: never stored, since writes saturate.)
// The vector loads (`_units`) skip that multiply: they give value / kFp8Unit<T> (exact, a power
// of two); widen_from_fp8 multiplies, and paged_decode.cpp folds the unit into its scales.
// Narrowing clamps to the format's largest finite value (448 / 57344) and then converts with
// c10's round-to-nearest-even, the conversion torch's .to() uses, so the C++ and torch cache
// writes (sluice.model.attention.kv_cache.to_cache_dtype) store the same bytes.
#pragma once

#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <immintrin.h>
#include <type_traits>

namespace sluice {

template <typename T>
inline constexpr bool kIsFp8 =
    std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;

// The largest finite value of fp8 type T.
template <typename T>
inline constexpr float kFp8Max = std::is_same_v<T, c10::Float8_e4m3fn> ? 448.f : 57344.f;

// What a `_units` load of T is in: value = kFp8Unit<T> x the loaded number (1 for any T but
// e4m3fn, whose fp16 route yields value / 256).
template <typename T>
inline constexpr float kFp8Unit = std::is_same_v<T, c10::Float8_e4m3fn> ? 256.f : 1.f;

#if defined(__AVX512F__) || defined(__F16C__)
// The fp16 bits described above of 16 (16-bit lanes of a __m256i) or 8 (__m128i) fp8 bytes.
// e4m3fn sign-extends each byte: after << 7 its sign is in bits 14 and 15 and its other seven
// bits in 7..13, and the mask 0xBF80 clears bit 14 (3 operations instead of 5).
template <typename T>
inline __m256i fp8_as_fp16_bits(__m128i bytes) {
  if constexpr (std::is_same_v<T, c10::Float8_e5m2>)
    return _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 8);
  else
    return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(bytes), 7),
                            _mm256_set1_epi16(static_cast<int16_t>(0xBF80)));
}
template <typename T>
inline __m128i fp8_as_fp16_bits8(__m128i bytes) {  // the low 8 bytes of `bytes`
  if constexpr (std::is_same_v<T, c10::Float8_e5m2>)
    return _mm_slli_epi16(_mm_cvtepu8_epi16(bytes), 8);
  else
    return _mm_and_si128(_mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7),
                         _mm_set1_epi16(static_cast<int16_t>(0xBF80)));
}
#endif

#if defined(__AVX512F__)
// 16 fp8 values at p, widened exactly, in kFp8Unit<T> units.
template <typename T>
inline __m512 widen16_fp8_units(const T* p) {
  return _mm512_cvtph_ps(
      fp8_as_fp16_bits<T>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

#if defined(__F16C__)
// 8 fp8 values at p, widened exactly, in kFp8Unit<T> units.
template <typename T>
inline __m256 widen8_fp8_units(const T* p) {
  return _mm256_cvtph_ps(
      fp8_as_fp16_bits8<T>(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// dst[0 .. n) = float(src[0 .. n)), exactly.
template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline void widen_from_fp8(float* dst, const T* src, int64_t n) {
  int64_t i = 0;  // the vector loads give value / kFp8Unit<T>; the multiply is exact
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_mul_ps(widen16_fp8_units(src + i),
                                            _mm512_set1_ps(kFp8Unit<T>)));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_mul_ps(widen8_fp8_units(src + i),
                                            _mm256_set1_ps(kFp8Unit<T>)));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// dst[0 .. n) = src[0 .. n) clamped to +-kFp8Max<T> and rounded to T (nearest even).
template <typename T, std::enable_if_t<kIsFp8<T>, int> = 0>
inline void narrow_to_fp8(T* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = T(std::clamp(src[i], -kFp8Max<T>, kFp8Max<T>));
}

}  // namespace sluice
