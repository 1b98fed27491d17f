// The CPU kernels' inner loops, compiled once per CPU capability and picked at run time.
//
// As in ATen (DispatchStub): kernels_impl.h is compiled by capability_{default,avx2,avx512}.cpp
// with CPU_CAPABILITY set, each into its own namespace and with its own at::vec::Vectorized width,
// and dispatch.cpp hands out the table of the capability that at::get_cpu_capability() names (it
// honours ATEN_CPU_CAPABILITY=default|avx2|avx512). The kernels work on raw pointers only: the
// tensor handling, argument checks, threading and reductions over blocks stay in the ops' files,
// compiled for the baseline ISA. The formulas are those of row_math.h.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "../../row_math.h"

namespace mnist_fast {
namespace cpu {

// Rows of at most this many classes are vectorized across rows (one row per vector lane), longer
// rows within the row.
constexpr int64_t kShortRow = 32;

// One call of the cross-entropy kernels: contiguous (rows, classes) input and probability targets.
template <typename scalar_t>
struct CrossEntropyArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* input = nullptr;
  const int64_t* target = nullptr;   // class indices (validated), or null for probability targets
  const scalar_t* probs = nullptr;   // probability targets, or null
  const acc_t* weight = nullptr;     // class weights, or null for all ones
  acc_t weight_total = 0;            // their sum (classes when absent)
  int64_t classes = 0;
  int64_t ignore_index = -100;
  int64_t reduction = row_math::kMean;
  row_math::CrossEntropyOptions<acc_t> opts{1, 0.0};
  double* stats = nullptr;           // (rows, kRowStats): written by forward, read by backward
  scalar_t* loss_rows = nullptr;     // forward, reduction 'none': the loss of each row
  // backward
  const acc_t* grad_rows = nullptr;  // incoming grad per row (reduction 'none'), or null: grad_scalar
  acc_t grad_scalar = 0;
  acc_t target_weight_sum = 0;       // reduction 'mean''s divisor (class-index targets)
  int64_t rows = 0;                  // reduction 'mean''s divisor (probability targets)
  scalar_t* grad_input = nullptr;    // may be input itself (the kernels read a row before writing it)
  scalar_t* grad_target = nullptr;
};

// The ReLU-mask pass of linear_relu's backward over the columns [c0, c0 + width) of every row.
template <typename scalar_t>
struct MaskGradArgs {
  const scalar_t* grad;  // (rows, cols) with strides (grad_row_stride, grad_col_stride)
  int64_t grad_row_stride;
  int64_t grad_col_stride;
  const scalar_t* output;  // (rows, cols) contiguous: the saved ReLU output
  scalar_t* grad_pre;      // (rows, cols) contiguous; may be grad itself
  int64_t rows;
  int64_t cols;
};

template <typename scalar_t>
struct Kernels {
  using acc_t = at::opmath_type<scalar_t>;
  // Rows [first, last): saves their stats, writes loss_rows if set, and returns in sums the sum over
  // these rows of the nll and smoothing terms (class indices) or of the row loss (probabilities, sums[1] = 0).
  void (*cross_entropy_forward)(const CrossEntropyArgs<scalar_t>& args, int64_t first, int64_t last, acc_t* sums);
  // Rows [first, last) of grad_input and/or grad_target.
  void (*cross_entropy_backward)(const CrossEntropyArgs<scalar_t>& args, int64_t first, int64_t last);
  // Both at once, for rows [first, last) (the autograd kernel's path when only the input needs a grad;
  // args carry an incoming grad of 1 per row or for the reduced loss).
  void (*cross_entropy_forward_backward)(const CrossEntropyArgs<scalar_t>& args, int64_t first, int64_t last,
                                         acc_t* sums);
  // out = log_softmax(x) over each row of a contiguous (rows, cols) matrix; out may be x.
  void (*log_softmax)(const scalar_t* x, scalar_t* out, int64_t rows, int64_t cols);
  // grad_x = grad - exp(out) * (the row sum of grad), log_softmax's backward from its output out;
  // everything contiguous (rows, cols); grad_x may be grad.
  void (*log_softmax_backward)(const scalar_t* grad, const scalar_t* out, scalar_t* grad_x, int64_t rows,
                               int64_t cols);
  // out[i, j] = relu(out[i, j] + bias[j]) (bias may be null; no ReLU when relu is false) on rows x cols.
  void (*bias_relu)(scalar_t* out, const scalar_t* bias, int64_t rows, int64_t cols, bool relu);
  // grad_pre = grad * (output > 0) on columns [c0, c0 + width) (width <= kMaskColumns), and, when
  // column_sums is not null, column_sums[j] = sum over rows of grad_pre[:, c0 + j], in row order.
  void (*mask_grad)(const MaskGradArgs<scalar_t>& args, int64_t c0, int64_t width, acc_t* column_sums);
  // n elements of torch.optim.SGD's update (buf null when momentum is 0).
  void (*sgd)(scalar_t* param, const scalar_t* grad, scalar_t* buf, int64_t n,
              const row_math::SgdOptions<acc_t>& options);
  // n elements of torch.optim.Adam's (AdamW's) update, given the gradient.
  void (*adam)(scalar_t* param, const scalar_t* grad, scalar_t* exp_avg, scalar_t* exp_avg_sq, int64_t n,
               const row_math::AdamOptions<acc_t>& options);
  // dst[i] = table[src[i]] for n bytes (the epoch ops' uint8 images through their pixel map).
  void (*map_bytes)(scalar_t* dst, const uint8_t* src, int64_t n, const scalar_t* table);
};

constexpr int64_t kMaskColumns = 64;

struct KernelTable {
  const char* capability;  // "default", "avx2", "avx512"
  Kernels<float> f32;
  Kernels<double> f64;
  Kernels<c10::BFloat16> bf16;
  Kernels<c10::Half> f16;
};

// The table for the capability in use (chosen once, on first use).
const KernelTable& kernel_table();

// x = torch.sqrt(x) in place, with the values torch's float and double tensors get: in torch's
// MKL builds that is MKL's VML in its high-accuracy mode (within 1 ulp, not always the correctly
// rounded root), elsewhere the correctly rounded root. Compiled once (dispatch.cpp).
void torch_sqrt(float* x, int64_t n);
void torch_sqrt(double* x, int64_t n);

template <typename scalar_t>
const Kernels<scalar_t>& kernels();
template <>
inline const Kernels<float>& kernels<float>() { return kernel_table().f32; }
template <>
inline const Kernels<double>& kernels<double>() { return kernel_table().f64; }
template <>
inline const Kernels<c10::BFloat16>& kernels<c10::BFloat16>() { return kernel_table().bf16; }
template <>
inline const Kernels<c10::Half>& kernels<c10::Half>() { return kernel_table().f16; }

}  // namespace cpu
}  // namespace mnist_fast
