// out[M, N] = x[M, K] @ w[N, K]^T (+ bias[N]) on CPU, as a grid of independent tiles.
//
// Why: for the decode-shaped GEMMs of small models (M = a few..64 rows, N up to the vocab) the
// BLAS library splits the work across threads poorly (on the reference model's lm_head,
// 64x512 @ 512x32000, two threads ran only 1.2x faster than one). Here every thread takes whole
// tiles and runs a single-threaded BLAS sgemm on each: tiles are (mt rows) x (nt columns) with
//   mt = M            if M <= kMaxRowTile, else kRowTile   (rows share one weight pass)
//   nt = kWideTile    if N >= kWideN,      else kNarrowTile (a tile's weights stay in L2)
// Tile i covers rows [mi*mt, min(M, (mi+1)*mt)) and columns [ni*nt, ...) with
// mi = i % m_tiles, ni = i / m_tiles: consecutive tiles share a weight strip (kept in the shared
// L3). Tiles are handed out dynamically, so a thread preempted by another process (the API
// server on the same cores) delays only its current tile, not the whole GEMM. Each output
// element is one full-K dot product, as in a plain GEMM (summation order inside BLAS may differ).
//
// BLAS is column-major: the row-major tile out[m0:m1, n0:n1] (leading dimension ldo = N) is the
// column-major (n1-n0) x (m1-m0) matrix  w[n0:n1, :] @ x[m0:m1, :]^T, i.e.
//   sgemm('T', 'N', n1-n0, m1-m0, K, 1, w + n0*ldw, ldw, x + m0*ldx, ldx,
//         beta, out + m0*ldo + n0, ldo)
// with beta = 1 over a tile pre-filled with the bias, else beta = 0.
// sgemm_ is the BLAS symbol libtorch_cpu exports (MKL on x86); inside the OpenMP region it runs
// single-threaded.
//
// M <= kMaxSkinnyRows (one to a few decoding sequences) is bound by streaming the weights:
// `dot_rows` reads each weight row once and takes its dot product with every row of x (16-lane
// partial sums). It streams ~1.8x faster than sgemm tiles at M = 1 and ~1.35x at M = 2..4 (all
// weights of a decode step, cold caches); from M = 8 on sgemm is as fast or faster. Its sums
// are ordered differently from BLAS (~1e-6 relative).
#include "blas.h"
#include "ops.h"
#include "vec_math.h"

#include <omp.h>

#include <algorithm>
#include <climits>


namespace {
constexpr int kMaxSkinnyRows = 4;
constexpr int64_t kGemvChunk = 256;  // weight rows per dynamically scheduled chunk

// out[i * ldo] = x_i . w (+ b) for the R rows x_i = x + i * ldx, in one pass over w[0:k].
template <int R>
inline void dot_rows(const float* x, int64_t ldx, const float* w, int64_t k, float* out,
                     int64_t ldo, float b) {
  constexpr int kL = sluice::kLanes;
  float acc[R][kL] = {};
  int64_t i = 0;
  for (; i + kL <= k; i += kL)
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < kL; ++j) acc[r][j] += x[r * ldx + i + j] * w[i + j];
  for (int r = 0; r < R; ++r) {
    float s = sluice::reduce_lanes(acc[r]);
    for (int64_t t = i; t < k; ++t) s += x[r * ldx + t] * w[t];
    out[r * ldo] = s + b;
  }
}

template <int R>
void skinny_linear(const float* xp, int64_t ldx, const float* wp, int64_t ldw, const float* bp,
                   float* op, int64_t k, int64_t n) {
#pragma omp parallel for schedule(dynamic, kGemvChunk)
  for (int64_t c = 0; c < n; ++c)
    dot_rows<R>(xp, ldx, wp + c * ldw, k, op + c, n, bp != nullptr ? bp[c] : 0.f);
}
constexpr int64_t kMaxRowTile = 128;
constexpr int64_t kRowTile = 256;
constexpr int64_t kWideN = 2048;
constexpr int64_t kWideTile = 512;
constexpr int64_t kNarrowTile = 256;
}  // namespace

void tiled_linear(at::Tensor out, at::Tensor x, at::Tensor w, std::optional<at::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && out.dim() == 2, "tiled_linear: 2-D tensors expected");
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0);
  TORCH_CHECK(w.size(1) == k && out.size(0) == m && out.size(1) == n,
              "tiled_linear: shape mismatch");
  TORCH_CHECK(x.dtype() == at::kFloat && w.dtype() == at::kFloat && out.dtype() == at::kFloat,
              "tiled_linear: float32 only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && out.device().is_cpu(),
              "tiled_linear: CPU tensors expected");
  TORCH_CHECK(x.stride(1) == 1 && w.stride(1) == 1 && out.is_contiguous(),
              "tiled_linear: rows of x and w must be contiguous, out contiguous");
  TORCH_CHECK(std::max({m, n, k, x.stride(0), w.stride(0)}) < INT_MAX,
              "tiled_linear: dimensions exceed BLAS int range");
  const float* bp = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dtype() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "tiled_linear: bias must be a contiguous float32 [N]");
    bp = bias->data_ptr<float>();
  }
  if (m == 0 || n == 0) return;
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (m <= kMaxSkinnyRows) {
    const int64_t ldx = x.stride(0), ldw = w.stride(0);
    switch (m) {
      case 1: skinny_linear<1>(xp, ldx, wp, ldw, bp, op, k, n); break;
      case 2: skinny_linear<2>(xp, ldx, wp, ldw, bp, op, k, n); break;
      case 3: skinny_linear<3>(xp, ldx, wp, ldw, bp, op, k, n); break;
      default: skinny_linear<4>(xp, ldx, wp, ldw, bp, op, k, n); break;
    }
    return;
  }
  const int64_t mt = m <= kMaxRowTile ? m : kRowTile;
  const int64_t nt = n >= kWideN ? kWideTile : kNarrowTile;
  const int64_t m_tiles = (m + mt - 1) / mt, n_tiles = (n + nt - 1) / nt;
  const int ik = static_cast<int>(k), ldx = static_cast<int>(x.stride(0));
  const int ldw = static_cast<int>(w.stride(0)), ldo = static_cast<int>(n);
  const float one = 1.f, zero = 0.f;

#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < m_tiles * n_tiles; ++i) {
    const int64_t m0 = (i % m_tiles) * mt, n0 = (i / m_tiles) * nt;
    const int tm = static_cast<int>(std::min(m, m0 + mt) - m0);
    const int tn = static_cast<int>(std::min(n, n0 + nt) - n0);
    float* c = op + m0 * n + n0;
    if (bp != nullptr)
      for (int r = 0; r < tm; ++r) std::copy(bp + n0, bp + n0 + tn, c + r * n);
    sgemm_("T", "N", &tn, &tm, &ik, &one, wp + n0 * ldw, &ldw, xp + m0 * ldx, &ldx,
           bp != nullptr ? &one : &zero, c, &ldo);
  }
}
