// GGUF Q8_0 / Q4_0 / Q4_1 weights x int8 activations on AVX-512 VNNI (vpdpbusd), any number of
// rows:
//
//   vnni::linear<Type>(out, m, n, k, x, ldx, w, bias):
//       out[i, j] = sum_b xd[i, b] * (wd[j, b] * sum_c xq[i, 32b + c] * (q[j, 32b + c] - o)
//                                     + wm[j, b] * sum_c xq[i, 32b + c])     (+ bias[j])
//   for i < m, j < n, b < k / 32, c < 32; (xq, xd) is x quantized per 32-element block exactly
//   as quant_linear.cpp's quantize_activations does (xd = max|x| / 127, xq = nearbyint(x / xd)
//   in [-127, 127]); the weight's value is wd (q - o) + wm:
//       Q8_0: q = the int8 quant, o = 0, wm = 0;  Q4_0: q in 0..15, o = 8, wm = 0;
//       Q4_1: q in 0..15, o = 0, wm = the block's fp16 min m.
// The same product as gguf_linear's int8-activation decode kernels, whose results it equals up
// to float32 summation order. A block's 32 products are summed exactly in int32; one float32
// FMA per (row, channel, block) applies xd * wd (and one more the min of Q4_1).
//
// Packed weight (vnni::pack, in place, the same bytes as the GGUF rows: N a multiple of 16).
// Rows [N, K / 32 * block_bytes] are regrouped per 16 output channels (a "tile"): tile g holds
// rows 16g .. 16g + 15 in the same 16 * row_bytes bytes, as K / 32 block records of
// 16 * block_bytes bytes (channel c < 16, value e < 32 of the block):
//   Q8_0 (544 B): [64 (e / 4) + 4 c + e % 4] = u8(q + 128); [512 + 2c] the fp16 scale d
//   Q4_0 (288 B): [64 (e / 8) + 4 c + e % 4] holds q in its low nibble for e % 8 < 4, in its
//                 high nibble for e % 8 >= 4; [256 + 2c] d
//   Q4_1 (320 B): as Q4_0; [256 + 2c] d, [288 + 2c] the fp16 min m
// so one 64-byte load (or one nibble half of it) is four consecutive K values of 16 channels:
// vpdpbusd's unsigned operand, against the signed activations broadcast four at a time. The
// weight's offset (Q8_0: the +128 that makes it unsigned; Q4_0: its -8) contributes
// -off * sum_c xq per (row, block), known once x is quantized: each block's int32 sum starts at
// it. vnni::unpack restores the GGUF bytes exactly.
//
// Work: tiles in pairs (32 channels) x row chunks of kRowChunk rows, spread over the threads;
// within an item, kRows rows x two tiles accumulate in registers over all of K (8 float32 and
// 8 int32 zmm accumulators). The activations are quantized once per call ([m, k] int8).
//
// Only the x86-64-v4 build holds the kernel (compiled for AVX512-VNNI by function attribute),
// and it runs only where `available()`: the CPU reports AVX512-VNNI. Callers elsewhere keep
// the GGUF layout and quant_linear.cpp's kernels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "act_quant.h"
#include "ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>
#endif

namespace vnni {

constexpr int64_t kTileCols = 16;  // output channels per packed tile
constexpr int64_t kBlock = sluice::kActBlock;  // K values per block
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;  // the GGML type ids it packs

// The per-type constants of the layout above.
struct Layout {
  int64_t block_bytes;  // bytes of one GGUF block
  int64_t quant_bytes;  // bytes of one record's quants (512 or 256)
  int offset;           // o: the int32 sum of a block starts at -offset * sum_c xq
  bool has_min;         // Q4_1's fp16 min after the scales
  int64_t record_bytes() const { return kTileCols * block_bytes; }
};

constexpr Layout layout_of(int64_t type) {
  return type == kQ8_0 ? Layout{34, 512, 128, false}
       : type == kQ4_0 ? Layout{18, 256, 8, false}
                       : Layout{20, 256, 0, true};
}

bool packable(int64_t type) { return type == kQ8_0 || type == kQ4_0 || type == kQ4_1; }

// The quant q of value e of a GGUF block (Q8_0: the int8; Q4: the nibble 0..15).
inline int gguf_quant(int64_t type, const uint8_t* blk, int64_t e) {
  if (type == kQ8_0) return static_cast<int8_t>(blk[2 + e]);
  const uint8_t* qs = blk + (type == kQ4_1 ? 4 : 2);
  return e < 16 ? qs[e] & 15 : qs[e - 16] >> 4;
}

inline void set_gguf_quant(int64_t type, uint8_t* blk, int64_t e, int q) {
  if (type == kQ8_0) {
    blk[2 + e] = static_cast<uint8_t>(static_cast<int8_t>(q));
    return;
  }
  uint8_t* qs = blk + (type == kQ4_1 ? 4 : 2);
  if (e < 16)
    qs[e] = static_cast<uint8_t>((qs[e] & 0xF0) | q);
  else
    qs[e - 16] = static_cast<uint8_t>((qs[e - 16] & 0x0F) | (q << 4));
}

// Byte and shift of value e of channel c in a packed record (layout above).
inline int64_t packed_byte(int64_t type, int64_t c, int64_t e) {
  const int64_t per_load = type == kQ8_0 ? 4 : 8;  // values of a channel per 64-byte load
  return 64 * (e / per_load) + 4 * c + e % 4;
}
inline int packed_shift(int64_t type, int64_t e) {
  return type == kQ8_0 ? 0 : (e % 8 < 4 ? 0 : 4);
}

// GGUF rows of one tile (16 rows of row_bytes) -> its packed records, and back.
inline void pack_tile(int64_t type, uint8_t* dst, const uint8_t* rows, int64_t row_bytes) {
  const Layout l = layout_of(type);
  std::memset(dst, 0, kTileCols * row_bytes);
  for (int64_t b = 0; b < row_bytes / l.block_bytes; ++b) {
    uint8_t* rec = dst + b * l.record_bytes();
    for (int64_t c = 0; c < kTileCols; ++c) {
      const uint8_t* blk = rows + c * row_bytes + b * l.block_bytes;
      std::memcpy(rec + l.quant_bytes + 2 * c, blk, 2);
      if (l.has_min) std::memcpy(rec + l.quant_bytes + 32 + 2 * c, blk + 2, 2);
      for (int64_t e = 0; e < kBlock; ++e) {
        const int q = gguf_quant(type, blk, e) + (type == kQ8_0 ? 128 : 0);
        rec[packed_byte(type, c, e)] |= static_cast<uint8_t>(q << packed_shift(type, e));
      }
    }
  }
}

inline void unpack_tile(int64_t type, uint8_t* rows, const uint8_t* src, int64_t row_bytes) {
  const Layout l = layout_of(type);
  for (int64_t b = 0; b < row_bytes / l.block_bytes; ++b) {
    const uint8_t* rec = src + b * l.record_bytes();
    for (int64_t c = 0; c < kTileCols; ++c) {
      uint8_t* blk = rows + c * row_bytes + b * l.block_bytes;
      std::memcpy(blk, rec + l.quant_bytes + 2 * c, 2);
      if (l.has_min) std::memcpy(blk + 2, rec + l.quant_bytes + 32 + 2 * c, 2);
      for (int64_t e = 0; e < kBlock; ++e) {
        const int raw = rec[packed_byte(type, c, e)] >> packed_shift(type, e);
        set_gguf_quant(type, blk, e, type == kQ8_0 ? raw - 128 : raw & 15);
      }
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

#if defined(__AVX512F__) && defined(__AVX512BW__)

#define SLUICE_VNNI __attribute__((target("avx512vnni")))

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx512vnni");
  return ok;
}

constexpr int kRows = 4;           // rows of x per register tile
constexpr int64_t kRowChunk = 64;  // rows of x per work item
constexpr int64_t kSerialQuantizeRows = 8;  // up to this many rows: x quantized by one thread
// The first pass of an item over its tiles reads them from memory: each tile's record
// kPrefetchAhead bytes on is hinted into the cache while a record is multiplied (the hardware
// prefetchers stop at 4 KiB pages; without the hints one row ran at ~55% of memory bandwidth).
constexpr int64_t kPrefetchAhead = 4096;

// x [m, k] (row stride ldx) -> xq [m, k] int8, xd [m, k / 32], xs [m, k / 32] = the block's
// sum of xq (act_quant.h).
inline void quantize_rows(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                          float* xd, int32_t* xs) {
  const int64_t nb = k / kBlock;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < nb; ++b)
      sluice::quantize_act_block(x + r * ldx + b * kBlock, xq + r * k + b * kBlock,
                                 &xd[r * nb + b], &xs[r * nb + b]);
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

// out[r, 16 t + c] for r < R, t < T, c < 16 of the R rows of xq (stride k) and the T packed
// tiles at w (tile stride ld_tile bytes): int32 block sums on vpdpbusd, float32 over blocks.
// `prefetch`: hint each tile's bytes kPrefetchAhead on (past a tile's end: the next tile's).
template <int64_t Type, int R, int T>
SLUICE_VNNI inline void tile_product(const int8_t* xq, const float* xd, const int32_t* xs,
                                     int64_t k, const uint8_t* w, int64_t ld_tile,
                                     const float* bias, float* out, int64_t ldo, bool prefetch) {
  constexpr Layout l = layout_of(Type);
  const int64_t nb = k / kBlock;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (prefetch)
      for (int t = 0; t < T; ++t) {
        const uint8_t* ahead = w + t * ld_tile + b * l.record_bytes() + kPrefetchAhead;
        for (int64_t o = 0; o < l.record_bytes(); o += 64) __builtin_prefetch(ahead + o, 0, 3);
      }
    __m512i sum[R][T];
    for (int r = 0; r < R; ++r) {
      const __m512i start = _mm512_set1_epi32(-l.offset * xs[r * nb + b]);
      for (int t = 0; t < T; ++t) sum[r][t] = start;
    }
    const uint8_t* rec = w + b * l.record_bytes();
    const int8_t* xb = xq + b * kBlock;
    if constexpr (Type == kQ8_0) {
      for (int j = 0; j < 8; ++j) {
        __m512i wv[T];
        for (int t = 0; t < T; ++t) wv[t] = _mm512_loadu_si512(rec + t * ld_tile + 64 * j);
        for (int r = 0; r < R; ++r) {
          const __m512i xv = broadcast4(xb + r * k + 4 * j);
          for (int t = 0; t < T; ++t) sum[r][t] = _mm512_dpbusd_epi32(sum[r][t], wv[t], xv);
        }
      }
    } else {
      for (int j = 0; j < 4; ++j) {  // values 8j .. 8j + 3 (low nibbles), 8j + 4 .. 8j + 7
        __m512i lo[T], hi[T];
        for (int t = 0; t < T; ++t) {
          const __m512i raw = _mm512_loadu_si512(rec + t * ld_tile + 64 * j);
          lo[t] = _mm512_and_si512(raw, nibble);
          hi[t] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
        }
        for (int r = 0; r < R; ++r) {
          const __m512i xlo = broadcast4(xb + r * k + 8 * j);
          const __m512i xhi = broadcast4(xb + r * k + 8 * j + 4);
          for (int t = 0; t < T; ++t) {
            sum[r][t] = _mm512_dpbusd_epi32(sum[r][t], lo[t], xlo);
            sum[r][t] = _mm512_dpbusd_epi32(sum[r][t], hi[t], xhi);
          }
        }
      }
    }
    __m512 wd[T], wm[T];
    for (int t = 0; t < T; ++t) {
      const uint8_t* scales = rec + t * ld_tile + l.quant_bytes;
      wd[t] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
      if constexpr (l.has_min)
        wm[t] = _mm512_cvtph_ps(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 32)));
    }
    for (int r = 0; r < R; ++r) {
      const float dx = xd[r * nb + b];
      const __m512 d = _mm512_set1_ps(dx);
      for (int t = 0; t < T; ++t) {
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][t]), _mm512_mul_ps(wd[t], d),
                                    acc[r][t]);
        if constexpr (l.has_min)
          acc[r][t] = _mm512_fmadd_ps(
              wm[t], _mm512_set1_ps(dx * static_cast<float>(xs[r * nb + b])), acc[r][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + 16 * t) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(out + r * ldo + 16 * t, _mm512_add_ps(acc[r][t], bv));
  }
}

// The R-row kernel for R = rows (1..kRows), T tiles.
template <int64_t Type, int T>
SLUICE_VNNI inline void rows_product(int rows, const int8_t* xq, const float* xd,
                                     const int32_t* xs, int64_t k, const uint8_t* w,
                                     int64_t ld_tile, const float* bias, float* out,
                                     int64_t ldo, bool prefetch) {
  switch (rows) {
    case 4: tile_product<Type, 4, T>(xq, xd, xs, k, w, ld_tile, bias, out, ldo, prefetch); break;
    case 3: tile_product<Type, 3, T>(xq, xd, xs, k, w, ld_tile, bias, out, ldo, prefetch); break;
    case 2: tile_product<Type, 2, T>(xq, xd, xs, k, w, ld_tile, bias, out, ldo, prefetch); break;
    default: tile_product<Type, 1, T>(xq, xd, xs, k, w, ld_tile, bias, out, ldo, prefetch);
  }
}

template <int64_t Type>
void linear(float* out, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx,
            const uint8_t* w, const float* bias) {
  const int64_t nb = k / kBlock, ld_tile = nb * layout_of(Type).record_bytes();
  std::vector<int8_t> xq(m * k);
  std::vector<float> xd(m * nb);
  std::vector<int32_t> xs(m * nb);
  const int64_t tiles = n / kTileCols, pairs = (tiles + 1) / 2;
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
  // a few rows (decode) are quantized before the parallel region: one barrier less
  const bool serial_quantize = m <= kSerialQuantizeRows;
  const int64_t grain =
      chunks > 1 ? 1 : std::max<int64_t>(1, pairs / (4 * std::max(1, omp_get_max_threads())));
  if (serial_quantize) quantize_rows(x, ldx, m, k, xq.data(), xd.data(), xs.data());
#pragma omp parallel
  {
    if (!serial_quantize) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < m; ++r)
        quantize_rows(x + r * ldx, ldx, 1, k, xq.data() + r * k, xd.data() + r * nb,
                      xs.data() + r * nb);
    }
    // items: row chunk major, so a thread's consecutive items share x rows; one row chunk
    // (decode): runs of consecutive tile pairs, so that a thread's prefetches run on into
    // the weight bytes it reads next
#pragma omp for schedule(dynamic, grain)
    for (int64_t item = 0; item < chunks * pairs; ++item) {
      const int64_t chunk = item / pairs, p = item % pairs;
      const int64_t t0 = 2 * p, r_end = std::min(m, (chunk + 1) * kRowChunk);
      const bool two = t0 + 1 < tiles;
      const uint8_t* wt = w + t0 * ld_tile;
      const float* bt = bias != nullptr ? bias + t0 * kTileCols : nullptr;
      for (int64_t r = chunk * kRowChunk; r < r_end; r += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, r_end - r));
        float* o = out + r * n + t0 * kTileCols;
        const bool first = r == chunk * kRowChunk;  // the tiles' bytes come from memory
        if (two)
          rows_product<Type, 2>(rows, xq.data() + r * k, xd.data() + r * nb,
                                xs.data() + r * nb, k, wt, ld_tile, bt, o, n, first);
        else
          rows_product<Type, 1>(rows, xq.data() + r * k, xd.data() + r * nb,
                                xs.data() + r * nb, k, wt, ld_tile, bt, o, n, first);
      }
    }
  }
}

inline void run(int64_t type, float* out, int64_t m, int64_t n, int64_t k, const float* x,
                int64_t ldx, const uint8_t* w, const float* bias) {
  switch (type) {
    case kQ8_0: linear<kQ8_0>(out, m, n, k, x, ldx, w, bias); break;
    case kQ4_0: linear<kQ4_0>(out, m, n, k, x, ldx, w, bias); break;
    default: linear<kQ4_1>(out, m, n, k, x, ldx, w, bias); break;
  }
}

#undef SLUICE_VNNI

#else

inline bool available() { return false; }
inline void run(int64_t, float*, int64_t, int64_t, int64_t, const float*, int64_t,
                const uint8_t*, const float*) {}

#endif

}  // namespace vnni

bool vnni_available() { return vnni::available(); }

namespace {
// w: a contiguous uint8 [N, K / 32 * block_bytes] of a packable type with N a multiple of 16
// (the packed form's contract).
void check_packable(const at::Tensor& w, int64_t type, const char* who) {
  TORCH_CHECK(vnni::packable(type), who, ": GGML type ", type,
              " has no VNNI layout (Q8_0 = 8, Q4_0 = 2, Q4_1 = 3 do)");
  TORCH_CHECK(w.dim() == 2 && w.dtype() == at::kByte && w.device().is_cpu() && w.is_contiguous(),
              who, ": a contiguous CPU uint8 [N, row_bytes] tensor expected");
  const int64_t block_bytes = vnni::layout_of(type).block_bytes;
  TORCH_CHECK(w.size(0) % vnni::kTileCols == 0 && w.size(1) % block_bytes == 0, who,
              ": N must be a multiple of 16 and row_bytes of ", block_bytes, ", got [",
              w.size(0), ", ", w.size(1), "]");
}

// pack (GGUF -> packed) or unpack (packed -> GGUF) w's tiles in place.
void regroup(at::Tensor& w, int64_t type, bool pack) {
  check_packable(w, type, pack ? "vnni_pack" : "vnni_unpack");
  const int64_t row_bytes = w.size(1);
  vnni::each_tile_in_place(w.data_ptr<uint8_t>(), w.size(0), row_bytes,
                           [&](uint8_t* dst, const uint8_t* src) {
                             if (pack)
                               vnni::pack_tile(type, dst, src, row_bytes);
                             else
                               vnni::unpack_tile(type, dst, src, row_bytes);
                           });
}
}  // namespace

void vnni_pack(at::Tensor w, int64_t type) { regroup(w, type, true); }

void vnni_unpack(at::Tensor w, int64_t type) { regroup(w, type, false); }
