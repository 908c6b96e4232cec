#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "Paged decode attention over an in-place block-structured KV cache (CPU, fp32)");
  m.def("tiled_linear", &tiled_linear, "out = x @ w.T (+ bias), tiled across threads (CPU)",
        pybind11::arg("out"), pybind11::arg("x"), pybind11::arg("w"),
        pybind11::arg("bias") = pybind11::none());
  m.def("rms_norm", &rms_norm, "out = RMSNorm(x) (CPU, fp32)");
  m.def("add_rms_norm", &add_rms_norm, "sum = x + residual; out = RMSNorm(sum) (CPU, fp32)");
  m.def("silu_and_mul", &silu_and_mul, "out = silu(x[:, :d]) * x[:, d:] (CPU, fp32)");
  m.def("rotary", &rotary, "out = rotate-half RoPE of x [T, heads, D] (CPU, fp32)");
}
