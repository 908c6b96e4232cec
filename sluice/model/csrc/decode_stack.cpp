// A decode step through every decoder layer of a Llama-family model, in one call.
//
// Every query token t is one attention row: block_ids[t], seq_lens[t] say which KV it attends
// to (T tokens = T rows). In a plain decode step row r is request r; a request computing
// several tokens (speculative verification, a short prompt) gets one row per token from
// Python (fused_decode.py), each seeing its causal prefix, since all rows' k/v are cached
// first. The step runs the same operators, in the same order, as the Python
// layers with layer ops 'cpu' and the cpu_paged backend (sluice/model/models/llama.py); only
// the Python between them is gone, which at one request is ~1/3 of the step. Per layer l:
//
//   h, res  = l == 0 ? (rms_norm(x), x) : add_rms_norm(mlp_out, res)      input_layernorm
//   qkv     = h @ Wqkv.T (+ b)                    [T, (H + 2 Hkv) D]: q | k | v columns
//   q, k    = rope(q), rope(k)                    (Qwen3: rms_norm per head first)
//   cache   [slot_mapping[t]] = k[t], v[t]        kv_caches[l]: [2, blocks, B, Hkv, D]
//   attn    = paged_decode_attention(q, cache)
//   h, res  = add_rms_norm(attn @ Wo.T (+ b), res)                         post_attention
//   mlp_out = silu_and_mul(h @ Wgate_up.T) @ Wdown.T   (bf16 between the GEMMs: bf16_mlp)
// and at the end out = add_rms_norm(mlp_out, res) with the final norm's weight.
// A projection whose `quant_types` entry is a GGML type id (not 0; | 256 for int8 activations)
// holds GGUF blocks (uint8 [N, row bytes]) and runs gguf_linear (quant_linear.cpp), as
// GgufBlockLinearMethod does.
#include "bf16_gemv.cpp"
#include "bf16_rows.h"
#include "kv_rows.h"
#include "ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

int64_t onednn_rows(int64_t m) {
  if (m < 2 * kOnednnRowsPerOctave) return m;
  // round up to a multiple of 1/16 of the power of two at or below m
  const int64_t floor_pow2 = int64_t{1} << (63 - __builtin_clzll(static_cast<uint64_t>(m)));
  const int64_t step = floor_pow2 / kOnednnRowsPerOctave;
  return (m + step - 1) / step * step;
}

namespace {
// torch.ops.mkldnn._linear_pointwise(input, packed, bias, "none", [], ""), looked up once.
at::Tensor linear_pointwise(const at::Tensor& input, const at::Tensor& packed,
                            const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>)>();
  return op.call(input, packed, bias, "none", c10::List<std::optional<at::Scalar>>(), "");
}

// Rows per task of the conversions around onednn_bf16_linear: at least ~16k elements each.
int64_t conversion_grain(int64_t cols) { return std::max<int64_t>(1, (1 << 14) / cols); }
}  // namespace

void store_kv_rows(at::Tensor dst, at::Tensor src) {
  TORCH_CHECK(src.scalar_type() == at::kFloat && src.is_contiguous() && dst.is_contiguous() &&
                  src.numel() == dst.numel(),
              "store_kv_rows: contiguous float32 src and dst of as many elements expected");
  const bool known = sluice::visit_kv_cache_type(dst.scalar_type(), [&](auto tag) {
    sluice::kv_row_store(static_cast<decltype(tag)*>(dst.data_ptr()), src.data_ptr<float>(),
                         src.numel());
  });
  TORCH_CHECK(known, "store_kv_rows: ", sluice::kKvCacheDtypes, " dst expected, got ",
              dst.scalar_type());
}

at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "onednn_linear: x [M, K] expected");
  const int64_t m = x.size(0), rows = onednn_rows(m);
  at::Tensor input = x.contiguous();
  if (rows != m) {
    input = at::empty({rows, x.size(1)}, x.options());
    input.narrow(0, 0, m).copy_(x);
    input.narrow(0, m, rows - m).zero_();
  }
  at::Tensor out = linear_pointwise(input, packed, bias);
  return rows == m ? out : out.narrow(0, 0, m);
}

at::Tensor onednn_bf16_linear(const at::Tensor& x, const at::Tensor& packed,
                              const std::optional<at::Tensor>& bias, bool float_out) {
  const bool x16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x16) && x.stride(1) == 1,
              "onednn_bf16_linear: float32 or bfloat16 x [M, K] with contiguous rows expected");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "onednn_bf16_linear: a contiguous float32 bias expected");
  const int64_t m = x.size(0), k = x.size(1), rows = onednn_rows(m), ldx = x.stride(0);
  at::Tensor input;
  if (x16 && rows == m && x.is_contiguous()) {
    input = x;  // already oneDNN's input
  } else {
    input = at::empty({rows, k}, x.options().dtype(at::kBFloat16));
    auto* in16 = input.data_ptr<c10::BFloat16>();
    if (x16) {
      const auto* src = x.data_ptr<c10::BFloat16>();
      for (int64_t r = 0; r < m; ++r) std::memcpy(in16 + r * k, src + r * ldx, k * 2);
    } else {
      const float* src = x.data_ptr<float>();
      at::parallel_for(0, m, conversion_grain(k), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) sluice::narrow_to_bf16(in16 + r * k, src + r * ldx, k);
      });
    }
    if (rows > m) std::memset(static_cast<void*>(in16 + m * k), 0, (rows - m) * k * 2);
  }
  const at::Tensor out16 = linear_pointwise(input, packed, std::nullopt);  // [rows, N] bf16
  if (!float_out) {
    TORCH_CHECK(!bias, "onednn_bf16_linear: a bias needs float_out");
    return rows == m ? out16 : out16.narrow(0, 0, m);
  }
  const int64_t n = out16.size(1);
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  const auto* o16 = out16.data_ptr<c10::BFloat16>();
  float* o = out.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  at::parallel_for(0, m, conversion_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      sluice::widen_from_bf16(o + r * n, o16 + r * n, n);
      if (b != nullptr)
        for (int64_t j = 0; j < n; ++j) o[r * n + j] += b[j];
    }
  });
  return out;
}

bool bf16_gemv_available() { return bf16gemv::available(); }

int64_t streamed_bf16_rows() {
  if (amx_bf16_available()) return 0;
  return bf16gemv::available() ? kStreamedBf16Rows : kWidenedBf16Rows;
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& packed,
                       const std::optional<at::Tensor>& bias, bool float_out) {
  const int64_t m = x.size(0), k = x.dim() == 2 ? x.size(1) : 0, n = w.size(0);
  const bool x16 = x.scalar_type() == at::kBFloat16;
  if (m > streamed_bf16_rows() || w.scalar_type() != at::kBFloat16 || !w.is_contiguous() ||
      x.dim() != 2 || x.stride(1) != 1 || w.size(1) != k ||
      !(x16 || x.scalar_type() == at::kFloat))
    return onednn_bf16_linear(x, packed, bias, float_out);
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous()),
              "bf16_linear: a contiguous float32 bias expected");
  TORCH_CHECK(!bias || float_out, "bf16_linear: a bias needs float_out");
  at::Tensor out = at::empty({m, n}, x.options().dtype(at::kFloat));
  if (bf16gemv::available()) {  // x rounded to bf16, contiguous rows, then vdpbf16ps
    at::Tensor xb = at::empty({m, k}, x.options().dtype(at::kBFloat16));
    auto* xb16 = xb.data_ptr<c10::BFloat16>();
    for (int64_t r = 0; r < m; ++r) {
      if (x16)
        std::memcpy(xb16 + r * k, x.data_ptr<c10::BFloat16>() + r * x.stride(0), k * 2);
      else
        sluice::narrow_to_bf16(xb16 + r * k, x.data_ptr<float>() + r * x.stride(0), k);
    }
    bf16gemv::run(out.data_ptr<float>(), m, n, k, reinterpret_cast<const uint16_t*>(xb16),
                  reinterpret_cast<const uint16_t*>(w.data_ptr<c10::BFloat16>()), k);
  } else {  // x rounded to bf16, held widened for gguf_linear's BF16 GEMV
    at::Tensor xr = at::empty({m, k}, x.options().dtype(at::kFloat));
    std::vector<c10::BFloat16> row16(static_cast<size_t>(k));
    for (int64_t r = 0; r < m; ++r) {
      const c10::BFloat16* src16 = row16.data();
      if (x16)
        src16 = x.data_ptr<c10::BFloat16>() + r * x.stride(0);
      else
        sluice::narrow_to_bf16(row16.data(), x.data_ptr<float>() + r * x.stride(0), k);
      sluice::widen_from_bf16(xr.data_ptr<float>() + r * k, src16, k);
    }
    gguf_linear(out, xr, w, /*GGML BF16*/ 30, std::nullopt);
  }
  at::Tensor out16 = at::empty({m, n}, x.options().dtype(at::kBFloat16));
  float* o = out.data_ptr<float>();
  auto* o16 = out16.data_ptr<c10::BFloat16>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < m; ++r) {  // oneDNN's bf16 result, then widened and biased as there
    sluice::narrow_to_bf16(o16 + r * n, o + r * n, n);
    if (!float_out) continue;
    sluice::widen_from_bf16(o + r * n, o16 + r * n, n);
    if (b != nullptr)
      for (int64_t j = 0; j < n; ++j) o[r * n + j] += b[j];
  }
  return float_out ? out : out16;
}

// Whether layer w's MLP runs in bf16 between its GEMMs: gate_up and down both bf16 with packed
// copies. oneDNN's gate_up result is bf16 already; silu_and_mul reads and writes bf16 rows in
// float32 arithmetic, and down takes its bf16 result as oneDNN's input: the same bits as
// widening gate_up, silu_and_mul in float32 and rounding its result to bf16 at down's input,
// without the two float32 [T, 2 I] / [T, I] round trips.
bool DecodeStack::bf16_mlp(const Layer& w) const {
  return w.gate_up_packed && w.down_packed && w.gate_up.scalar_type() == at::kBFloat16 &&
         w.down.scalar_type() == at::kBFloat16;
}

// out = x @ w.T (+ b): a bf16 weight with a oneDNN packed copy (HalfWeightLinearMethod on a
// CPU with native bf16 products) through bf16_linear, any row count, as the layer does;
// other GGUF blocks and 16-bit weights through gguf_linear (quant_type != 0); float32 weights
// on oneDNN's packed copy for 2+ rows when there is one, else tiled_linear (whose one-row path
// streams the weight once).
at::Tensor DecodeStack::linear(const at::Tensor& x_in, const at::Tensor& w,
                               const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& packed, int64_t quant_type,
                               const std::optional<at::Tensor>& order) const {
  const at::Tensor x = order ? x_in.index_select(1, *order) : x_in;
  if (packed && w.scalar_type() == at::kBFloat16)
    return bf16_linear(x.contiguous(), w, *packed, bias, true);
  at::Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
  if (quant_type != 0) {
    gguf_linear(out, x.contiguous(), w, quant_type, bias);
    return out;
  }
  if (packed && x.size(0) >= 2) return onednn_linear(x, *packed, bias);
  tiled_linear(out, x, w, bias);
  return out;
}

DecodeStack::DecodeStack(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps,
                         double scale, std::vector<at::Tensor> input_norm,
                         std::vector<at::Tensor> qkv,
                         std::vector<std::optional<at::Tensor>> qkv_bias,
                         std::vector<std::optional<at::Tensor>> q_norm,
                         std::vector<std::optional<at::Tensor>> k_norm, std::vector<at::Tensor> o,
                         std::vector<std::optional<at::Tensor>> o_bias,
                         std::vector<at::Tensor> post_norm, std::vector<at::Tensor> gate_up,
                         std::vector<at::Tensor> down, at::Tensor final_norm,
                         std::vector<std::optional<at::Tensor>> packed,
                         std::vector<int64_t> quant_types,
                         std::vector<std::optional<at::Tensor>> input_orders,
                         std::vector<double> kv_scales)
    : n_heads_(n_heads), n_kv_heads_(n_kv_heads), head_dim_(head_dim), eps_(eps),
      scale_(scale), final_norm_(std::move(final_norm)) {
  const size_t n = input_norm.size();
  TORCH_CHECK(qkv.size() == n && qkv_bias.size() == n && q_norm.size() == n &&
                  k_norm.size() == n && o.size() == n && o_bias.size() == n &&
                  post_norm.size() == n && gate_up.size() == n && down.size() == n && n > 0,
              "DecodeStack: one entry per layer expected in every weight list");
  TORCH_CHECK(packed.empty() || packed.size() == 4 * n,
              "DecodeStack: packed holds qkv, o, gate_up, down per layer, or nothing");
  TORCH_CHECK(quant_types.empty() || quant_types.size() == 4 * n,
              "DecodeStack: quant_types holds qkv, o, gate_up, down per layer, or nothing");
  TORCH_CHECK(input_orders.empty() || input_orders.size() == 4 * n,
              "DecodeStack: input_orders holds qkv, o, gate_up, down per layer, or nothing");
  auto pk = [&](size_t i) { return packed.empty() ? std::nullopt : packed[i]; };
  auto io = [&](size_t i) { return input_orders.empty() ? std::nullopt : input_orders[i]; };
  TORCH_CHECK(kv_scales.empty() || kv_scales.size() == 2 * n,
              "DecodeStack: kv_scales holds k_scale, v_scale per layer, or nothing");
  for (double v : kv_scales)
    TORCH_CHECK(v > 0 && std::isfinite(v), "DecodeStack: KV-cache scales must be positive");
  auto qt = [&](size_t i) { return quant_types.empty() ? int64_t{0} : quant_types[i]; };
  auto ks = [&](size_t i) { return kv_scales.empty() ? 1.0 : kv_scales[i]; };
  for (size_t l = 0; l < n; ++l)
    layers_.push_back({input_norm[l], qkv[l], qkv_bias[l], q_norm[l], k_norm[l], o[l],
                       o_bias[l], post_norm[l], gate_up[l], down[l], pk(4 * l), pk(4 * l + 1),
                       pk(4 * l + 2), pk(4 * l + 3), qt(4 * l), qt(4 * l + 1), qt(4 * l + 2),
                       qt(4 * l + 3), io(4 * l), io(4 * l + 1), io(4 * l + 2), io(4 * l + 3),
                       ks(2 * l), ks(2 * l + 1)});
}

at::Tensor DecodeStack::forward(at::Tensor x, at::Tensor cos, at::Tensor sin,
                                std::vector<at::Tensor> kv_caches, at::Tensor slot_mapping,
                                at::Tensor block_ids, int64_t nb, at::Tensor seq_lens) {
  TORCH_CHECK(kv_caches.size() == layers_.size(), "DecodeStack: one KV cache per layer expected");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && slot_mapping.is_contiguous() &&
                  slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == x.size(0),
              "DecodeStack: x [T, hidden] contiguous and slot_mapping [T] int64 expected");
  const int64_t T = x.size(0), H = n_heads_, Hkv = n_kv_heads_, D = head_dim_;
  const int64_t q_cols = H * D, kv_cols = Hkv * D;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  at::Tensor h = at::empty_like(x), res = at::empty_like(x), mlp_out;

  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& w = layers_[l];
    if (l == 0) {
      rms_norm(h, x, w.input_norm, eps_);
      res.copy_(x);
    } else {
      add_rms_norm(h, res, mlp_out, res, w.input_norm, eps_);
    }
    at::Tensor qkv = linear(h, w.qkv, w.qkv_bias, w.qkv_packed, w.qkv_type, w.qkv_order);
    at::Tensor q, k;
    if (!w.q_norm) {  // q and k are adjacent columns: one RoPE pass over both
      at::Tensor qk = at::empty({T, H + Hkv, D}, x.options());
      rotary(qk, qkv.narrow(1, 0, q_cols + kv_cols).view({T, H + Hkv, D}), cos, sin);
      q = qk.narrow(1, 0, H);
      k = qk.narrow(1, H, Hkv);
    } else {
      at::Tensor qn = at::empty({T * H, D}, x.options()), kn = at::empty({T * Hkv, D}, x.options());
      rms_norm(qn, qkv.narrow(1, 0, q_cols).reshape({T * H, D}), *w.q_norm, eps_);
      rms_norm(kn, qkv.narrow(1, q_cols, kv_cols).reshape({T * Hkv, D}), *w.k_norm, eps_);
      q = at::empty({T, H, D}, x.options());
      k = at::empty({T, Hkv, D}, x.options());
      rotary(q, qn.view({T, H, D}), cos, sin);
      rotary(k, kn.view({T, Hkv, D}), cos, sin);
    }
    // Cache write: token t's k and v rows go to slot slots[t] of this layer's cache.
    at::Tensor& cache = kv_caches[l];
    TORCH_CHECK(cache.is_contiguous() && cache.size(3) == Hkv && cache.size(4) == D,
                "DecodeStack: KV cache [2, blocks, B, Hkv, D] contiguous expected");
    const float* kp = k.data_ptr<float>();  // row stride (H + Hkv) D or Hkv D
    const float* vp = qkv.data_ptr<float>() + q_cols + kv_cols;
    const int64_t ldk = k.stride(0), ldv = qkv.stride(0), half = cache.numel() / 2;
    // KV-cache scales apply over an fp8 cache only (ops.h)
    const bool scaled = (w.k_scale != 1.0 || w.v_scale != 1.0) &&
                        (cache.scalar_type() == at::kFloat8_e4m3fn ||
                         cache.scalar_type() == at::kFloat8_e5m2);
    const bool known = sluice::visit_kv_cache_type(cache.scalar_type(), [&](auto tag) {
      // rows stored in the cache's dtype (kv_rows.h)
      auto* kc = static_cast<decltype(tag)*>(cache.data_ptr());
      if (!scaled) {
        for (int64_t t = 0; t < T; ++t) {
          sluice::kv_row_store(kc + slots[t] * kv_cols, kp + t * ldk, kv_cols);
          sluice::kv_row_store(kc + half + slots[t] * kv_cols, vp + t * ldv, kv_cols);
        }
        return;
      }
      const float k_inv = static_cast<float>(1.0 / w.k_scale);
      const float v_inv = static_cast<float>(1.0 / w.v_scale);
      std::vector<float> row(kv_cols);
      auto store_scaled = [&](decltype(tag)* dst, const float* src, float inv) {
        for (int64_t i = 0; i < kv_cols; ++i) row[i] = src[i] * inv;
        sluice::kv_row_store(dst, row.data(), kv_cols);
      };
      for (int64_t t = 0; t < T; ++t) {
        store_scaled(kc + slots[t] * kv_cols, kp + t * ldk, k_inv);
        store_scaled(kc + half + slots[t] * kv_cols, vp + t * ldv, v_inv);
      }
    });
    TORCH_CHECK(known, "DecodeStack: ", sluice::kKvCacheDtypes, " KV cache expected, got ",
                cache.scalar_type());
    at::Tensor attn = at::empty({T, H, D}, x.options());
    paged_decode_attention(attn, q, cache, block_ids, nb, seq_lens,
                           scaled ? scale_ * w.k_scale : scale_);
    if (scaled) attn.mul_(w.v_scale);
    at::Tensor o = linear(attn.view({T, q_cols}), w.o, w.o_bias, w.o_packed, w.o_type, w.o_order);
    add_rms_norm(h, res, o, res, w.post_norm, eps_);
    if (bf16_mlp(w)) {  // gate_up -> silu -> down in bf16 (see bf16_mlp)
      at::Tensor gate_up = bf16_linear(h, w.gate_up, *w.gate_up_packed, std::nullopt, false);
      at::Tensor act = at::empty({T, w.gate_up.size(0) / 2}, gate_up.options());
      silu_and_mul(act, gate_up);
      mlp_out = bf16_linear(act, w.down, *w.down_packed, std::nullopt, true);
    } else {
      at::Tensor gate_up =
          linear(h, w.gate_up, std::nullopt, w.gate_up_packed, w.gate_up_type, w.gate_up_order);
      at::Tensor act = at::empty({T, w.gate_up.size(0) / 2}, x.options());
      silu_and_mul(act, gate_up);
      mlp_out = linear(act, w.down, std::nullopt, w.down_packed, w.down_type, w.down_order);
    }
  }
  at::Tensor out = at::empty_like(x);
  add_rms_norm(out, res, mlp_out, res, final_norm_, eps_);
  return out;
}
