// Paged decode attention for CPU: one query token per request, keys and values read in place
// from the block-structured KV cache (no gather copy). fp32 arithmetic over a float32,
// bfloat16, float16 or fp8 (e4m3fn / e5m2) cache (16-bit and 8-bit keys/values are widened to
// fp32 in registers as they are read, exactly: fp8_rows.h); OpenMP over (request, key chunk).
//
// Shapes (all contiguous):
//   q          [N, H, D]                 query of each decode request (rows may be strided)
//   kv_cache   [2, num_blocks, B, Hkv, D]  B = block_size; [0] keys, [1] values
//   block_ids  [N * nb] int64            request n's first nb block-table entries
//   seq_lens   [N] int64                 keys 0 .. seq_lens[n]-1 are attended
//   out        [N, H, D]
// Query head h uses kv head h / G with G = H / Hkv (HF's repeat_kv order).
// Key t of request n lives at block block_ids[n*nb + t/B], offset t%B.
// Sums and exp come from vec_math.h (vectorised without -ffast-math).
//
// Work item = (request n, key chunk c): row n's keys in chunks of kChunkTokens (whole blocks),
// cut by its own length only, so a row's result never depends on the other rows of the step.
// A chunk is a run of whole blocks, so the item reads cached token rows (all kv heads,
// contiguous) in one forward sweep, which the hardware prefetcher follows. A row of one chunk
// writes its normalised output. A longer row is split ("split-KV"): each item keeps its
// chunk's running max m, exp-sum l and unnormalised sum acc per query head, and a second pass
// merges the chunks: out = sum_c e^(m_c - M) acc_c / sum_c e^(m_c - M) l_c.
// Within a chunk, keys go in tiles of up to kTile rows of one block: a tile's scores for one
// head are 16 lane-vectors summed by one transpose, and its value sweep keeps the head's
// output in registers over the tile's keys (same per-element order as key by key).
#include "fp8_rows.h"
#include "kv_rows.h"
#include "ops.h"
#include "vec_math.h"

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstring>
#include <immintrin.h>
#include <limits>
#include <omp.h>
#include <vector>

namespace {

constexpr int64_t kChunkTokens = 128;  // keys per chunk of a row (rounded to blocks)

template <typename T>  // the cache's element type (kv_rows.h's visit_kv_cache_type)
struct Geometry {
  int64_t n_heads, kvh, d, group, bs;
  const T* k;   // keys of the whole cache
  const T* v;   // values
  const int64_t* bid;
  int64_t nb;
};

// f(t, rows, nt, next, next_rows) for keys t in [t0, t1) of request n in order, in tiles of at
// most kTile keys within one block: rows = the cached row (all kv heads, row_len elements,
// consecutive rows row_len apart) of key t, the tile's first, in `cache` (keys or values);
// next = the first row of the tile after it (the rest of this block, else the start of the
// next block), next_rows of them (0 after the last block, next then = rows' block). f
// prefetches next's rows one by one as it reads its own (prefetch_span). Walks whole blocks
// (no division per key). Blocks are scattered, and the hardware prefetcher, which restarts at
// every block, left the sweep latency-bound; hints for a whole tile issued in one burst before
// it stalled the core until the miss queue drained (memory and compute in series: 18 GB/s for
// W1's 64 rows of SmolLM2's bf16 cache on 2 Zen 5 threads), hints spread over the tile's keys
// overlap the two (27 GB/s; one tile ahead beat two or three).
constexpr int64_t kTile = 16;
template <typename T, typename F>
inline void for_each_tile(const Geometry<T>& g, int64_t n, int64_t t0, int64_t t1,
                          const T* cache, F&& f) {
  const int64_t row_len = g.kvh * g.d, block_len = g.bs * row_len;
  const int64_t last_block = (t1 - 1) / g.bs;
  for (int64_t b = t0 / g.bs; b <= last_block; ++b) {
    const T* block = cache + g.bid[n * g.nb + b] * block_len;
    const T* next = b < last_block ? cache + g.bid[n * g.nb + b + 1] * block_len : nullptr;
    const int64_t first = std::max(t0, b * g.bs), last = std::min(t1, (b + 1) * g.bs);
    for (int64_t t = first; t < last; t += kTile) {
      const int64_t nt = std::min(kTile, last - t);
      const int64_t ahead = t + nt - b * g.bs;  // the next tile's offset in this block
      const T* pf = ahead < g.bs ? block + ahead * row_len : next ? next : block;
      const int64_t pf_rows = ahead < g.bs ? std::min(kTile, g.bs - ahead) : next ? kTile : 0;
      f(t, block + (t - b * g.bs) * row_len, nt, pf, pf_rows);
    }
  }
}

// Hints the n elements at p into L2 (locality 2: its miss queue holds more lines in flight
// than L1's), one hint per cache line touched.
template <typename T>
inline void prefetch_span(const T* p, int64_t n) {
  const char* c = reinterpret_cast<const char*>(p);
  const char* end = c + n * static_cast<int64_t>(sizeof(T));
  const char* line =
      reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(c) & ~uintptr_t{63});
  for (; line < end; line += 64) __builtin_prefetch(line, 0, 2);
}

using sluice::load16;
using sluice::v16;

// r[i] = the sum of a[i]'s 16 lanes for i < 16, lanes added in reduce_lanes' order (j + 8,
// then j + 4, j + 2, j + 1): four levels that each fold every vector in half and pack two
// vectors' halves into one (15 vector adds of 30 shuffles instead of 16 separate reductions).
inline v16 transpose_sum(const v16* a) {
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                   19, 20, 21, 22, 23) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25,
                                   26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18,
                                   19, 24, 25, 26, 27) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21,
                                   22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    d[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20,
                                   21, 24, 25, 28, 29) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19,
                                   22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(d[0], d[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                 28, 30) +
         __builtin_shufflevector(d[0], d[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                 29, 31);
}

// The widest float vector this build keeps in one register (AVX-512: 16 lanes, else 8) and
// its loads from a float32 / bfloat16 / fp8 cache row: a bf16 element widened exactly (its 16
// bits are the high half of the float32: zero-extend to 32 bits, shift into the high half), an
// fp8 one through fp16 (fp8_rows.h), a float16 one by vcvtph2ps (exact).
#if defined(__AVX512F__)
using vreg = v16;
inline vreg load_vreg(const float* p) { return load16(p); }
inline vreg load_vreg(const c10::BFloat16* p) {
  const __m512i wide = _mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
  return reinterpret_cast<v16>(_mm512_castsi512_ps(wide));
}
inline vreg load_vreg(const c10::Half* p) {
  return reinterpret_cast<v16>(
      _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
template <typename T, std::enable_if_t<sluice::kIsFp8<T>, int> = 0>
inline vreg load_vreg(const T* p) {  // in kFp8Unit<T> units (see attend_range)
  return reinterpret_cast<v16>(sluice::widen16_fp8_units(p));
}
#else
using vreg = float __attribute__((vector_size(32)));
inline vreg load_vreg(const float* p) {
  vreg v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vreg load_vreg(const c10::BFloat16* p) {
  const __m256i wide = _mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
  return reinterpret_cast<vreg>(_mm256_castsi256_ps(wide));
}
inline vreg load_vreg(const c10::Half* p) {
  return reinterpret_cast<vreg>(
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
template <typename T, std::enable_if_t<sluice::kIsFp8<T>, int> = 0>
inline vreg load_vreg(const T* p) {  // in kFp8Unit<T> units (see attend_range)
  return reinterpret_cast<vreg>(sluice::widen8_fp8_units(p));
}
#endif
constexpr int kRegLanes = sizeof(vreg) / sizeof(float);

// 16 cache elements as float32 (one or two vregs).
template <typename T>
inline v16 load16_kv(const T* p) {
  if constexpr (kRegLanes == 16) {
    return load_vreg(p);
  } else {
    const vreg lo = load_vreg(p), hi = load_vreg(p + kRegLanes);
    v16 f;
    std::memcpy(&f, &lo, sizeof lo);
    std::memcpy(reinterpret_cast<char*>(&f) + sizeof lo, &hi, sizeof hi);
    return f;
  }
}
template <typename T>
inline float load1_kv(const T* p) {  // in kFp8Unit<T> units, as load_vreg
  if constexpr (sluice::kFp8Unit<T> != 1.f) return static_cast<float>(*p) / sluice::kFp8Unit<T>;
  return static_cast<float>(*p);
}

// out[i] = sum over c < dv of a[16c + i] * b[16c + i] (in order of c), i < 16. Without
// AVX-512 a 16-float value is two registers, and GCC spilled a v16 accumulator (and the v16
// result) through the stack lane by lane (16-byte stores reloaded as 32-byte vectors: failed
// store forwards, ~4x the whole attention); two 8-float accumulators stay in registers and
// are stored as they are, giving the same lanes, so the scores are bit-identical.
template <typename T>
inline void dot_lanes(float* out, const float* a, const T* b, int64_t dv) {
#if defined(__AVX512F__)
  v16 s = {};
  for (int64_t c = 0; c < dv; ++c) s += load16(a + 16 * c) * load16_kv(b + 16 * c);
  std::memcpy(out, &s, sizeof s);
#else
  vreg lo = {}, hi = {};  // 8 lanes each
  for (int64_t c = 0; c < dv; ++c) {
    lo += load_vreg(a + 16 * c) * load_vreg(b + 16 * c);
    hi += load_vreg(a + 16 * c + 8) * load_vreg(b + 16 * c + 8);
  }
  std::memcpy(out, &lo, sizeof lo);
  std::memcpy(out + 8, &hi, sizeof hi);
#endif
}

// part[16 g + j] = the 16-lane partial products of q_(h0+g) . k_j (dot_lanes' lanes and
// order) for the GS query heads h0 + g sharing one kv head (q_(h0+g) = q0 + g * D) and the
// nt <= 16 keys of a tile, k_j = kh + j * stride; DV = D / 16 known at compile time. With
// AVX-512 the heads' q stay in registers over the tile and each key is loaded (and widened)
// once for the GS heads; the loop state stays in registers (GCC kept dot_lanes' runtime-length
// loop counters on the stack inside the OpenMP body: a store-forward per 16 dims, ~1.5x the
// whole attention). Reading key j, it prefetches the same DV * 16 columns of row j of the next
// tile, pf (j < pf_rows; rows `stride` apart).
template <int DV, int GS, typename T>
inline void score_tile(v16* part, const float* q0, int64_t d, const T* kh, int64_t stride,
                       int64_t nt, const T* pf, int64_t pf_rows) {
#if defined(__AVX512F__)
  v16 qv[GS][DV];
  for (int g = 0; g < GS; ++g)
    for (int c = 0; c < DV; ++c) qv[g][c] = load16(q0 + g * d + 16 * c);
  for (int64_t j = 0; j < nt; ++j) {
    if (j < pf_rows) prefetch_span(pf + j * stride, DV * 16);
    v16 k[DV];
    for (int c = 0; c < DV; ++c) k[c] = load16_kv(kh + j * stride + 16 * c);
    for (int g = 0; g < GS; ++g) {
      v16 s = {};
      for (int c = 0; c < DV; ++c) s += qv[g][c] * k[c];
      part[16 * g + j] = s;
    }
  }
#else
  for (int64_t j = 0; j < pf_rows; ++j) prefetch_span(pf + j * stride, DV * 16);
  for (int g = 0; g < GS; ++g)
    for (int64_t j = 0; j < nt; ++j)
      dot_lanes(reinterpret_cast<float*>(part + 16 * g + j), q0 + g * d, kh + j * stride, DV);
#endif
}


// For the GS query heads g sharing one kv head: o_g[16c + i] += sum over j < nt, in order of
// j, of w_g[j] * rows[j * stride + 16c + i], o_g = o0 + g * ldo, w_g = w0 + g * ldw, for the NC
// 16-dim chunks c < NC. The sums stay in registers (vreg-sized) over the tile's keys (one load
// and store of o per tile, not per key), and each value row is loaded (and widened) once for
// the GS heads. Reading row j, it prefetches the same NC * 16 columns of row j of the next
// tile, pf (j < pf_rows).
template <int NC, int GS, typename T>
inline void axpy_tile(float* o0, int64_t ldo, const float* w0, int64_t ldw, const T* rows,
                      int64_t stride, int64_t nt, const T* pf, int64_t pf_rows) {
  constexpr int R = NC * 16 / kRegLanes;
  vreg acc[GS][R];
  for (int g = 0; g < GS; ++g)
    for (int c = 0; c < R; ++c) acc[g][c] = load_vreg(o0 + g * ldo + kRegLanes * c);
  for (int64_t j = 0; j < nt; ++j) {
    if (j < pf_rows) prefetch_span(pf + j * stride, NC * 16);
    vreg v[R];
    for (int c = 0; c < R; ++c) v[c] = load_vreg(rows + j * stride + kRegLanes * c);
    for (int g = 0; g < GS; ++g)
      for (int c = 0; c < R; ++c) acc[g][c] += w0[g * ldw + j] * v[c];
  }
  for (int g = 0; g < GS; ++g)
    for (int c = 0; c < R; ++c)
      std::memcpy(o0 + g * ldo + kRegLanes * c, &acc[g][c], sizeof(vreg));
}

// Per-thread scratch of attend_range: scores/probabilities p [H][len] and, for a tile of 16
// keys, part [H][16] (16-lane partial sums of q_h . k_t over the first 16 * (D / 16) dims) and
// tail [H][16] (the sum over the D % 16 dims left; zero when D % 16 == 0).
struct Scratch {
  std::vector<float> p;
  std::vector<v16> part;
  std::vector<float> tail;
};

// Attention of query heads q[0..H) of request n over keys [t0, t1): writes p (scores, then
// probabilities, [H][t1 - t0]) and acc [H][D] = sum_t p[h][t] v[t]. With `normalise`, p is
// divided by its sum before the value sweep and m/l are not written; otherwise m[h] = max
// score, l[h] = sum of e^(score - m[h]) and acc is unnormalised. An empty range gives
// m = -inf, l = 0, acc = 0. Scores are made 16 keys at a time: each (head, key) gives a
// 16-lane partial product vector, and one transpose_sum per head turns a tile's 16 vectors into
// 16 scores (~1.1x faster than a reduction per score with 64-token blocks here).
// DV: D / 16 where known at compile time (score_tile), else 0; GS: query heads computed
// together, a divisor of the group size (heads h .. h + GS - 1 share a kv head).
// Cache loads give value / u, u = kFp8Unit<T> (256 for e4m3fn, a power of two, else 1), so
// the scores use scale * u, p is normalised by u / sum (acc = sum_t p_t (v_t / u) u), and an
// unnormalised range reports l = sum / u: every quantity equals, bit for bit, what loads of the
// values themselves would give (scaling by a power of two is exact).
template <int DV, int GS, typename T>
void attend_range(const Geometry<T>& g, int64_t n, const float* q, int64_t t0, int64_t t1,
                  float scale, bool normalise, Scratch& scratch, float* acc, float* m,
                  float* l) {
  const int64_t len = t1 - t0, H = g.n_heads, d = g.d, dv = d / 16;  // dv full 16-dim chunks
  std::fill(acc, acc + H * d, 0.f);
  if (len <= 0) {
    std::fill(m, m + H, -std::numeric_limits<float>::infinity());
    std::fill(l, l + H, 0.f);
    return;
  }
  constexpr float u = sluice::kFp8Unit<T>;
  const float score_scale = scale * u;
  std::vector<float>& p = scratch.p;
  p.resize(static_cast<size_t>(H * len));
  scratch.part.resize(static_cast<size_t>(H * 16));
  scratch.tail.resize(static_cast<size_t>(H * 16), 0.f);
  v16* part = scratch.part.data();
  float* tail = scratch.tail.data();
  const int64_t row_len = g.kvh * d;
  for_each_tile(g, n, t0, t1, g.k, [&](int64_t t, const T* rows, int64_t nt, const T* pf,
                                       int64_t pf_rows) {
    for (int64_t h = 0; h < H; h += GS) {
      const int64_t col = (h / g.group) * d;  // the kv head's columns in a row
      const T* kh = rows + col;
      const int64_t pfr = h % g.group == 0 ? pf_rows : 0;  // the kv head's first visit
      if constexpr (DV > 0) {
        score_tile<DV, GS>(part + h * 16, q + h * d, d, kh, row_len, nt, pf + col, pfr);
      } else {
        for (int64_t j = 0; j < pfr; ++j) prefetch_span(pf + j * row_len + col, d);
        for (int64_t gi = 0; gi < GS; ++gi)
          for (int64_t j = 0; j < nt; ++j)
            dot_lanes(reinterpret_cast<float*>(part + (h + gi) * 16 + j), q + (h + gi) * d,
                      kh + j * row_len, dv);
      }
    }
    for (int64_t h = 0; h < H; ++h) {
      const float* qh = q + h * d;
      const T* kh = rows + (h / g.group) * d;
      if (16 * dv < d) {
        for (int64_t j = 0; j < nt; ++j) {
          float rest = 0.f;
          for (int64_t e = 16 * dv; e < d; ++e) rest += qh[e] * load1_kv(kh + j * row_len + e);
          tail[h * 16 + j] = rest;
        }
      }
      const v16 tile = (transpose_sum(part + h * 16) + load16(tail + h * 16)) * score_scale;
      float* dst = p.data() + h * len + (t - t0);
      if (nt == kTile)  // a constant size: one vector store (a runtime size became rep movsq)
        std::memcpy(dst, &tile, sizeof tile);
      else
        std::memcpy(dst, &tile, nt * sizeof(float));
    }
  });
  for (int64_t h = 0; h < H; ++h) {
    float* s = p.data() + h * len;
    const float mx = sluice::max_value(s, len);
    for (int64_t t = 0; t < len; ++t) s[t] = sluice::exp_approx(s[t] - mx);
    const float total = sluice::sum(s, len);
    if (normalise) {
      const float inv = u / total;
      for (int64_t t = 0; t < len; ++t) s[t] *= inv;
    } else {
      m[h] = mx;
      l[h] = total / u;
    }
  }
  for_each_tile(g, n, t0, t1, g.v, [&](int64_t t, const T* rows, int64_t nt, const T* pf,
                                       int64_t pf_rows) {
    for (int64_t h = 0; h < H; h += GS) {
      const float* w = p.data() + h * len + (t - t0);
      const int64_t col = (h / g.group) * d;
      const T* vh = rows + col;
      const T* pfh = pf + col;
      const int64_t pfr = h % g.group == 0 ? pf_rows : 0;
      float* o = acc + h * d;
      int64_t c = 0;
      for (; c + 4 <= dv; c += 4)
        axpy_tile<4, GS>(o + 16 * c, d, w, len, vh + 16 * c, row_len, nt, pfh + 16 * c, pfr);
      for (; c < dv; ++c)
        axpy_tile<1, GS>(o + 16 * c, d, w, len, vh + 16 * c, row_len, nt, pfh + 16 * c, pfr);
      for (int64_t gi = 0; gi < GS; ++gi)
        for (int64_t j = 0; j < nt; ++j)
          for (int64_t e = 16 * dv; e < d; ++e)
            o[gi * d + e] += w[gi * len + j] * load1_kv(vh + j * row_len + e);
    }
  });
}

}  // namespace

namespace {
template <typename T, int DV, int GS>  // attend_range's compile-time D / 16 (0: any), GS
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                      const at::Tensor& block_ids, int64_t nb, const at::Tensor& seq_lens,
                      double scale) {
  const int64_t n_reqs = q.size(0), n_heads = q.size(1), d = q.size(2);
  const int64_t n_blocks = kv_cache.size(1), bs = kv_cache.size(2), kvh = kv_cache.size(3);
  const T* kp = static_cast<const T*>(kv_cache.data_ptr());
  const Geometry<T> g{n_heads, kvh, d, n_heads / kvh, bs, kp, kp + n_blocks * bs * kvh * d,
                      block_ids.data_ptr<int64_t>(), nb};
  const float* qp = q.data_ptr<float>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  const int64_t hd = n_heads * d, ldq = q.stride(0);

  // Each row's keys are cut into chunks of kChunkTokens (whole blocks) by its own length only,
  // so a row's result does not depend on the other rows of the step (a verification step's
  // row equals the plain decode step's row, bit for bit). A one-chunk row writes its
  // normalised output directly; a longer row's chunks keep partial results, merged below.
  const int64_t chunk = std::max<int64_t>(1, kChunkTokens / bs) * bs;
  std::vector<int64_t> first(n_reqs + 1, 0);  // row n's items: first[n] .. first[n + 1] - 1
  for (int64_t n = 0; n < n_reqs; ++n)
    first[n + 1] = first[n] + std::max<int64_t>(1, (lens[n] + chunk - 1) / chunk);
  const int64_t items = first[n_reqs];
  std::vector<int64_t> row_of(items);
  for (int64_t n = 0; n < n_reqs; ++n)
    std::fill(row_of.begin() + first[n], row_of.begin() + first[n + 1], n);
  // partial results of item i (used by rows of 2+ chunks): acc H*D floats, m and l H each
  std::vector<float> acc(items * hd), mx(items * n_heads), ls(items * n_heads);
#pragma omp parallel
  {
    Scratch p;
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < items; ++i) {
      const int64_t n = row_of[i], c = i - first[n];
      if (first[n + 1] - first[n] == 1) {
        attend_range<DV, GS>(g, n, qp + n * ldq, 0, lens[n], fscale, true, p, op + n * hd, nullptr,
                     nullptr);
        continue;
      }
      const int64_t t0 = std::min(c * chunk, lens[n]), t1 = std::min((c + 1) * chunk, lens[n]);
      attend_range<DV, GS>(g, n, qp + n * ldq, t0, t1, fscale, false, p, acc.data() + i * hd,
                   mx.data() + i * n_heads, ls.data() + i * n_heads);
    }
#pragma omp for
    for (int64_t j = 0; j < n_reqs * n_heads; ++j) {
      const int64_t n = j / n_heads, h = j % n_heads;
      if (first[n + 1] - first[n] == 1) continue;  // written directly
      float big = -std::numeric_limits<float>::infinity();
      for (int64_t part = first[n]; part < first[n + 1]; ++part)
        big = std::max(big, mx[part * n_heads + h]);
      float denom = 0.f;
      float* o = op + n * hd + h * d;
      std::fill(o, o + d, 0.f);
      for (int64_t part = first[n]; part < first[n + 1]; ++part) {
        if (ls[part * n_heads + h] == 0.f) continue;  // empty chunk
        const float w = sluice::exp_approx(mx[part * n_heads + h] - big);
        denom += w * ls[part * n_heads + h];
        const float* a = acc.data() + part * hd + h * d;
        for (int64_t e = 0; e < d; ++e) o[e] += w * a[e];
      }
      const float inv = denom > 0.f ? 1.f / denom : 0.f;  // no keys at all: zeros
      for (int64_t e = 0; e < d; ++e) o[e] *= inv;
    }
  }
}
// decode_attention with D / 16 a compile-time constant for the common head sizes, and (AVX-512
// builds) the query heads of a group computed GS at a time: the largest of 4, 3, 2 dividing the
// group whose q and sums fit the 32 vector registers (D = 128: at most 2), else 1.
template <typename T>
void decode_attention_for_d(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                            const at::Tensor& block_ids, int64_t nb, const at::Tensor& seq_lens,
                            double scale) {
  const int64_t dv = q.size(2) / 16, group = q.size(1) / kv_cache.size(3);
#define SLUICE_DECODE(DV, GS) \
  return decode_attention<T, DV, GS>(out, q, kv_cache, block_ids, nb, seq_lens, scale)
#if defined(__AVX512F__)
  if (dv == 4) {
    if (group % 4 == 0) SLUICE_DECODE(4, 4);
    if (group % 3 == 0) SLUICE_DECODE(4, 3);
    if (group % 2 == 0) SLUICE_DECODE(4, 2);
    SLUICE_DECODE(4, 1);
  }
  if (dv == 8) {
    if (group % 2 == 0) SLUICE_DECODE(8, 2);
    SLUICE_DECODE(8, 1);
  }
#else
  if (dv == 4) SLUICE_DECODE(4, 1);
  if (dv == 8) SLUICE_DECODE(8, 1);
#endif
  SLUICE_DECODE(0, 1);
#undef SLUICE_DECODE
}
}  // namespace

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache,
                            at::Tensor block_ids, int64_t nb, at::Tensor seq_lens,
                            double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && out.dtype() == at::kFloat,
              "paged_decode_attention: float32 q/out expected");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && kv_cache.is_contiguous() &&
                  out.is_contiguous() &&
                  block_ids.is_contiguous() && seq_lens.is_contiguous(),
              "paged_decode_attention: contiguous tensors (q: contiguous rows) expected");
  const bool known = sluice::visit_kv_cache_type(kv_cache.scalar_type(), [&](auto tag) {
    decode_attention_for_d<decltype(tag)>(out, q, kv_cache, block_ids, nb, seq_lens, scale);
  });
  TORCH_CHECK(known, "paged_decode_attention: ", sluice::kKvCacheDtypes,
              " cache expected, got ", kv_cache.scalar_type());
}
