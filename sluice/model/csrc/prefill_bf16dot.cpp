// Prefill attention over a bfloat16 KV cache with bf16 products (AVX512-BF16 vdpbf16ps), float32
// accumulation: paged_prefill_attention's path when it is asked for bf16 products (the CPU paged
// backend asks for it with a bf16 cache) and `available(head_dim)`, for the requests with at
// least kMinQueries query tokens (prompts and prompt chunks). Fewer queries per key (a
// speculative verification's 1 + k tokens, a short chunk) do not pay for packing the keys:
// those rows are bound by reading the keys, as decode rows, and keep the float32 products, the
// decode kernel's precision.
//
// Same work plan and online softmax as the float32 path (prefill_tiles.h, paged_prefill.cpp's
// header), different products and roundings:
//   S = bf16(q * scale) . K        (the keys are the cache's bf16 values; float32 sums)
//   O += bf16(p) . V               (p = e^(S - m') in float32, rounded to bf16; float32 sums)
// q and p are rounded to nearest even (vcvtneps2bf16). The running max, the exponentials, l
// (from the unrounded p) and the final O / l are float32. Against the float32 path each output
// moves by about 2^-9 of the values' magnitude (a bf16 rounding of q and of p), the precision
// of a bf16 model's own activations (HF transformers rounds S, p and O to bf16 as well).
//
// Layout. Before the items run, every (prefill request r, kv head g) has its visible keys and
// values [0, seq_len) copied once out of the blocks into pair-interleaved (VNNI) panels, in
// parallel over 128-key chunks:
//   keys:   kp[(kg * D/2 + p) * 16 + i] = key 16 kg + i's bf16 pair (2p, 2p + 1), as uint32
//           (keys past seq_len in the last group of 16 are 0)
//   values: vp[tp * D + e] = (v[2 tp + 1][e] << 16) | v[2 tp][e]
//           (the second key of the last pair past seq_len is 0: p is 0 there, and 0 * 0 is 0)
// so that one vdpbf16ps of a broadcast q pair (2p, 2p + 1) and one key panel row adds that
// pair's products to 16 keys' scores, and one of a broadcast p pair (2tp, 2tp + 1) and one value
// row adds two keys' weighted values to 16 output dims. The float32 path copies each chunk
// again per item instead (widening it).
//
// Rows of an item (query x head in group: (i - i0) * G + j, as the float32 path) are padded to
// a multiple of 8 with zero queries. QK^T runs 8 rows x 32 keys per register block (16
// accumulators), PV 4 rows x 64 dims (16 accumulators). Requires D % 32 == 0 (64, 96, 128, 256:
// whole bf16 pairs and whole 16-dim vectors, 64-dim blocks with one 32-dim rest).
//
// Compiled in the x86-64-v4 build only (function attribute avx512bf16); available() says whether
// this build has it and the CPU reports AVX512-BF16.

namespace prefill_bf16dot {

constexpr int64_t kMinQueries = sluice::prefill::kTileQ;  // a request's queries for this path

#if defined(__AVX512F__) && defined(__AVX512BW__)

#define SLUICE_BF16DOT __attribute__((target("avx512f,avx512bw,avx512bf16")))

using sluice::prefill::Item;
using sluice::prefill::kTileK;
using sluice::prefill::kTileQ;

constexpr int64_t kRowBlock = 8;  // QK^T rows per register block; item rows pad to this

inline bool available(int64_t head_dim) {
  static const bool ok = __builtin_cpu_supports("avx512bf16");
  return ok && head_dim % 32 == 0;
}

// 16 float32 -> 16 bf16 (round to nearest even) at dst.
SLUICE_BF16DOT inline void store_bf16x16(uint16_t* dst, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// dst[0 .. n) = bf16(src[0 .. n) * scale), n % 16 == 0.
SLUICE_BF16DOT inline void scaled_row_to_bf16(uint16_t* dst, const float* src, int64_t n,
                                              float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t e = 0; e < n; e += 16)
    store_bf16x16(dst + e, _mm512_mul_ps(_mm512_loadu_ps(src + e), s));
}

// p row: dst[0 .. n2) = bf16(src[0 .. n2)) where n2 = n rounded up to even; src[n] (if n is
// odd) must be 0 (softmax_chunk_row leaves zeros past `visible`, and the chunk buffer is
// kTileK wide, so it is).
SLUICE_BF16DOT inline void probs_to_bf16(uint16_t* dst, const float* src, int64_t n) {
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) store_bf16x16(dst + t, _mm512_loadu_ps(src + t));
  if (t < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - t + (n & 1))) - 1);
    const __m256i bits = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, src + t));
    _mm256_mask_storeu_epi16(dst + t, mask, bits);
  }
}

// Keys [k0, k1) of head g of one request (its block row `blocks`) into the key panel kp (see
// the header; k0 a multiple of 16) and their values into the value panel vp (k0 even).
inline void pack_chunk(uint32_t* kp, uint32_t* vp, const uint16_t* cache, int64_t v_offset,
                       const int32_t* blocks, int64_t bs, int64_t row_len, int64_t g, int64_t d,
                       int64_t k0, int64_t k1, int64_t seq_len) {
  const int64_t half = d / 2;
  auto row_of = [&](int64_t t) {
    const int64_t slot = static_cast<int64_t>(blocks[t / bs]) * bs + t % bs;
    return cache + slot * row_len + g * d;
  };
  for (int64_t t = k0; t < k1; ++t) {
    const uint32_t* key = reinterpret_cast<const uint32_t*>(row_of(t));
    uint32_t* dst = kp + (t / 16) * half * 16 + t % 16;
    for (int64_t p = 0; p < half; ++p) dst[p * 16] = key[p];
  }
  if (k1 == seq_len)  // zero keys past the end of the last group of 16
    for (int64_t t = k1; t % 16 != 0; ++t) {
      uint32_t* dst = kp + (t / 16) * half * 16 + t % 16;
      for (int64_t p = 0; p < half; ++p) dst[p * 16] = 0;
    }
  for (int64_t t = k0; t < k1; t += 2) {
    const uint16_t* a = row_of(t) + v_offset;
    const uint16_t* b = t + 1 < seq_len ? row_of(t + 1) + v_offset : nullptr;
    uint32_t* dst = vp + (t / 2) * d;
    for (int64_t e = 0; e < d; ++e)
      dst[e] = static_cast<uint32_t>(a[e]) | (b ? static_cast<uint32_t>(b[e]) << 16 : 0u);
  }
}

// s[r * lds + 16 kg + i] = q row r . key 16 kg + i for r < kRowBlock, kg < n_groups
// (q: kRowBlock rows of D/2 bf16 pairs; kp: the key panel from the chunk's first group).
SLUICE_BF16DOT void qk_rows(float* s, int64_t lds, const uint32_t* q, const uint32_t* kp,
                            int64_t half, int64_t n_groups) {
  int64_t kg = 0;
  for (; kg + 2 <= n_groups; kg += 2) {
    __m512 acc[kRowBlock][2];
    for (int r = 0; r < kRowBlock; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + kg * half * 16;
    const uint32_t* k1 = k0 + half * 16;
    for (int64_t p = 0; p < half; ++p) {
      const __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * 16);
      const __m512bh b = (__m512bh)_mm512_loadu_si512(k1 + p * 16);
      for (int r = 0; r < kRowBlock; ++r) {
        const __m512bh qv = (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * half + p]));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qv, a);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qv, b);
      }
    }
    for (int r = 0; r < kRowBlock; ++r) {
      _mm512_storeu_ps(s + r * lds + kg * 16, acc[r][0]);
      _mm512_storeu_ps(s + r * lds + kg * 16 + 16, acc[r][1]);
    }
  }
  if (kg < n_groups) {
    __m512 acc[kRowBlock];
    for (int r = 0; r < kRowBlock; ++r) acc[r] = _mm512_setzero_ps();
    const uint32_t* k0 = kp + kg * half * 16;
    for (int64_t p = 0; p < half; ++p) {
      const __m512bh a = (__m512bh)_mm512_loadu_si512(k0 + p * 16);
      for (int r = 0; r < kRowBlock; ++r)
        acc[r] = _mm512_dpbf16_ps(
            acc[r], (__m512bh)_mm512_set1_epi32(static_cast<int>(q[r * half + p])), a);
    }
    for (int r = 0; r < kRowBlock; ++r) _mm512_storeu_ps(s + r * lds + kg * 16, acc[r]);
  }
}

// o[r * d + e0 + 16 j + l] += sum_tp p[r][tp] . vp[tp][e0 + 16 j + l] for r < 4, j < NV
// (p: 4 rows of bf16 pairs, row stride ldp pairs; vp: the value panel from the chunk's first
// pair, row stride d).
template <int NV>
SLUICE_BF16DOT void pv_rows(float* o, int64_t d, int64_t e0, const uint32_t* p, int64_t ldp,
                            const uint32_t* vp, int64_t n_pairs) {
  constexpr int R = 4;
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_loadu_ps(o + r * d + e0 + 16 * j);
  for (int64_t tp = 0; tp < n_pairs; ++tp) {
    __m512bh v[NV];
    for (int j = 0; j < NV; ++j)
      v[j] = (__m512bh)_mm512_loadu_si512(vp + tp * d + e0 + 16 * j);
    for (int r = 0; r < R; ++r) {
      const __m512bh pv = (__m512bh)_mm512_set1_epi32(static_cast<int>(p[r * ldp + tp]));
      for (int j = 0; j < NV; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], pv, v[j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) _mm512_storeu_ps(o + r * d + e0 + 16 * j, acc[r][j]);
}

// out for the requests with q_len >= kMinQueries (paged_prefill.cpp's contract otherwise), cache
// c10::BFloat16.
SLUICE_BF16DOT void run(float* op, const float* qp, int64_t ldq, int64_t n_heads, int64_t d,
                        const uint16_t* kc, int64_t n_blocks, int64_t bs, int64_t kvh,
                        const int32_t* bt, int64_t max_blocks, const int64_t* qsl,
                        const int64_t* lens, int64_t n_reqs, float scale) {
  const int64_t group = n_heads / kvh, row_len = kvh * d, half = d / 2;
  const int64_t v_offset = n_blocks * bs * row_len;
  const std::vector<Item> items =
      sluice::prefill::plan_items(qsl, lens, n_reqs, kvh, kMinQueries, INT64_MAX);
  if (items.empty()) return;
  const int64_t n_items = static_cast<int64_t>(items.size());

  // Panels of every (request, kv head): offsets into kp (keys, rounded up to 16) and vp
  // (pairs); chunks of kTileK keys are the packing's work units.
  std::vector<int64_t> k_at(n_reqs * kvh, 0), v_at(n_reqs * kvh, 0);
  struct Chunk {
    int64_t r, g, k0, k1;
  };
  std::vector<Chunk> chunks;
  int64_t k_total = 0, v_total = 0;
  for (int64_t r = 0; r < n_reqs; ++r) {
    if (qsl[r + 1] - qsl[r] < kMinQueries) continue;
    const int64_t len = lens[r];
    for (int64_t g = 0; g < kvh; ++g) {
      k_at[r * kvh + g] = k_total;
      v_at[r * kvh + g] = v_total;
      k_total += (len + 15) / 16 * 16 * half;
      v_total += (len + 1) / 2 * d;
      for (int64_t k0 = 0; k0 < len; k0 += kTileK)
        chunks.push_back({r, g, k0, std::min(len, k0 + kTileK)});
    }
  }
  std::vector<uint32_t> kp(k_total), vp(v_total);
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const int64_t max_rows = (kTileQ * group + kRowBlock - 1) / kRowBlock * kRowBlock;

#pragma omp parallel
  {
#pragma omp for schedule(dynamic, 4)
    for (int64_t c = 0; c < n_chunks; ++c) {
      const Chunk& w = chunks[c];
      pack_chunk(kp.data() + k_at[w.r * kvh + w.g], vp.data() + v_at[w.r * kvh + w.g], kc,
                 v_offset, bt + w.r * max_blocks, bs, row_len, w.g, d, w.k0, w.k1, lens[w.r]);
    }
    std::vector<uint16_t> qb(max_rows * d), pb(max_rows * kTileK);
    std::vector<float> s(max_rows * kTileK), o(max_rows * d), m(max_rows), l(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& w = items[it];
      const int64_t q_len = qsl[w.r + 1] - qsl[w.r], ctx = lens[w.r] - q_len;
      const int64_t rows = (w.i1 - w.i0) * group, key_end = ctx + w.i1;
      const int64_t padded = (rows + kRowBlock - 1) / kRowBlock * kRowBlock;
      const uint32_t* kpanel = kp.data() + k_at[w.r * kvh + w.g];
      const uint32_t* vpanel = vp.data() + v_at[w.r * kvh + w.g];
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t i = w.i0 + row / group, j = row % group;
        const float* src = qp + (qsl[w.r] + i) * ldq + (w.g * group + j) * d;
        scaled_row_to_bf16(qb.data() + row * d, src, d, scale);
      }
      std::fill(qb.begin() + rows * d, qb.begin() + padded * d, uint16_t{0});
      std::fill(o.begin(), o.begin() + padded * d, 0.f);
      std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + rows, 0.f);
      const uint32_t* q32 = reinterpret_cast<const uint32_t*>(qb.data());
      uint32_t* p32 = reinterpret_cast<uint32_t*>(pb.data());
      for (int64_t k0 = 0; k0 < key_end; k0 += kTileK) {
        const int64_t kn = std::min(kTileK, key_end - k0);
        const int64_t n_groups = (kn + 15) / 16, n_pairs = (kn + 1) / 2;
        for (int64_t r0 = 0; r0 < padded; r0 += kRowBlock)
          qk_rows(s.data() + r0 * kTileK, kTileK, q32 + r0 * half, kpanel + k0 * half, half,
                  n_groups);
        for (int64_t row = 0; row < padded; ++row) {
          float* sr = s.data() + row * kTileK;
          if (row < rows) {
            // keys k0 .. limit are visible to this row (its query's absolute position)
            const int64_t visible = std::min(kn, ctx + w.i0 + row / group - k0 + 1);
            sluice::prefill::softmax_chunk_row(sr, kn, visible, m[row], l[row],
                                               o.data() + row * d, d);
          } else {
            std::fill(sr, sr + kn, 0.f);
          }
          if (kn & 1) sr[kn] = 0.f;  // the pad of the last pair (kTileK is even: in the row)
          probs_to_bf16(pb.data() + row * kTileK, sr, kn);
        }
        const uint32_t* vchunk = vpanel + k0 / 2 * d;
        for (int64_t r0 = 0; r0 < padded; r0 += 4) {
          float* orow = o.data() + r0 * d;
          const uint32_t* prow = p32 + r0 * (kTileK / 2);
          int64_t e0 = 0;
          for (; e0 + 64 <= d; e0 += 64)
            pv_rows<4>(orow, d, e0, prow, kTileK / 2, vchunk, n_pairs);
          if (e0 < d) pv_rows<2>(orow, d, e0, prow, kTileK / 2, vchunk, n_pairs);
        }
      }
      sluice::prefill::store_item_output(op, o.data(), l.data(), w, qsl, group, n_heads, d);
    }
  }
}

#undef SLUICE_BF16DOT

#else  // no AVX-512 in this build

inline bool available(int64_t) { return false; }
inline void run(float*, const float*, int64_t, int64_t, int64_t, const uint16_t*, int64_t,
                int64_t, int64_t, const int32_t*, int64_t, const int64_t*, const int64_t*,
                int64_t, float) {}

#endif

}  // namespace prefill_bf16dot
