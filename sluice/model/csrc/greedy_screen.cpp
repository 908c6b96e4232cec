// Exact greedy tokens from a bfloat16 screen of the LM head (see sluice/model/layers/greedy.py).
//
// A greedy step needs only argmax_j l_j per row, with l_j = x . w_j (x: the row's final hidden
// state [K], w_j: LM-head row j, both float32). The caller first computes cheap screen scores
//   s_j = x~ . w~_j      (x, w rounded to bfloat16, products summed in float32, s stored as bf16)
// with |s_j - l_j| <= b_j := c * ||x|| * ||w_j|| + a for every j (the caller's c and a bound the
// rounding of inputs, sum and output; Cauchy-Schwarz gives sum_i |x_i w_ij| <= ||x|| ||w_j||).
// Let t = max_k (s_k - b_k), attained at k*. Every j with s_j + b_j < t has
//   l_j <= s_j + b_j < t = s_k* - b_k* <= l_k*,
// so the maximum is among the candidates C = {j : s_j + b_j >= t} (a handful of the vocabulary).
// Each candidate's logit is recomputed in float32 (one dot product) and the row's token is the
// first maximum among them, as argmax over full float32 logits picks it (up to float32 rounding,
// which also separates any two GEMM implementations).
//
//   greedy_screen(out, scores, x, w, w_norms, c, a)
//     out [R] int64      the token of each row, or -1 where the screen cannot decide (a NaN or
//                        infinity in x or in the row's scores): the caller then computes full
//                        logits for the step
//     scores [R, V] bf16 s, rows contiguous;  x [R, K] float32;  w [V, K] float32
//     w_norms [V] float32 ||w_j||, rounded up
// Rows are independent and handed out to the threads one at a time.
//
//   bf16_scores(scores, x, w)    scores[r, j] = bf16(x_r . w_j) for 1..kMaxScoreRows rows of
//                                float32 x and a bf16 w [V, K]: the screen scores of a decode
//                                step of a few requests, where the step is bound by reading
//                                w. Each bf16 weight is widened to float32 (exact) and
//                                multiplied with the unrounded x, summed in float32, and the
//                                sum rounded to bf16 (nearest even): within the same bound.
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

constexpr int kW = 16;        // scores per vector step
constexpr int kBlock = 256;   // scores per candidate check in pass 2
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
using f32x16 = sluice::v16;
using sluice::load16;

// scores[j..j+16) as float32: a bf16 is the top half of the float32 with the same bits.
inline f32x16 load_bf16(const uint16_t* s) {
  u16x16 h;
  std::memcpy(&h, s, sizeof(h));
  const u32x16 wide = __builtin_convertvector(h, u32x16) << 16;
  return (f32x16)wide;  // a vector cast keeps the bits
}

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// The row's token, or -1 (see the file comment). cn = c * ||x||, so b_j = cn * w_norms[j] + a.
int64_t screen_row(const uint16_t* s, const float* x, const float* w, const float* w_norms,
                   int64_t v, int64_t k, float cn, float a) {
  auto bound16 = [&](int64_t j) { return cn * load16(w_norms + j) + a; };  // b_j .. b_j+15
  auto bound = [&](int64_t j) { return cn * w_norms[j] + a; };
  const float inf = std::numeric_limits<float>::infinity();
  // Pass 1: t = max_j (s_j - b_j); any NaN/inf score makes the row undecidable.
  f32x16 lower_max = f32x16{} - inf;
  i32x16 bad = {};  // lanes that saw a NaN or infinity
  int64_t j = 0;
  for (; j + kW <= v; j += kW) {
    const f32x16 sj = load_bf16(s + j);
    const f32x16 lower = sj - bound16(j);
    lower_max = lower > lower_max ? lower : lower_max;
    bad |= !(sj < inf && sj > -inf);  // NaN fails both comparisons
  }
  float t = -inf;
  for (int i = 0; i < kW; ++i) {
    t = std::max(t, lower_max[i]);
    if (bad[i]) return -1;
  }
  for (int64_t r = j; r < v; ++r) {
    const float sj = bf16_to_float(s[r]);
    if (!std::isfinite(sj)) return -1;
    t = std::max(t, sj - bound(r));
  }
  // Pass 2: recompute the candidates in float32; the first maximum wins.
  int64_t best = -1;
  float best_logit = -inf;
  auto consider = [&](int64_t r) {
    if (bf16_to_float(s[r]) + bound(r) < t) return;
    const float logit = sluice::dot(x, w + r * k, k);
    if (best < 0 || logit > best_logit) best = r, best_logit = logit;
  };
  // Blocks of kBlock scores: one horizontal max of s_j + b_j per block (candidates are rare).
  for (j = 0; j + kBlock <= v; j += kBlock) {
    f32x16 upper_max = f32x16{} - inf;
    for (int q = 0; q < kBlock; q += kW) {
      const f32x16 upper = load_bf16(s + j + q) + bound16(j + q);
      upper_max = upper > upper_max ? upper : upper_max;
    }
    float m = upper_max[0];
    for (int i = 1; i < kW; ++i) m = std::max(m, upper_max[i]);
    if (m >= t)
      for (int64_t r = j; r < j + kBlock; ++r) consider(r);
  }
  for (int64_t r = j; r < v; ++r) consider(r);
  return std::isfinite(best_logit) ? best : -1;
}

// float32 -> bfloat16 bits, rounded to nearest even (a NaN may come out as an infinity, which
// the screen rejects the same way).
inline u16x16 to_bf16(f32x16 v) {
  const u32x16 bits = (u32x16)v;
  return __builtin_convertvector((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16, u16x16);
}

// scores[r, j] = bf16(x_r . w_j) for the R rows x_r = x + r * k, in one pass over w_j.
template <int R>
inline void score_row(const float* x, const uint16_t* w, int64_t k, float* out, int64_t ldo) {
  f32x16 acc[R] = {};
  int64_t i = 0;
  for (; i + kW <= k; i += kW) {
    const f32x16 wv = load_bf16(w + i);
    for (int r = 0; r < R; ++r) acc[r] += load16(x + r * k + i) * wv;
  }
  for (int r = 0; r < R; ++r) {
    float s = sluice::reduce_lanes(reinterpret_cast<const float*>(&acc[r]));
    for (int64_t t = i; t < k; ++t) s += x[r * k + t] * bf16_to_float(w[t]);
    out[r * ldo] = s;
  }
}

constexpr int64_t kScoreChunk = 256;  // weight rows per dynamically scheduled chunk

template <int R>
void score_rows(const float* x, const uint16_t* w, int64_t v, int64_t k, uint16_t* scores) {
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t c0 = 0; c0 < v; c0 += kScoreChunk) {
    const int64_t c1 = std::min(v, c0 + kScoreChunk);
    alignas(64) float part[R][kScoreChunk];
    for (int64_t j = c0; j < c1; ++j) score_row<R>(x, w + j * k, k, &part[0][j - c0], kScoreChunk);
    for (int r = 0; r < R; ++r) {
      int64_t j = c0;
      for (; j + kW <= c1; j += kW) {
        const u16x16 h = to_bf16(load16(&part[r][j - c0]));
        std::memcpy(scores + r * v + j, &h, sizeof(h));
      }
      for (; j < c1; ++j) scores[r * v + j] = c10::BFloat16(part[r][j - c0]).x;
    }
  }
}

}  // namespace

void bf16_scores(at::Tensor scores, at::Tensor x, at::Tensor w) {
  TORCH_CHECK(scores.dtype() == at::kBFloat16 && scores.dim() == 2 && scores.is_contiguous(),
              "bf16_scores scores: contiguous bfloat16 [R, V] expected");
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "bf16_scores x: contiguous float32 [R, K] expected");
  TORCH_CHECK(w.dtype() == at::kBFloat16 && w.dim() == 2 && w.is_contiguous(),
              "bf16_scores w: contiguous bfloat16 [V, K] expected");
  const int64_t rows = x.size(0), k = x.size(1), v = w.size(0);
  TORCH_CHECK(w.size(1) == k && scores.size(0) == rows && scores.size(1) == v,
              "bf16_scores: shapes of scores, x and w disagree");
  TORCH_CHECK(rows >= 1 && rows <= kMaxScoreRows, "bf16_scores: 1 to ", kMaxScoreRows,
              " rows expected, got ", rows);
  TORCH_CHECK(scores.device().is_cpu() && x.device().is_cpu() && w.device().is_cpu(),
              "bf16_scores: CPU tensors expected");
  const float* xp = x.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  auto* sp = reinterpret_cast<uint16_t*>(scores.data_ptr<at::BFloat16>());
  switch (rows) {
    case 1: score_rows<1>(xp, wp, v, k, sp); break;
    case 2: score_rows<2>(xp, wp, v, k, sp); break;
    case 3: score_rows<3>(xp, wp, v, k, sp); break;
    default: score_rows<4>(xp, wp, v, k, sp); break;
  }
}

void greedy_screen(at::Tensor out, at::Tensor scores, at::Tensor x, at::Tensor w,
                   at::Tensor w_norms, double c, double a) {
  TORCH_CHECK(scores.dtype() == at::kBFloat16 && scores.dim() == 2 && scores.is_contiguous(),
              "greedy_screen scores: contiguous bfloat16 [R, V] expected");
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "greedy_screen x: contiguous float32 [R, K] expected");
  TORCH_CHECK(w.dtype() == at::kFloat && w.dim() == 2 && w.is_contiguous(),
              "greedy_screen w: contiguous float32 [V, K] expected");
  const int64_t rows = scores.size(0), v = scores.size(1), k = x.size(1);
  TORCH_CHECK(x.size(0) == rows && w.size(0) == v && w.size(1) == k,
              "greedy_screen: shapes of scores, x and w disagree");
  TORCH_CHECK(w_norms.dtype() == at::kFloat && w_norms.is_contiguous() && w_norms.numel() == v,
              "greedy_screen w_norms: contiguous float32 [V] expected");
  TORCH_CHECK(out.dtype() == at::kLong && out.is_contiguous() && out.numel() == rows,
              "greedy_screen out: contiguous int64 [R] expected");
  TORCH_CHECK(scores.device().is_cpu() && x.device().is_cpu() && w.device().is_cpu() &&
                  w_norms.device().is_cpu() && out.device().is_cpu(),
              "greedy_screen: CPU tensors expected");
  const auto* sp = reinterpret_cast<const uint16_t*>(scores.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* np = w_norms.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * k;
    double sq = 0;
    for (int64_t i = 0; i < k; ++i) sq += static_cast<double>(xr[i]) * xr[i];
    // c * ||x||, rounded up by a relative 2^-20 (far above float32's own rounding of it)
    const double cn = c * std::sqrt(sq) * (1 + 0x1p-20);
    op[r] = std::isfinite(cn) ? screen_row(sp + r * v, xr, wp, np, v, k,
                                           static_cast<float>(cn), static_cast<float>(a))
                              : -1;
  }
}
