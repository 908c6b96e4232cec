// Paged decode attention for CPU: one query token per request, keys and values read in place
// from the block-structured KV cache (no gather copy). fp32; OpenMP over requests (and kv
// heads when there are few requests).
//
// Shapes (all contiguous):
//   q          [N, H, D]                 query of each decode request
//   kv_cache   [2, num_blocks, B, Hkv, D]  B = block_size; [0] keys, [1] values
//   block_ids  [N * nb] int64            request n's first nb block-table entries
//   seq_lens   [N] int64                 keys 0 .. seq_lens[n]-1 are attended
//   out        [N, H, D]
// Query head h uses kv head h / G with G = H / Hkv (HF's repeat_kv order).
// Key t of request n lives at block block_ids[n*nb + t/B], offset t%B.
// Sums and exp come from vec_math.h (vectorised without -ffast-math).
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <omp.h>
#include <vector>

void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache,
                            at::Tensor block_ids, int64_t nb, at::Tensor seq_lens,
                            double scale) {
  TORCH_CHECK(q.dtype() == at::kFloat && kv_cache.dtype() == at::kFloat,
              "paged_decode_attention: float32 only");
  TORCH_CHECK(q.is_contiguous() && kv_cache.is_contiguous() && out.is_contiguous() &&
                  block_ids.is_contiguous() && seq_lens.is_contiguous(),
              "paged_decode_attention: contiguous tensors expected");
  const int64_t n_reqs = q.size(0), n_heads = q.size(1), d = q.size(2);
  const int64_t n_blocks = kv_cache.size(1), bs = kv_cache.size(2), kvh = kv_cache.size(3);
  const int64_t group = n_heads / kvh;
  const float* qp = q.data_ptr<float>();
  const float* kp = kv_cache.data_ptr<float>();
  const float* vp = kp + n_blocks * bs * kvh * d;
  const int64_t* bid = block_ids.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);

  // Work item i = (request n = i / h_split, kv heads [h0, h1) of chunk i % h_split). With many
  // requests an item takes all kv heads, so it reads each cached token row (all heads,
  // contiguous) in one sweep; with few requests the heads are split to keep every thread busy.
  const int64_t h_split = n_reqs >= 4 * omp_get_max_threads() ? 1 : kvh;
#pragma omp parallel
  {
    std::vector<float> scores;  // [query head - first query head of the item][t]
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_reqs * h_split; ++i) {
      const int64_t n = i / h_split, c = i % h_split;
      const int64_t h0 = c * kvh / h_split, h1 = (c + 1) * kvh / h_split;
      const int64_t q0 = h0 * group, nq = (h1 - h0) * group;  // query heads of the item
      const int64_t len = lens[n];
      scores.resize(static_cast<size_t>(nq * len));
      const float* qn = qp + (n * n_heads + q0) * d;
      // scores[j * len + t] = scale * q[q0 + j] . k[t] (kv head (q0 + j) / group)
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = bid[n * nb + t / bs] * bs + t % bs;
        const float* row = kp + (slot * kvh + h0) * d;
        for (int64_t j = 0; j < nq; ++j)
          scores[j * len + t] = fscale * sluice::dot(qn + j * d, row + (j / group) * d, d);
      }
      // softmax per query head, in place
      for (int64_t j = 0; j < nq; ++j) {
        float* s = scores.data() + j * len;
        const float mx = *std::max_element(s, s + len);
        for (int64_t t = 0; t < len; ++t) s[t] = sluice::exp_approx(s[t] - mx);
        const float inv = 1.f / sluice::sum(s, len);
        for (int64_t t = 0; t < len; ++t) s[t] *= inv;
      }
      // out[q0 + j] = sum_t p[j, t] v[t], one sweep over the value rows
      float* on = op + (n * n_heads + q0) * d;
      std::fill(on, on + nq * d, 0.f);
      for (int64_t t = 0; t < len; ++t) {
        const int64_t slot = bid[n * nb + t / bs] * bs + t % bs;
        const float* row = vp + (slot * kvh + h0) * d;
        for (int64_t j = 0; j < nq; ++j) {
          const float p = scores[j * len + t];
          const float* v = row + (j / group) * d;
          float* o = on + j * d;
          for (int64_t e = 0; e < d; ++e) o[e] += p * v[e];
        }
      }
    }
  }
}
