// Elementwise math that the compiler vectorises without -ffast-math (whose libm vector calls and
// process-wide flush-to-zero we avoid).
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace sluice {

// 16 floats as one value; GCC lowers it to the widest vectors the target has (one AVX-512
// register, two AVX2 ones). Loads and stores go through memcpy: no alignment is assumed.
using v16 = float __attribute__((vector_size(64)));
inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Reductions with kLanes independent partial sums, so the compiler vectorises them without
// reassociating (-ffast-math); the lanes are then added pairwise and the tail past the last
// full group serially.
constexpr int kLanes = 16;

// acc[0] + ... + acc[kLanes - 1] as a pairwise tree (lanes j and j + w, w = 8, 4, 2, 1): a fixed
// order the compiler turns into a few vector adds, where a serial sum is a 16-add dependency
// chain.
inline float reduce_lanes(const float* acc) {
  static_assert(kLanes == 16, "reduce_lanes adds 16 lanes");
  float half[8], quarter[4];  // constant trip counts: each level is one vector add
  for (int j = 0; j < 8; ++j) half[j] = acc[j] + acc[j + 8];
  for (int j = 0; j < 4; ++j) quarter[j] = half[j] + half[j + 4];
  return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = reduce_lanes(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float sum(const float* a, int64_t n) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j];
  float s = reduce_lanes(acc);
  for (; i < n; ++i) s += a[i];
  return s;
}

// max(a[0..n)), -inf for n == 0 (NaNs are skipped, as std::max keeps its first argument).
inline float max_value(const float* a, int64_t n) {
  float m[kLanes];
  std::fill(m, m + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) m[j] = std::max(m[j], a[i + j]);
  float r = *std::max_element(m, m + kLanes);
  for (; i < n; ++i) r = std::max(r, a[i]);
  return r;
}

// exp(x), relative error ~2e-7: exp(x) = 2^n * 2^f with t = x*log2(e), n = round(t),
// f = t - n in [-0.5, 0.5], 2^f by a degree-6 polynomial and 2^n built in the exponent bits.
// x is clamped to [-87, 88]: below, the result is ~0 (2^-126 is flushed to 0); above, it
// saturates at ~1.6e38 (callers only divide by it, as in silu).
inline float exp_approx(float x) {
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to nearest
  const float t = std::min(std::max(x, -87.0f), 88.0f) * 1.44269504088896341f;
  const float n = (t + kRound) - kRound;
  const float f = t - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace sluice
