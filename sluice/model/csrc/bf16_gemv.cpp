// Few-row products of bf16 activations and a plain row-major bf16 weight on AVX512-BF16
// (vdpbf16ps), for bf16_linear (decode_stack.cpp) on CPUs without AMX:
//
//   bf16gemv::run(out, m, n, k, x, w, ldw):
//       out[i * n + j] = sum_e x[i * k + e] * w[j * ldw + e]      i < m <= kMaxRows, j < n
//
// x [m, k] and w [n, ldw >= k] hold bf16 bits (uint16); out is float32 [m, n]. Each 32-value
// chunk c of a weight row meets the same chunk of every x row in one vdpbf16ps per x row: lane
// l accumulates, in float32, the products of elements 2l and 2l + 1 of the chunk (exact: a bf16
// x bf16 product fits a float32), the even chunks and the odd ones in order of c on two
// accumulators, added at the end, whose 16 lanes are then summed (_mm512_reduce_add_ps). That
// is oneDNN's arithmetic on these CPUs (the same instruction, which flushes denormal inputs and
// results to zero): results equal its GEMM up to float32 summation order. A k that is not a
// multiple of 32 ends in one zero-masked chunk.
//
// Work: the weight split over the threads in contiguous runs of rows, each thread reading its
// span front to back. Up to kRowByRowMax (4) x rows, one weight row after another (row_dot: 2R
// float32 accumulators), so each thread's reads are a single stream; every two chunk loads
// hint the two lines kPrefetchBytes further along into L2. On a Zen 5 VM that read the weight
// 1.1-1.5x faster than panels of 4 rows side by side (four streams 2k bytes apart), TPOT of
// bf16 SmolLM2 1.1-1.2x (benchmarks/RESULTS.md, 2026-12-08). More x rows: panels of 2 weight
// rows side by side (panel: R x 2 accumulators), which load each x chunk once per 2 weight
// rows; at 8 rows that stayed ~1.2x faster than row by row, which loads it once per row. The
// weight is read once per call whatever m is; compute per weight byte grows with m, and at 8
// rows on a Zen 5 the product is still bound by memory (benchmarks/bf16_rows.py).
//
// Compiled in the x86-64-v4 build only (function attribute avx512bf16); available() says whether
// this build has it and the CPU reports AVX512-BF16.
#include <algorithm>
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>
#endif

namespace bf16gemv {

constexpr int64_t kMaxRows = 8;

#if defined(__AVX512F__) && defined(__AVX512BW__)

constexpr int64_t kPrefetchBytes = 4096;
constexpr int kRowByRowMax = 4;  // up to this many x rows: weight rows one after another

#define SLUICE_BF16DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))

// out[r * ldo] = x row r . the weight row at w, for the R x rows: the row's 32-value chunks in
// order, even chunks on one set of R accumulators and odd ones on another (two independent
// chains per x row), the two sets summed at the end; each pair of chunks hints the two lines
// kPrefetchBytes further along into L2.
template <int R>
SLUICE_BF16DOT void row_dot(float* out, int64_t ldo, int64_t k, const uint16_t* x,
                            const uint16_t* w) {
  __m512 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_ps();
  const int64_t whole = k / 32 * 32;
  int64_t c = 0;
  for (; c + 64 <= whole; c += 64) {
    const char* ahead = reinterpret_cast<const char*>(w + c) + kPrefetchBytes;
    __builtin_prefetch(ahead, 0, 2);
    __builtin_prefetch(ahead + 64, 0, 2);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + c);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + c + 32);
    for (int r = 0; r < R; ++r) {
      even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)_mm512_loadu_si512(x + r * k + c), w0);
      odd[r] = _mm512_dpbf16_ps(odd[r], (__m512bh)_mm512_loadu_si512(x + r * k + c + 32), w1);
    }
  }
  if (c < whole) {  // an odd number of whole chunks
    __builtin_prefetch(reinterpret_cast<const char*>(w + c) + kPrefetchBytes, 0, 2);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + c);
    for (int r = 0; r < R; ++r)
      even[r] = _mm512_dpbf16_ps(even[r], (__m512bh)_mm512_loadu_si512(x + r * k + c), w0);
  }
  if (whole < k) {
    const __mmask32 mask = (__mmask32)((uint64_t{1} << (k - whole)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + whole);
    for (int r = 0; r < R; ++r)
      odd[r] = _mm512_dpbf16_ps(
          odd[r], (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * k + whole), wv);
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = _mm512_reduce_add_ps(_mm512_add_ps(even[r], odd[r]));
}

// out[r * ldo + j] for the R x rows and the NW weight rows of one panel (w: its first row):
// the panel's rows side by side, each chunk of x loaded once for all NW of them.
template <int R, int NW>
SLUICE_BF16DOT void panel(float* out, int64_t ldo, int64_t k, const uint16_t* x,
                          const uint16_t* w, int64_t ldw) {
  __m512 acc[R][NW];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = _mm512_setzero_ps();
  const int64_t whole = k / 32 * 32;
  for (int64_t c = 0; c < whole; c += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * k + c);
    for (int j = 0; j < NW; ++j) {
      const uint16_t* p = w + j * ldw + c;
      __builtin_prefetch(reinterpret_cast<const char*>(p) + kPrefetchBytes, 0, 2);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(p);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv[r], wv);
    }
  }
  if (whole < k) {
    const __mmask32 mask = (__mmask32)((uint64_t{1} << (k - whole)) - 1);
    __m512bh xv[R];
    for (int r = 0; r < R; ++r)
      xv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + r * k + whole);
    for (int j = 0; j < NW; ++j) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + j * ldw + whole);
      for (int r = 0; r < R; ++r) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv[r], wv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NW; ++j) out[r * ldo + j] = _mm512_reduce_add_ps(acc[r][j]);
}

template <int R>
SLUICE_BF16DOT void run_rows(float* out, int64_t n, int64_t k, const uint16_t* x,
                             const uint16_t* w, int64_t ldw) {
  constexpr int NW = 2;   // panels, for R > kRowByRowMax
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    if constexpr (R <= kRowByRowMax) {
      const int64_t j0 = n * t / threads, j1 = n * (t + 1) / threads;
      for (int64_t j = j0; j < j1; ++j) row_dot<R>(out + j, n, k, x, w + j * ldw);
    } else {
      const int64_t panels = n / NW;
      const int64_t p0 = panels * t / threads, p1 = panels * (t + 1) / threads;
      for (int64_t p = p0; p < p1; ++p)
        panel<R, NW>(out + p * NW, n, k, x, w + p * NW * ldw, ldw);
      if (t == threads - 1)  // the rows left over after whole panels
        for (int64_t j = panels * NW; j < n; ++j) panel<R, 1>(out + j, n, k, x, w + j * ldw, ldw);
    }
  }
}

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok;
}

inline void run(float* out, int64_t m, int64_t n, int64_t k, const uint16_t* x,
                const uint16_t* w, int64_t ldw) {
  switch (m) {
    case 1: return run_rows<1>(out, n, k, x, w, ldw);
    case 2: return run_rows<2>(out, n, k, x, w, ldw);
    case 3: return run_rows<3>(out, n, k, x, w, ldw);
    case 4: return run_rows<4>(out, n, k, x, w, ldw);
    case 5: return run_rows<5>(out, n, k, x, w, ldw);
    case 6: return run_rows<6>(out, n, k, x, w, ldw);
    case 7: return run_rows<7>(out, n, k, x, w, ldw);
    case 8: return run_rows<8>(out, n, k, x, w, ldw);
    default: break;
  }
}

#undef SLUICE_BF16DOT

#else  // no AVX-512 in this build

inline bool available() { return false; }
inline void run(float*, int64_t, int64_t, int64_t, const uint16_t*, const uint16_t*, int64_t) {}

#endif

}  // namespace bf16gemv
