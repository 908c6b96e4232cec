// Paged prefill attention for CPU: requests with several query tokens (whole prompts or chunks
// after earlier context), keys and values read from the block-structured KV cache after this
// step's k/v were written. No padding between requests and no gathered copy of the cache.
//
// Shapes:
//   q                [T, H, D]     the step's flat queries (rows may be strided)
//   kv_cache         [2, num_blocks, B, Hkv, D] contiguous; [0] keys, [1] values; float32,
//                    bfloat16, float16 or fp8 (rows widened to fp32 as they are copied out,
//                    `kv_rows.h`)
//   block_table      [R, MB] int32 request r's blocks
//   query_start_loc  [R + 1] int64 request r owns flat tokens [qsl[r], qsl[r+1])
//   seq_lens         [R] int64     context length after this step
//   out              [T, H, D] contiguous: rows of requests with q_len > 1 are written, the
//                    others are left as they are (decode rows belong to the decode kernel)
// Request r has q_len = qsl[r+1] - qsl[r] and ctx = seq_lens[r] - q_len cached tokens before
// it; its query i (absolute position ctx + i) attends to keys 0 .. ctx + i (causal). Query
// head h uses kv head h / G, G = H / Hkv.
//
// Work item = (request, kv head g, tile of up to kTileQ queries): its G*rows query vectors
// (row = (i - i0) * G + j for query head g*G + j), pre-scaled, are one matrix Q. The item walks
// its visible keys [0, ctx + i1) in chunks of kTileK, copying a chunk's key and value rows of
// head g out of the blocks, and keeps a flash-attention running softmax per row:
//   S = Q K^T (sgemm);  m' = max(m, max_t S);  p = e^(S - m') (0 past a row's causal limit)
//   l = l e^(m - m') + sum_t p;  O = O e^(m - m') + p V (sgemm);  finally out = O / l.
// Items are handed out dynamically, the most expensive (most keys x queries) first
// (prefill_tiles.h: the plan and the per-row softmax step, shared with the bf16 path).
//
// bf16_products (the CPU paged backend passes it for a bfloat16 cache): where the CPU has
// AVX512-BF16 and D % 32 == 0, the requests of at least prefill_bf16dot::kMinQueries (32)
// query tokens over a bfloat16 cache run prefill_bf16dot.cpp instead: q and p rounded to bf16,
// vdpbf16ps products, float32 sums (see there); fewer queries, other CPUs and other caches
// take the float32 products above. The decode kernel always multiplies in float32.
#include "blas.h"
#include "kv_rows.h"
#include "ops.h"
#include "prefill_tiles.h"
#include "vec_math.h"

#include <algorithm>
#include <limits>
#include <omp.h>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include "prefill_bf16dot.cpp"

namespace {

using sluice::prefill::Item;
using sluice::prefill::kTileK;
using sluice::prefill::kTileQ;

// paged_prefill_attention over a cache of element type T (kv_rows.h's visit_kv_cache_type).
template <typename T>
void prefill_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv_cache,
                       const at::Tensor& block_table, const at::Tensor& query_start_loc,
                       const at::Tensor& seq_lens, double scale, int64_t q_max) {
  const int64_t n_heads = q.size(1), d = q.size(2);
  const int64_t n_blocks = kv_cache.size(1), bs = kv_cache.size(2), kvh = kv_cache.size(3);
  const int64_t group = n_heads / kvh, row_len = kvh * d, ldq = q.stride(0);
  const int64_t n_reqs = seq_lens.size(0), max_blocks = block_table.size(1);
  const int32_t* bt = block_table.data_ptr<int32_t>();
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const float* qp = q.data_ptr<float>();
  const T* kc = static_cast<const T*>(kv_cache.data_ptr());
  const int64_t v_offset = n_blocks * bs * row_len;  // elements from keys to values
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  const std::vector<Item> items = sluice::prefill::plan_items(qsl, lens, n_reqs, kvh, 2, q_max);
  if (items.empty()) return;
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int max_rows = static_cast<int>(kTileQ * group), D = static_cast<int>(d);

#pragma omp parallel
  {
    std::vector<float> qbuf(max_rows * d), kbuf(kTileK * d), vbuf(kTileK * d),
        s(max_rows * kTileK), o(max_rows * d), m(max_rows), l(max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& w = items[it];
      const int64_t q_len = qsl[w.r + 1] - qsl[w.r], ctx = lens[w.r] - q_len;
      const int64_t rows = (w.i1 - w.i0) * group, key_end = ctx + w.i1;
      const int32_t* blocks = bt + w.r * max_blocks;
      for (int64_t i = w.i0; i < w.i1; ++i)
        for (int64_t j = 0; j < group; ++j) {
          const float* src = qp + (qsl[w.r] + i) * ldq + (w.g * group + j) * d;
          float* dst = qbuf.data() + ((i - w.i0) * group + j) * d;
          for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * fscale;
        }
      std::fill(o.begin(), o.begin() + rows * d, 0.f);
      std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + rows, 0.f);
      for (int64_t k0 = 0; k0 < key_end; k0 += kTileK) {
        const int64_t kn = std::min(kTileK, key_end - k0);
        for (int64_t t = k0; t < k0 + kn; ++t) {
          const int64_t slot = static_cast<int64_t>(blocks[t / bs]) * bs + t % bs;
          const int64_t at = slot * row_len + w.g * d;  // key row of head g
          float* kdst = kbuf.data() + (t - k0) * d;
          float* vdst = vbuf.data() + (t - k0) * d;
          if constexpr (std::is_same_v<T, float>) {
            std::copy(kc + at, kc + at + d, kdst);
            std::copy(kc + v_offset + at, kc + v_offset + at + d, vdst);
          } else {
            sluice::kv_row_as_float(kc + at, d, kdst);
            sluice::kv_row_as_float(kc + v_offset + at, d, vdst);
          }
        }
        sluice::gemm_row_major(static_cast<int>(rows), static_cast<int>(kn), D, qbuf.data(), D,
                               kbuf.data(), D, true, 0.f, s.data(), static_cast<int>(kTileK));
        for (int64_t row = 0; row < rows; ++row) {
          // keys k0 .. limit are visible to this row (its query's absolute position)
          const int64_t visible = std::min(kn, ctx + w.i0 + row / group - k0 + 1);
          sluice::prefill::softmax_chunk_row(s.data() + row * kTileK, kn, visible, m[row],
                                             l[row], o.data() + row * d, d);
        }
        sluice::gemm_row_major(static_cast<int>(rows), D, static_cast<int>(kn), s.data(),
                               static_cast<int>(kTileK), vbuf.data(), D, false, 1.f, o.data(),
                               D);
      }
      sluice::prefill::store_item_output(op, o.data(), l.data(), w, qsl, group, n_heads, d);
    }
  }
}

}  // namespace

void paged_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache,
                             at::Tensor block_table, at::Tensor query_start_loc,
                             at::Tensor seq_lens, double scale, bool bf16_products) {
  TORCH_CHECK(q.dtype() == at::kFloat && out.dtype() == at::kFloat,
              "paged_prefill_attention: float32 q/out expected");
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2) &&
                  kv_cache.is_contiguous() && out.is_contiguous() && out.sizes() == q.sizes(),
              "paged_prefill_attention: q [T, H, D] with contiguous rows, contiguous cache/out");
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.is_contiguous() &&
                  query_start_loc.scalar_type() == at::kLong && query_start_loc.is_contiguous() &&
                  seq_lens.scalar_type() == at::kLong && seq_lens.is_contiguous(),
              "paged_prefill_attention: int32 block_table, int64 query_start_loc/seq_lens");
  const int64_t d = q.size(2);
  int64_t q_max = INT64_MAX;  // the float32 products' requests: 2 <= q_len <= q_max
  if (bf16_products && kv_cache.scalar_type() == at::kBFloat16 &&
      prefill_bf16dot::available(d)) {
    q_max = prefill_bf16dot::kMinQueries - 1;
    prefill_bf16dot::run(out.data_ptr<float>(), q.data_ptr<float>(), q.stride(0), q.size(1), d,
                         static_cast<const uint16_t*>(kv_cache.data_ptr()), kv_cache.size(1),
                         kv_cache.size(2), kv_cache.size(3), block_table.data_ptr<int32_t>(),
                         block_table.size(1), query_start_loc.data_ptr<int64_t>(),
                         seq_lens.data_ptr<int64_t>(), seq_lens.size(0),
                         static_cast<float>(scale));
  }
  const bool known = sluice::visit_kv_cache_type(kv_cache.scalar_type(), [&](auto tag) {
    prefill_attention<decltype(tag)>(out, q, kv_cache, block_table, query_start_loc, seq_lens,
                                     scale, q_max);
  });
  TORCH_CHECK(known, "paged_prefill_attention: ", sluice::kKvCacheDtypes,
              " cache expected, got ", kv_cache.scalar_type());
}

bool prefill_bf16_products_available(int64_t head_dim) {
  return prefill_bf16dot::available(head_dim);
}

int64_t prefill_bf16_min_queries() { return prefill_bf16dot::kMinQueries; }
