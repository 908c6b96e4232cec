// float32 <-> IEEE float16 (c10::Half) conversion of contiguous runs: a float16 KV cache.
//
// Widening is exact (vcvtph2ps: AVX-512F, or F16C on x86-64-v3). Narrowing clamps to +-65504
// (float16's largest finite value: a cache holds no inf, which attention would turn into NaN),
// rounds to nearest even (vcvtps2ph) and gives the canonical quiet NaN 0x7E00 with the input's
// sign for any NaN: bit for bit what torch's .to(torch.float16) and c10::Half(float) store
// after that clamp (c10's fp16_ieee_from_fp32_value; `to_cache_dtype`), so the C++ and torch
// cache writes agree.
#pragma once

#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <immintrin.h>

namespace sluice {

constexpr float kFp16Max = 65504.f;

// dst[0 .. n) = float16(src[0 .. n) clamped to +-kFp16Max), round to nearest even.
inline void narrow_to_fp16(c10::Half* dst, const float* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m256i quiet = _mm256_set1_epi16(0x7E00);
  const __m512 hi = _mm512_set1_ps(kFp16Max), lo = _mm512_set1_ps(-kFp16Max);
  for (; i + 16 <= n; i += 16) {
    const __m512 x = _mm512_loadu_ps(src + i);
    const __m512 clamped = _mm512_min_ps(_mm512_max_ps(x, lo), hi);  // NaN: -65504, fixed below
    __m256i h = _mm512_cvtps_ph(clamped, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    if (nan) {  // c10's NaN: 0x7E00 | x's sign (vcvtps2ph of x keeps the sign and payload bits)
      const __m256i raw = _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256i sign = _mm256_and_si256(raw, _mm256_set1_epi16(static_cast<int16_t>(0x8000)));
      h = _mm256_mask_blend_epi16(nan, h, _mm256_or_si256(sign, quiet));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), h);
  }
#elif defined(__F16C__)
  const __m256 hi = _mm256_set1_ps(kFp16Max), lo = _mm256_set1_ps(-kFp16Max);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(src + i);
    if (_mm256_movemask_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q))) break;  // NaN: scalar tail
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_min_ps(_mm256_max_ps(x, lo), hi),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; i < n; ++i)  // std::clamp keeps a NaN, which c10 makes 0x7E00 | sign
    dst[i] = c10::Half(std::clamp(src[i], -kFp16Max, kFp16Max));
}

// dst[0 .. n) = float(src[0 .. n)), exactly.
inline void widen_from_fp16(float* dst, const c10::Half* src, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i))));
#elif defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(
                                  _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

}  // namespace sluice
