// Q8_0 weights x int8 activations on AVX-512 VNNI (vpdpbusd), any number of rows:
//
//   vnni::q8_linear(out, m, n, k, x, ldx, w, bias):
//       out[i, j] = sum_b xd[i, b] * wd[j, b] * sum_{c < 32} xq[i, 32b + c] * wq[j, 32b + c]
//                   (+ bias[j])                        for i < m, j < n, b < k / 32
//
// where (xq, xd) is x quantized per 32-element block exactly as quant_linear.cpp's
// quantize_activations does (xd = max|x| / 127, xq = nearbyint(x / xd) in [-127, 127]) and
// (wq, wd) are the weight's Q8_0 quants and fp16 scales: the same product as gguf_linear's
// int8-activation decode kernels, whose results it equals up to float32 summation order.
// Each block's 32 products are summed exactly in int32; one float32 FMA per (row, channel,
// block) applies xd * wd.
//
// Packed weight (vnni::pack_q8_0, in place, the same bytes as Q8_0: N a multiple of 16). The
// Q8_0 rows [N, K / 32 * 34] are regrouped per 16 output channels (a "tile"): tile g holds rows
// 16g .. 16g + 15 in the same 16 * row_bytes bytes, as K / 32 block records of 544 bytes:
//   bytes [64 j + 4 c + i]  (j < 8, c < 16, i < 4) = u8(wq[16g + c, 32b + 4j + i] + 128)
//   bytes [512 + 2c, +1]                          = the fp16 scale wd[16g + c, b]
// so one 64-byte load is four consecutive K values of 16 channels: vpdpbusd's unsigned
// operand, against the signed activations broadcast four at a time. The +128 makes the weight
// unsigned; its contribution 128 * sum_c xq[i, 32b + c] is known per (row, block) and starts
// each block's int32 sum at its negative. vnni::unpack_q8_0 restores the Q8_0 bytes exactly.
//
// Work: tiles in pairs (32 channels) x row chunks of kRowChunk rows, spread over the threads;
// within an item, kRows rows x two tiles accumulate in registers over all of K (8 float32 and
// 8 int32 zmm accumulators). The activations are quantized once per call ([m, k] int8, L2 for
// a row chunk).
//
// Only the x86-64-v4 build holds the kernel (compiled for AVX512-VNNI by function attribute),
// and it runs only where `available()`: the CPU reports AVX512-VNNI. Callers elsewhere keep
// the Q8_0 layout and quant_linear.cpp's kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>
#endif

namespace vnni {

constexpr int64_t kTileCols = 16;      // output channels per packed tile
constexpr int64_t kBlock = 32;         // K values per Q8_0 block
constexpr int64_t kQ8Bytes = 34;       // bytes per Q8_0 block
constexpr int64_t kRecordBytes = kTileCols * kQ8Bytes;  // 544: one tile's block record

// Q8_0 rows of one tile (16 rows of row_bytes) -> its packed records (layout above), and back.
inline void pack_tile(uint8_t* dst, const uint8_t* rows, int64_t row_bytes) {
  const int64_t nb = row_bytes / kQ8Bytes;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* rec = dst + b * kRecordBytes;
    for (int64_t c = 0; c < kTileCols; ++c) {
      const uint8_t* blk = rows + c * row_bytes + b * kQ8Bytes;
      std::memcpy(rec + 512 + 2 * c, blk, 2);
      for (int64_t e = 0; e < kBlock; ++e)
        rec[64 * (e / 4) + 4 * c + e % 4] =
            static_cast<uint8_t>(static_cast<int8_t>(blk[2 + e]) + 128);
    }
  }
}

inline void unpack_tile(uint8_t* rows, const uint8_t* src, int64_t row_bytes) {
  const int64_t nb = row_bytes / kQ8Bytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* rec = src + b * kRecordBytes;
    for (int64_t c = 0; c < kTileCols; ++c) {
      uint8_t* blk = rows + c * row_bytes + b * kQ8Bytes;
      std::memcpy(blk, rec + 512 + 2 * c, 2);
      for (int64_t e = 0; e < kBlock; ++e)
        blk[2 + e] = static_cast<uint8_t>(
            static_cast<int8_t>(static_cast<int>(rec[64 * (e / 4) + 4 * c + e % 4]) - 128));
    }
  }
}

// f(dst, src) over each 16-row tile of the contiguous uint8 [n, row_bytes] w, in place.
template <typename F>
void each_tile_in_place(uint8_t* w, int64_t n, int64_t row_bytes, F&& f) {
  std::vector<uint8_t> tmp(kTileCols * row_bytes);
  for (int64_t g = 0; g < n / kTileCols; ++g) {
    uint8_t* tile = w + g * kTileCols * row_bytes;
    std::memcpy(tmp.data(), tile, tmp.size());
    f(tile, tmp.data());
  }
}

inline void pack_q8_0(uint8_t* w, int64_t n, int64_t row_bytes) {
  each_tile_in_place(w, n, row_bytes,
                     [&](uint8_t* dst, const uint8_t* src) { pack_tile(dst, src, row_bytes); });
}

inline void unpack_q8_0(uint8_t* w, int64_t n, int64_t row_bytes) {
  each_tile_in_place(w, n, row_bytes,
                     [&](uint8_t* dst, const uint8_t* src) { unpack_tile(dst, src, row_bytes); });
}

#if defined(__AVX512F__) && defined(__AVX512BW__)

#define SLUICE_VNNI __attribute__((target("avx512vnni")))

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512vnni");
  return ok;
}

constexpr int kRows = 4;             // rows of x per register tile
constexpr int64_t kRowChunk = 64;    // rows of x per work item

// x [m, k] (row stride ldx) -> xq [m, k] int8, xd [m, k / 32], xc [m, k / 32] =
// -128 * sum of the block's xq (the start of each block's int32 sum; file comment).
inline void quantize_rows(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                          float* xd, int32_t* xc) {
  const int64_t nb = k / kBlock;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* v = x + r * ldx + b * kBlock;
      const __m512 lo = _mm512_loadu_ps(v), hi = _mm512_loadu_ps(v + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m512 vinv = _mm512_set1_ps(inv);
      // products as in the scalar quantizer; the default rounding mode is nearest-even
      const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, vinv));
      const __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, vinv));
      int8_t* q = xq + r * k + b * kBlock;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(qlo));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtsepi32_epi8(qhi));
      xd[r * nb + b] = d;
      xc[r * nb + b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
    }
}

// out[r, 16 t + c] for r < R, t < T, c < 16 of the R rows of xq (stride k) and the T packed
// tiles at w (tile stride ld_tile bytes): int32 block sums on vpdpbusd, float32 over blocks.
template <int R, int T>
SLUICE_VNNI inline void tile_product(const int8_t* xq, const float* xd, const int32_t* xc,
                                     int64_t k, const uint8_t* w, int64_t ld_tile,
                                     const float* bias, float* out, int64_t ldo) {
  const int64_t nb = k / kBlock;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i sum[R][T];
    for (int r = 0; r < R; ++r) {
      const __m512i start = _mm512_set1_epi32(xc[r * nb + b]);
      for (int t = 0; t < T; ++t) sum[r][t] = start;
    }
    const uint8_t* rec = w + b * kRecordBytes;
    const int8_t* xb = xq + b * kBlock;
    for (int j = 0; j < 8; ++j) {
      __m512i wv[T];
      for (int t = 0; t < T; ++t)
        wv[t] = _mm512_loadu_si512(rec + t * ld_tile + 64 * j);
      for (int r = 0; r < R; ++r) {
        int32_t four;
        std::memcpy(&four, xb + r * k + 4 * j, 4);
        const __m512i xv = _mm512_set1_epi32(four);
        for (int t = 0; t < T; ++t) sum[r][t] = _mm512_dpbusd_epi32(sum[r][t], wv[t], xv);
      }
    }
    __m512 wd[T];
    for (int t = 0; t < T; ++t)
      wd[t] = _mm512_cvtph_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rec + t * ld_tile + 512)));
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_set1_ps(xd[r * nb + b]);
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][t]), _mm512_mul_ps(wd[t], d),
                                    acc[r][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + 16 * t) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(out + r * ldo + 16 * t, _mm512_add_ps(acc[r][t], bv));
  }
}

// The R-row kernel for R = rows (1..kRows), T tiles.
template <int T>
SLUICE_VNNI inline void rows_product(int rows, const int8_t* xq, const float* xd,
                                     const int32_t* xc, int64_t k, const uint8_t* w,
                                     int64_t ld_tile, const float* bias, float* out,
                                     int64_t ldo) {
  switch (rows) {
    case 4: tile_product<4, T>(xq, xd, xc, k, w, ld_tile, bias, out, ldo); break;
    case 3: tile_product<3, T>(xq, xd, xc, k, w, ld_tile, bias, out, ldo); break;
    case 2: tile_product<2, T>(xq, xd, xc, k, w, ld_tile, bias, out, ldo); break;
    default: tile_product<1, T>(xq, xd, xc, k, w, ld_tile, bias, out, ldo); break;
  }
}

inline void q8_linear(float* out, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx,
                      const uint8_t* w, const float* bias) {
  const int64_t nb = k / kBlock, ld_tile = nb * kRecordBytes;
  std::vector<int8_t> xq(m * k);
  std::vector<float> xd(m * nb);
  std::vector<int32_t> xc(m * nb);
  const int64_t tiles = n / kTileCols, pairs = (tiles + 1) / 2;
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
#pragma omp parallel
  {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < m; ++r)
      quantize_rows(x + r * ldx, ldx, 1, k, xq.data() + r * k, xd.data() + r * nb,
                    xc.data() + r * nb);
    // items: row chunk major, so a thread's consecutive items share x rows
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < chunks * pairs; ++item) {
      const int64_t chunk = item / pairs, p = item % pairs;
      const int64_t t0 = 2 * p, r_end = std::min(m, (chunk + 1) * kRowChunk);
      const bool two = t0 + 1 < tiles;
      const uint8_t* wt = w + t0 * ld_tile;
      const float* bt = bias != nullptr ? bias + t0 * kTileCols : nullptr;
      for (int64_t r = chunk * kRowChunk; r < r_end; r += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, r_end - r));
        float* o = out + r * n + t0 * kTileCols;
        if (two)
          rows_product<2>(rows, xq.data() + r * k, xd.data() + r * nb, xc.data() + r * nb, k,
                          wt, ld_tile, bt, o, n);
        else
          rows_product<1>(rows, xq.data() + r * k, xd.data() + r * nb, xc.data() + r * nb, k,
                          wt, ld_tile, bt, o, n);
      }
    }
  }
}

#undef SLUICE_VNNI

#else

inline bool available() { return false; }
inline void q8_linear(float*, int64_t, int64_t, int64_t, const float*, int64_t, const uint8_t*,
                      const float*) {}

#endif

}  // namespace vnni

bool vnni_q8_available() { return vnni::available(); }

namespace {
// w: a contiguous uint8 [N, K / 32 * 34] with N a multiple of 16 (the packed form's contract).
void check_packable(const at::Tensor& w, const char* who) {
  TORCH_CHECK(w.dim() == 2 && w.dtype() == at::kByte && w.device().is_cpu() && w.is_contiguous(),
              who, ": a contiguous CPU uint8 [N, row_bytes] tensor expected");
  TORCH_CHECK(w.size(0) % vnni::kTileCols == 0 && w.size(1) % vnni::kQ8Bytes == 0, who,
              ": N must be a multiple of 16 and row_bytes of 34 (Q8_0 blocks), got [",
              w.size(0), ", ", w.size(1), "]");
}
}  // namespace

void vnni_pack_q8_0(at::Tensor w) {
  check_packable(w, "vnni_pack_q8_0");
  vnni::pack_q8_0(w.data_ptr<uint8_t>(), w.size(0), w.size(1));
}

void vnni_unpack_q8_0(at::Tensor w) {
  check_packable(w, "vnni_unpack_q8_0");
  vnni::unpack_q8_0(w.data_ptr<uint8_t>(), w.size(0), w.size(1));
}
