// sluice's CPU operators, compiled into one extension module (see sluice/model/cpu_ops.py).
#pragma once
#include <ATen/ATen.h>

// Paged decode attention over the block-structured KV cache (paged_decode.cpp).
void paged_decode_attention(at::Tensor out, at::Tensor q, at::Tensor kv_cache,
                            at::Tensor block_ids, int64_t nb, at::Tensor seq_lens,
                            double scale);

// out = x @ w.T (+ bias), tiled over rows and columns (tiled_linear.cpp).
void tiled_linear(at::Tensor out, at::Tensor x, at::Tensor w,
                  std::optional<at::Tensor> bias);

// Fused elementwise operators of the decoder layers (elementwise.cpp).
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor w, double eps);
void add_rms_norm(at::Tensor out, at::Tensor sum, at::Tensor x, at::Tensor residual,
                  at::Tensor w, double eps);
void silu_and_mul(at::Tensor out, at::Tensor x);
void rotary(at::Tensor out, at::Tensor x, at::Tensor cos, at::Tensor sin);
