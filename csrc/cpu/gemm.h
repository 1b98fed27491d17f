// A row-major GEMM on raw pointers, for code that runs on torch's intra-op threads (the fused train
// step's workers, train_step.cpp): no tensor, dispatcher or autograd state is touched, so it is safe
// on any thread and costs no per-call overhead beyond the BLAS call. With MKL (torch's x86 builds)
// it is the sgemm/dgemm that at::mm itself ends in, pinned to the calling thread; elsewhere it
// goes through at::mm_out on tensors over the same memory.
#pragma once

#include <ATen/Config.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#if AT_MKL_ENABLED()
extern "C" {
// Fortran BLAS (LP64, as torch links MKL), exported by libtorch_cpu.
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
// The MKL thread count of the calling thread (0: back to the global setting); returns the previous one.
int MKL_Set_Num_Threads_Local(int nthreads);  // mkl_service.h's C name of mkl_set_num_threads_local
}
#endif

namespace mnist_fast {
namespace cpu {

// For the duration of a scope, MKL runs on the calling thread only (the step's workers already
// occupy every intra-op thread). A no-op without MKL.
class SingleThreadedBlas {
 public:
#if AT_MKL_ENABLED()
  SingleThreadedBlas() : previous_(MKL_Set_Num_Threads_Local(1)) {}
  ~SingleThreadedBlas() { MKL_Set_Num_Threads_Local(previous_); }

 private:
  int previous_;
#endif
};

// C = op(A) op(B), C (m, n) with row stride ldc; op(A) is (m, k): A stored as (m, k), or as (k, m)
// when trans_a, with row stride lda; op(B) is (k, n) likewise. Every row stride is at least the
// stored row length (the matrices are contiguous rows or column blocks of contiguous rows).
template <typename scalar_t>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const scalar_t* a, int64_t lda,
          const scalar_t* b, int64_t ldb, scalar_t* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, scalar_t(0));
    return;
  }
#if AT_MKL_ENABLED()
  const int64_t largest = std::max({m, n, k, lda, ldb, ldc});
  if (largest <= INT_MAX) {
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T, and a row-major matrix read
    // as column-major is its transpose: the operands swap, the flags stay.
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(std::max<int64_t>(1, lda)), lb = static_cast<int>(std::max<int64_t>(1, ldb)),
              lc = static_cast<int>(std::max<int64_t>(1, ldc));
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    const scalar_t one = 1, zero = 0;
    if constexpr (std::is_same_v<scalar_t, float>) {
      sgemm_(&tb, &ta, &ni, &mi, &ki, &one, b, &lb, a, &la, &zero, c, &lc);
      return;
    } else if constexpr (std::is_same_v<scalar_t, double>) {
      dgemm_(&tb, &ta, &ni, &mi, &ki, &one, b, &lb, a, &la, &zero, c, &lc);
      return;
    }
  }
#endif
  // Tensors over the same memory; inference mode: no autograd state, whatever the thread's.
  const c10::InferenceMode no_autograd;
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto matrix = [&](const scalar_t* p, int64_t r, int64_t cols, int64_t ld, bool trans) {
    // (r, cols) stored with row stride ld, read transposed when trans.
    const at::Tensor t = at::from_blob(const_cast<scalar_t*>(p), {r, cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::mm_out(out, trans_a ? matrix(a, k, m, lda, true) : matrix(a, m, k, lda, false),
             trans_b ? matrix(b, n, k, ldb, true) : matrix(b, k, n, ldb, false));
}

}  // namespace cpu
}  // namespace mnist_fast
