// int8 activations per 32-element block, llama.cpp's Q8_0 quantization of x, shared by the
// int8-activation kernels (quant_linear.cpp's decode kernels, vnni_linear.cpp):
//   d = max|v| / 127, q[j] = the nearest integer (ties to even) of v[j] * (1 / d) in
//   [-127, 127], sum = the sum of q; an all-zero block gives d = 0 and q = 0.
// The AVX-512 build (x86-64-v4) computes a block in two 16-lane halves, the other build
// element by element: the same products, max and rounding (the default nearest-even mode), so
// both give identical q, d and sum.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace sluice {

constexpr int64_t kActBlock = 32;  // activation values per quantization block

// f(std::integral_constant<int, R>{}) for R = rows clamped to 1 .. Max: a row count as the
// template argument of the int8 kernels' register blocks (quant_linear.cpp, vnni_linear.cpp).
template <int Max, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, static_cast<F&&>(f));
  }
  f(std::integral_constant<int, Max>{});
}

// q[0 .. 32), *d, *sum of the 32 values at v (header doc).
inline void quantize_act_block(const float* v, int8_t* q, float* d, int32_t* sum) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
  const __m512 vinv = _mm512_set1_ps(inv);
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vinv));
  const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vinv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qhi));
  *d = scale;
  *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
#else
  float amax = 0.f;
  for (int j = 0; j < kActBlock; ++j) amax = std::max(amax, std::fabs(v[j]));
  const float scale = amax / 127.f, inv = scale > 0.f ? 1.f / scale : 0.f;
  int32_t total = 0;
  for (int j = 0; j < kActBlock; ++j) {
    const int qj = static_cast<int>(std::nearbyint(v[j] * inv));
    q[j] = static_cast<int8_t>(qj);
    total += qj;
  }
  *d = scale;
  *sum = total;
#endif
}

}  // namespace sluice
