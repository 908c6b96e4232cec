// Fused elementwise operators of the decoder layers (CPU, float32), each one pass over memory
// and one Python call instead of 3-7 torch ops:
//
//   rms_norm(out, x, w, eps)          out[t] = w * (x[t] * 1/sqrt(mean(x[t]^2) + eps))
//   add_rms_norm(out, sum, x, r, w, eps)   sum[t] = x[t] + r[t];  out[t] = rms_norm(sum[t])
//   silu_and_mul(out, x)              out[t, i] = silu(x[t, i]) * x[t, d + i],  d = out.size(1)
//                                     (float32, or bf16 in and out: computed in float32)
//   rotary(out, x, cos, sin)          x [T, Hh, D], half = D/2, cos/sin [T, half]:
//                                     out[t, h, i]        = x1 * cos[t, i] - x2 * sin[t, i]
//                                     out[t, h, i + half] = x2 * cos[t, i] + x1 * sin[t, i]
//                                     with x1 = x[t, h, i], x2 = x[t, h, i + half] (rotate-half)
//   argmax_rows_bf16(out, x)          the same over a bf16 x (the index argmax_rows gives on x's
//                                     exact float32 widening)
//   argmax_rows(out, x)               out[t] = index of the first maximum of x[t] (torch.argmax:
//                                     the first NaN if any), vectorised (torch's is ~10x slower)
// Rows of x/r may be strided (stride(-1) == 1); outputs are contiguous. The operation order
// matches the torch code in sluice/model/layers (HF's); sums and exp differ in rounding only
// (16-lane mean, polynomial exp with ~2e-7 relative error). Loops hand out rows dynamically, so
// a thread preempted by another process (the API server on the same cores) delays only its
// own chunk, not the whole step.
#include "bf16_rows.h"
#include "ops.h"
#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace {

constexpr int64_t kParallelMin = 1 << 14;  // elements below which one thread does the work
constexpr int kRowChunk = 16;              // rows per dynamically scheduled chunk

inline float mean_square(const float* x, int64_t n) {
  return sluice::dot(x, x, n) / static_cast<float>(n);
}

inline void norm_row(float* out, const float* x, const float* w, int64_t n, float eps) {
  const float inv = 1.f / std::sqrt(mean_square(x, n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dtype() == at::kFloat && t.device().is_cpu(), name, ": float32 CPU expected");
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, ": 2-D with contiguous rows expected");
}

}  // namespace

void rms_norm(at::Tensor out, at::Tensor x, at::Tensor w, double eps) {
  check_rows(x, "rms_norm x");
  check_rows(out, "rms_norm out");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && out.sizes() == x.sizes(),
              "rms_norm: shape mismatch");
  const int64_t rows = x.size(0), n = x.size(1), ldx = x.stride(0), ldo = out.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float feps = static_cast<float>(eps);
#pragma omp parallel for schedule(dynamic, kRowChunk) if (rows * n >= kParallelMin)
  for (int64_t t = 0; t < rows; ++t) norm_row(op + t * ldo, xp + t * ldx, wp, n, feps);
}

void add_rms_norm(at::Tensor out, at::Tensor sum, at::Tensor x, at::Tensor residual,
                  at::Tensor w, double eps) {
  check_rows(x, "add_rms_norm x");
  check_rows(residual, "add_rms_norm residual");
  check_rows(out, "add_rms_norm out");
  check_rows(sum, "add_rms_norm sum");
  TORCH_CHECK(w.is_contiguous() && w.numel() == x.size(1) && out.sizes() == x.sizes() &&
                  sum.sizes() == x.sizes() && residual.sizes() == x.sizes(),
              "add_rms_norm: shape mismatch");
  const int64_t rows = x.size(0), n = x.size(1);
  const int64_t ldx = x.stride(0), ldr = residual.stride(0), ldo = out.stride(0),
                lds = sum.stride(0);
  const float* xp = x.data_ptr<float>();
  const float* rp = residual.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  const float feps = static_cast<float>(eps);
#pragma omp parallel for schedule(dynamic, kRowChunk) if (rows * n >= kParallelMin)
  for (int64_t t = 0; t < rows; ++t) {
    float* s = sp + t * lds;
    const float* a = xp + t * ldx;
    const float* b = rp + t * ldr;
    for (int64_t i = 0; i < n; ++i) s[i] = a[i] + b[i];
    norm_row(op + t * ldo, s, wp, n, feps);
  }
}

namespace {
// o[i] = silu(gate[i]) * up[i], i < d.
inline void silu_mul_row(float* o, const float* gate, const float* up, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    const float g = gate[i];
    o[i] = g / (1.f + sluice::exp_approx(-g)) * up[i];
  }
}

// The same over bf16 rows: widened exactly in chunks, the float32 arithmetic above, the result
// rounded to nearest-even — bit for bit the float32 op on the widened rows, then narrowed.
inline void silu_mul_row(c10::BFloat16* o, const c10::BFloat16* gate, const c10::BFloat16* up,
                         int64_t d) {
  constexpr int64_t kChunk = 64;
  float g[kChunk], u[kChunk], r[kChunk];
  for (int64_t i = 0; i < d; i += kChunk) {
    const int64_t n = std::min(kChunk, d - i);
    sluice::widen_from_bf16(g, gate + i, n);
    sluice::widen_from_bf16(u, up + i, n);
    silu_mul_row(r, g, u, n);
    sluice::narrow_to_bf16(o + i, r, n);
  }
}

template <typename T>
void silu_and_mul_rows(at::Tensor& out, const at::Tensor& x) {
  const int64_t rows = x.size(0), d = out.size(1), ldx = x.stride(0), ldo = out.stride(0);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
#pragma omp parallel for schedule(dynamic, kRowChunk) if (rows * d >= kParallelMin)
  for (int64_t t = 0; t < rows; ++t) silu_mul_row(op + t * ldo, xp + t * ldx, xp + t * ldx + d, d);
}
}  // namespace

void silu_and_mul(at::Tensor out, at::Tensor x) {
  const bool bf16 = x.dtype() == at::kBFloat16 && out.dtype() == at::kBFloat16;
  TORCH_CHECK(bf16 || (x.dtype() == at::kFloat && out.dtype() == at::kFloat),
              "silu_and_mul: x and out both float32 or both bfloat16 expected");
  TORCH_CHECK(x.device().is_cpu() && out.device().is_cpu() && x.dim() == 2 && out.dim() == 2 &&
                  x.stride(1) == 1 && out.stride(1) == 1,
              "silu_and_mul: 2-D CPU tensors with contiguous rows expected");
  TORCH_CHECK(x.size(1) == 2 * out.size(1) && out.size(0) == x.size(0),
              "silu_and_mul: shape mismatch");
  if (bf16)
    silu_and_mul_rows<c10::BFloat16>(out, x);
  else
    silu_and_mul_rows<float>(out, x);
}

void rotary(at::Tensor out, at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dtype() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
              "rotary x: float32 [T, heads, D] with contiguous head vectors expected");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes(), "rotary out: contiguous, x's shape");
  const int64_t rows = x.size(0), heads = x.size(1), dim = x.size(2), half = dim / 2;
  TORCH_CHECK(dim % 2 == 0 && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.dtype() == at::kFloat && sin.dtype() == at::kFloat &&
                  cos.numel() == rows * half && sin.numel() == rows * half,
              "rotary: cos/sin must be contiguous float32 [T, D/2]");
  const int64_t ldt = x.stride(0), ldh = x.stride(1);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* op = out.data_ptr<float>();
#pragma omp parallel for schedule(dynamic, kRowChunk) if (rows * heads * dim >= kParallelMin)
  for (int64_t t = 0; t < rows; ++t) {
    const float* c = cp + t * half;
    const float* s = sp + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      const float* x1 = xp + t * ldt + h * ldh;
      const float* x2 = x1 + half;
      float* o = op + (t * heads + h) * dim;
      for (int64_t i = 0; i < half; ++i) {
        o[i] = x1[i] * c[i] - x2[i] * s[i];
        o[i + half] = x2[i] * c[i] + x1[i] * s[i];
      }
    }
  }
}

namespace {

// 16 values of a row as float32 (bf16 widened exactly, bf16_rows.h).
inline sluice::v16 load16_wide(const float* p) { return sluice::load16(p); }
inline sluice::v16 load16_wide(const c10::BFloat16* p) { return sluice::load16_from_bf16(p); }
inline float wide(float v) { return v; }
inline float wide(c10::BFloat16 v) { return static_cast<float>(v); }

// Index of the first maximum of x[0..n) as torch.argmax on x's float32 values: the first NaN
// if there is one. Pass 1 keeps kVecs vectors of lane maxima (m = m < x ? x : m, which skips
// NaNs as std::max does) and a NaN flag per lane, independent chains the compiler keeps in
// registers (a scalar loop compiled to one vmaxss per element); pass 2 finds the first element
// equal to the maximum (or the first NaN), kVecs * 16 values per test. bf16 values are widened
// in registers, so both passes read the row itself.
template <typename T>
int64_t argmax_row(const T* x, int64_t n) {
  using sluice::v16;
  using i16 = int32_t __attribute__((vector_size(64)));
  constexpr int kVecs = 4, kStep = 16 * kVecs;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  v16 m[kVecs];
  i16 nan[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    m[v] = v16{} + kNegInf;
    nan[v] = i16{};
  }
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep)
    for (int v = 0; v < kVecs; ++v) {
      const v16 a = load16_wide(x + i + 16 * v);
      m[v] = m[v] < a ? a : m[v];
      nan[v] |= a != a;
    }
  float best = kNegInf;
  bool any_nan = false;
  for (int v = 0; v < kVecs; ++v)
    for (int j = 0; j < 16; ++j) best = std::max(best, m[v][j]), any_nan |= nan[v][j] != 0;
  for (int64_t t = i; t < n; ++t) {
    const float v = wide(x[t]);
    best = std::max(best, v), any_nan |= v != v;
  }
  if (any_nan) {
    for (int64_t t = 0; t < n; ++t)
      if (wide(x[t]) != wide(x[t])) return t;
  }
  for (i = 0; i + kStep <= n; i += kStep) {  // first group holding `best`, then its first lane
    i16 hit = {};
    for (int v = 0; v < kVecs; ++v) hit |= load16_wide(x + i + 16 * v) == best;
    bool any = false;
    for (int j = 0; j < 16; ++j) any |= hit[j] != 0;
    if (any) break;
  }
  for (; i < n; ++i)
    if (wide(x[i]) == best) return i;
  return 0;  // n == 0, or every value is -inf
}

}  // namespace

void argmax_rows(at::Tensor out, at::Tensor x) {
  check_rows(x, "argmax_rows x");
  TORCH_CHECK(out.dtype() == at::kLong && out.is_contiguous() && out.numel() == x.size(0),
              "argmax_rows out: contiguous int64 [rows] expected");
  const int64_t rows = x.size(0), n = x.size(1), ldx = x.stride(0);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 1) if (rows * n >= 4 * kParallelMin)
  for (int64_t t = 0; t < rows; ++t) op[t] = argmax_row(xp + t * ldx, n);
}

void argmax_rows_bf16(at::Tensor out, at::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1,
              "argmax_rows_bf16 x: bfloat16 [rows, n] with contiguous rows expected");
  TORCH_CHECK(out.dtype() == at::kLong && out.is_contiguous() && out.numel() == x.size(0),
              "argmax_rows_bf16 out: contiguous int64 [rows] expected");
  const int64_t rows = x.size(0), n = x.size(1), ldx = x.stride(0);
  const auto* xp = x.data_ptr<c10::BFloat16>();
  int64_t* op = out.data_ptr<int64_t>();
#pragma omp parallel for schedule(dynamic, 1) if (rows * n >= 4 * kParallelMin)
  for (int64_t t = 0; t < rows; ++t) op[t] = argmax_row(xp + t * ldx, n);
}
