// Linear layers over GGUF (llama.cpp) block-quantized weights, dequantized on the fly.
//
//   gguf_linear(out, x, w, type, bias):  out[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias[N])
//                                        (type | 256: x quantized to int8 first, see below)
//   gguf_dequantize(out, w, type):       out[N, K] = dequant(w)
//
// w is uint8 [N, row_bytes]: row n holds output channel n as K / block_elems consecutive blocks
// (the GGUF tensor's bytes as stored; rows may be narrowed, so w's row stride may exceed
// row_bytes, but each row is contiguous). x, out: float32 with contiguous rows.
//
// Block layouts (ggml-common.h; d, dmin, m: IEEE fp16, little-endian; value i of the block):
//   Q4_0 (type 2)  32 elems, 18 B: d | qs[16]          v = d * (q_i - 8)
//   Q4_1 (type 3)  32 elems, 20 B: d | m | qs[16]      v = d * q_i + m
//                  q_i = qs[i] & 15 for i < 16, qs[i - 16] >> 4 for i >= 16
//   Q8_0 (type 8)  32 elems, 34 B: d | qs[32] (int8)   v = d * qs[i]
//   Q4_K (type 12) 256 elems, 144 B: d | dmin | scales[12] | qs[128]
//                  8 sub-blocks of 32 with 6-bit scale sc_j and min m_j packed in scales
//                  (get_scale_min_k4); group g = 0..3 covers elements 64g..64g+63 from
//                  qs[32g..32g+31]: low nibbles sub-block 2g, high nibbles sub-block 2g + 1;
//                  v = d * sc_j * q - dmin * m_j
//   F16 (type 1), BF16 (type 30)  1 elem, 2 B: the value as IEEE fp16 / bfloat16 (a float
//                  weight stored in 16 bits; `w` may also be a float16 / bfloat16 [N, K]
//                  tensor, read as its bytes)
//   Q6_K (type 14) 256 elems, 210 B: ql[128] | qh[64] | scales[16] (int8) | d
//                  halves h = 0, 1 of 128 elements (ql + 64h, qh + 32h, scales + 8h); for
//                  l < 32, element 128h + l + 32t (t = 0..3) is
//                  q = (ql[l + 32(t&1)] >> 4(t>>1) & 15) | ((qh[l] >> 2t) & 3) << 4,
//                  v = d * scales[l / 16 + 2t] * (q - 32)   (16 sub-blocks of 16)
//
// Decode (M <= kMaxQuantSkinnyRows): every weight row is streamed once; each block is unpacked
// into float32 vectors in registers and multiplied with the M activation rows (fp32 FMA, fp32
// accumulation in 8 lanes). The per-block constant terms (the min of Q4_1 / Q4_K, the -8 and
// -32 offsets) are folded out: sum_i (a q_i + c) x_i = a (q . x) + c sum(x), with the sums of x
// over each (sub-)block computed once per call. Rows are spread over the threads in dynamic
// chunks. Results equal F.linear on the dequantized weight up to summation order.
//
// int8 activations (type | kInt8Activations = 256, for Q4_0, Q4_1, Q8_0 and M <= 8; otherwise
// the flag is ignored): llama.cpp's dot product. Each x row is quantized per 32-element block
// (xd = max|x| / 127, xq = round(x / xd), ties to even) and the weight's integer quants meet
// xq in vpmaddubsw / vpmaddwd (exact int32 sums per block), one FMA per block and row with
// d_w * xd; about 1.8x the float path's speed at one row, 1.3x at 8 (Zen 3, one thread).
// Results equal x_q @ dequant(w)^T for x_q = xq * xd, up to summation order.
//
// Prefill / batched decode (more rows): each work item dequantizes a panel of weight rows into
// a float32 scratch tile (in L2) and runs a single-threaded BLAS sgemm of all M rows against
// it, so one dequantization serves every row of x.
//
// Instruction sets: the x86 variants (x86-64-v3 and -v4 both have AVX2 + FMA) unpack blocks
// with AVX2 intrinsics (vpmovzxbd / vpmovsxbd + vcvtdq2ps: GCC scalarises
// __builtin_convertvector from bytes to floats, ~3x slower) into 8-float vectors; any other CPU
// (the per-machine build) runs `dequant_row_scalar` and a plain dot product.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "blas.h"
#include "ops.h"
#include "vec_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8, kQ4_K = 12, kQ6_K = 14, kBF16 = 30;
constexpr int kMaxQuantSkinnyRows = 8;
constexpr int64_t kInt8Activations = 256;  // a flag on the type id (see the file comment)

bool takes_int8_activations(int64_t type) {
  return type == kQ4_0 || type == kQ4_1 || type == kQ8_0;
}

struct QuantFormat {
  int64_t block_elems, block_bytes, sub_elems;  // sub_elems: the span of one x-sum (0: none)
};

QuantFormat quant_format(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18, 32};
    case kQ4_1: return {32, 20, 32};
    case kQ8_0: return {32, 34, 0};
    case kQ4_K: return {256, 144, 32};
    case kQ6_K: return {256, 210, 16};
    case kF16: case kBF16: return {1, 2, 0};
    default: break;
  }
  TORCH_CHECK(false, "gguf_linear: unsupported GGML type ", type);
  return {};
}

inline float f16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline float bf16(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

bool is_half_type(int64_t type) { return type == kF16 || type == kBF16; }

// ggml-quants.c get_scale_min_k4: 6-bit scale and min j (0..7) of a Q4_K block's scales[12].
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// The unsigned quant of element e (0..255) of a Q6_K block (the layout above).
inline int q6k_quant(const uint8_t* blk, int e) {
  const int h = e / 128, l = e % 32, t = (e % 128) / 32;
  const uint8_t* ql = blk + 64 * h;
  const uint8_t* qh = blk + 128 + 32 * h;
  return ((ql[l + 32 * (t & 1)] >> (4 * (t >> 1))) & 15) | (((qh[l] >> (2 * t)) & 3) << 4);
}

// Scalar dequantization of one row of k elements (every CPU; the reference for the vector code).
void dequant_row_scalar(int64_t type, const uint8_t* w, float* y, int64_t k) {
  const QuantFormat f = quant_format(type);
  if (is_half_type(type)) {
    for (int64_t i = 0; i < k; ++i) y[i] = type == kBF16 ? bf16(w + 2 * i) : f16(w + 2 * i);
    return;
  }
  for (int64_t b = 0; b < k / f.block_elems; ++b) {
    const uint8_t* blk = w + b * f.block_bytes;
    float* o = y + b * f.block_elems;
    if (type == kQ4_0 || type == kQ4_1) {
      const float d = f16(blk), m = type == kQ4_1 ? f16(blk + 2) : -8.f * d;
      const uint8_t* qs = blk + (type == kQ4_1 ? 4 : 2);
      for (int i = 0; i < 16; ++i) {
        o[i] = (qs[i] & 15) * d + m;
        o[i + 16] = (qs[i] >> 4) * d + m;
      }
    } else if (type == kQ8_0) {
      const float d = f16(blk);
      for (int i = 0; i < 32; ++i) o[i] = static_cast<int8_t>(blk[2 + i]) * d;
    } else if (type == kQ4_K) {
      const float d = f16(blk), dmin = f16(blk + 2);
      for (int g = 0; g < 4; ++g) {
        int sc1, m1, sc2, m2;
        scale_min_k4(2 * g, blk + 4, &sc1, &m1);
        scale_min_k4(2 * g + 1, blk + 4, &sc2, &m2);
        const uint8_t* qs = blk + 16 + 32 * g;
        for (int i = 0; i < 32; ++i) {
          o[64 * g + i] = d * sc1 * (qs[i] & 15) - dmin * m1;
          o[64 * g + 32 + i] = d * sc2 * (qs[i] >> 4) - dmin * m2;
        }
      }
    } else {  // Q6_K
      const float d = f16(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      for (int e = 0; e < 256; ++e) {
        const int h = e / 128, l = e % 32, t = (e % 128) / 32;
        o[e] = d * sc[8 * h + l / 16 + 2 * t] * (q6k_quant(blk, e) - 32);
      }
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// ---- x86 (both prebuilt variants): 8-float AVX2 vectors -------------------------------------

inline __m256 cvt_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 cvt_i8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }
inline __m128i load128(const uint8_t* p) {
  return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
}

// 16 bytes of nibbles -> lo[0..1]: the low nibbles of bytes 0..15, hi[0..1]: the high ones.
inline void nibbles(const uint8_t* qs, __m256 lo[2], __m256 hi[2]) {
  const __m128i q = load128(qs), mask = _mm_set1_epi8(15);
  const __m128i l = _mm_and_si128(q, mask), h = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
  lo[0] = cvt_u8(l);
  lo[1] = cvt_u8(_mm_srli_si128(l, 8));
  hi[0] = cvt_u8(h);
  hi[1] = cvt_u8(_mm_srli_si128(h, 8));
}

// 16 bytes (one Q6_K sub-block) -> 2 vectors of floats.
inline void widen16(__m128i q, __m256 v[2]) {
  v[0] = cvt_u8(q);
  v[1] = cvt_u8(_mm_srli_si128(q, 8));
}

// The Q6_K quants (0..63) of elements 128h + l0 + 32t + [0, 16), t = 0..3 (l0 = 0 or 16).
inline void q6k_quads(const uint8_t* ql, const uint8_t* qh, int l0, __m128i q[4]) {
  const __m128i a = load128(ql + l0), b = load128(ql + l0 + 32), h = load128(qh + l0);
  const __m128i m4 = _mm_set1_epi8(15), m2 = _mm_set1_epi8(3);
  auto hbits = [&](int shift) {  // ((h >> shift) & 3) << 4, bytewise
    return _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, shift), m2), 4);
  };
  q[0] = _mm_or_si128(_mm_and_si128(a, m4), hbits(0));
  q[1] = _mm_or_si128(_mm_and_si128(b, m4), hbits(2));
  q[2] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), m4), hbits(4));
  q[3] = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(b, 4), m4), hbits(6));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void store(float* o, __m256 v) { _mm256_storeu_ps(o, v); }
inline __m256 affine(__m256 q, float a, float c) {  // a * q + c
  return _mm256_fmadd_ps(q, _mm256_set1_ps(a), _mm256_set1_ps(c));
}

// 8 consecutive 16-bit floats (BF16: the high half of a float32; F16: F16C's vcvtph2ps).
template <bool kIsBf16>
inline __m256 load8_half(const uint8_t* p) {
  const __m128i h = load128(p);
  if constexpr (kIsBf16)
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  else
    return _mm256_cvtph_ps(h);
}

template <bool kIsBf16>
void dequant_row_half(const uint8_t* w, float* y, int64_t k) {
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) store(y + i, load8_half<kIsBf16>(w + 2 * i));
  for (; i < k; ++i) y[i] = kIsBf16 ? bf16(w + 2 * i) : f16(w + 2 * i);
}

// out[r * ldo] = x_r . w (+ b) for a row of k 16-bit floats. 32 elements per step; each x row
// keeps kChains = 4 / R (at least 1) independent accumulators so that at least four FMA chains
// are in flight (an FMA's latency is ~4 cycles, two issue per cycle).
template <int R, bool kIsBf16>
void dot_row_half(const uint8_t* w, int64_t k, const float* x, int64_t ldx, float* out,
                  int64_t ldo, float b) {
  constexpr int kChains = R >= 4 ? 1 : 4 / R;
  __m256 acc[R][kChains];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < kChains; ++c) acc[r][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    __m256 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = load8_half<kIsBf16>(w + 2 * (i + 8 * j));
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j)
        acc[r][j % kChains] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + r * ldx + i + 8 * j),
                                              acc[r][j % kChains]);
  }
  for (; i + 8 <= k; i += 8) {
    const __m256 w0 = load8_half<kIsBf16>(w + 2 * i);
    for (int r = 0; r < R; ++r)
      acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + r * ldx + i), acc[r][0]);
  }
  for (int r = 0; r < R; ++r) {
    __m256 t = acc[r][0];
    for (int c = 1; c < kChains; ++c) t = _mm256_add_ps(t, acc[r][c]);
    float s = hsum(t);
    for (int64_t j = i; j < k; ++j)
      s += (kIsBf16 ? bf16(w + 2 * j) : f16(w + 2 * j)) * x[r * ldx + j];
    out[r * ldo] = s + b;
  }
}

void dequant_row(int64_t type, const uint8_t* w, float* y, int64_t k) {
  if (type == kBF16) return dequant_row_half<true>(w, y, k);
  if (type == kF16) return dequant_row_half<false>(w, y, k);
  const QuantFormat f = quant_format(type);
  const int64_t nb = k / f.block_elems;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * f.block_bytes;
    float* o = y + b * f.block_elems;
    switch (type) {
      case kQ4_0: case kQ4_1: {
        const float d = f16(blk), m = type == kQ4_1 ? f16(blk + 2) : -8.f * d;
        __m256 lo[2], hi[2];
        nibbles(blk + (type == kQ4_1 ? 4 : 2), lo, hi);
        store(o, affine(lo[0], d, m));
        store(o + 8, affine(lo[1], d, m));
        store(o + 16, affine(hi[0], d, m));
        store(o + 24, affine(hi[1], d, m));
        break;
      }
      case kQ8_0: {
        const __m256 d = _mm256_set1_ps(f16(blk));
        for (int j = 0; j < 4; ++j)
          store(o + 8 * j, _mm256_mul_ps(cvt_i8(_mm_loadl_epi64(
                                             reinterpret_cast<const __m128i*>(blk + 2 + 8 * j))), d));
        break;
      }
      case kQ4_K: {
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int g = 0; g < 4; ++g) {
          int sc1, m1, sc2, m2;
          scale_min_k4(2 * g, blk + 4, &sc1, &m1);
          scale_min_k4(2 * g + 1, blk + 4, &sc2, &m2);
          for (int h = 0; h < 2; ++h) {
            __m256 lo[2], hi[2];
            nibbles(blk + 16 + 32 * g + 16 * h, lo, hi);
            float* e = o + 64 * g + 16 * h;
            store(e, affine(lo[0], d * sc1, -dmin * m1));
            store(e + 8, affine(lo[1], d * sc1, -dmin * m1));
            store(e + 32, affine(hi[0], d * sc2, -dmin * m2));
            store(e + 40, affine(hi[1], d * sc2, -dmin * m2));
          }
        }
        break;
      }
      case kQ6_K: {
        const float d = f16(blk + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        for (int half = 0; half < 2; ++half)
          for (int g = 0; g < 2; ++g) {
            __m128i q[4];
            q6k_quads(blk + 64 * half, blk + 128 + 32 * half, 16 * g, q);
            for (int t = 0; t < 4; ++t) {
              const float a = d * sc[8 * half + g + 2 * t];
              __m256 v[2];
              widen16(q[t], v);
              float* e = o + 128 * half + 16 * g + 32 * t;
              store(e, affine(v[0], a, -32.f * a));
              store(e + 8, affine(v[1], a, -32.f * a));
            }
          }
        break;
      }
    }
  }
}

// acc += (w[0..n) . x[0..8n)) * a for the n vectors w of 8 consecutive elements.
template <int n>
inline __m256 scaled_dot(const __m256* w, const float* x, __m256 a, __m256 acc) {
  __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
  for (int j = 1; j < n; ++j) t = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + 8 * j), t);
  return _mm256_fmadd_ps(t, a, acc);
}

// out[r * ldo] = x_r . dequant(w row) (+ b) for R rows x_r = x + r * ldx; xs + r * ldxs: the
// sums of x_r over each sub-block (QuantFormat::sub_elems) of the row.
template <int R>
void dot_row(int64_t type, const uint8_t* w, int64_t k, const float* x, int64_t ldx,
             const float* xs, int64_t ldxs, float* out, int64_t ldo, float b) {
  if (type == kBF16) return dot_row_half<R, true>(w, k, x, ldx, out, ldo, b);
  if (type == kF16) return dot_row_half<R, false>(w, k, x, ldx, out, ldo, b);
  __m256 acc[R];
  float off[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    off[r] = 0.f;
  }
  switch (type) {
    case kQ4_0: case kQ4_1: {
      const int64_t bytes = type == kQ4_1 ? 20 : 18, nb = k / 32;
      for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* blk = w + i * bytes;
        const float d = f16(blk), m = type == kQ4_1 ? f16(blk + 2) : -8.f * d;
        __m256 q[4];
        nibbles(blk + (type == kQ4_1 ? 4 : 2), q, q + 2);
        const __m256 dv = _mm256_set1_ps(d);
        for (int r = 0; r < R; ++r) {
          acc[r] = scaled_dot<4>(q, x + r * ldx + i * 32, dv, acc[r]);
          off[r] += m * xs[r * ldxs + i];
        }
      }
      break;
    }
    case kQ8_0: {
      const int64_t nb = k / 32;
      for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* blk = w + i * 34;
        const __m256 dv = _mm256_set1_ps(f16(blk));
        const __m128i a = load128(blk + 2), c = load128(blk + 18);
        const __m256 q[4] = {cvt_i8(a), cvt_i8(_mm_srli_si128(a, 8)), cvt_i8(c),
                             cvt_i8(_mm_srli_si128(c, 8))};
        for (int r = 0; r < R; ++r) acc[r] = scaled_dot<4>(q, x + r * ldx + i * 32, dv, acc[r]);
      }
      break;
    }
    case kQ4_K: {
      const int64_t nb = k / 256;
      for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* blk = w + i * 144;
        const float d = f16(blk), dmin = f16(blk + 2);
        for (int g = 0; g < 4; ++g) {
          int sc1, m1, sc2, m2;
          scale_min_k4(2 * g, blk + 4, &sc1, &m1);
          scale_min_k4(2 * g + 1, blk + 4, &sc2, &m2);
          const __m256 a1 = _mm256_set1_ps(d * sc1), a2 = _mm256_set1_ps(d * sc2);
          const float c1 = dmin * m1, c2 = dmin * m2;
          __m256 lo[4], hi[4];  // elements 64g + [0, 32) and 64g + [32, 64)
          nibbles(blk + 16 + 32 * g, lo, hi);
          nibbles(blk + 16 + 32 * g + 16, lo + 2, hi + 2);
          for (int r = 0; r < R; ++r) {
            const float* xr = x + r * ldx + i * 256 + 64 * g;
            acc[r] = scaled_dot<4>(lo, xr, a1, acc[r]);
            acc[r] = scaled_dot<4>(hi, xr + 32, a2, acc[r]);
            const float* s = xs + r * ldxs + i * 8 + 2 * g;
            off[r] -= c1 * s[0] + c2 * s[1];
          }
        }
      }
      break;
    }
    case kQ6_K: {
      const int64_t nb = k / 256;
      for (int64_t i = 0; i < nb; ++i) {
        const uint8_t* blk = w + i * 210;
        const float d = f16(blk + 208);
        const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
        for (int half = 0; half < 2; ++half)
          for (int g = 0; g < 2; ++g) {
            __m128i q[4];
            q6k_quads(blk + 64 * half, blk + 128 + 32 * half, 16 * g, q);
            for (int t = 0; t < 4; ++t) {
              const float a = d * sc[8 * half + g + 2 * t];
              const __m256 av = _mm256_set1_ps(a);
              const int64_t e = i * 256 + 128 * half + 16 * g + 32 * t;  // first element
              __m256 v[2];
              widen16(q[t], v);
              for (int r = 0; r < R; ++r) {
                acc[r] = scaled_dot<2>(v, x + r * ldx + e, av, acc[r]);
                off[r] -= 32.f * a * xs[r * ldxs + e / 16];
              }
            }
          }
      }
      break;
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]) + off[r] + b;
}

// ---- int8 activations (llama.cpp's Q8 x Q4/Q8 dot) ---------------------------------------
// out[r * ldo] = sum_i d_w,i * xd[r][i] * (q_w,i . xq_r,i) + c_w,i * xs[r][i] (+ b): x row r
// quantized per 32-element block i (xq int8, scale xd, xs = xd * sum(xq)); the weight's
// quants q (Q4: 0..15, Q8_0: -127..127) meet xq in vpmaddubsw (u8 x s8 pairs summed in int16:
// 2 * 15 * 127 and 2 * 128 * 127 fit) + vpmaddwd into int32, one FMA per block and row.
template <int R>
void dot_row_a8(int64_t type, const uint8_t* w, int64_t k, const int8_t* xq, const float* xd,
                const float* xs, float* out, int64_t ldo, float b) {
  __m256 acc[R];
  float off[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm256_setzero_ps();
    off[r] = 0.f;
  }
  const int64_t nb = k / 32;
  const __m256i ones = _mm256_set1_epi16(1);
  auto xv = [&](int r, int64_t i) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + i * 32));
  };
  if (type == kQ8_0) {
    for (int64_t i = 0; i < nb; ++i) {
      const uint8_t* blk = w + i * 34;
      const float d = f16(blk);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      const __m256i aq = _mm256_abs_epi8(q);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i sx = _mm256_sign_epi8(xv(r, i), q);  // x * sign(q): |q| . sx = q . x
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sx), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[r * nb + i]),
                                 acc[r]);
      }
    }
  } else {  // Q4_0, Q4_1
    const int64_t bytes = type == kQ4_1 ? 20 : 18;
    const __m256i low = _mm256_set1_epi8(15);
    for (int64_t i = 0; i < nb; ++i) {
      const uint8_t* blk = w + i * bytes;
      const float d = f16(blk), m = type == kQ4_1 ? f16(blk + 2) : -8.f * d;
      const __m128i q = load128(blk + (type == kQ4_1 ? 4 : 2));
      const __m256i uq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(uq, xv(r, i)), ones);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[r * nb + i]),
                                 acc[r]);
        off[r] += m * xs[r * nb + i];
      }
    }
  }
  for (int r = 0; r < R; ++r) out[r * ldo] = hsum(acc[r]) + off[r] + b;
}

#else
// ---- other CPUs (the per-machine build): the scalar reference ------------------------------

void dequant_row(int64_t type, const uint8_t* w, float* y, int64_t k) {
  dequant_row_scalar(type, w, y, k);
}

template <int R>
void dot_row(int64_t type, const uint8_t* w, int64_t k, const float* x, int64_t ldx,
             const float*, int64_t, float* out, int64_t ldo, float b) {
  thread_local std::vector<float> row;
  row.resize(k);
  dequant_row_scalar(type, w, row.data(), k);
  for (int r = 0; r < R; ++r) out[r * ldo] = sluice::dot(x + r * ldx, row.data(), k) + b;
}

// The same sums as the vector code: the weight dequantized, the activations xq * xd.
template <int R>
void dot_row_a8(int64_t type, const uint8_t* w, int64_t k, const int8_t* xq, const float* xd,
                const float*, float* out, int64_t ldo, float b) {
  thread_local std::vector<float> row;
  row.resize(k);
  dequant_row_scalar(type, w, row.data(), k);
  const int64_t nb = k / 32;
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t i = 0; i < nb; ++i) {
      float t = 0.f;
      for (int j = 0; j < 32; ++j) t += row[i * 32 + j] * xq[r * k + i * 32 + j];
      s += t * xd[r * nb + i];
    }
    out[r * ldo] = s + b;
  }
}
#endif

// f(std::integral_constant<int, R>{}) for R = m (1..kMaxQuantSkinnyRows): the row count as a
// template argument of the register-blocked kernels.
template <typename F>
void with_rows(int64_t m, F&& f) {
  switch (m) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

int64_t num_threads() { return std::max(1, omp_get_max_threads()); }

}  // namespace

int64_t gguf_block_elems(int64_t type) { return quant_format(type).block_elems; }
int64_t gguf_block_bytes(int64_t type) { return quant_format(type).block_bytes; }

namespace {
// x [m, k] (row stride ldx) per 32-element block i of row r: xd = max|x| / 127, xq = the
// nearest integer (ties to even) of x * (1 / xd), xs = xd * sum(xq); an all-zero block: 0s.
void quantize_activations(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                          float* xd, float* xs) {
  const int64_t nb = k / 32;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < nb; ++i) {
      const float* v = x + r * ldx + i * 32;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int j = 0; j < 32; ++j) {
        const int q = static_cast<int>(std::nearbyint(v[j] * inv));
        xq[r * k + i * 32 + j] = static_cast<int8_t>(q);
        sum += q;
      }
      xd[r * nb + i] = d;
      xs[r * nb + i] = d * static_cast<float>(sum);
    }
}

// w's rows as bytes: uint8 [N, row_bytes], or for F16 / BF16 also a float16 / bfloat16 [N, K]
// tensor (its 2 K bytes per row); checked against K and the type's row size.
struct WeightBytes {
  const uint8_t* data;
  int64_t ld;  // bytes between rows
};

WeightBytes check_weight(const at::Tensor& w, int64_t type, int64_t k, const char* who) {
  const QuantFormat f = quant_format(type);
  const bool half_tensor = (type == kBF16 && w.dtype() == at::kBFloat16) ||
                           (type == kF16 && w.dtype() == at::kHalf);
  TORCH_CHECK(w.dim() == 2 && (w.dtype() == at::kByte || half_tensor) && w.device().is_cpu() &&
                  w.stride(1) == 1,
              who, ": w must be a CPU uint8 [N, row_bytes] tensor with contiguous rows (or a "
              "float16 / bfloat16 [N, K] one for types 1 / 30)");
  const int64_t row_bytes = w.size(1) * w.element_size();
  TORCH_CHECK(k % f.block_elems == 0 && row_bytes == k / f.block_elems * f.block_bytes, who,
              ": K = ", k, " does not match the weight's ", row_bytes, " bytes per row of type ",
              type);
  return {static_cast<const uint8_t*>(w.data_ptr()), w.stride(0) * w.element_size()};
}
}  // namespace

void gguf_dequantize(at::Tensor out, at::Tensor w, int64_t type) {
  TORCH_CHECK(out.dim() == 2 && out.dtype() == at::kFloat && out.is_contiguous() &&
              out.device().is_cpu(), "gguf_dequantize: out must be a contiguous float32 [N, K]");
  const int64_t n = out.size(0), k = out.size(1);
  const WeightBytes wb = check_weight(w, type, k, "gguf_dequantize");
  TORCH_CHECK(w.size(0) == n, "gguf_dequantize: row count mismatch");
  const uint8_t* wp = wb.data;
  float* op = out.data_ptr<float>();
  const int64_t ldw = wb.ld;
#pragma omp parallel for schedule(dynamic, 64)
  for (int64_t r = 0; r < n; ++r) dequant_row(type, wp + r * ldw, op + r * k, k);
}

void gguf_linear(at::Tensor out, at::Tensor x, at::Tensor w, int64_t type,
                 std::optional<at::Tensor> bias) {
  const bool int8_act = (type & kInt8Activations) != 0;
  type &= ~kInt8Activations;
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2, "gguf_linear: 2-D x and out expected");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  const WeightBytes wb = check_weight(w, type, k, "gguf_linear");
  TORCH_CHECK(out.size(0) == m && out.size(1) == n, "gguf_linear: out shape mismatch");
  TORCH_CHECK(x.dtype() == at::kFloat && out.dtype() == at::kFloat,
              "gguf_linear: float32 x and out expected");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu(), "gguf_linear: CPU tensors expected");
  TORCH_CHECK(x.stride(1) == 1 && out.is_contiguous(),
              "gguf_linear: rows of x must be contiguous, out contiguous");
  TORCH_CHECK(std::max({m, n, k, x.stride(0)}) < INT_MAX,
              "gguf_linear: dimensions exceed BLAS int range");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "gguf_linear: bias must be a contiguous float32 [N]");
    bp = bias->data_ptr<float>();
  }
  if (m == 0 || n == 0) return;
  const uint8_t* wp = wb.data;
  const int64_t ldw = wb.ld, ldx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t threads = num_threads();

  // decode (m <= kMaxQuantSkinnyRows): output channels spread over the threads in chunks
  const int64_t chunk = std::clamp<int64_t>(n / (8 * threads), 4, 64);
  if (m <= kMaxQuantSkinnyRows && int8_act && takes_int8_activations(type)) {
    const int64_t nb = k / 32;
    std::vector<int8_t> xq(m * k);
    std::vector<float> xd(m * nb), xs(m * nb);
    quantize_activations(xp, ldx, m, k, xq.data(), xd.data(), xs.data());
    with_rows(m, [&](auto rows) {
#pragma omp parallel for schedule(dynamic, chunk)
      for (int64_t c = 0; c < n; ++c)
        dot_row_a8<decltype(rows)::value>(type, wp + c * ldw, k, xq.data(), xd.data(), xs.data(),
                                          op + c, n, bp != nullptr ? bp[c] : 0.f);
    });
    return;
  }

  if (m <= kMaxQuantSkinnyRows) {
    const QuantFormat f = quant_format(type);
    // sums of each x row over the weight's sub-blocks (for the folded constant terms)
    const int64_t subs = f.sub_elems > 0 ? k / f.sub_elems : 0;
    std::vector<float> xs(std::max<int64_t>(1, m * subs));
    for (int64_t r = 0; r < m; ++r)
      for (int64_t s = 0; s < subs; ++s)
        xs[r * subs + s] = sluice::sum(xp + r * ldx + s * f.sub_elems, f.sub_elems);
    with_rows(m, [&](auto rows) {
#pragma omp parallel for schedule(dynamic, chunk)
      for (int64_t c = 0; c < n; ++c)
        dot_row<decltype(rows)::value>(type, wp + c * ldw, k, xp, ldx, xs.data(), subs, op + c,
                                       n, bp != nullptr ? bp[c] : 0.f);
    });
    return;
  }

  // Panels of nt weight rows, dequantized into a per-thread scratch tile (nt x k floats, kept
  // in L2: at most ~256 KiB), then one sgemm of all m rows against it.
  int64_t nt = std::clamp<int64_t>(n / (4 * threads), 16, 128);
  nt = std::max<int64_t>(8, std::min<int64_t>(nt, (64 * 1024) / std::max<int64_t>(1, k)) / 8 * 8);
  const int64_t panels = (n + nt - 1) / nt;
  const int ik = static_cast<int>(k), ildx = static_cast<int>(ldx), ldo = static_cast<int>(n);
  const float one = 1.f, zero = 0.f;
#pragma omp parallel
  {
    std::vector<float> tile(nt * k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * nt;
      const int tn = static_cast<int>(std::min(n, n0 + nt) - n0);
      for (int r = 0; r < tn; ++r) dequant_row(type, wp + (n0 + r) * ldw, tile.data() + r * k, k);
      float* c = op + n0;
      if (bp != nullptr)
        for (int64_t r = 0; r < m; ++r) std::copy(bp + n0, bp + n0 + tn, c + r * n);
      const int im = static_cast<int>(m);
      sgemm_("T", "N", &tn, &im, &ik, &one, tile.data(), &ik, xp, &ildx,
             bp != nullptr ? &one : &zero, c, &ldo);
    }
  }
}
