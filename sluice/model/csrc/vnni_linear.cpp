// GGUF block weights (Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 / Q2_K / Q3_K / Q4_K / Q5_K / Q6_K /
// IQ4_NL / IQ4_XS) x int8 activations
// on AVX-512 VNNI (vpdpbusd) or AVX2, any number of rows:
//
//   vnni::linear<Type>(out, m, n, k, x, ldx, w, bias):
//       out[i, j] = sum_b xd[i, b] * (sum_h wd[j, b, h] * sum_c xq[i, 32b + c] * (q[j, 32b + c] - o)
//                                     + wm[j, b] * sum_c xq[i, 32b + c])     (+ bias[j])
//   for i < m, j < n, b < k / 32 (an activation block), c < 32 (h: the 16-value halves of a
//   Q6_K block, c in half h; one h = the whole block for the other types); (xq, xd) is x
//   quantized per 32-element block exactly as quant_linear.cpp's quantize_activations does
//   (xd = max|x| / 127, xq = nearbyint(x / xd) in [-127, 127]); the weight's value is
//   wd (q - o) + wm, q its unsigned quant:
//       Q8_0: q = int8 quant + 128, o = 128;  Q4_0 / Q5_0: q in 0..15 / 0..31, o = 8 / 16;
//       Q4_1 / Q5_1: o = 0, wm = the block's fp16 min m;
//       Q4_K / Q5_K: 32-value sub-block j of a 256-value block: wd = d * sc_j,
//                    wm = -dmin * m_j (6-bit sc_j, m_j), o = 0;
//       Q6_K: q in 0..63, o = 32, 16-value sub-block s: wd = d * sc_s (int8 sc_s), wm = 0;
//       Q3_K: q in 0..7, o = 4, 16-value sub-block s: wd = d * (sc_s - 32) (6-bit sc_s);
//       Q2_K: q in 0..3, o = 0, 16-value sub-block s: wd = d * (sc_s & 15), and the min
//             -dmin * (sc_s >> 4) applied per 16-value half (its own sum of xq);
//       IQ4_NL: q = kvalues_iq4nl[its 4-bit index] + 128 (an int8 codebook), o = 128: the
//               index is stored as Q4_0's nibble and looked up (vpshufb) as it is loaded;
//       IQ4_XS: IQ4_NL's q and o in 256-value blocks, 32-value sub-block j: wd = d * (ls_j - 32)
//               (6-bit ls_j), wm = 0.
// The same product as gguf_linear's int8-activation decode kernels, whose results it equals up
// to float32 summation order. A (half-)block's products are summed exactly in int32; one
// float32 FMA per (row, channel, (half-)block) applies xd * wd (and one more the min).
//
// Packed weight (vnni::pack, in place, the same bytes as the GGUF rows: N a multiple of 16).
// Rows [N, K / block_elems * block_bytes] are regrouped per 16 output channels (a "tile"): tile
// g holds rows 16g .. 16g + 15 in the same 16 * row_bytes bytes, as K / block_elems records of
// 16 * block_bytes bytes, one per GGUF block position. A record is block_elems / 32
// sub-records (the quants of 32 consecutive values of the 16 channels), then the scalars.
// Sub-record (channel c < 16, value e < 32):
//   Q8_0 (512 B): [64 (e / 4) + 4 c + e % 4] = q
//   others: [64 (e / 8) + 4 c + e % 4] holds q & 15 in its low nibble for e % 8 < 4, in its
//           high nibble for e % 8 >= 4 (256 B); then
//     Q5_0 / Q5_1 / Q5_K (+64 B): bit 4 of q as bit 4c + e % 4 of the little-endian uint64 at
//           256 + 8 (2 (e / 8) + (e % 8) / 4): the mask of the lanes of load e / 8's low or
//           high nibbles that add 16 (vpaddb under a mask);
//     Q6_K (+128 B): bits 4-5 of q in byte 256 + 64 (e / 16) + 4 c + e % 4 at bit
//           2 (2 ((e / 8) % 2) + (e % 8) / 4).
//   Q3_K (192 B): bits 0-1 of q in byte 64 (e / 16) + 4 c + e % 4 at bit 2 ((e % 16) / 4) (128
//           B), bit 2 as bit 4c + e % 4 of the little-endian uint64 at 128 + 8 (e / 4);
//   Q2_K (128 B): Q3_K's first 128 bytes.
// Scalars after the sub-records (fp16 values as stored, channel c at 2c):
//   Q8_0 / Q4_0 / Q5_0 / IQ4_NL: [0] d x 16;  Q4_1 / Q5_1: [0] d, [32] m;
//   Q4_K / Q5_K: [0] d, [32] dmin, [64 + 16 j + c] (sc_j & 15) | (m_j & 15) << 4 (j < 8),
//                [192 + 4 c] uint32 with bits 4j .. 4j + 3 = sc_j >> 4 | (m_j >> 4) << 2;
//   Q6_K: [0] d, [32 + 16 s + c] the int8 scale of sub-block s (s < 16);
//   IQ4_XS: [0] d, [32 + 16 p + c] (ls_2p & 15) | (ls_2p+1 & 15) << 4 (p < 4), [96 + 2 c] uint16
//           with bits 2j, 2j + 1 = ls_j >> 4;
//   Q3_K: [0] d, [32 + 16 p + c] (sc_2p & 15) | (sc_2p+1 & 15) << 4 (p < 8), [160 + 4 c] uint32
//         with bits 2t, 2t + 1 = sc_t >> 4;
//   Q2_K: [0] d, [32] dmin, [64 + 16 t + c] the scale byte of sub-block t (sc | m << 4).
// so one 64-byte load (or one nibble half of it) is four consecutive K values of 16 channels:
// vpdpbusd's unsigned operand, against the signed activations broadcast four at a time. The
// weight's offset o contributes -o * sum_c xq per (row, (half-)block), known once x is
// quantized (Q6_K's and Q3_K's halves: the first 16 values' sum, xs16): each int32 sum starts
// at it.
// vnni::unpack restores the GGUF bytes exactly (both go through BlockFields, every bit of a
// block).
//
// Work: tiles in pairs (32 channels) x row chunks of kRowChunk rows, spread over the threads;
// within an item, kRows rows x two tiles accumulate in registers over all of K (8 float32 and
// 8 int32 zmm accumulators). Up to kRows rows in all (decode of up to 4 requests) the pair's
// two tiles go one after the other instead, so that a thread's reads of its run of tiles are
// one stream: SmolLM2 Q4_1 TPOT 1.1-1.5x on a Zen 5 VM at 1, 2 and 4 requests
// (benchmarks/RESULTS.md, 2026-12-08; the AVX2 kernel already goes tile by tile). The activations are quantized once
// per call ([m, k] int8).
//
// Kernels (`kernel_name()`): the x86-64-v4 build holds the vpdpbusd one (compiled for
// AVX512-VNNI by function attribute; it runs where the CPU reports AVX512-VNNI); both x86
// builds hold an AVX2 one over the same layout (namespace avx2: each tile as two 8-channel
// halves, vpdpbusd emulated), which runs everywhere else. A build without AVX2 (another
// architecture's native build) has neither: callers keep the GGUF layout and
// quant_linear.cpp's kernels there.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "act_quant.h"
#include "gguf_codebook.h"
#include "ops.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <omp.h>
#endif

namespace vnni {

constexpr int64_t kTileCols = 16;  // output channels per packed tile
constexpr int64_t kBlock = sluice::kActBlock;  // K values per block
// the GGML type ids it packs
constexpr int64_t kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12,
                  kQ5_K = 13, kQ6_K = 14, kIQ4_NL = 20, kIQ4_XS = 23, kQ2_K = 10, kQ3_K = 11;

// The per-type constants of the layout above.
struct Layout {
  int64_t block_elems;  // values of one GGUF block (32, or 256 for the k-quants)
  int64_t block_bytes;  // bytes of one GGUF block
  int64_t sub_bytes;    // bytes of one sub-record (the quants of 32 values x 16 channels)
  int offset;           // o: a (half-)block's int32 sum starts at -offset * sum_c xq
  bool has_min;         // a min term: Q4_1 / Q5_1 (fp16 m), Q4_K / Q5_K (-dmin * m_j)
  bool fifth_bits;      // Q5_*: bit 4 of each quant in 64-bit lane masks
  constexpr int64_t record_bytes() const { return kTileCols * block_bytes; }
  constexpr int64_t subs() const { return block_elems / kBlock; }  // sub-records per record
  constexpr int64_t scalars_at() const { return subs() * sub_bytes; }  // record offset of the scalars
};

constexpr Layout layout_of(int64_t type) {
  switch (type) {
    case kQ8_0: return Layout{32, 34, 512, 128, false, false};
    case kQ4_0: return Layout{32, 18, 256, 8, false, false};
    case kQ4_1: return Layout{32, 20, 256, 0, true, false};
    case kQ5_0: return Layout{32, 22, 320, 16, false, true};
    case kQ5_1: return Layout{32, 24, 320, 0, true, true};
    case kQ4_K: return Layout{256, 144, 256, 0, true, false};
    case kQ5_K: return Layout{256, 176, 320, 0, true, true};
    case kIQ4_NL: return Layout{32, 18, 256, 128, false, false};
    case kIQ4_XS: return Layout{256, 136, 256, 128, false, false};
    case kQ3_K: return Layout{256, 110, 192, 4, false, false};
    case kQ2_K: return Layout{256, 84, 128, 0, false, false};  // its mins: per half (header)
    default: return Layout{256, 210, 384, 32, false, false};  // Q6_K
  }
}

constexpr bool is_kquant(int64_t type) { return type == kQ4_K || type == kQ5_K; }
// the types whose 4-bit index is looked up in IQ4_NL's codebook
constexpr bool is_iq4(int64_t type) { return type == kIQ4_NL || type == kIQ4_XS; }
// the types whose 32-value blocks sum in two 16-value halves of their own scales
constexpr bool has_halves(int64_t type) {
  return type == kQ6_K || type == kQ3_K || type == kQ2_K;
}
// 2-bit quants as Q3_K's low bits (Q3_K adds its third bit from lane masks)
constexpr bool has_2bit_fields(int64_t type) { return type == kQ3_K || type == kQ2_K; }

bool packable(int64_t type) {
  switch (type) {
    case kQ8_0: case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1: case kQ4_K: case kQ5_K:
    case kQ6_K: case kIQ4_NL: case kIQ4_XS: case kQ3_K: case kQ2_K: return true;
    default: return false;
  }
}

// Everything one GGUF block holds, decoded: the unsigned quants q[e] (Q8_0: int8 + 128; the
// others their stored value, 0..15 / 0..31 / 0..63; IQ4_NL / IQ4_XS the codebook index), the
// fp16 bits of d (and of Q4_1 / Q5_1's m or the k-quants' dmin), the k-quants' 6-bit scales /
// mins sc[j], mn[j] (j < 8), Q6_K's int8 scales sc[s] (s < 16), Q3_K's 6-bit ones and Q2_K's
// scale bytes (s < 16; Q2_K's dmin as dm) and IQ4_XS's 6-bit ls_j as sc[j] (j < 8).
// `decode_gguf` and `encode_gguf` are exact inverses.
struct BlockFields {
  int q[256];
  uint16_t d, dm;
  uint8_t sc[16], mn[8];
};

inline uint16_t bits16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

void decode_gguf(int64_t type, const uint8_t* blk, BlockFields* f) {
  const Layout l = layout_of(type);
  if (type == kQ6_K) {
    f->d = bits16(blk + 208);
    std::memcpy(f->sc, blk + 192, 16);
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, i = e % 32, t = (e % 128) / 32;
      f->q[e] = ((blk[64 * h + i + 32 * (t & 1)] >> (4 * (t >> 1))) & 15) |
                (((blk[128 + 32 * h + i] >> (2 * t)) & 3) << 4);
    }
    return;
  }
  if (type == kQ2_K) {  // scales[16] | qs[64] | d | dmin; 16-value sub-block s
    std::memcpy(f->sc, blk, 16);
    f->d = bits16(blk + 80);
    f->dm = bits16(blk + 82);
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, j = (e % 128) / 32, i = e % 32;
      f->q[e] = (blk[16 + 32 * h + i] >> (2 * j)) & 3;
    }
    return;
  }
  if (type == kQ3_K) {  // hmask[32] | qs[64] | scales[12] | d; 16-value sub-block s
    f->d = bits16(blk + 108);
    const uint8_t* sc = blk + 96;
    for (int s = 0; s < 16; ++s)
      f->sc[s] = static_cast<uint8_t>(((sc[s % 8] >> (4 * (s / 8))) & 15) |
                                      ((sc[8 + s % 4] >> (2 * (s / 4))) & 3) << 4);
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, j = (e % 128) / 32, i = e % 32;
      f->q[e] = ((blk[32 + 32 * h + i] >> (2 * j)) & 3) | ((blk[i] >> (4 * h + j)) & 1) << 2;
    }
    return;
  }
  f->d = bits16(blk);
  if (type == kIQ4_XS) {  // d | scales_h | scales_l[4] | qs[128], 32-value sub-block j
    const uint16_t high = bits16(blk + 2);
    for (int j = 0; j < 8; ++j)
      f->sc[j] = static_cast<uint8_t>(((blk[4 + j / 2] >> (4 * (j % 2))) & 15) |
                                      ((high >> (2 * j)) & 3) << 4);
    for (int e = 0; e < 256; ++e)
      f->q[e] = (blk[8 + 16 * (e / 32) + e % 16] >> (4 * ((e % 32) / 16))) & 15;
    return;
  }
  if (is_kquant(type)) {  // ggml's get_scale_min_k4
    f->dm = bits16(blk + 2);
    const uint8_t* s = blk + 4;
    for (int j = 0; j < 8; ++j) {
      f->sc[j] = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
      f->mn[j] = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + (type == kQ5_K ? 48 : 16);
    for (int e = 0; e < 256; ++e) {
      const int g = e / 64, upper = (e % 64) / 32, i = e % 32;
      f->q[e] = (qs[32 * g + i] >> (4 * upper)) & 15;
      if (type == kQ5_K) f->q[e] |= ((qh[i] >> (2 * g + upper)) & 1) << 4;
    }
    return;
  }
  if (l.has_min) f->dm = bits16(blk + 2);
  const uint8_t* q = blk + (l.has_min ? 4 : 2);
  if (type == kQ8_0) {
    for (int e = 0; e < 32; ++e) f->q[e] = static_cast<int8_t>(q[e]) + 128;
    return;
  }
  uint32_t qh = 0;
  if (l.fifth_bits) {
    std::memcpy(&qh, q, 4);
    q += 4;
  }
  for (int e = 0; e < 32; ++e)
    f->q[e] = ((e < 16 ? q[e] : q[e - 16] >> 4) & 15) | ((qh >> e) & 1) << 4;
}

void encode_gguf(int64_t type, const BlockFields& f, uint8_t* blk) {
  const Layout l = layout_of(type);
  std::memset(blk, 0, l.block_bytes);
  if (type == kQ6_K) {
    std::memcpy(blk + 208, &f.d, 2);
    std::memcpy(blk + 192, f.sc, 16);
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, i = e % 32, t = (e % 128) / 32;
      blk[64 * h + i + 32 * (t & 1)] |= (f.q[e] & 15) << (4 * (t >> 1));
      blk[128 + 32 * h + i] |= (f.q[e] >> 4) << (2 * t);
    }
    return;
  }
  if (type == kQ2_K) {
    std::memcpy(blk, f.sc, 16);
    std::memcpy(blk + 80, &f.d, 2);
    std::memcpy(blk + 82, &f.dm, 2);
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, j = (e % 128) / 32, i = e % 32;
      blk[16 + 32 * h + i] |= static_cast<uint8_t>((f.q[e] & 3) << (2 * j));
    }
    return;
  }
  if (type == kQ3_K) {
    std::memcpy(blk + 108, &f.d, 2);
    for (int s = 0; s < 16; ++s) {
      blk[96 + s % 8] |= static_cast<uint8_t>((f.sc[s] & 15) << (4 * (s / 8)));
      blk[104 + s % 4] |= static_cast<uint8_t>((f.sc[s] >> 4) << (2 * (s / 4)));
    }
    for (int e = 0; e < 256; ++e) {
      const int h = e / 128, j = (e % 128) / 32, i = e % 32;
      blk[32 + 32 * h + i] |= static_cast<uint8_t>((f.q[e] & 3) << (2 * j));
      blk[i] |= static_cast<uint8_t>(((f.q[e] >> 2) & 1) << (4 * h + j));
    }
    return;
  }
  std::memcpy(blk, &f.d, 2);
  if (type == kIQ4_XS) {
    uint16_t high = 0;
    for (int j = 0; j < 8; ++j) {
      blk[4 + j / 2] |= static_cast<uint8_t>((f.sc[j] & 15) << (4 * (j % 2)));
      high |= static_cast<uint16_t>((f.sc[j] >> 4) << (2 * j));
    }
    std::memcpy(blk + 2, &high, 2);
    for (int e = 0; e < 256; ++e)
      blk[8 + 16 * (e / 32) + e % 16] |= static_cast<uint8_t>(f.q[e] << (4 * ((e % 32) / 16)));
    return;
  }
  if (is_kquant(type)) {
    std::memcpy(blk + 2, &f.dm, 2);
    uint8_t* s = blk + 4;
    for (int j = 0; j < 4; ++j) {
      s[j] = f.sc[j] | (f.sc[j + 4] >> 4) << 6;
      s[j + 4] = f.mn[j] | (f.mn[j + 4] >> 4) << 6;
      s[j + 8] = (f.sc[j + 4] & 15) | (f.mn[j + 4] & 15) << 4;
    }
    uint8_t* qh = blk + 16;
    uint8_t* qs = blk + (type == kQ5_K ? 48 : 16);
    for (int e = 0; e < 256; ++e) {
      const int g = e / 64, upper = (e % 64) / 32, i = e % 32;
      qs[32 * g + i] |= (f.q[e] & 15) << (4 * upper);
      if (type == kQ5_K) qh[i] |= ((f.q[e] >> 4) & 1) << (2 * g + upper);
    }
    return;
  }
  if (l.has_min) std::memcpy(blk + 2, &f.dm, 2);
  uint8_t* q = blk + (l.has_min ? 4 : 2);
  if (type == kQ8_0) {
    for (int e = 0; e < 32; ++e) q[e] = static_cast<uint8_t>(f.q[e] - 128);
    return;
  }
  if (l.fifth_bits) {
    uint32_t qh = 0;
    for (int e = 0; e < 32; ++e) qh |= static_cast<uint32_t>((f.q[e] >> 4) & 1) << e;
    std::memcpy(q, &qh, 4);
    q += 4;
  }
  for (int e = 0; e < 32; ++e) q[e % 16] |= (f.q[e] & 15) << (e < 16 ? 0 : 4);
}

// Where value e (< 32) of channel c sits in a sub-record (layout above): the byte of its
// 8-bit quant (Q8_0) or low nibble, that nibble's shift, and the lane (bit index of a 64-bit
// mask, byte of a 64-byte load) and load j = e / 8 (4-bit types; Q8_0: e / 4).
inline int64_t quant_lane(int64_t c, int64_t e) { return 4 * c + e % 4; }
inline int64_t quant_byte(int64_t type, int64_t c, int64_t e) {
  return 64 * (e / (type == kQ8_0 ? 4 : 8)) + quant_lane(c, e);
}
inline int nibble_shift(int64_t e) { return e % 8 < 4 ? 0 : 4; }
// Q5_*: the 64-bit mask of bit 4 for load j's low (h = 0) or high (h = 1) nibbles.
inline int64_t fifth_mask_at(int64_t e) { return 256 + 8 * (2 * (e / 8) + (e % 8) / 4); }
// Q6_K: bits 4-5 of a quant, 2 bits in the byte of its lane in one of two 64-byte vectors.
inline int64_t q6_high_byte(int64_t c, int64_t e) { return 256 + 64 * (e / 16) + quant_lane(c, e); }
inline int q6_high_shift(int64_t e) { return 2 * (2 * ((e / 8) % 2) + (e % 8) / 4); }
// Q3_K: bits 0-1 of a quant in byte 64 (e / 16) + lane at bit 2 ((e % 16) / 4); bit 2 as bit
// `lane` of the little-endian uint64 at 128 + 8 (e / 4) (added as 4 under that lane mask).
inline int64_t q3_low_byte(int64_t c, int64_t e) { return 64 * (e / 16) + quant_lane(c, e); }
inline int q3_low_shift(int64_t e) { return 2 * ((e % 16) / 4); }
inline int64_t q3_mask_at(int64_t e) { return 128 + 8 * (e / 4); }

// n (8 or 16) 6-bit scales v of channel c into a record's scalars (IQ4_XS, Q3_K: layout above)
// and back: the low nibbles of scales 2p, 2p + 1 in byte 32 + 16 p + c, the high bit pairs in
// the little-endian n / 4-byte integer at 32 + 8 n + (n / 4) c.
inline void write_scales6(uint8_t* scal, int64_t c, const uint8_t* v, int n) {
  uint32_t high = 0;
  for (int i = 0; i < n; ++i) {
    scal[32 + 16 * (i / 2) + c] |= static_cast<uint8_t>((v[i] & 15) << (4 * (i % 2)));
    high |= static_cast<uint32_t>(v[i] >> 4) << (2 * i);
  }
  std::memcpy(scal + 32 + 8 * n + n / 4 * c, &high, n / 4);
}
inline void read_scales6(const uint8_t* scal, int64_t c, uint8_t* v, int n) {
  uint32_t high = 0;
  std::memcpy(&high, scal + 32 + 8 * n + n / 4 * c, n / 4);
  for (int i = 0; i < n; ++i)
    v[i] = static_cast<uint8_t>(((scal[32 + 16 * (i / 2) + c] >> (4 * (i % 2))) & 15) |
                                ((high >> (2 * i)) & 3) << 4);
}

// Channel c's fields into record `rec` (zeroed before its first channel), and back.
void write_packed(int64_t type, const BlockFields& f, int64_t c, uint8_t* rec) {
  const Layout l = layout_of(type);
  for (int64_t s = 0; s < l.subs(); ++s) {
    uint8_t* sub = rec + s * l.sub_bytes;
    for (int64_t e = 0; e < kBlock; ++e) {
      const int q = f.q[kBlock * s + e];
      if (has_2bit_fields(type)) {
        const int64_t lane = quant_lane(c, e);
        sub[q3_low_byte(c, e)] |= static_cast<uint8_t>((q & 3) << q3_low_shift(e));
        if (type == kQ3_K)
          sub[q3_mask_at(e) + lane / 8] |= static_cast<uint8_t>(((q >> 2) & 1) << (lane % 8));
        continue;
      }
      if (type == kQ8_0) {
        sub[quant_byte(type, c, e)] = static_cast<uint8_t>(q);
        continue;
      }
      sub[quant_byte(type, c, e)] |= static_cast<uint8_t>((q & 15) << nibble_shift(e));
      const int64_t lane = quant_lane(c, e);
      if (l.fifth_bits)
        sub[fifth_mask_at(e) + lane / 8] |= static_cast<uint8_t>(((q >> 4) & 1) << (lane % 8));
      if (type == kQ6_K)
        sub[q6_high_byte(c, e)] |= static_cast<uint8_t>((q >> 4) << q6_high_shift(e));
    }
  }
  uint8_t* scal = rec + l.scalars_at();
  std::memcpy(scal + 2 * c, &f.d, 2);
  if (l.has_min) std::memcpy(scal + 32 + 2 * c, &f.dm, 2);
  if (is_kquant(type)) {
    uint32_t high = 0;
    for (int j = 0; j < 8; ++j) {
      scal[64 + 16 * j + c] = static_cast<uint8_t>((f.sc[j] & 15) | (f.mn[j] & 15) << 4);
      high |= static_cast<uint32_t>((f.sc[j] >> 4) | (f.mn[j] >> 4) << 2) << (4 * j);
    }
    std::memcpy(scal + 192 + 4 * c, &high, 4);
  }
  if (type == kQ6_K)
    for (int s = 0; s < 16; ++s) scal[32 + 16 * s + c] = f.sc[s];
  if (type == kIQ4_XS) write_scales6(scal, c, f.sc, 8);
  if (type == kQ2_K) {
    std::memcpy(scal + 32 + 2 * c, &f.dm, 2);
    for (int t = 0; t < 16; ++t) scal[64 + 16 * t + c] = f.sc[t];
  }
  if (type == kQ3_K) write_scales6(scal, c, f.sc, 16);
}

void read_packed(int64_t type, const uint8_t* rec, int64_t c, BlockFields* f) {
  const Layout l = layout_of(type);
  for (int64_t s = 0; s < l.subs(); ++s) {
    const uint8_t* sub = rec + s * l.sub_bytes;
    for (int64_t e = 0; e < kBlock; ++e) {
      if (has_2bit_fields(type)) {
        const int64_t lane = quant_lane(c, e);
        f->q[kBlock * s + e] = (sub[q3_low_byte(c, e)] >> q3_low_shift(e)) & 3;
        if (type == kQ3_K)
          f->q[kBlock * s + e] |= ((sub[q3_mask_at(e) + lane / 8] >> (lane % 8)) & 1) << 2;
        continue;
      }
      int q = sub[quant_byte(type, c, e)];
      if (type != kQ8_0) {
        q = (q >> nibble_shift(e)) & 15;
        const int64_t lane = quant_lane(c, e);
        if (l.fifth_bits) q |= ((sub[fifth_mask_at(e) + lane / 8] >> (lane % 8)) & 1) << 4;
        if (type == kQ6_K) q |= ((sub[q6_high_byte(c, e)] >> q6_high_shift(e)) & 3) << 4;
      }
      f->q[kBlock * s + e] = q;
    }
  }
  const uint8_t* scal = rec + l.scalars_at();
  f->d = bits16(scal + 2 * c);
  if (l.has_min) f->dm = bits16(scal + 32 + 2 * c);
  if (is_kquant(type)) {
    uint32_t high;
    std::memcpy(&high, scal + 192 + 4 * c, 4);
    for (int j = 0; j < 8; ++j) {
      const int low = scal[64 + 16 * j + c], hi = (high >> (4 * j)) & 15;
      f->sc[j] = static_cast<uint8_t>((low & 15) | (hi & 3) << 4);
      f->mn[j] = static_cast<uint8_t>((low >> 4) | (hi >> 2) << 4);
    }
  }
  if (type == kQ6_K)
    for (int s = 0; s < 16; ++s) f->sc[s] = scal[32 + 16 * s + c];
  if (type == kIQ4_XS) read_scales6(scal, c, f->sc, 8);
  if (type == kQ2_K) {
    f->dm = bits16(scal + 32 + 2 * c);
    for (int t = 0; t < 16; ++t) f->sc[t] = scal[64 + 16 * t + c];
  }
  if (type == kQ3_K) read_scales6(scal, c, f->sc, 16);
}

// GGUF rows of one tile (16 rows of row_bytes) -> its packed records, and back.
inline void pack_tile(int64_t type, uint8_t* dst, const uint8_t* rows, int64_t row_bytes) {
  const Layout l = layout_of(type);
  std::memset(dst, 0, kTileCols * row_bytes);
  BlockFields f{};
  for (int64_t b = 0; b < row_bytes / l.block_bytes; ++b)
    for (int64_t c = 0; c < kTileCols; ++c) {
      decode_gguf(type, rows + c * row_bytes + b * l.block_bytes, &f);
      write_packed(type, f, c, dst + b * l.record_bytes());
    }
}

inline void unpack_tile(int64_t type, uint8_t* rows, const uint8_t* src, int64_t row_bytes) {
  const Layout l = layout_of(type);
  BlockFields f{};
  for (int64_t b = 0; b < row_bytes / l.block_bytes; ++b)
    for (int64_t c = 0; c < kTileCols; ++c) {
      read_packed(type, src + b * l.record_bytes(), c, &f);
      encode_gguf(type, f, rows + c * row_bytes + b * l.block_bytes);
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

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

constexpr int kRows = 4;           // rows of x per register tile
constexpr int64_t kRowChunk = 64;  // rows of x per work item
constexpr int64_t kSerialQuantizeRows = 8;  // up to this many rows: x quantized by one thread
// The first pass of an item over its tiles reads them from memory: each tile's record
// kPrefetchAhead bytes on is hinted into the cache while a record is multiplied (the hardware
// prefetchers stop at 4 KiB pages; without the hints one row ran at ~55% of memory bandwidth).
constexpr int64_t kPrefetchAhead = 4096;

// x [m, k] (row stride ldx) -> xq [m, k] int8, xd [m, k / 32], xs [m, k / 32] = the block's
// sum of xq (act_quant.h); xs16 (Q6_K; nullptr: not wanted) the sum of its first 16 values.
inline void quantize_rows(const float* x, int64_t ldx, int64_t m, int64_t k, int8_t* xq,
                          float* xd, int32_t* xs, int32_t* xs16) {
  const int64_t nb = k / kBlock;
  for (int64_t r = 0; r < m; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      int8_t* q = xq + r * k + b * kBlock;
      sluice::quantize_act_block(x + r * ldx + b * kBlock, q, &xd[r * nb + b], &xs[r * nb + b]);
      if (xs16 != nullptr) {
        int32_t half = 0;
        for (int i = 0; i < kBlock / 2; ++i) half += q[i];
        xs16[r * nb + b] = half;
      }
    }
}

// ---- AVX2 (both x86 builds): the same packed layout, vpdpbusd emulated ------------------------
// A 64-byte load of a record holds channels 0..7 in its first 32 bytes and 8..15 in the
// second, so a tile is two 8-channel halves of one ymm each. vpdpbusd(acc, u, s) is
// acc + vpmaddwd(vpmaddubsw(u, s), 1): the int16 pair sums do not saturate for quants up to
// 63 (2 * 63 * 127 < 2^15); Q8_0 multiplies its signed quants (u ^ 0x80) through
// vpsignb (|q| * sign(x, q): 2 * 128 * 127 < 2^15), so its sums start at 0, not -128 sum(xq),
// and IQ4_NL likewise its codebook values, looked up signed.
// The k-quants' 6-bit scale and min of one sub-block for each channel lane (both kernels; V
// is GCC's __v8si or __v16si): low = the lane's byte (sc & 15) | (m & 15) << 4, high = its
// uint32 of high bits already shifted right by 4 s (layout above).
template <class V>
inline void kquant_scale_min(V low, V high, V* sc, V* mn) {
  *sc = (low & 15) | ((high & 3) << 4);
  *mn = (low >> 4) | (((high >> 2) & 3) << 4);
}
// 6-bit scale i minus 32 for each channel lane (IQ4_XS's ls_i, Q3_K's sc_i; `write_scales6`'s
// layout): `pair` = the lane's byte of the low nibbles of scales 2 (i / 2), 2 (i / 2) + 1,
// `high` its integer of high bit pairs.
template <class V>
inline V scale6_minus_32(V pair, V high, int64_t i) {
  const int shift = static_cast<int>(4 * (i % 2)), hshift = static_cast<int>(2 * i);
  return (((pair >> shift) & 15) | (((high >> hshift) & 3) << 4)) - 32;
}

namespace avx2 {

constexpr int kRows = 4;  // rows of x per register tile (8 accumulators: 16 ymm in all)

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

inline __m256i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm256_set1_epi32(four);
}

inline __m256i dot4(__m256i acc, __m256i u, __m256i s) {  // vpdpbusd (header comment)
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
                                                 _mm256_set1_epi16(1)));
}

inline __m256i load32(const uint8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline __m128i load8(const uint8_t* p) {
  return _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
}
inline __m256 half8(const uint8_t* p) {  // 8 fp16 -> float32
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// byte i = `value` where bit i of m is set, else 0
inline __m256i bits_to_bytes(uint32_t m, char value) {
  const __m256i spread = _mm256_shuffle_epi8(
      _mm256_set1_epi32(static_cast<int>(m)),
      _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                       3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit),
                          _mm256_set1_epi8(value));
}

// Half h (channels 8h .. 8h + 7) of load j of a 4-bit sub-record: vnni's quant_pair.
template <int64_t Type>
inline void quant_pair(const uint8_t* sub, int h, int j, __m256i* lo, __m256i* hi) {
  if constexpr (has_2bit_fields(Type)) {  // bits 0-1 at 4 (j % 2), + 2; Q3_K's bit 2: masks
    const __m256i three = _mm256_set1_epi8(3);
    const __m256i raw = load32(sub + 64 * (j / 2) + 32 * h);
    const int shift = 4 * (j % 2);
    *lo = _mm256_and_si256(_mm256_srli_epi16(raw, shift), three);
    *hi = _mm256_and_si256(_mm256_srli_epi16(raw, shift + 2), three);
    if constexpr (Type == kQ2_K) return;
    uint32_t mlo, mhi;
    std::memcpy(&mlo, sub + 128 + 16 * j + 4 * h, 4);
    std::memcpy(&mhi, sub + 128 + 16 * j + 8 + 4 * h, 4);
    *lo = _mm256_add_epi8(*lo, bits_to_bytes(mlo, 4));
    *hi = _mm256_add_epi8(*hi, bits_to_bytes(mhi, 4));
    return;
  }
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i raw = load32(sub + 64 * j + 32 * h);
  *lo = _mm256_and_si256(raw, nibble);
  *hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nibble);
  if constexpr (is_iq4(Type)) {  // the signed codebook values (multiplied as Q8_0's)
    const __m256i table = _mm256_broadcastsi128_si256(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(sluice::kIq4nlValues)));
    *lo = _mm256_shuffle_epi8(table, *lo);
    *hi = _mm256_shuffle_epi8(table, *hi);
  }
  if constexpr (layout_of(Type).fifth_bits) {
    uint32_t mlo, mhi;  // bits 32h .. 32h + 31 of the two uint64 masks
    std::memcpy(&mlo, sub + 256 + 16 * j + 4 * h, 4);
    std::memcpy(&mhi, sub + 256 + 16 * j + 8 + 4 * h, 4);
    *lo = _mm256_add_epi8(*lo, bits_to_bytes(mlo, 16));
    *hi = _mm256_add_epi8(*hi, bits_to_bytes(mhi, 16));
  }
  if constexpr (Type == kQ6_K) {
    const __m256i bits = _mm256_set1_epi8(0x30);
    const __m256i hb = load32(sub + 256 + 64 * (j / 2) + 32 * h);
    const __m256i at_lo = j % 2 == 0 ? _mm256_slli_epi16(hb, 4) : hb;
    const __m256i at_hi = j % 2 == 0 ? _mm256_slli_epi16(hb, 2) : _mm256_srli_epi16(hb, 2);
    *lo = _mm256_or_si256(*lo, _mm256_and_si256(at_lo, bits));
    *hi = _mm256_or_si256(*hi, _mm256_and_si256(at_hi, bits));
  }
}

// Half h of vnni's block_factors.
template <int64_t Type>
inline void block_factors(const uint8_t* scal, int h, int64_t s, __m256 wd[2], __m256 wm[2]) {
  const __m256 d = half8(scal + 16 * h);
  if constexpr (Type == kQ6_K) {
    for (int hh = 0; hh < 2; ++hh)
      wd[hh] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                    load8(scal + 32 + 32 * s + 16 * hh + 8 * h))));
  } else if constexpr (is_kquant(Type)) {
    __v8si sc, mn;
    kquant_scale_min<__v8si>(
        (__v8si)_mm256_cvtepu8_epi32(load8(scal + 64 + 16 * s + 8 * h)),
        (__v8si)_mm256_srl_epi32(load32(scal + 192 + 32 * h),
                                 _mm_cvtsi32_si128(static_cast<int>(4 * s))),
        &sc, &mn);
    wd[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps((__m256i)sc));
    wm[0] = _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(half8(scal + 32 + 16 * h),
                                                           _mm256_cvtepi32_ps((__m256i)mn)));
  } else if constexpr (Type == kQ2_K) {  // sub-blocks 2s, 2s + 1: sc | m << 4
    const __m256 dmin = half8(scal + 32 + 16 * h);
    for (int hh = 0; hh < 2; ++hh) {
      const __v8si b = (__v8si)_mm256_cvtepu8_epi32(load8(scal + 64 + 16 * (2 * s + hh) + 8 * h));
      wd[hh] = _mm256_mul_ps(d, _mm256_cvtepi32_ps((__m256i)(b & 15)));
      wm[hh] = _mm256_sub_ps(_mm256_setzero_ps(),
                             _mm256_mul_ps(dmin, _mm256_cvtepi32_ps((__m256i)(b >> 4))));
    }
  } else if constexpr (Type == kQ3_K) {  // sub-blocks 2s, 2s + 1: 6-bit scales - 32
    const __v8si pair = (__v8si)_mm256_cvtepu8_epi32(load8(scal + 32 + 16 * s + 8 * h));
    const __v8si high = (__v8si)load32(scal + 160 + 32 * h);
    for (int hh = 0; hh < 2; ++hh)
      wd[hh] = _mm256_mul_ps(d, _mm256_cvtepi32_ps((__m256i)scale6_minus_32<__v8si>(pair, high, 2 * s + hh)));
  } else if constexpr (Type == kIQ4_XS) {
    wd[0] = _mm256_mul_ps(d, _mm256_cvtepi32_ps((__m256i)scale6_minus_32<__v8si>(
        (__v8si)_mm256_cvtepu8_epi32(load8(scal + 32 + 16 * (s / 2) + 8 * h)),
        (__v8si)_mm256_cvtepu16_epi32(_mm_loadu_si128(
            reinterpret_cast<const __m128i*>(scal + 96 + 16 * h))), s)));
  } else {
    wd[0] = d;
    if constexpr (layout_of(Type).has_min) wm[0] = half8(scal + 32 + 16 * h);
  }
}

// out[r, 8h + c] for r < R, c < 8: half h of the packed tile at w (vnni's tile_product for
// one 8-channel half); `prefetch` as there.
template <int64_t Type, int R>
inline void half_tile_product(const int8_t* xq, const float* xd, const int32_t* xs,
                              const int32_t* xs16, int64_t k, const uint8_t* w, int h,
                              const float* bias, float* out, int64_t ldo, bool prefetch) {
  constexpr Layout l = layout_of(Type);
  constexpr int kHalves = has_halves(Type) ? 2 : 1;
  constexpr bool kSigned = Type == kQ8_0 || is_iq4(Type);  // signed quants (header)
  constexpr int kOffset = kSigned ? 0 : l.offset;
  constexpr int64_t kBlockBytes = l.record_bytes() / l.subs();
  const int64_t nb = k / kBlock;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (prefetch) {
      const uint8_t* ahead = w + b * kBlockBytes + kPrefetchAhead;
      for (int64_t o = 0; o < kBlockBytes; o += 64) __builtin_prefetch(ahead + o, 0, 3);
    }
    const int64_t s = b % l.subs();
    const uint8_t* rec = w + b / l.subs() * l.record_bytes();
    const uint8_t* sub = rec + s * l.sub_bytes;
    const int8_t* xb = xq + b * kBlock;
    __m256 wd[2], wm[2];
    block_factors<Type>(rec + l.scalars_at(), h, s, wd, wm);
#pragma GCC unroll 2
    for (int hh = 0; hh < kHalves; ++hh) {
      __m256i sum[R];
      for (int r = 0; r < R; ++r) {
        int32_t xsum = xs[r * nb + b];
        if constexpr (kHalves == 2) xsum = hh == 0 ? xs16[r * nb + b] : xsum - xs16[r * nb + b];
        sum[r] = _mm256_set1_epi32(-kOffset * xsum);
      }
      if constexpr (Type == kQ8_0) {
        for (int j = 0; j < 8; ++j) {
          const __m256i q = _mm256_xor_si256(load32(sub + 64 * j + 32 * h),
                                             _mm256_set1_epi8(static_cast<char>(0x80)));
          const __m256i mag = _mm256_sign_epi8(q, q);
          for (int r = 0; r < R; ++r)
            sum[r] = dot4(sum[r], mag, _mm256_sign_epi8(broadcast4(xb + r * k + 4 * j), q));
        }
      } else {
#pragma GCC unroll 4
        for (int j = 4 / kHalves * hh; j < 4 / kHalves * (hh + 1); ++j) {
          __m256i lo, hi;
          quant_pair<Type>(sub, h, j, &lo, &hi);
          if constexpr (kSigned) {  // IQ4_*: |q| against x with q's sign, as Q8_0
            const __m256i mlo = _mm256_sign_epi8(lo, lo), mhi = _mm256_sign_epi8(hi, hi);
            for (int r = 0; r < R; ++r) {
              sum[r] = dot4(sum[r], mlo, _mm256_sign_epi8(broadcast4(xb + r * k + 8 * j), lo));
              sum[r] = dot4(sum[r], mhi, _mm256_sign_epi8(broadcast4(xb + r * k + 8 * j + 4), hi));
            }
          } else {
            for (int r = 0; r < R; ++r) {
              sum[r] = dot4(sum[r], lo, broadcast4(xb + r * k + 8 * j));
              sum[r] = dot4(sum[r], hi, broadcast4(xb + r * k + 8 * j + 4));
            }
          }
        }
      }
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]),
                                 _mm256_mul_ps(wd[hh], _mm256_set1_ps(xd[r * nb + b])), acc[r]);
      if constexpr (Type == kQ2_K)  // the half's min: wm * xd * (its sum of xq)
        for (int r = 0; r < R; ++r) {
          const int32_t half = hh == 0 ? xs16[r * nb + b] : xs[r * nb + b] - xs16[r * nb + b];
          acc[r] = _mm256_fmadd_ps(
              wm[hh], _mm256_set1_ps(xd[r * nb + b] * static_cast<float>(half)), acc[r]);
        }
    }
    if constexpr (l.has_min)
      for (int r = 0; r < R; ++r)
        acc[r] = _mm256_fmadd_ps(
            wm[0], _mm256_set1_ps(xd[r * nb + b] * static_cast<float>(xs[r * nb + b])), acc[r]);
  }
  const __m256 bv = bias != nullptr ? _mm256_loadu_ps(bias + 8 * h) : _mm256_setzero_ps();
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + r * ldo + 8 * h, _mm256_add_ps(acc[r], bv));
}

// The driver's work for rows [0, rows) (rows <= kRows) and one or two tiles (`two`) at w (tile
// by tile, whatever `one_pass` says).
struct Kernel {
  static constexpr int kRows = avx2::kRows;
  template <int64_t Type>
  static void rows(int rows, const int8_t* xq, const float* xd, const int32_t* xs,
                   const int32_t* xs16, int64_t k, const uint8_t* w, int64_t ld_tile, bool two,
                   const float* bias, float* out, int64_t ldo, bool prefetch, bool) {
    sluice::with_rows<kRows>(rows, [&](auto r) {
      for (int t = 0; t < (two ? 2 : 1); ++t)
        for (int h = 0; h < 2; ++h)
          half_tile_product<Type, decltype(r)::value>(
              xq, xd, xs, xs16, k, w + t * ld_tile, h,
              bias != nullptr ? bias + kTileCols * t : nullptr, out + kTileCols * t, ldo,
              prefetch && h == 0);
    });
  }
};

}  // namespace avx2

#if defined(__AVX512F__) && defined(__AVX512BW__)
// ---- AVX-512 VNNI (the x86-64-v4 build) -------------------------------------------------------

#define SLUICE_VNNI __attribute__((target("avx512vnni")))

inline bool vnni_cpu() {
  static const bool ok = __builtin_cpu_supports("avx512vnni");
  return ok;
}

inline __m512i broadcast4(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  return _mm512_set1_epi32(four);
}

inline __m512 half16(const uint8_t* p) {  // 16 fp16 -> float32
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Load j (< 4) of a 4-bit sub-record: the unsigned quants of values 8j .. 8j + 3 (*lo) and
// 8j + 4 .. 8j + 7 (*hi), four per channel lane, with Q5's fifth bits and Q6_K's bits 4-5.
template <int64_t Type>
SLUICE_VNNI inline void quant_pair(const uint8_t* sub, int j, __m512i* lo, __m512i* hi) {
  if constexpr (has_2bit_fields(Type)) {  // bits 0-1 at 4 (j % 2), + 2; Q3_K's bit 2: masks
    const __m512i three = _mm512_set1_epi8(3), four = _mm512_set1_epi8(4);
    const __m512i raw = _mm512_loadu_si512(sub + 64 * (j / 2));
    const unsigned shift = 4 * (j % 2);
    *lo = _mm512_and_si512(_mm512_srli_epi16(raw, shift), three);
    *hi = _mm512_and_si512(_mm512_srli_epi16(raw, shift + 2), three);
    if constexpr (Type == kQ2_K) return;
    uint64_t masks[2];
    std::memcpy(masks, sub + 128 + 16 * j, 16);
    *lo = _mm512_mask_add_epi8(*lo, _cvtu64_mask64(masks[0]), *lo, four);
    *hi = _mm512_mask_add_epi8(*hi, _cvtu64_mask64(masks[1]), *hi, four);
    return;
  }
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i raw = _mm512_loadu_si512(sub + 64 * j);
  *lo = _mm512_and_si512(raw, nibble);
  *hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nibble);
  if constexpr (is_iq4(Type)) {  // codebook value + 128 (o = 128): the sign bit flipped
    const __m512i table = _mm512_xor_si512(
        _mm512_broadcast_i32x4(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(sluice::kIq4nlValues))),
        _mm512_set1_epi8(static_cast<char>(0x80)));
    *lo = _mm512_shuffle_epi8(table, *lo);
    *hi = _mm512_shuffle_epi8(table, *hi);
  }
  if constexpr (layout_of(Type).fifth_bits) {
    const __m512i sixteen = _mm512_set1_epi8(16);
    uint64_t masks[2];
    std::memcpy(masks, sub + 256 + 16 * j, 16);
    *lo = _mm512_mask_add_epi8(*lo, _cvtu64_mask64(masks[0]), *lo, sixteen);
    *hi = _mm512_mask_add_epi8(*hi, _cvtu64_mask64(masks[1]), *hi, sixteen);
  }
  if constexpr (Type == kQ6_K) {  // bits 4-5 of both halves of loads 2p, 2p + 1 (p = j / 2)
    const __m512i bits = _mm512_set1_epi8(0x30);
    const __m512i h = _mm512_loadu_si512(sub + 256 + 64 * (j / 2));
    const __m512i at_lo = j % 2 == 0 ? _mm512_slli_epi16(h, 4) : h;
    const __m512i at_hi = j % 2 == 0 ? _mm512_slli_epi16(h, 2) : _mm512_srli_epi16(h, 2);
    *lo = _mm512_or_si512(*lo, _mm512_and_si512(at_lo, bits));
    *hi = _mm512_or_si512(*hi, _mm512_and_si512(at_hi, bits));
  }
}

// The float factors of (half-)block h of sub-block s of a record whose scalars are at scal,
// 16 channels: a value is wd[h] * (q - offset) + wm (wm: the types with a min).
template <int64_t Type>
SLUICE_VNNI inline void block_factors(const uint8_t* scal, int64_t s, __m512 wd[2], __m512 wm[2]) {
  const __m512 d = half16(scal);
  if constexpr (Type == kQ6_K) {  // the int8 scales of 16-value sub-blocks 2s, 2s + 1
    for (int h = 0; h < 2; ++h) {
      const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scal + 32 + 32 * s + 16 * h));
      wd[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)));
    }
  } else if constexpr (is_kquant(Type)) {  // 6-bit scale and min of sub-block s
    __v16si sc, mn;
    kquant_scale_min<__v16si>(
        (__v16si)_mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(scal + 64 + 16 * s))),
        (__v16si)_mm512_srl_epi32(_mm512_loadu_si512(scal + 192),
                                  _mm_cvtsi32_si128(static_cast<int>(4 * s))),
        &sc, &mn);
    wd[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps((__m512i)sc));
    wm[0] = _mm512_sub_ps(_mm512_setzero_ps(),
                          _mm512_mul_ps(half16(scal + 32), _mm512_cvtepi32_ps((__m512i)mn)));
  } else if constexpr (Type == kQ2_K) {  // sub-blocks 2s, 2s + 1: sc | m << 4
    const __m512 dmin = half16(scal + 32);
    for (int h = 0; h < 2; ++h) {
      const __v16si b = (__v16si)_mm512_cvtepu8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(scal + 64 + 16 * (2 * s + h))));
      wd[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps((__m512i)(b & 15)));
      wm[h] = _mm512_sub_ps(_mm512_setzero_ps(),
                            _mm512_mul_ps(dmin, _mm512_cvtepi32_ps((__m512i)(b >> 4))));
    }
  } else if constexpr (Type == kQ3_K) {  // sub-blocks 2s, 2s + 1: 6-bit scales - 32
    const __v16si pair = (__v16si)_mm512_cvtepu8_epi32(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(scal + 32 + 16 * s)));
    const __v16si high = (__v16si)_mm512_loadu_si512(scal + 160);
    for (int h = 0; h < 2; ++h)
      wd[h] = _mm512_mul_ps(d, _mm512_cvtepi32_ps((__m512i)scale6_minus_32<__v16si>(pair, high, 2 * s + h)));
  } else if constexpr (Type == kIQ4_XS) {
    wd[0] = _mm512_mul_ps(d, _mm512_cvtepi32_ps((__m512i)scale6_minus_32<__v16si>(
        (__v16si)_mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(scal + 32 + 16 * (s / 2)))),
        (__v16si)_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scal + 96))), s)));
  } else {
    wd[0] = d;
    if constexpr (layout_of(Type).has_min) wm[0] = half16(scal + 32);
  }
}

// out[r, 16 t + c] for r < R, t < T, c < 16 of the R rows of xq (stride k) and the T packed
// tiles at w (tile stride ld_tile bytes): int32 block sums on vpdpbusd, float32 over blocks.
// Q6_K sums each 32-value block in two halves of 16 (their own scales; xs16: the first half's
// sum of xq). `prefetch`: hint each tile's bytes kPrefetchAhead on (past a tile's end: the
// next tile's).
template <int64_t Type, int R, int T>
SLUICE_VNNI inline void tile_product(const int8_t* xq, const float* xd, const int32_t* xs,
                                     const int32_t* xs16, int64_t k, const uint8_t* w,
                                     int64_t ld_tile, const float* bias, float* out, int64_t ldo,
                                     bool prefetch) {
  constexpr Layout l = layout_of(Type);
  constexpr int kHalves = has_halves(Type) ? 2 : 1;
  constexpr int64_t kBlockBytes = l.record_bytes() / l.subs();  // per 32 values, on average
  const int64_t nb = k / kBlock;
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    if (prefetch)
      for (int t = 0; t < T; ++t) {
        const uint8_t* ahead = w + t * ld_tile + b * kBlockBytes + kPrefetchAhead;
        for (int64_t o = 0; o < kBlockBytes; o += 64) __builtin_prefetch(ahead + o, 0, 3);
      }
    const int64_t s = b % l.subs();
    const uint8_t* rec = w + b / l.subs() * l.record_bytes();
    const uint8_t* sub = rec + s * l.sub_bytes;
    const int8_t* xb = xq + b * kBlock;
    __m512 wd[T][2], wm[T][2];
    for (int t = 0; t < T; ++t)
      block_factors<Type>(rec + t * ld_tile + l.scalars_at(), s, wd[t], wm[t]);
#pragma GCC unroll 2
    for (int h = 0; h < kHalves; ++h) {
      __m512i sum[R][T];
      for (int r = 0; r < R; ++r) {
        int32_t xsum = xs[r * nb + b];
        if constexpr (kHalves == 2) xsum = h == 0 ? xs16[r * nb + b] : xsum - xs16[r * nb + b];
        const __m512i start = _mm512_set1_epi32(-l.offset * xsum);
        for (int t = 0; t < T; ++t) sum[r][t] = start;
      }
      if constexpr (Type == kQ8_0) {
        for (int j = 0; j < 8; ++j) {
          __m512i wv[T];
          for (int t = 0; t < T; ++t) wv[t] = _mm512_loadu_si512(sub + t * ld_tile + 64 * j);
          for (int r = 0; r < R; ++r) {
            const __m512i xv = broadcast4(xb + r * k + 4 * j);
            for (int t = 0; t < T; ++t) sum[r][t] = _mm512_dpbusd_epi32(sum[r][t], wv[t], xv);
          }
        }
      } else {
#pragma GCC unroll 4
        for (int j = 4 / kHalves * h; j < 4 / kHalves * (h + 1); ++j) {
          __m512i lo[T], hi[T];
          for (int t = 0; t < T; ++t) quant_pair<Type>(sub + t * ld_tile, j, &lo[t], &hi[t]);
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
      for (int r = 0; r < R; ++r) {
        const __m512 d = _mm512_set1_ps(xd[r * nb + b]);
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum[r][t]), _mm512_mul_ps(wd[t][h], d),
                                      acc[r][t]);
        if constexpr (Type == kQ2_K) {  // the half's min: wm * xd * (its sum of xq)
          const int32_t half = h == 0 ? xs16[r * nb + b] : xs[r * nb + b] - xs16[r * nb + b];
          const __m512 dxs = _mm512_set1_ps(xd[r * nb + b] * static_cast<float>(half));
          for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wm[t][h], dxs, acc[r][t]);
        }
      }
    }
    if constexpr (l.has_min)
      for (int r = 0; r < R; ++r) {
        const __m512 dxs =
            _mm512_set1_ps(xd[r * nb + b] * static_cast<float>(xs[r * nb + b]));
        for (int t = 0; t < T; ++t) acc[r][t] = _mm512_fmadd_ps(wm[t][0], dxs, acc[r][t]);
      }
  }
  for (int t = 0; t < T; ++t) {
    const __m512 bv = bias != nullptr ? _mm512_loadu_ps(bias + 16 * t) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_storeu_ps(out + r * ldo + 16 * t, _mm512_add_ps(acc[r][t], bv));
  }
}

// The driver's work for rows [0, rows) (rows <= kRows) and one or two tiles (`two`) at w.
// `one_pass`: the call's rows are all here (m <= kRows: decode of a few requests), so the
// tiles are read once, from memory: one after the other, a single stream; else side by side,
// each x value loaded once for both.
struct VnniKernel {
  static constexpr int kRows = vnni::kRows;
  template <int64_t Type>
  static void rows(int rows, const int8_t* xq, const float* xd, const int32_t* xs,
                   const int32_t* xs16, int64_t k, const uint8_t* w, int64_t ld_tile, bool two,
                   const float* bias, float* out, int64_t ldo, bool prefetch, bool one_pass) {
    sluice::with_rows<kRows>(rows, [&](auto r) {
      constexpr int R = decltype(r)::value;
      if (two && one_pass) {
        tile_product<Type, R, 1>(xq, xd, xs, xs16, k, w, ld_tile, bias, out, ldo, prefetch);
        tile_product<Type, R, 1>(xq, xd, xs, xs16, k, w + ld_tile, ld_tile,
                                 bias != nullptr ? bias + 16 : nullptr, out + 16, ldo, prefetch);
      } else if (two) {
        tile_product<Type, R, 2>(xq, xd, xs, xs16, k, w, ld_tile, bias, out, ldo, prefetch);
      } else {
        tile_product<Type, R, 1>(xq, xd, xs, xs16, k, w, ld_tile, bias, out, ldo, prefetch);
      }
    });
  }
};

#undef SLUICE_VNNI

#else

inline bool vnni_cpu() { return false; }

#endif  // AVX-512

// ---- the driver (both kernels) ------------------------------------------------------------

template <int64_t Type, class Kernel>
void linear(float* out, int64_t m, int64_t n, int64_t k, const float* x, int64_t ldx,
            const uint8_t* w, const float* bias) {
  constexpr Layout l = layout_of(Type);
  constexpr int kItemRows = Kernel::kRows;
  const int64_t nb = k / kBlock, ld_tile = k / l.block_elems * l.record_bytes();
  std::vector<int8_t> xq(m * k);
  std::vector<float> xd(m * nb);
  std::vector<int32_t> xs(m * nb), xs16(has_halves(Type) ? m * nb : 0);
  int32_t* xs16p = has_halves(Type) ? xs16.data() : nullptr;
  const int64_t tiles = n / kTileCols, pairs = (tiles + 1) / 2;
  const int64_t chunks = (m + kRowChunk - 1) / kRowChunk;
  // a few rows (decode) are quantized before the parallel region: one barrier less
  const bool serial_quantize = m <= kSerialQuantizeRows;
  const bool one_pass = m <= kItemRows;  // each item reads its tiles once (VnniKernel::rows)
  const int64_t grain =
      chunks > 1 ? 1 : std::max<int64_t>(1, pairs / (4 * std::max(1, omp_get_max_threads())));
  if (serial_quantize) quantize_rows(x, ldx, m, k, xq.data(), xd.data(), xs.data(), xs16p);
#pragma omp parallel
  {
    if (!serial_quantize) {
#pragma omp for schedule(static)
      for (int64_t r = 0; r < m; ++r)
        quantize_rows(x + r * ldx, ldx, 1, k, xq.data() + r * k, xd.data() + r * nb,
                      xs.data() + r * nb, xs16p != nullptr ? xs16p + r * nb : nullptr);
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
      for (int64_t r = chunk * kRowChunk; r < r_end; r += kItemRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kItemRows, r_end - r));
        const bool first = r == chunk * kRowChunk;  // the tiles' bytes come from memory
        const int32_t* s16 = xs16p != nullptr ? xs16p + r * nb : nullptr;
        Kernel::template rows<Type>(rows, xq.data() + r * k, xd.data() + r * nb,
                                    xs.data() + r * nb, s16, k, wt, ld_tile, two, bt,
                                    out + r * n + t0 * kTileCols, n, first, one_pass);
      }
    }
  }
}

// Which kernel runs the packed layout here: AVX512-VNNI where the CPU has it, else AVX2.
inline const char* kernel_name() {
  return vnni_cpu() ? "avx512vnni" : avx2::available() ? "avx2" : "";
}

template <class Kernel>
void run_with(int64_t type, float* out, int64_t m, int64_t n, int64_t k, const float* x,
              int64_t ldx, const uint8_t* w, const float* bias) {
  switch (type) {
#define SLUICE_TYPE(T) \
  case T: linear<T, Kernel>(out, m, n, k, x, ldx, w, bias); break;
    SLUICE_TYPE(kQ8_0)
    SLUICE_TYPE(kQ4_0)
    SLUICE_TYPE(kQ4_1)
    SLUICE_TYPE(kQ5_0)
    SLUICE_TYPE(kQ5_1)
    SLUICE_TYPE(kQ4_K)
    SLUICE_TYPE(kQ5_K)
    SLUICE_TYPE(kQ6_K)
    SLUICE_TYPE(kIQ4_NL)
    SLUICE_TYPE(kIQ4_XS)
    SLUICE_TYPE(kQ3_K)
    SLUICE_TYPE(kQ2_K)
#undef SLUICE_TYPE
    default: break;
  }
}

inline void run(int64_t type, float* out, int64_t m, int64_t n, int64_t k, const float* x,
                int64_t ldx, const uint8_t* w, const float* bias) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  if (vnni_cpu()) return run_with<VnniKernel>(type, out, m, n, k, x, ldx, w, bias);
#endif
  run_with<avx2::Kernel>(type, out, m, n, k, x, ldx, w, bias);
}

#else  // no AVX2: the packed layout has no kernel here

inline const char* kernel_name() { return ""; }
inline void run(int64_t, float*, int64_t, int64_t, int64_t, const float*, int64_t,
                const uint8_t*, const float*) {}

#endif

inline bool available() { return kernel_name()[0] != '\0'; }

}  // namespace vnni

std::string packed_int8_kernel() { return vnni::kernel_name(); }

namespace {
// w: a contiguous uint8 [N, K / 32 * block_bytes] of a packable type with N a multiple of 16
// (the packed form's contract).
void check_packable(const at::Tensor& w, int64_t type, const char* who) {
  TORCH_CHECK(vnni::packable(type), who, ": GGML type ", type,
              " has no VNNI layout (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, "
              "IQ4_NL and IQ4_XS do)");
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
