// Paged decode attention for CPU: one query token per request, keys and values read in place
// from the block-structured KV cache (no gather copy). fp32; OpenMP over (request, kv head).
//
// Shapes (all contiguous):
//   q          [N, H, D]                 query of each decode request
//   kv_cache   [2, num_blocks, B, Hkv, D]  B = block_size; [0] keys, [1] values
//   block_ids  [N * nb] int64            request n's first nb block-table entries
//   seq_lens   [N] int64                 keys 0 .. seq_lens[n]-1 are attended
//   out        [N, H, D]
// Query head h uses kv head h / G with G = H / Hkv (HF's repeat_kv order).
// Key t of request n lives at block block_ids[n*nb + t/B], offset t%B.
// Sums use 8 independent lanes so the compiler vectorises them without -ffast-math.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int kLanes = 8;

inline float dot(const float* a, const float* b, int64_t d) {
  float acc[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0.f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < d; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor kv_cache,
                            torch::Tensor block_ids, int64_t nb, torch::Tensor seq_lens,
                            double scale) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && kv_cache.dtype() == torch::kFloat32,
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

#pragma omp parallel
  {
    std::vector<float> scores;
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t n = 0; n < n_reqs; ++n) {
      for (int64_t h = 0; h < kvh; ++h) {
        const int64_t len = lens[n];
        scores.assign(static_cast<size_t>(group * len), 0.f);
        const float* qh = qp + (n * n_heads + h * group) * d;
        // scores[g * len + t] = scale * q[g] . k[t]
        for (int64_t t = 0; t < len; ++t) {
          const int64_t slot = bid[n * nb + t / bs] * bs + t % bs;
          const float* k = kp + (slot * kvh + h) * d;
          for (int64_t g = 0; g < group; ++g)
            scores[g * len + t] = fscale * dot(qh + g * d, k, d);
        }
        // softmax per query head, in place
        for (int64_t g = 0; g < group; ++g) {
          float* s = scores.data() + g * len;
          const float mx = *std::max_element(s, s + len);
          float sum = 0.f;
          for (int64_t t = 0; t < len; ++t) {
            s[t] = std::exp(s[t] - mx);
            sum += s[t];
          }
          const float inv = 1.f / sum;
          for (int64_t t = 0; t < len; ++t) s[t] *= inv;
        }
        // out[g] = sum_t p[g, t] v[t], reading each value row once for the whole group
        float* oh = op + (n * n_heads + h * group) * d;
        std::fill(oh, oh + group * d, 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const int64_t slot = bid[n * nb + t / bs] * bs + t % bs;
          const float* v = vp + (slot * kvh + h) * d;
          for (int64_t g = 0; g < group; ++g) {
            const float p = scores[g * len + t];
            float* o = oh + g * d;
            for (int64_t i = 0; i < d; ++i) o[i] += p * v[i];
          }
        }
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over an in-place block-structured KV cache (CPU, fp32)");
}
