// Every kernel of sluice's CPU operators in one translation unit, so that the torch headers
// (ATen.h: ~13 s of a ~27 s compile) are parsed once per build instead of once per file. The
// build (setup.py, and cpu_ops.py's fallback) compiles this file, not the ones it includes;
// helpers in their anonymous namespaces share one scope here, so their names must not collide.
#include "amx_gemm.cpp"
#include "decode_stack.cpp"
#include "elementwise.cpp"
#include "greedy_screen.cpp"
#include "paged_decode.cpp"
#include "paged_prefill.cpp"
#include "vnni_linear.cpp"
#include "quant_linear.cpp"
#include "tiled_linear.cpp"
