// Linear layers over GGUF (llama.cpp) block-quantized weights, dequantized on the fly.
//
//   gguf_linear(out, x, w, type, bias):  out[M, N] = x[M, K] @ dequant(w)[N, K]^T (+ bias[N])
//                                        (type | 256: x quantized to int8 first for up to 8
//                                        rows; type | 512: bf16 products for more; see below;
//                                        type | 256 | 1024: w in vnni_linear.cpp's packed
//                                        layout, int8 x at every M on AVX2 / AVX512-VNNI)
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
//   Q5_0 (type 6)  32 elems, 22 B: d | qh[4] | qs[16]  v = d * (q_i - 16)
//   Q5_1 (type 7)  32 elems, 24 B: d | m | qh[4] | qs[16]   v = d * q_i + m
//                  q_i = Q4_0's nibble q_i | (bit i of the little-endian uint32 qh) << 4
//   Q8_0 (type 8)  32 elems, 34 B: d | qs[32] (int8)   v = d * qs[i]
//   Q4_K (type 12) 256 elems, 144 B: d | dmin | scales[12] | qs[128]
//                  8 sub-blocks of 32 with 6-bit scale sc_j and min m_j packed in scales
//                  (get_scale_min_k4); group g = 0..3 covers elements 64g..64g+63 from
//                  qs[32g..32g+31]: low nibbles sub-block 2g, high nibbles sub-block 2g + 1;
//                  v = d * sc_j * q - dmin * m_j
//   Q5_K (type 13) 256 elems, 176 B: d | dmin | scales[12] | qh[32] | qs[128]
//                  as Q4_K, each quant q (0..31) with a fifth bit: element 64g + i (i < 32)
//                  is (qs[32g + i] & 15) | ((qh[i] >> 2g) & 1) << 4, element 64g + 32 + i
//                  (qs[32g + i] >> 4) | ((qh[i] >> (2g + 1)) & 1) << 4
//   F8_E4M3 (type 200, sluice's own: no GGML type) 32 elems, 36 B: d (IEEE float32) |
//                  qs[32] (float8_e4m3fn)      v = d * e4m3(qs[i])
//                  (an FP8 checkpoint's weights, `sluice.model.fp8_checkpoint`; float
//                  activations only: the int8 flag is ignored)
//   F16 (type 1), BF16 (type 30)  1 elem, 2 B: the value as IEEE fp16 / bfloat16 (a float
//                  weight stored in 16 bits; `w` may also be a float16 / bfloat16 [N, K]
//                  tensor, read as its bytes)
//   IQ4_NL (type 20) 32 elems, 18 B: d | qs[16]       v = d * kvalues_iq4nl[q_i], q_i as Q4_0's
//                  (a 16-entry int8 codebook)
//   Q2_K (type 10) 256 elems, 84 B: scales[16] | qs[64] | d | dmin
//                  element 128h + 32j + i (i < 32): q = qs[32h + i] >> 2j & 3, v =
//                  d * (sc & 15) * q - dmin * (sc >> 4), sc = scales[8h + 2j + i / 16]
//   Q3_K (type 11) 256 elems, 110 B: hmask[32] | qs[64] | scales[12] | d
//                  element 128h + 32j + i (i < 32): q = (qs[32h + i] >> 2j & 3) |
//                  (hmask[i] >> (4h + j) & 1) << 2, v = d * (sc_s - 32) * (q - 4) for its
//                  16-value sub-block s = 8h + 2j + i / 16, sc_s = (scales[s % 8] >> 4 (s / 8)
//                  & 15) | (scales[8 + s % 4] >> 2 (s / 4) & 3) << 4
//   IQ4_XS (type 23) 256 elems, 136 B: d | scales_h (uint16) | scales_l[4] | qs[128]
//                  sub-block j of 32: ls_j = (scales_l[j / 2] >> 4 (j % 2) & 15) |
//                  (scales_h >> 2j & 3) << 4, its values IQ4_NL's from qs + 16 j with
//                  d * (ls_j - 32) for d
//                  (Q2_K, Q3_K, IQ4_NL and IQ4_XS have no decode kernels of their own here:
//                  a weight not in vnni_linear.cpp's packed layout runs the panel path below
//                  at every M; int8 activations, M <= 8, quantize its copy of x)
//   Q6_K (type 14) 256 elems, 210 B: ql[128] | qh[64] | scales[16] (int8) | d
//                  halves h = 0, 1 of 128 elements (ql + 64h, qh + 32h, scales + 8h); for
//                  l < 32, element 128h + l + 32t (t = 0..3) is
//                  q = (ql[l + 32(t&1)] >> 4(t>>1) & 15) | ((qh[l] >> 2t) & 3) << 4,
//                  v = d * scales[l / 16 + 2t] * (q - 32)   (16 sub-blocks of 16)
//
// Decode (M <= kMaxQuantSkinnyRows): every weight row is streamed once, in panels of NW
// consecutive rows per kernel call (NW = 4 for M = 1, 2 for M = 2..3, else 1: panel_rows; the
// last N % NW rows as panels of one), each panel with one accumulator per (x row, weight row)
// pair so that several FMA chains are in flight. Each block is unpacked into float32 vectors in
// registers and multiplied with the M activation rows (fp32 FMA, fp32 accumulation). The
// per-block constant terms (the min of Q4_1 / Q4_K, the -8 and -32 offsets) are folded out:
// sum_i (a q_i + c) x_i = a (q . x) + c sum(x), with the sums of x over each (sub-)block computed
// once per call. As it reads block i of its rows, a kernel prefetches block i of the rows
// prefetch_rows(ldw) ahead (~kPrefetchBytes = 4 KiB; clamped to the tensor's last rows): the
// hardware prefetchers stop at 4 KiB pages and out-of-order execution alone keeps too few cache
// misses in flight (~6 GB/s from memory without). Panels are spread over the threads in dynamic
// chunks (for_panels). Results equal F.linear on the dequantized weight up to summation order.
//
// int8 activations (type | kInt8Activations = 256, for every block type above and M <= 8;
// otherwise the flag is ignored): llama.cpp's dot product. Each x row is quantized per
// 32-element block (xd = max|x| / 127, xq = round(x / xd), ties to even) and the weight's
// integer quants meet xq in vpmaddubsw / vpmaddwd (exact int32 sums per block), one FMA per
// block, x row and weight row with d_w * xd; panels and prefetch as above. Results equal x_q @ dequant(w)^T for
// x_q = xq * xd, up to summation order.
//
// Prefill / batched decode (more rows): each work item dequantizes a panel of weight rows into
// a float32 scratch tile (in L2) and runs a single-threaded BLAS sgemm of all M rows against
// it, so one dequantization serves every row of x. With bf16 products (type | kBf16Products =
// 512) x and the weight are rounded to bf16 first (round to nearest even; float32 sums): on a
// CPU with AMX-BF16 amx::bf16_linear (amx_gemm.cpp) computes that product on tiles, elsewhere
// the rounded values go through the same sgemm, so results agree across CPUs up to summation
// order.
//
// Instruction sets: the x86 variants (x86-64-v3 and -v4 both have AVX2 + FMA) unpack blocks
// with AVX2 intrinsics (vpmovzxbd / vpmovsxbd + vcvtdq2ps: GCC scalarises
// __builtin_convertvector from bytes to floats, ~3x slower) into 8-float vectors; x86-64-v4
// (AVX-512 F/BW, no VNNI) runs the float decode of Q4_0 / Q4_1 / Q8_0 in 16-float vectors
// (dot_rows_q4q8_512). Any other CPU (the per-machine build) runs `dequant_row_scalar` and a
// plain dot product.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "act_quant.h"
#include "blas.h"
#include "fp8_rows.h"
#include "gguf_codebook.h"
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

constexpr int64_t kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ2_K = 10,
                  kQ3_K = 11, kQ4_K = 12,
                  kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kBF16 = 30,
                  kF8E4M3 = 200;
constexpr int kMaxQuantSkinnyRows = 8;
using sluice::kIq4nlValues;  // gguf_codebook.h
// the types only the panel path (and vnni_linear.cpp's packed kernel) runs
constexpr bool panel_only_type(int64_t type) {
  return type == kQ2_K || type == kQ3_K || type == kIQ4_NL || type == kIQ4_XS;
}
constexpr int64_t kInt8Activations = 256;  // a flag on the type id (see the file comment)
constexpr int64_t kBf16Products = 512;     // another: more rows may run amx::bf16_linear
constexpr int64_t kVnniPacked = 1024;      // vnni_linear.cpp's packed layout: every M

bool takes_int8_activations(int64_t type) {  // every block type but F8_E4M3; not F16 / BF16
  return type != kF16 && type != kBF16 && type != kF8E4M3;
}

// Bytes before a Q4_0 / Q4_1 / Q5_0 / Q5_1 block's quants (qh, qs): d, and m for _1 types.
constexpr int64_t legacy_header(int64_t type) { return type == kQ4_1 || type == kQ5_1 ? 4 : 2; }

// A Q4_K / Q5_K block's quants qs and Q5_K's fifth bits qh (nullptr for Q4_K).
inline void k_quants(int64_t type, const uint8_t* blk, const uint8_t** qs, const uint8_t** qh) {
  *qh = type == kQ5_K ? blk + 16 : nullptr;
  *qs = blk + (type == kQ5_K ? 48 : 16);
}

struct QuantFormat {
  int64_t block_elems, block_bytes, sub_elems;  // sub_elems: the span of one x-sum (0: none)
};

QuantFormat quant_format(int64_t type) {
  switch (type) {
    case kQ4_0: return {32, 18, 32};
    case kQ4_1: return {32, 20, 32};
    case kQ5_0: return {32, 22, 32};
    case kQ5_1: return {32, 24, 32};
    case kQ8_0: return {32, 34, 0};
    case kF8E4M3: return {32, 36, 0};
    case kQ4_K: return {256, 144, 32};
    case kQ5_K: return {256, 176, 32};
    case kQ6_K: return {256, 210, 16};
    case kIQ4_NL: return {32, 18, 0};
    case kIQ4_XS: return {256, 136, 0};
    case kQ3_K: return {256, 110, 0};
    case kQ2_K: return {256, 84, 0};
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

inline float f32(const uint8_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

// An F8_E4M3 block's d times kFp8Unit: its `_units` loads (fp8_rows.h) give value / 256, so
// (256 d) * (value / 256) is d * value exactly (both factors exact: powers of two).
inline float f8_block_scale(const uint8_t* blk) {
  return f32(blk) * sluice::kFp8Unit<c10::Float8_e4m3fn>;
}
inline const c10::Float8_e4m3fn* f8_quants(const uint8_t* blk) {
  return reinterpret_cast<const c10::Float8_e4m3fn*>(blk + 4);
}

// v[i] = the float32 value of bf16(v[i]) (round to nearest even): bf16 products without AMX.
void round_to_bf16(float* v, int64_t count) {
  for (int64_t i = 0; i < count; ++i) v[i] = static_cast<float>(c10::BFloat16(v[i]));
}

// A panel of NW consecutive weight rows for the decode kernels (dot_rows, dot_rows_a8): weight
// row j (j < NW) at w + j * ldw; its outputs for x row r go to out[r * ldo + j]; bias: bias[j]
// (nullptr: none). pf: the same panel some rows later (row stride ldw), whose bytes the kernel
// prefetches as it reads w's: rows beyond the tensor's last are never addressed.
struct RowPanel {
  const uint8_t* w;
  int64_t ldw;
  const uint8_t* pf;
  float* out;
  int64_t ldo;
  const float* bias;
};

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
    } else if (type == kQ5_0 || type == kQ5_1) {
      const float d = f16(blk), m = type == kQ5_1 ? f16(blk + 2) : -16.f * d;
      const uint8_t* qh = blk + legacy_header(type);
      uint32_t bits;
      std::memcpy(&bits, qh, 4);
      for (int i = 0; i < 16; ++i) {
        o[i] = ((qh[4 + i] & 15) | ((bits >> i) & 1) << 4) * d + m;
        o[i + 16] = ((qh[4 + i] >> 4) | ((bits >> (i + 16)) & 1) << 4) * d + m;
      }
    } else if (type == kQ8_0) {
      const float d = f16(blk);
      for (int i = 0; i < 32; ++i) o[i] = static_cast<int8_t>(blk[2 + i]) * d;
    } else if (type == kF8E4M3) {
      const float d = f32(blk);
      for (int i = 0; i < 32; ++i) o[i] = d * static_cast<float>(f8_quants(blk)[i]);
    } else if (type == kIQ4_NL) {
      const float d = f16(blk);
      for (int i = 0; i < 16; ++i) {
        o[i] = d * kIq4nlValues[blk[2 + i] & 15];
        o[i + 16] = d * kIq4nlValues[blk[2 + i] >> 4];
      }
    } else if (type == kQ2_K || type == kQ3_K) {
      // 16-value sub-block s = 8h + 2j + i / 16 holds elements 128h + 32j + i (file comment)
      const bool q3 = type == kQ3_K;
      const float d = f16(blk + (q3 ? 108 : 80)), dmin = q3 ? 0.f : f16(blk + 82);
      const uint8_t* qs = blk + (q3 ? 32 : 16);
      for (int s = 0; s < 16; ++s) {
        const int h = s / 8, j = (s % 8) / 2, i0 = 16 * (s % 2);
        float dl, ml = 0.f;
        if (q3) {
          dl = d * static_cast<float>((((blk[96 + s % 8] >> (4 * (s / 8))) & 15) |
                                       ((blk[104 + s % 4] >> (2 * (s / 4))) & 3) << 4) - 32);
        } else {
          dl = d * static_cast<float>(blk[s] & 15);
          ml = dmin * static_cast<float>(blk[s] >> 4);
        }
        for (int i = i0; i < i0 + 16; ++i) {
          int q = (qs[32 * h + i] >> (2 * j)) & 3;
          if (q3) q = (q | ((blk[i] >> (4 * h + j)) & 1) << 2) - 4;
          o[128 * h + 32 * j + i] = q3 ? dl * static_cast<float>(q)
                                       : dl * static_cast<float>(q) - ml;
        }
      }
    } else if (type == kIQ4_XS) {
      const float d = f16(blk);
      uint16_t high;
      std::memcpy(&high, blk + 2, 2);
      for (int j = 0; j < 8; ++j) {
        const int ls = ((blk[4 + j / 2] >> (4 * (j % 2))) & 15) | ((high >> (2 * j)) & 3) << 4;
        const float dl = d * static_cast<float>(ls - 32);
        const uint8_t* qs = blk + 8 + 16 * j;
        for (int i = 0; i < 16; ++i) {
          o[32 * j + i] = dl * kIq4nlValues[qs[i] & 15];
          o[32 * j + 16 + i] = dl * kIq4nlValues[qs[i] >> 4];
        }
      }
    } else if (type == kQ4_K || type == kQ5_K) {
      const float d = f16(blk), dmin = f16(blk + 2);
      const uint8_t *quants, *qh;
      k_quants(type, blk, &quants, &qh);
      for (int g = 0; g < 4; ++g) {
        int sc1, m1, sc2, m2;
        scale_min_k4(2 * g, blk + 4, &sc1, &m1);
        scale_min_k4(2 * g + 1, blk + 4, &sc2, &m2);
        const uint8_t* qs = quants + 32 * g;
        for (int i = 0; i < 32; ++i) {
          const int h1 = qh != nullptr ? ((qh[i] >> (2 * g)) & 1) << 4 : 0;
          const int h2 = qh != nullptr ? ((qh[i] >> (2 * g + 1)) & 1) << 4 : 0;
          o[64 * g + i] = d * sc1 * ((qs[i] & 15) | h1) - dmin * m1;
          o[64 * g + 32 + i] = d * sc2 * ((qs[i] >> 4) | h2) - dmin * m2;
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

// 16 bytes (one Q6_K sub-block; 16 unpacked quants of the other types) -> 2 vectors of floats.
inline void widen16(__m128i q, __m256 v[2]) {
  v[0] = cvt_u8(q);
  v[1] = cvt_u8(_mm_srli_si128(q, 8));
}

// Q5_0 / Q5_1: the 32 values (0..31) of a block as bytes, from its qh (4 bytes: bit i is value
// i's fifth bit) and the qs (16 bytes) after it: bytes 0..15 of the result elements 0..15 (the
// low nibbles), bytes 16..31 elements 16..31 (the high ones). Each 128-bit lane spreads two
// bytes of qh over its 16 bytes (vpshufb), picks bit j % 8 of byte j and turns it into 0x10.
inline __m256i legacy5_bytes(const uint8_t* qh) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(bits)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                       3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i fifth = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                                         _mm256_set1_epi8(0x10));
  const __m128i q = load128(qh + 4);
  const __m256i nibbles = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q),
                                           _mm256_set1_epi8(15));
  return _mm256_or_si256(nibbles, fifth);
}

// The same values as floats: lo[0..1] elements 0..15, hi[0..1] 16..31 (as `nibbles`).
inline void legacy5(const uint8_t* qh, __m256 lo[2], __m256 hi[2]) {
  const __m256i both = legacy5_bytes(qh);
  widen16(_mm256_castsi256_si128(both), lo);
  widen16(_mm256_extracti128_si256(both, 1), hi);
}

// Q4_K / Q5_K group g's 16 bytes of nibbles at qs as bytes: *l the low nibbles (sub-block 2g),
// *u the high ones (sub-block 2g + 1); Q5_K (qh not nullptr) adds the fifth bits, bit 2g
// (low) and 2g + 1 (high) of the 16 bytes at qh: values 0..15, or 0..31.
inline void k_bytes(const uint8_t* qs, const uint8_t* qh, int g, __m128i* l, __m128i* u) {
  const __m128i q = load128(qs), mask = _mm_set1_epi8(15);
  *l = _mm_and_si128(q, mask);
  *u = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
  if (qh != nullptr) {
    // a 16-bit shift moves bits across bytes, but only bit 0 of each byte is kept before << 4
    const __m128i h = load128(qh), one = _mm_set1_epi8(1);
    *l = _mm_or_si128(*l, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 2 * g), one), 4));
    *u = _mm_or_si128(*u, _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 2 * g + 1), one), 4));
  }
}

// The same as floats for bytes 16h .. 16h + 15 (h = 0, 1) of group g: lo[0..1], hi[0..1] as
// `nibbles` gives them; qs points at group g's 32 bytes, qh at the block's fifth bits.
inline void k_nibbles(const uint8_t* qs, const uint8_t* qh, int g, int h, __m256 lo[2],
                      __m256 hi[2]) {
  __m128i l, u;
  k_bytes(qs + 16 * h, qh == nullptr ? nullptr : qh + 16 * h, g, &l, &u);
  widen16(l, lo);
  widen16(u, hi);
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

// The fp16 at p (F16C: exact, as f16() but one instruction).
inline float f16c(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return _cvtsh_ss(bits);
}

// The scale d and the per-element constant m of a Q4_0 / Q4_1 / Q5_0 / Q5_1 block
// (v = d * q + m).
inline void q4_scale_min(int64_t type, const uint8_t* blk, float* d, float* m) {
  *d = f16c(blk);
  *m = type == kQ4_1 || type == kQ5_1 ? f16c(blk + 2)
       : type == kQ5_0 ? -16.f * *d : -8.f * *d;
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
  if (panel_only_type(type)) return dequant_row_scalar(type, w, y, k);  // the panel path's only
  if (type == kBF16) return dequant_row_half<true>(w, y, k);
  if (type == kF16) return dequant_row_half<false>(w, y, k);
  const QuantFormat f = quant_format(type);
  const int64_t nb = k / f.block_elems;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + b * f.block_bytes;
    float* o = y + b * f.block_elems;
    switch (type) {
      case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1: {
        float d, m;
        q4_scale_min(type, blk, &d, &m);
        __m256 lo[2], hi[2];
        if (type == kQ5_0 || type == kQ5_1)
          legacy5(blk + legacy_header(type), lo, hi);
        else
          nibbles(blk + legacy_header(type), lo, hi);
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
      case kF8E4M3: {
        const __m256 d = _mm256_set1_ps(f8_block_scale(blk));
        for (int j = 0; j < 4; ++j)
          store(o + 8 * j, _mm256_mul_ps(sluice::widen8_fp8_units(f8_quants(blk) + 8 * j), d));
        break;
      }
      case kQ4_K: case kQ5_K: {
        const float d = f16(blk), dmin = f16(blk + 2);
        const uint8_t *qs, *qh;
        k_quants(type, blk, &qs, &qh);
        for (int g = 0; g < 4; ++g) {
          int sc1, m1, sc2, m2;
          scale_min_k4(2 * g, blk + 4, &sc1, &m1);
          scale_min_k4(2 * g + 1, blk + 4, &sc2, &m2);
          for (int h = 0; h < 2; ++h) {
            __m256 lo[2], hi[2];
            k_nibbles(qs + 32 * g, qh, g, h, lo, hi);
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


// Hints the cache lines of [p, p + bytes) into L1 (never faults). __builtin_prefetch: GCC 12
// dropped every _mm_prefetch of these kernels.
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}


// body(i, j, blk) for block i (0 .. nb - 1, outer) of the panel's weight rows j (0 .. NW - 1,
// inner; blk = p.w + j * p.ldw + i * bytes), prefetching the same block of the later panel
// p.pf. Unrolled over j so that the callers' acc[r][j] arrays stay in registers.
template <int NW, typename F>
__attribute__((always_inline)) inline void for_blocks(const RowPanel& p, int64_t nb,
                                                      int64_t bytes, F&& body) {
  for (int64_t i = 0; i < nb; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NW; ++j) {
      prefetch(p.pf + j * p.ldw + i * bytes, bytes);
      body(i, j, p.w + j * p.ldw + i * bytes);
    }
  }
}

// Forces a kernel's per-block lambda inline into for_blocks (else acc[r][j] lives in memory).
#define SLUICE_INLINE __attribute__((always_inline))

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- x86-64-v4: the Q4_0 / Q4_1 / Q8_0 float path in 16-float vectors ---------------------
inline __m512 cvt16_u8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v)); }
inline __m512 cvt16_i8(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

// dot_rows for Q4_0, Q4_1, Q8_0 and F8_E4M3 (its contract; kType the type): block i unpacked
// into two vectors w[0] = elements 0..15, w[1] = 16..31; acc[r][j] += (w[0] . x + w[1] . x') *
// d (F8_E4M3: the quants in units of 2^-8, d times 256).
template <int R, int NW, int64_t kType>
void dot_rows_q4q8_512(const RowPanel& p, int64_t k, const float* x, int64_t ldx,
                       const float* xs, int64_t ldxs) {
  __m512 acc[R][NW] = {};  // per (x row, weight row) pair, zeroed
  float off[R][NW] = {};
  const __m128i low = _mm_set1_epi8(15);
  for_blocks<NW>(p, k / 32, quant_format(kType).block_bytes,
                 [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
    float d, m = 0.f;
    __m512 w[2];
    if constexpr (kType == kQ8_0) {
      d = f16c(blk);
      w[0] = cvt16_i8(load128(blk + 2));
      w[1] = cvt16_i8(load128(blk + 18));
    } else if constexpr (kType == kF8E4M3) {
      d = f8_block_scale(blk);
      w[0] = sluice::widen16_fp8_units(f8_quants(blk));
      w[1] = sluice::widen16_fp8_units(f8_quants(blk) + 16);
    } else {
      q4_scale_min(kType, blk, &d, &m);
      const __m128i q = load128(blk + (kType == kQ4_1 ? 4 : 2));
      w[0] = cvt16_u8(_mm_and_si128(q, low));
      w[1] = cvt16_u8(_mm_and_si128(_mm_srli_epi16(q, 4), low));
    }
    const __m512 dv = _mm512_set1_ps(d);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + i * 32;
      const __m512 t = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16),
                                       _mm512_mul_ps(w[0], _mm512_loadu_ps(xr)));
      acc[r][j] = _mm512_fmadd_ps(t, dv, acc[r][j]);
      if constexpr (kType != kQ8_0 && kType != kF8E4M3) off[r][j] += m * xs[r * ldxs + i];
    }
  });
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NW; ++j)
      p.out[r * p.ldo + j] = _mm512_reduce_add_ps(acc[r][j]) + off[r][j] +
                             (p.bias != nullptr ? p.bias[j] : 0.f);
}

void dequant_row(int64_t type, const uint8_t* w, float* y, int64_t k);

// A weight row (k values, a multiple of 32) as bf16 (round to nearest even) for
// amx::bf16_linear, values 32c..32c+31 at y + c * step: Q4_0 / Q4_1 / Q8_0 blocks unpacked as dot_rows_q4q8_512 does (the values
// of dequant_row, bit for bit, then rounded), other types through dequant_row's float32.
__attribute__((target("avx512bf16,avx512f,avx512bw"))) inline void store32(uint16_t* dst,
                                                                           __m512 lo, __m512 hi) {
  _mm512_storeu_si512(dst, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
}

__attribute__((target("avx512bf16,avx512f,avx512bw"))) void dequant_row_bf16(
    int64_t type, const uint8_t* w, uint16_t* y, int64_t step, int64_t k) {
  const int64_t nb = k / 32;
  const __m128i low = _mm_set1_epi8(15);
  if (type == kQ8_0) {
    for (int64_t i = 0; i < nb; ++i) {
      const uint8_t* blk = w + i * 34;
      const __m512 d = _mm512_set1_ps(f16c(blk));
      store32(y + i * step, _mm512_mul_ps(cvt16_i8(load128(blk + 2)), d),
              _mm512_mul_ps(cvt16_i8(load128(blk + 18)), d));
    }
  } else if (type == kQ4_0 || type == kQ4_1) {
    const int64_t bytes = quant_format(type).block_bytes, qs = type == kQ4_1 ? 4 : 2;
    for (int64_t i = 0; i < nb; ++i) {
      const uint8_t* blk = w + i * bytes;
      float d, m;
      q4_scale_min(type, blk, &d, &m);
      const __m512 dv = _mm512_set1_ps(d), mv = _mm512_set1_ps(m);
      const __m128i q = load128(blk + qs);
      store32(y + i * step, _mm512_fmadd_ps(cvt16_u8(_mm_and_si128(q, low)), dv, mv),
              _mm512_fmadd_ps(cvt16_u8(_mm_and_si128(_mm_srli_epi16(q, 4), low)), dv, mv));
    }
  } else {
    thread_local std::vector<float> row;
    row.resize(k);
    dequant_row(type, w, row.data(), k);
    for (int64_t i = 0; i < nb; ++i)
      store32(y + i * step, _mm512_loadu_ps(row.data() + i * 32),
              _mm512_loadu_ps(row.data() + i * 32 + 16));
  }
}
#else
void dequant_row_bf16(int64_t, const uint8_t*, uint16_t*, int64_t, int64_t) {}  // amx::bf16_linear's
#endif                                                                  // only, never called

// out[r * ldo + j] = x_r . dequant(w_j) (+ bias[j]) for R rows x_r = x + r * ldx and the NW
// weight rows w_j of the panel; xs + r * ldxs: the sums of x_r over each sub-block
// (QuantFormat::sub_elems). Each (r, j) pair has its own accumulator (R x NW chains); blocks
// are read and prefetched by for_blocks.
template <int R, int NW>
void dot_rows(int64_t type, const RowPanel& p, int64_t k, const float* x, int64_t ldx,
              const float* xs, int64_t ldxs) {
  if (is_half_type(type)) {
    for (int j = 0; j < NW; ++j) {
      const float b = p.bias != nullptr ? p.bias[j] : 0.f;
      if (type == kBF16)
        dot_row_half<R, true>(p.w + j * p.ldw, k, x, ldx, p.out + j, p.ldo, b);
      else
        dot_row_half<R, false>(p.w + j * p.ldw, k, x, ldx, p.out + j, p.ldo, b);
    }
    return;
  }
#if defined(__AVX512F__) && defined(__AVX512BW__)
  switch (type) {
    case kQ4_0: return dot_rows_q4q8_512<R, NW, kQ4_0>(p, k, x, ldx, xs, ldxs);
    case kQ4_1: return dot_rows_q4q8_512<R, NW, kQ4_1>(p, k, x, ldx, xs, ldxs);
    case kQ8_0: return dot_rows_q4q8_512<R, NW, kQ8_0>(p, k, x, ldx, xs, ldxs);
    case kF8E4M3: return dot_rows_q4q8_512<R, NW, kF8E4M3>(p, k, x, ldx, xs, ldxs);
    default: break;
  }
#endif
  __m256 acc[R][NW] = {};  // per (x row, weight row) pair, zeroed
  float off[R][NW] = {};
  const QuantFormat f = quant_format(type);
  const int64_t nb = k / f.block_elems, bytes = f.block_bytes;
  switch (type) {
    case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1:
      for_blocks<NW>(p, nb, bytes, [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
        float d, m;
        q4_scale_min(type, blk, &d, &m);
        __m256 q[4];
        const uint8_t* qs = blk + legacy_header(type);
        if (type == kQ5_0 || type == kQ5_1)
          legacy5(qs, q, q + 2);
        else
          nibbles(qs, q, q + 2);
        const __m256 dv = _mm256_set1_ps(d);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          acc[r][j] = scaled_dot<4>(q, x + r * ldx + i * 32, dv, acc[r][j]);
          off[r][j] += m * xs[r * ldxs + i];
        }
      });
      break;
    case kQ8_0:
      for_blocks<NW>(p, nb, bytes, [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
        const __m256 dv = _mm256_set1_ps(f16c(blk));
        const __m128i a = load128(blk + 2), c = load128(blk + 18);
        const __m256 q[4] = {cvt_i8(a), cvt_i8(_mm_srli_si128(a, 8)), cvt_i8(c),
                             cvt_i8(_mm_srli_si128(c, 8))};
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          acc[r][j] = scaled_dot<4>(q, x + r * ldx + i * 32, dv, acc[r][j]);
      });
      break;
    case kF8E4M3:
      for_blocks<NW>(p, nb, bytes, [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
        const __m256 dv = _mm256_set1_ps(f8_block_scale(blk));
        const c10::Float8_e4m3fn* qs = f8_quants(blk);
        const __m256 q[4] = {sluice::widen8_fp8_units(qs), sluice::widen8_fp8_units(qs + 8),
                             sluice::widen8_fp8_units(qs + 16),
                             sluice::widen8_fp8_units(qs + 24)};
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
          acc[r][j] = scaled_dot<4>(q, x + r * ldx + i * 32, dv, acc[r][j]);
      });
      break;
    case kQ4_K: case kQ5_K:
      for_blocks<NW>(p, nb, bytes, [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
        const float d = f16c(blk), dmin = f16c(blk + 2);
        const uint8_t *qs, *qh;
        k_quants(type, blk, &qs, &qh);
        for (int g = 0; g < 4; ++g) {
          int sc1, m1, sc2, m2;
          scale_min_k4(2 * g, blk + 4, &sc1, &m1);
          scale_min_k4(2 * g + 1, blk + 4, &sc2, &m2);
          const __m256 a1 = _mm256_set1_ps(d * sc1), a2 = _mm256_set1_ps(d * sc2);
          const float c1 = dmin * m1, c2 = dmin * m2;
          __m256 lo[4], hi[4];  // elements 64g + [0, 32) and 64g + [32, 64)
          k_nibbles(qs + 32 * g, qh, g, 0, lo, hi);
          k_nibbles(qs + 32 * g, qh, g, 1, lo + 2, hi + 2);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const float* xr = x + r * ldx + i * 256 + 64 * g;
            acc[r][j] = scaled_dot<4>(lo, xr, a1, acc[r][j]);
            acc[r][j] = scaled_dot<4>(hi, xr + 32, a2, acc[r][j]);
            const float* s = xs + r * ldxs + i * 8 + 2 * g;
            off[r][j] -= c1 * s[0] + c2 * s[1];
          }
        }
      });
      break;
    case kQ6_K:
      for_blocks<NW>(p, nb, bytes, [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
        const float d = f16c(blk + 208);
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
#pragma GCC unroll 8
              for (int r = 0; r < R; ++r) {
                acc[r][j] = scaled_dot<2>(v, x + r * ldx + e, av, acc[r][j]);
                off[r][j] -= 32.f * a * xs[r * ldxs + e / 16];
              }
            }
          }
      });
      break;
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NW; ++j)
      p.out[r * p.ldo + j] = hsum(acc[r][j]) + off[r][j] + (p.bias != nullptr ? p.bias[j] : 0.f);
}

// ---- int8 activations (llama.cpp's Q8 x Q4/Q8 dot) ---------------------------------------
// out[r * ldo + j] = sum_i d_j,i * xd[r][i] * (q_j,i . xq_r,i) + c_j,i * xs[r][i] (+ bias[j]):
// x row r quantized per 32-element block i (xq int8, scale xd, xs = xd * sum(xq)); the quants
// q of weight row j (Q4: 0..15, Q8_0: -127..127) meet xq in vpmaddubsw (u8 x s8 pairs summed
// in int16: 2 * 31 * 127 and 2 * 128 * 127 fit) + vpmaddwd into int32, one FMA per block, row
// and weight row; R x NW accumulators, blocks read and prefetched by for_blocks.
template <int R, int NW, int64_t kType>
void dot_rows_a8_typed(const RowPanel& p, int64_t k, const int8_t* xq, const float* xd,
                       const float* xs) {
  __m256 acc[R][NW] = {};  // per (x row, weight row) pair, zeroed
  float off[R][NW] = {};
  const int64_t nb = k / 32;
  const __m256i ones = _mm256_set1_epi16(1), low = _mm256_set1_epi8(15);
  auto xv = [&](int r, int64_t i) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * k + i * 32));
  };
  const QuantFormat f = quant_format(kType);  // nb: activation blocks of 32; weight blocks:
  for_blocks<NW>(p, k / f.block_elems, f.block_bytes,  // of f.block_elems (256: k-quants)
                 [&](int64_t i, int j, const uint8_t* blk) SLUICE_INLINE {
    if constexpr (kType == kQ8_0) {
      const float d = f16c(blk);
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      const __m256i aq = _mm256_abs_epi8(q);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i sx = _mm256_sign_epi8(xv(r, i), q);  // x * sign(q): |q| . sx = q . x
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sx), ones);
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xd[r * nb + i]),
                                    acc[r][j]);
      }
    } else if constexpr (kType == kQ4_K || kType == kQ5_K) {
      // block i of 256 = 8 sub-blocks of 32, each one activation block (i * 8 + sub) with
      // its own scale d * sc and min dmin * m: sum = d sc xd (q . xq) - dmin m xs
      const float d = f16c(blk), dmin = f16c(blk + 2);
      const uint8_t *qs, *qh;
      k_quants(kType, blk, &qs, &qh);
      for (int g = 0; g < 4; ++g) {
        int sc[2], mn[2];
        scale_min_k4(2 * g, blk + 4, &sc[0], &mn[0]);
        scale_min_k4(2 * g + 1, blk + 4, &sc[1], &mn[1]);
        __m128i l0, u0, l1, u1;  // bytes 0..15 and 16..31 of the group
        k_bytes(qs + 32 * g, qh, g, &l0, &u0);
        k_bytes(qs + 32 * g + 16, qh == nullptr ? nullptr : qh + 16, g, &l1, &u1);
        const __m256i uq[2] = {_mm256_set_m128i(l1, l0), _mm256_set_m128i(u1, u0)};
        for (int h = 0; h < 2; ++h) {
          const int64_t b = i * 8 + 2 * g + h;  // the activation block
          const float a = d * sc[h], c = dmin * mn[h];
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(uq[h], xv(r, b)), ones);
            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),
                                        _mm256_set1_ps(a * xd[r * nb + b]), acc[r][j]);
            off[r][j] -= c * xs[r * nb + b];
          }
        }
      }
    } else if constexpr (kType == kQ6_K) {
      // block i of 256 = 8 activation blocks (elements 128h + 32t + [0, 32)), each two 16-value
      // sub-blocks with int8 scales sc_a, sc_b: sum = d xd (sc_a (q - 32) . xq over the first
      // 16, sc_b over the next); q - 32 signed, so |q - 32| meets sign(q - 32) * xq (as Q8_0);
      // int32 lanes 0..3 of a product cover the first 16 values, lanes 4..7 the next
      const float d = f16c(blk + 208);
      const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
      const __m256i m32 = _mm256_set1_epi8(32);
      for (int h = 0; h < 2; ++h) {
        __m128i lo[4], hi[4];  // elements 128h + 32t + [0, 16) and + [16, 32)
        q6k_quads(blk + 64 * h, blk + 128 + 32 * h, 0, lo);
        q6k_quads(blk + 64 * h, blk + 128 + 32 * h, 16, hi);
        for (int t = 0; t < 4; ++t) {
          const __m256i q = _mm256_sub_epi8(_mm256_set_m128i(hi[t], lo[t]), m32);
          const __m256i aq = _mm256_abs_epi8(q);
          const int64_t b = i * 8 + 4 * h + t;  // the activation block
          const float sa = d * sc[8 * h + 2 * t], sb = d * sc[8 * h + 2 * t + 1];
          const __m256 scales = _mm256_setr_ps(sa, sa, sa, sa, sb, sb, sb, sb);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const __m256i sx = _mm256_sign_epi8(xv(r, b), q);
            const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aq, sx), ones);
            acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s),
                                        _mm256_mul_ps(scales, _mm256_set1_ps(xd[r * nb + b])),
                                        acc[r][j]);
          }
        }
      }
    } else {  // Q4_0, Q4_1, Q5_0, Q5_1
      float d, m;
      q4_scale_min(kType, blk, &d, &m);
      __m256i uq;
      if constexpr (kType == kQ5_0 || kType == kQ5_1) {
        uq = legacy5_bytes(blk + legacy_header(kType));
      } else {
        const __m128i q = load128(blk + legacy_header(kType));
        uq = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), low);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(uq, xv(r, i)), ones);
        acc[r][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(d * xd[r * nb + i]),
                                    acc[r][j]);
        off[r][j] += m * xs[r * nb + i];
      }
    }
  });
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NW; ++j)
      p.out[r * p.ldo + j] = hsum(acc[r][j]) + off[r][j] + (p.bias != nullptr ? p.bias[j] : 0.f);
}

template <int R, int NW>
void dot_rows_a8(int64_t type, const RowPanel& p, int64_t k, const int8_t* xq, const float* xd,
                 const float* xs) {
  switch (type) {
    case kQ8_0: return dot_rows_a8_typed<R, NW, kQ8_0>(p, k, xq, xd, xs);
    case kQ4_1: return dot_rows_a8_typed<R, NW, kQ4_1>(p, k, xq, xd, xs);
    case kQ5_0: return dot_rows_a8_typed<R, NW, kQ5_0>(p, k, xq, xd, xs);
    case kQ5_1: return dot_rows_a8_typed<R, NW, kQ5_1>(p, k, xq, xd, xs);
    case kQ4_K: return dot_rows_a8_typed<R, NW, kQ4_K>(p, k, xq, xd, xs);
    case kQ5_K: return dot_rows_a8_typed<R, NW, kQ5_K>(p, k, xq, xd, xs);
    case kQ6_K: return dot_rows_a8_typed<R, NW, kQ6_K>(p, k, xq, xd, xs);
    default: return dot_rows_a8_typed<R, NW, kQ4_0>(p, k, xq, xd, xs);
  }
}

#else
// ---- other CPUs (the per-machine build): the scalar reference ------------------------------

void dequant_row(int64_t type, const uint8_t* w, float* y, int64_t k) {
  dequant_row_scalar(type, w, y, k);
}

// As the vector dot_rows: weight row j dequantized, then a plain dot product per x row.
template <int R, int NW>
void dot_rows(int64_t type, const RowPanel& p, int64_t k, const float* x, int64_t ldx,
              const float*, int64_t) {
  thread_local std::vector<float> row;
  row.resize(k);
  for (int j = 0; j < NW; ++j) {
    dequant_row_scalar(type, p.w + j * p.ldw, row.data(), k);
    const float b = p.bias != nullptr ? p.bias[j] : 0.f;
    for (int r = 0; r < R; ++r) p.out[r * p.ldo + j] = sluice::dot(x + r * ldx, row.data(), k) + b;
  }
}

// The same sums as the vector code: the weight dequantized, the activations xq * xd.
template <int R, int NW>
void dot_rows_a8(int64_t type, const RowPanel& p, int64_t k, const int8_t* xq, const float* xd,
                 const float*) {
  thread_local std::vector<float> row;
  row.resize(k);
  const int64_t nb = k / 32;
  for (int j = 0; j < NW; ++j) {
    dequant_row_scalar(type, p.w + j * p.ldw, row.data(), k);
    for (int r = 0; r < R; ++r) {
      float s = 0.f;
      for (int64_t i = 0; i < nb; ++i) {
        float t = 0.f;
        for (int e = 0; e < 32; ++e) t += row[i * 32 + e] * xq[r * k + i * 32 + e];
        s += t * xd[r * nb + i];
      }
      p.out[r * p.ldo + j] = s + (p.bias != nullptr ? p.bias[j] : 0.f);
    }
  }
}
#endif

int64_t num_threads() { return std::max(1, omp_get_max_threads()); }

// Weight rows per decode kernel call for R x rows: 4 chains (or more) of accumulation in flight
// while the register file holds the R x NW accumulators and one block's unpacked quants.
constexpr int panel_rows(int r) { return r == 1 ? 4 : r <= 3 ? 2 : 1; }

// How many rows of ldw bytes ahead the decode kernels prefetch: kPrefetchBytes or just over
// (at least one row), so that ~64 cache lines are in flight while a thread streams its rows.
constexpr int64_t kPrefetchBytes = 4096;
int64_t prefetch_rows(int64_t ldw) {
  return std::max<int64_t>(1, (kPrefetchBytes + ldw - 1) / ldw);
}

// f(std::integral_constant<int, NW>{}, c) for the panels c = 0, NW, 2 NW, ... of n weight rows,
// then f(std::integral_constant<int, 1>{}, c) for each of the last n % NW rows; spread over the
// threads in dynamic chunks of about n / (8 threads) rows (at least 16, at most 64).
template <int NW, typename F>
void for_panels(int64_t n, int64_t threads, F&& f) {
  const int64_t full = n / NW, items = full + n % NW;
  const int64_t chunk = std::clamp<int64_t>(n / (8 * threads), 16, 64) / NW;
#pragma omp parallel for schedule(dynamic, chunk)
  for (int64_t t = 0; t < items; ++t) {
    if (t < full)
      f(std::integral_constant<int, NW>{}, t * NW);
    else
      f(std::integral_constant<int, 1>{}, full * NW + (t - full));
  }
}

}  // namespace

int64_t gguf_block_elems(int64_t type) { return quant_format(type).block_elems; }
int64_t gguf_block_bytes(int64_t type) { return quant_format(type).block_bytes; }

namespace {
// x [m, k] (row stride ldx) per 32-element block i of row r (act_quant.h): xq, its scale xd
// and xs = xd * sum(xq).
void quantize_activations(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                          float* xd, float* xs) {
  const int64_t nb = k / sluice::kActBlock;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t i = 0; i < nb; ++i) {
      int32_t sum;
      sluice::quantize_act_block(x + r * ldx + i * sluice::kActBlock,
                                 xq + r * k + i * sluice::kActBlock, &xd[r * nb + i], &sum);
      xs[r * nb + i] = xd[r * nb + i] * static_cast<float>(sum);
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
  const bool bf16_products = (type & kBf16Products) != 0;
  const bool vnni_packed = (type & kVnniPacked) != 0;
  type &= ~(kInt8Activations | kBf16Products | kVnniPacked);
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
  if (vnni_packed) {
    TORCH_CHECK(vnni::packable(type) && vnni::available() && n % vnni::kTileCols == 0 &&
                    wb.ld == k / vnni::layout_of(type).block_elems * vnni::layout_of(type).block_bytes,
                "gguf_linear: a VNNI-packed weight (type | 1024) must be contiguous blocks of a "
                "packable type with N a multiple of 16, on an x86 CPU with AVX2");
    vnni::run(type, out.data_ptr<float>(), m, n, k, x.data_ptr<float>(), x.stride(0), wb.data,
              bp);
    return;
  }
  const uint8_t* wp = wb.data;
  const int64_t ldw = wb.ld, ldx = x.stride(0);
  const float* xp = x.data_ptr<float>();  // re-pointed to a rounded copy for bf16 products
  float* op = out.data_ptr<float>();
  const int64_t threads = num_threads();

  // decode (m <= kMaxQuantSkinnyRows): panels of weight rows spread over the threads
  const int64_t ahead = prefetch_rows(ldw);
  auto panel = [&](int64_t c, int nw) {  // weight rows c .. c + nw - 1
    const int64_t later = std::min(c + ahead, n - nw);
    return RowPanel{wp + c * ldw, ldw, wp + later * ldw, op + c, n,
                    bp != nullptr ? bp + c : nullptr};
  };
  // Q2_K / Q3_K / IQ4_NL / IQ4_XS outside the packed layout: the panel path at every M
  const bool skinny = m <= kMaxQuantSkinnyRows && !panel_only_type(type);
  if (skinny && int8_act && takes_int8_activations(type)) {
    const int64_t nb = k / 32;
    std::vector<int8_t> xq(m * k);
    std::vector<float> xd(m * nb), xs(m * nb);
    quantize_activations(xp, ldx, m, k, xq.data(), xd.data(), xs.data());
    sluice::with_rows<kMaxQuantSkinnyRows>(m, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      for_panels<panel_rows(R)>(n, threads, [&](auto nw, int64_t c) {
        constexpr int NW = decltype(nw)::value;
        dot_rows_a8<R, NW>(type, panel(c, NW), k, xq.data(), xd.data(), xs.data());
      });
    });
    return;
  }

  if (skinny) {
    const QuantFormat f = quant_format(type);
    // sums of each x row over the weight's sub-blocks (for the folded constant terms)
    const int64_t subs = f.sub_elems > 0 ? k / f.sub_elems : 0;
    std::vector<float> xs(std::max<int64_t>(1, m * subs));
    for (int64_t r = 0; r < m; ++r)
      for (int64_t s = 0; s < subs; ++s)
        xs[r * subs + s] = sluice::sum(xp + r * ldx + s * f.sub_elems, f.sub_elems);
    sluice::with_rows<kMaxQuantSkinnyRows>(m, [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      for_panels<panel_rows(R)>(n, threads, [&](auto nw, int64_t c) {
        constexpr int NW = decltype(nw)::value;
        dot_rows<R, NW>(type, panel(c, NW), k, xp, ldx, xs.data(), subs);
      });
    });
    return;
  }

  if (bf16_products && k % amx::kTileK == 0 && amx::available() &&
      !panel_only_type(type)) {
    amx::bf16_linear(op, m, n, k, xp, ldx, bp,
                     [&](int64_t j, uint16_t* y, int64_t step) {
                       prefetch(wp + std::min(j + ahead, n - 1) * ldw, ldw);  // as the decode
                       dequant_row_bf16(type, wp + j * ldw, y, step, k);      // kernels do
                     });
    return;
  }
  // bf16 products without AMX: the same roundings of x and the weight, then the sgemm below
  std::vector<float> x_rounded;
  int64_t ldx_used = ldx;
  // those types' decode rows with int8 activations (the flag's M <= 8, as for every type)
  const bool int8_copy = int8_act && panel_only_type(type) && m <= kMaxQuantSkinnyRows;
  if (int8_copy) {  // x_q = xq * xd, as the int8 kernels multiply
    const int64_t nb = k / sluice::kActBlock;
    std::vector<int8_t> xq(m * k);
    std::vector<float> xd(m * nb), xs(m * nb);
    quantize_activations(xp, ldx, m, k, xq.data(), xd.data(), xs.data());
    x_rounded.resize(m * k);
    for (int64_t i = 0; i < m * k; ++i)
      x_rounded[i] = static_cast<float>(xq[i]) * xd[i / sluice::kActBlock];
    xp = x_rounded.data();
    ldx_used = k;
  } else if (bf16_products) {
    x_rounded.resize(m * k);
    for (int64_t r = 0; r < m; ++r) {
      std::copy(xp + r * ldx, xp + r * ldx + k, x_rounded.data() + r * k);
      round_to_bf16(x_rounded.data() + r * k, k);
    }
    xp = x_rounded.data();
    ldx_used = k;
  }

  // Panels of nt weight rows, dequantized into a per-thread scratch tile (nt x k floats, kept
  // in L2: at most ~256 KiB), then one sgemm of all m rows against it.
  int64_t nt = std::clamp<int64_t>(n / (4 * threads), 16, 128);
  nt = std::max<int64_t>(8, std::min<int64_t>(nt, (64 * 1024) / std::max<int64_t>(1, k)) / 8 * 8);
  const int64_t panels = (n + nt - 1) / nt;
  const int ik = static_cast<int>(k), ildx = static_cast<int>(ldx_used);
  const int ldo = static_cast<int>(n);
  const float one = 1.f, zero = 0.f;
#pragma omp parallel
  {
    std::vector<float> tile(nt * k);
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * nt;
      const int tn = static_cast<int>(std::min(n, n0 + nt) - n0);
      for (int r = 0; r < tn; ++r) dequant_row(type, wp + (n0 + r) * ldw, tile.data() + r * k, k);
      if (bf16_products && !int8_copy) round_to_bf16(tile.data(), tn * k);
      float* c = op + n0;
      if (bp != nullptr)
        for (int64_t r = 0; r < m; ++r) std::copy(bp + n0, bp + n0 + tn, c + r * n);
      const int im = static_cast<int>(m);
      sgemm_("T", "N", &tn, &im, &ik, &one, tile.data(), &ik, xp, &ildx,
             bp != nullptr ? &one : &zero, c, &ldo);
    }
  }
}
