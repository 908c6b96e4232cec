// sluice's CPU operators, compiled into one extension module (see sluice/model/cpu_ops.py).
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <vector>

// Paged decode attention over the block-structured KV cache (paged_decode.cpp).
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache,
                            at::Tensor block_ids, int64_t nb, at::Tensor seq_lens,
                            double scale);

// Paged prefill attention (several query tokens per request) from the cache (paged_prefill.cpp);
// bf16_products: a bfloat16 cache multiplies in bf16 where prefill_bf16_products_available(D).
void paged_prefill_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache,
                             at::Tensor block_table, at::Tensor query_start_loc,
                             at::Tensor seq_lens, double scale, bool bf16_products);
bool prefill_bf16_products_available(int64_t head_dim);
int64_t prefill_bf16_min_queries();  // a request's query tokens for the bf16 products

// dst[i] = src[i] (float32) stored in dst's KV cache dtype (float32, bfloat16, float16, fp8
// e4m3fn / e5m2) exactly as the fused decode stack's cache writes round it (kv_rows.h); both
// contiguous, same number of elements (decode_stack.cpp). For tests against torch's casts.
void store_kv_rows(at::Tensor dst, at::Tensor src);

// out = x @ w.T (+ bias), tiled over rows and columns (tiled_linear.cpp).
void tiled_linear(at::Tensor out, at::Tensor x, at::Tensor w,
                  std::optional<at::Tensor> bias);

// Linear layers over GGUF block-quantized weights (quant_linear.cpp; block layouts there):
// out [M, N] = x [M, K] @ dequant(w).T (+ bias), w uint8 [N, row bytes] of GGML type `type`
// (2 Q4_0, 3 Q4_1, 8 Q8_0, 12 Q4_K, 13 Q5_K, 14 Q6_K), dequantized on the fly; and the
// dequantization.
void gguf_linear(at::Tensor out, at::Tensor x, at::Tensor w, int64_t type,
                 std::optional<at::Tensor> bias);
void gguf_dequantize(at::Tensor out, at::Tensor w, int64_t type);
int64_t gguf_block_elems(int64_t type);
// Whether this process runs gguf_linear's bf16 products (type flag 512) on AMX (amx_gemm.cpp):
// the CPU has AMX-BF16 and Linux granted the tile state; elsewhere the flag changes nothing.
bool amx_bf16_available();
int64_t gguf_block_bytes(int64_t type);
// GGUF block weights (every type gguf_linear runs but F16 / BF16) in vnni_linear.cpp's packed
// layout (the same bytes, regrouped per 16 rows), run by gguf_linear with type | 256 | 1024 for
// any M: the kernel that runs it here ("avx512vnni", "avx2", or "" where none does), and the
// in-place conversions between the GGUF and packed layouts (N % 16 == 0).
std::string packed_int8_kernel();
void vnni_pack(at::Tensor w, int64_t type);
void vnni_unpack(at::Tensor w, int64_t type);

// Fused elementwise operators of the decoder layers (elementwise.cpp).
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor w, double eps);
void add_rms_norm(at::Tensor out, at::Tensor sum, at::Tensor x, at::Tensor residual,
                  at::Tensor w, double eps);
void silu_and_mul(at::Tensor out, at::Tensor x);  // float32, or bf16 in and out
void rotary(at::Tensor out, at::Tensor x, at::Tensor cos, at::Tensor sin);
void argmax_rows(at::Tensor out, at::Tensor x);
void argmax_rows_bf16(at::Tensor out, at::Tensor x);

// Exact greedy tokens from bfloat16 screen scores of the LM head (greedy_screen.cpp).
void greedy_screen(at::Tensor out, at::Tensor scores, at::Tensor x, at::Tensor w,
                   at::Tensor w_norms, double c, double a);
// Its screen scores for 1..kMaxScoreRows rows: one streaming pass over a bf16 weight.
constexpr int64_t kMaxScoreRows = 4;
void bf16_scores(at::Tensor scores, at::Tensor x, at::Tensor w);

// oneDNN's GEMM on a weight pre-packed by torch.ops.mkldnn._reorder_linear_weight
// (decode_stack.cpp): out [M, N] = x [M, K] @ W.T (+ bias), the op
// torch.ops.mkldnn._linear_pointwise with its input padded with zero rows to onednn_rows(M)
// (out is the first M rows of the padded result: a contiguous view).
//
// Why: torch's oneDNN linear builds a primitive for every input shape it meets and keeps it in
// an LRU cache of 1024 entries (ideep's; ~0.5 MiB each with its JIT code). A server's steps
// have every row count from 2 to the token budget, so that cache grew by ~0.5 GB and then
// churned (a miss costs milliseconds and leaves the heap fragmented). Padded, the row counts
// are a fixed set: exact below 32, then 16 per octave (32, 34, ..., 64, 68, ..., 128, 136, ...),
// so at most 1/16 extra rows and 127 shapes per weight up to 2048 rows. Coarser steps cost
// throughput: at the small models' sizes even an 8-row GEMM is compute bound (2 rows padded
// to 8 ran ~2x slower).
constexpr int64_t kOnednnRowsPerOctave = 16;

int64_t onednn_rows(int64_t m);
at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias);
// float32 x [M, K] @ W.T (+ bias) for a bf16 W packed as above: x rounded to bf16 (nearest-
// even) into the padded input (a bfloat16 x is taken as it is, copied only to pad), oneDNN's
// bf16 GEMM (AMX / AVX-512-BF16), its bf16 result widened to float32 [M, N] and the float32
// bias added — the conversions in one pass each. With float_out false (no bias): oneDNN's bf16
// result [M, N] as it is.
at::Tensor onednn_bf16_linear(const at::Tensor& x, const at::Tensor& packed,
                              const std::optional<at::Tensor>& bias, bool float_out);
// The same product and result for a bf16 W [N, K] that also has `packed`, its oneDNN copy:
// up to streamed_bf16_rows() rows (0 on a CPU with AMX-BF16) the plain W is streamed once, x
// rounded to bf16, float32 sums, the result rounded to bf16 as oneDNN's is — its numerics up
// to float32 summation order: on AVX512-BF16 (the x86-64-v4 build) by bf16_gemv.cpp's
// vdpbf16ps kernel up to kStreamedBf16Rows rows, else by gguf_linear's widening BF16 GEMV up
// to kWidenedBf16Rows; otherwise onednn_bf16_linear on `packed`. Why: oneDNN's GEMM costs
// ~20 us per call at few rows whatever the shape and reads its packed copy at ~half the
// bandwidth a plain streaming pass gets (SmolLM2's 121 bf16 products on a Zen 5,
// benchmarks/bf16_rows.py: the widening GEMV 11.8 vs oneDNN 19.2 ms at one row, even at 3,
// behind from 4). With AMX oneDNN wins from one row on (~0.9x the widening GEMV at one row).
constexpr int64_t kStreamedBf16Rows = 8;
constexpr int64_t kWidenedBf16Rows = 2;
int64_t streamed_bf16_rows();
bool bf16_gemv_available();  // this build has bf16_gemv.cpp's kernel and the CPU AVX512-BF16
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& packed,
                       const std::optional<at::Tensor>& bias, bool float_out);

// A decode step through every decoder layer of a Llama-family model (decode_stack.cpp).
// Built once from the model's weights (per layer; optional entries are None/nullopt) and,
// optionally, their oneDNN-packed copies (qkv, o, gate_up, down per layer: used for 2+ rows)
// and GGML type ids (the same four per layer; 0: float, else GGUF blocks run by gguf_linear)
// and input orders (the same four; int64 [in]: the projection multiplies x[:, order], as
// ActOrderBlockLinearMethod does; nullopt: x as it is) and KV-cache scales (k_scale, v_scale
// per layer, or nothing: all 1), then `forward` runs one step. The weight tensors are shared
// with the model, not copied. Over an fp8 cache a layer with scales stores k * inv(k_scale)
// and v * inv(v_scale) (inv: 1 / scale rounded to float32), attends with softmax scale
// scale * k_scale and multiplies the result by v_scale, as the Python `Attention` layer does
// (sluice.model.attention.kv_scales); any other cache ignores them.
class DecodeStack {
 public:
  DecodeStack(int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, double scale,
              std::vector<at::Tensor> input_norm, std::vector<at::Tensor> qkv,
              std::vector<std::optional<at::Tensor>> qkv_bias,
              std::vector<std::optional<at::Tensor>> q_norm,
              std::vector<std::optional<at::Tensor>> k_norm, std::vector<at::Tensor> o,
              std::vector<std::optional<at::Tensor>> o_bias, std::vector<at::Tensor> post_norm,
              std::vector<at::Tensor> gate_up, std::vector<at::Tensor> down,
              at::Tensor final_norm, std::vector<std::optional<at::Tensor>> packed,
              std::vector<int64_t> quant_types,
              std::vector<std::optional<at::Tensor>> input_orders,
              std::vector<double> kv_scales);

  // x [T, hidden]: the embeddings of T decode tokens (token t = request t); cos/sin [T, D/2];
  // kv_caches: one per layer; slot_mapping [T]; block_ids/nb/seq_lens as
  // paged_decode_attention. Writes this step's k/v into the caches and returns the final
  // norm's output [T, hidden].
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin,
                     std::vector<at::Tensor> kv_caches, at::Tensor slot_mapping,
                     at::Tensor block_ids, int64_t nb, at::Tensor seq_lens);

 private:
  struct Layer {
    at::Tensor input_norm, qkv;
    std::optional<at::Tensor> qkv_bias, q_norm, k_norm;
    at::Tensor o;
    std::optional<at::Tensor> o_bias;
    at::Tensor post_norm, gate_up, down;
    // oneDNN-packed weights (sluice.model.layers.layer_ops.packed_weight), used for 2+ rows
    std::optional<at::Tensor> qkv_packed, o_packed, gate_up_packed, down_packed;
    // GGML type ids of GGUF-block projections (weights uint8 [N, row bytes]); 0: float
    int64_t qkv_type, o_type, gate_up_type, down_type;
    // the projections' input orders (int64 [in]: they multiply x[:, order]), or nullopt
    std::optional<at::Tensor> qkv_order, o_order, gate_up_order, down_order;
    double k_scale, v_scale;  // KV-cache scales (1: none), used over an fp8 cache only
  };
  at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                    const std::optional<at::Tensor>& packed, int64_t quant_type,
                    const std::optional<at::Tensor>& order) const;
  bool bf16_mlp(const Layer& w) const;
  int64_t n_heads_, n_kv_heads_, head_dim_;
  double eps_, scale_;
  at::Tensor final_norm_;
  std::vector<Layer> layers_;
};
