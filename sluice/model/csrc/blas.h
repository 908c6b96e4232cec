// Row-major single-precision GEMM on the BLAS symbol libtorch_cpu exports (MKL on x86). Called
// from inside OpenMP regions, where it runs single-threaded.
#pragma once

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace sluice {

// C[m, n] = A[m, k] @ op(B) + beta * C, all row-major with leading dimensions lda, ldb, ldc.
// b_rows_are_n: B is stored [n, k] and op(B) = B^T; otherwise B is [k, n] and op(B) = B.
// (Row-major C is column-major C^T = op(B)^T A^T, hence the swapped operands.)
inline void gemm_row_major(int m, int n, int k, const float* a, int lda, const float* b, int ldb,
                           bool b_rows_are_n, float beta, float* c, int ldc) {
  const float one = 1.f;
  sgemm_(b_rows_are_n ? "T" : "N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &beta, c, &ldc);
}

}  // namespace sluice
