// The work plan and the per-row online softmax shared by paged_prefill.cpp's two prefill
// attention paths (float32 products, and bf16 products in prefill_bf16dot.cpp); see
// paged_prefill.cpp's header for the shapes and the algorithm.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace sluice::prefill {

constexpr int64_t kTileQ = 32;   // queries per work item
constexpr int64_t kTileK = 128;  // keys per chunk

// One work item: queries [i0, i1) of request r against kv head g; cost = visible keys of its
// last query x queries, the order items are handed out in (most expensive first).
struct Item {
  int64_t r, g, i0, i1, cost;
};

// The items of every request with q_min <= q_len <= q_max query tokens, q_min >= 2 (qsl:
// query_start_loc [R + 1], lens: seq_lens [R]), sorted by cost, descending (stable: ties keep
// request order).
inline std::vector<Item> plan_items(const int64_t* qsl, const int64_t* lens, int64_t n_reqs,
                                    int64_t kv_heads, int64_t q_min, int64_t q_max) {
  std::vector<Item> items;
  for (int64_t r = 0; r < n_reqs; ++r) {
    const int64_t q_len = qsl[r + 1] - qsl[r], ctx = lens[r] - q_len;
    if (q_len < q_min || q_len > q_max) continue;
    for (int64_t i0 = 0; i0 < q_len; i0 += kTileQ) {
      const int64_t i1 = std::min(q_len, i0 + kTileQ);
      for (int64_t g = 0; g < kv_heads; ++g)
        items.push_back({r, g, i0, i1, (ctx + i1) * (i1 - i0)});
    }
  }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& a, const Item& b) { return a.cost > b.cost; });
  return items;
}

// One row's step of the running softmax over a chunk of kn scores sr[0 .. kn), of which the
// first `visible` are the row's (causal) keys: sr becomes e^(s - m') for those and 0 for the
// rest, m' = max(m, their max), l = l e^(m - m') + their sum, m = m', and the row's output
// accumulator o_row[0 .. d) is scaled by e^(m - m') (unchanged when nothing is visible).
inline void softmax_chunk_row(float* sr, int64_t kn, int64_t visible, float& m, float& l,
                              float* o_row, int64_t d) {
  if (visible <= 0) {
    std::fill(sr, sr + kn, 0.f);
    return;
  }
  const float m_new = std::max(m, max_value(sr, visible));
  const float correction = exp_approx(m - m_new);
  for (int64_t t = 0; t < visible; ++t) sr[t] = exp_approx(sr[t] - m_new);
  std::fill(sr + visible, sr + kn, 0.f);
  l = l * correction + sum(sr, visible);
  m = m_new;
  if (correction != 1.f)
    for (int64_t e = 0; e < d; ++e) o_row[e] *= correction;
}

// An item's result: out row (token qsl[r] + i, head g * G + j) = o row (i - i0) * G + j / its l,
// for its queries [i0, i1) and the G = group query heads of kv head g (out: [T, n_heads, d]).
inline void store_item_output(float* out, const float* o, const float* l, const Item& w,
                              const int64_t* qsl, int64_t group, int64_t n_heads, int64_t d) {
  for (int64_t row = 0; row < (w.i1 - w.i0) * group; ++row) {
    const int64_t i = w.i0 + row / group, j = row % group;
    const float inv = 1.f / l[row];
    const float* src = o + row * d;
    float* dst = out + ((qsl[w.r] + i) * n_heads + w.g * group + j) * d;
    for (int64_t e = 0; e < d; ++e) dst[e] = src[e] * inv;
  }
}

}  // namespace sluice::prefill
