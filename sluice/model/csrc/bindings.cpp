// Python bindings of the CPU operators. Every operator releases the GIL while it runs (its
// arguments are converted to at::Tensor before the call and it touches no Python object), so
// the engine process's I/O threads keep sending outputs and taking requests during a step, as
// they do during torch's own ops.
// <torch/csrc/utils/pybind.h> (pybind11 and its at::Tensor casters), not <torch/extension.h>:
// the same bindings in ~60% of the compile time.
#include <torch/csrc/utils/pybind.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("paged_decode_attention", &paged_decode_attention, nogil,
        "Paged decode attention over an in-place block-structured KV cache (CPU, fp32)");
  m.def("paged_prefill_attention", &paged_prefill_attention, nogil,
        "Causal attention of multi-token requests over the block-structured KV cache (CPU, fp32 "
        "q/out; bf16_products: bf16 products over a bf16 cache where available)",
        py::arg("out"), py::arg("q"), py::arg("kv_cache"), py::arg("block_table"),
        py::arg("query_start_loc"), py::arg("seq_lens"), py::arg("scale"),
        py::arg("bf16_products") = false);
  m.def("prefill_bf16_products_available", &prefill_bf16_products_available,
        "Whether paged_prefill_attention's bf16 products run here for this head dim "
        "(AVX512-BF16 in this build and CPU, head_dim % 32 == 0)");
  m.def("prefill_bf16_min_queries", &prefill_bf16_min_queries,
        "The query tokens a request needs for paged_prefill_attention's bf16 products");
  m.def("store_kv_rows", &store_kv_rows, nogil,
        "dst = float32 src in dst's KV cache dtype, rounded as the C++ cache writes round");
  m.def("tiled_linear", &tiled_linear, nogil,
        "out = x @ w.T (+ bias), tiled across threads (CPU)", py::arg("out"), py::arg("x"),
        py::arg("w"), py::arg("bias") = py::none());
  m.def("onednn_linear", &onednn_linear, nogil,
        "x @ W.T (+ bias) on oneDNN with W pre-packed; rows padded to onednn_rows(M)",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none());
  m.def("onednn_bf16_linear", &onednn_bf16_linear, nogil,
        "float32 x @ W.T (+ bias) through oneDNN's bf16 GEMM on a packed bf16 W; float32 out "
        "(float_out=False: its bf16 result)",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none(),
        py::arg("float_out") = true);
  m.def("bf16_linear", &bf16_linear, nogil,
        "onednn_bf16_linear's product for a bf16 W with its packed copy; up to "
        "kStreamedBf16Rows rows without AMX: a streaming GEMV over W with the same roundings",
        py::arg("x"), py::arg("w"), py::arg("packed"), py::arg("bias") = py::none(),
        py::arg("float_out") = true);
  m.def("streamed_bf16_rows", &streamed_bf16_rows,
        "Rows up to which bf16_linear streams the plain weight here (0 with AMX-BF16)");
  m.def("bf16_gemv_available", &bf16_gemv_available,
        "Whether bf16_linear's few-row products run vdpbf16ps here (bf16_gemv.cpp)");
  m.def("onednn_rows", &onednn_rows, "Rows oneDNN's GEMM runs for an M-row input");
  m.def("gguf_linear", &gguf_linear, nogil,
        "out = x @ dequant(w).T (+ bias) for GGUF blocks w (uint8 [N, row bytes]) of a GGML type",
        py::arg("out"), py::arg("x"), py::arg("w"), py::arg("type"), py::arg("bias") = py::none());
  m.def("gguf_dequantize", &gguf_dequantize, nogil,
        "out [N, K] float32 = the GGUF blocks w (uint8 [N, row bytes]) of a GGML type",
        py::arg("out"), py::arg("w"), py::arg("type"));
  m.def("amx_bf16_available", &amx_bf16_available,
        "Whether gguf_linear's bf16 products run on AMX here (amx_gemm.cpp)");
  m.def("packed_int8_kernel", &packed_int8_kernel,
        "The kernel gguf_linear runs VNNI-packed block weights (type flag 1024) with here: "
        "'avx512vnni', 'avx2', or '' where none (vnni_linear.cpp)");
  m.def("vnni_pack", &vnni_pack, nogil,
        "GGUF blocks uint8 [N, row bytes] of a block type (2, 3, 6, 7, 8, 12, 13, 14) -> the "
        "VNNI-packed layout, in place "
        "(N % 16 == 0)", py::arg("w"), py::arg("type"));
  m.def("vnni_unpack", &vnni_unpack, nogil,
        "The VNNI-packed layout -> GGUF blocks, in place (exact inverse of vnni_pack)",
        py::arg("w"), py::arg("type"));
  m.def("gguf_block_elems", &gguf_block_elems, "Elements per block of a GGML type");
  m.def("gguf_block_bytes", &gguf_block_bytes, "Bytes per block of a GGML type");
  m.def("rms_norm", &rms_norm, nogil, "out = RMSNorm(x) (CPU, fp32)");
  m.def("add_rms_norm", &add_rms_norm, nogil,
        "sum = x + residual; out = RMSNorm(sum) (CPU, fp32)");
  m.def("silu_and_mul", &silu_and_mul, nogil,
        "out = silu(x[:, :d]) * x[:, d:] (CPU: fp32, or bf16 in and out computed in fp32)");
  m.def("rotary", &rotary, nogil, "out = rotate-half RoPE of x [T, heads, D] (CPU, fp32)");
  m.def("argmax_rows_bf16", &argmax_rows_bf16, nogil,
        "out[t] = first argmax of bf16 x[t] (as torch.argmax on x.float())", py::arg("out"),
        py::arg("x"));
  m.def("argmax_rows", &argmax_rows, nogil,
        "out[t] = first index of the maximum of x[t] (CPU, fp32 -> int64)");
  m.def("greedy_screen", &greedy_screen, nogil,
        "Exact greedy tokens from bf16 LM-head screen scores (-1: undecided)", py::arg("out"),
        py::arg("scores"), py::arg("x"), py::arg("w"), py::arg("w_norms"), py::arg("c"),
        py::arg("a"));
  m.def("bf16_scores", &bf16_scores, nogil,
        "scores = bf16(x @ w.T) for 1-4 rows x (fp32) and a bf16 weight w, streamed once",
        py::arg("scores"), py::arg("x"), py::arg("w"));
  m.attr("MAX_SCORE_ROWS") = kMaxScoreRows;
  py::class_<DecodeStack>(m, "DecodeStack",
                          "A decode step through every decoder layer of a Llama-family model")
      .def(py::init<int64_t, int64_t, int64_t, double, double, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<std::optional<at::Tensor>>,
                    std::vector<std::optional<at::Tensor>>,
                    std::vector<std::optional<at::Tensor>>, std::vector<at::Tensor>,
                    std::vector<std::optional<at::Tensor>>, std::vector<at::Tensor>,
                    std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor,
                    std::vector<std::optional<at::Tensor>>, std::vector<int64_t>,
                    std::vector<std::optional<at::Tensor>>, std::vector<double>>(),
           py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"), py::arg("eps"),
           py::arg("scale"), py::arg("input_norm"), py::arg("qkv"), py::arg("qkv_bias"),
           py::arg("q_norm"), py::arg("k_norm"), py::arg("o"), py::arg("o_bias"),
           py::arg("post_norm"), py::arg("gate_up"), py::arg("down"), py::arg("final_norm"),
           py::arg("packed"), py::arg("quant_types") = std::vector<int64_t>(),
           py::arg("input_orders") = std::vector<std::optional<at::Tensor>>(),
           py::arg("kv_scales") = std::vector<double>())
      .def("forward", &DecodeStack::forward, nogil,
           "x [T, hidden] of T one-token decode requests -> final-norm output [T, hidden]");
}
