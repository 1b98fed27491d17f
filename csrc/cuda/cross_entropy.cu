// Fused log-softmax + NLL (cross-entropy) on CUDA.
//
// Every kernel here is one generic row kernel (rows_kernel) applied to a row operation: forward
// with class-index or probability targets, backward of either, and the summed target weight that
// reduction 'mean' divides by. The formulas are those of row_math.h, shared with the CPU kernels;
// what is CUDA-only is the decomposition:
//   - small C (up to kMaxWarpClasses): a row per group of 1 to 32 lanes of a warp, reduced with
//     shuffles, so that C = 10 packs 4 rows into a warp instead of idling 22 of 32 lanes;
//   - large C: a row per block, reduced through shared memory.
// A reduced loss is summed deterministically: each block adds its rows in a fixed tree, and a
// one-block kernel adds the per-block partials in a fixed tree. A grid of one block (MNIST's
// batch 64) finishes the loss itself: one launch in all.
//
// An out-of-range class index is a device-side assert, as in stock nll_loss, and is never read.
//
// The training step's loss pass (TrainStepLoss, cuda::train_step_loss) is a row operation here too.
// The host side's checks and allocations are cross_entropy_impl.h's, shared with the CPU.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../cross_entropy_impl.h"
#include "kernels.cuh"

namespace mnist_fast {
namespace {

using namespace row_math;
using cuda::ceil_div;

constexpr int kWarpSize = 32;
// Threads per block at most: 512 lets the compiler use up to 128 registers a thread, and still
// fits MNIST's batch of 64 rows x 8 lanes in one block.
constexpr int kMaxThreads = 512;
constexpr int kFinishThreads = 256;
// A warp group per row up to this many classes, a block per row above.
constexpr int64_t kMaxWarpClasses = 1024;

// From the <cmath> macros rather than std::numeric_limits, whose constexpr functions need
// --expt-relaxed-constexpr in device code.
template <typename T>
__device__ __forceinline__ T minus_infinity() { return -T(INFINITY); }

__device__ __forceinline__ float device_exp(float v) { return ::expf(v); }
__device__ __forceinline__ double device_exp(double v) { return ::exp(v); }
__device__ __forceinline__ float device_log(float v) { return ::logf(v); }
__device__ __forceinline__ double device_log(double v) { return ::log(v); }

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return nan_max(a, b); }
};

// Butterfly reduction over `width` lanes (a power of two); every lane gets the same result.
template <typename T, typename F>
__device__ __forceinline__ T warp_reduce(T v, F f, int width, unsigned mask) {
  for (int offset = width / 2; offset > 0; offset /= 2) v = f(v, __shfl_xor_sync(mask, v, offset, width));
  return v;
}

// Reduction over the whole block (blockDim.x a multiple of 32, every thread calling); every thread
// gets the result. The tree is fixed, so the result is the same from run to run.
template <typename T, typename F>
__device__ T block_allreduce(T v, F f, T identity) {
  __shared__ T per_warp[kMaxThreads / kWarpSize];
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  v = warp_reduce(v, f, kWarpSize, 0xffffffffu);
  __syncthreads();  // a previous call may still be reading per_warp
  if (lane == 0) per_warp[warp] = v;
  __syncthreads();
  // Every warp reduces the per-warp values itself: no broadcast step needed.
  v = lane < int(blockDim.x / kWarpSize) ? per_warp[lane] : identity;
  return warp_reduce(v, f, kWarpSize, 0xffffffffu);
}

// A row per group of `lanes` consecutive threads of a warp (a power of two, 1 to 32).
struct WarpRows {
  int lanes;
  int lane;       // index within the group
  unsigned mask;  // the group's lanes within the warp, for the shuffles
  int64_t row;

  __device__ explicit WarpRows(int group_lanes) : lanes(group_lanes), lane(threadIdx.x & (group_lanes - 1)) {
    const int first_lane = (threadIdx.x % kWarpSize) & ~(lanes - 1);
    mask = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u) << first_lane;
    row = int64_t(blockIdx.x) * (blockDim.x / lanes) + threadIdx.x / lanes;
  }
  template <typename T>
  __device__ T sum(T v) const { return warp_reduce(v, SumOp(), lanes, mask); }
  template <typename T>
  __device__ T max(T v) const { return warp_reduce(v, MaxOp(), lanes, mask); }
};

// A row per block, for large C.
struct BlockRows {
  int lanes;
  int lane;
  int64_t row;

  __device__ explicit BlockRows(int) : lanes(blockDim.x), lane(threadIdx.x), row(blockIdx.x) {}
  template <typename T>
  __device__ T sum(T v) const { return block_allreduce(v, SumOp(), T(0)); }
  template <typename T>
  __device__ T max(T v) const { return block_allreduce(v, MaxOp(), minus_infinity<T>()); }
};

// ---- what every row operation reads ----

template <typename scalar_t>
struct Logits {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;          // (rows, classes), contiguous
  const scalar_t* weight;     // (classes,) or null: all ones
  const acc_t* weight_total;  // sum of weight on the device, or null: classes (used with smoothing only)
  int64_t rows;
  int64_t classes;
  CrossEntropyOptions<acc_t> opts;

  __device__ acc_t w(int64_t c) const { return weight != nullptr ? static_cast<acc_t>(weight[c]) : acc_t(1); }
  __device__ acc_t total_weight() const { return weight_total != nullptr ? *weight_total : acc_t(classes); }
  __device__ const scalar_t* row(int64_t i) const { return x + i * classes; }

  // max and log(sum(exp(x - max))) of a row; every lane of the group gets them.
  template <typename Rows>
  __device__ void stats(const Rows& g, const scalar_t* xr, acc_t& row_max, acc_t& log_sum) const {
    acc_t m = minus_infinity<acc_t>();
    for (int64_t c = g.lane; c < classes; c += g.lanes) m = nan_max(static_cast<acc_t>(xr[c]), m);
    m = g.max(m);
    acc_t s = 0;
    for (int64_t c = g.lane; c < classes; c += g.lanes) s += device_exp(static_cast<acc_t>(xr[c]) - m);
    row_max = m;
    log_sum = device_log(g.sum(s));
  }
};

// Class-index targets, (rows,).
struct IndexTargets {
  const int64_t* target;
  int64_t ignore_index;

  // The class of row i, or -1 when the row is ignored. Out of range: a device-side assert, and the
  // row is treated as ignored so that nothing is read out of bounds even without asserts.
  __device__ __forceinline__ int64_t of(int64_t i, int64_t classes) const {
    const int64_t y = target[i];
    if (y == ignore_index) return -1;
    const bool in_range = y >= 0 && y < classes;
    CUDA_KERNEL_ASSERT(in_range);
    return in_range ? y : -1;
  }
};

// ---- row operations ----
// Each has: acc_t; kSums, the number of per-row values a reduced result sums; reduces(); row(g, i,
// sums), which fills sums on lane 0 of the group at least; finish(totals), which writes the reduced
// result from the sums over all rows.

struct NoReduction {
  static constexpr int kSums = 1;
  __host__ __device__ bool reduces() const { return false; }
  template <typename A>
  __device__ void finish(const A&) const {}
};

// What the forward ops have in common: the reduction, and what they write for a row.
struct ForwardRows {
  int64_t reduction;
  double* lse;  // (rows, kRowStats), float64 for every dtype (checks.h)

  __host__ __device__ bool reduces() const { return reduction != kNone; }

  // Row i's saved stats and, for reduction 'none', its loss.
  template <typename scalar_t, typename acc_t>
  __device__ void write_row(int64_t i, acc_t row_max, acc_t log_sum, acc_t row_loss, scalar_t* loss) const {
    save_row_stats(lse + kRowStats * i, row_max, log_sum);
    if (reduction == kNone) loss[i] = static_cast<scalar_t>(row_loss);
  }
};

// Forward, class-index targets. Sums: nll, smoothing term, weight of the target (mean's divisor).
template <typename scalar_t>
struct IndexForward : ForwardRows {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 3;
  Logits<scalar_t> d;
  IndexTargets targets;
  scalar_t* loss;  // (rows,) for reduction 'none', else the 0-d result

  template <typename Rows>
  __device__ void row(const Rows& g, int64_t i, acc_t (&sums)[kSums]) const {
    const scalar_t* xr = d.row(i);
    const int64_t y = targets.of(i, d.classes);
    acc_t row_max, log_sum;
    d.stats(g, xr, row_max, log_sum);
    acc_t nll = 0, smooth = 0;
    if (d.opts.smoothing) {  // the same for every row: the group reduction runs on ignored rows too
      acc_t part = 0;
      for (int64_t c = g.lane; c < d.classes; c += g.lanes) {
        part += d.w(c) * neg_log_prob(static_cast<acc_t>(xr[c]), row_max, log_sum);
      }
      smooth = g.sum(part);
    }
    if (y >= 0) {
      nll = d.w(y) * neg_log_prob(static_cast<acc_t>(xr[y]), row_max, log_sum);
    } else {
      smooth = 0;
    }
    if (g.lane == 0) write_row(i, row_max, log_sum, index_row_loss(nll, smooth, d.opts), loss);
    sums[0] = nll;
    sums[1] = smooth;
    sums[2] = y >= 0 ? d.w(y) : acc_t(0);
  }

  __device__ void finish(const acc_t (&totals)[kSums]) const {
    *loss = static_cast<scalar_t>(index_reduced_loss(totals[0], totals[1], reduction, totals[2], d.opts));
  }
};

// Forward, probability targets. Sum: the row loss.
template <typename scalar_t>
struct ProbForward : ForwardRows {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 1;
  Logits<scalar_t> d;
  const scalar_t* target;  // (rows, classes), contiguous
  scalar_t* loss;

  template <typename Rows>
  __device__ void row(const Rows& g, int64_t i, acc_t (&sums)[kSums]) const {
    const scalar_t* xr = d.row(i);
    const scalar_t* tr = target + i * d.classes;
    acc_t row_max, log_sum;
    d.stats(g, xr, row_max, log_sum);
    acc_t part = 0;
    for (int64_t c = g.lane; c < d.classes; c += g.lanes) {
      const acc_t wt = d.w(c) * d.opts.smoothed_target(static_cast<acc_t>(tr[c]));
      part += prob_loss_term(neg_log_prob(static_cast<acc_t>(xr[c]), row_max, log_sum), wt);
    }
    const acc_t row_loss = g.sum(part);
    if (g.lane == 0) write_row(i, row_max, log_sum, row_loss, loss);
    sums[0] = row_loss;
  }

  __device__ void finish(const acc_t (&totals)[kSums]) const {
    // Stock gives NaN for the mean of an empty input, whatever its shape (as the CPU kernel does).
    const bool empty_mean = d.rows * d.classes == 0 && reduction == kMean;
    *loss = static_cast<scalar_t>(empty_mean ? acc_t(NAN)
                                             : prob_reduced_loss(totals[0], d.rows, reduction));
  }
};

// The summed weight of the rows' targets, ignored rows excluded: reduction 'mean''s divisor, which
// the backward needs before any gradient. One row per thread.
template <typename scalar_t>
struct TargetWeightSum {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 1;
  Logits<scalar_t> d;
  IndexTargets targets;
  acc_t* result;  // 0-d

  __host__ __device__ bool reduces() const { return true; }

  template <typename Rows>
  __device__ void row(const Rows&, int64_t i, acc_t (&sums)[kSums]) const {
    const int64_t y = targets.of(i, d.classes);
    sums[0] = y >= 0 ? d.w(y) : acc_t(0);
  }

  __device__ void finish(const acc_t (&totals)[kSums]) const { *result = totals[0]; }
};

// Backward, class-index targets.
template <typename scalar_t>
struct IndexBackward : NoReduction {
  using acc_t = at::opmath_type<scalar_t>;
  Logits<scalar_t> d;
  IndexTargets targets;
  int64_t reduction;
  const scalar_t* grad_loss;
  int64_t grad_stride;             // 0 for a reduced loss's 0-d grad
  const double* lse;
  const acc_t* target_weight_sum;  // reduction 'mean' only
  scalar_t* grad_input;

  template <typename Rows>
  __device__ void row(const Rows& g, int64_t i, acc_t (&)[kSums]) const {
    const int64_t y = targets.of(i, d.classes);
    scalar_t* gr = grad_input + i * d.classes;
    const acc_t divisor = reduction == kMean ? *target_weight_sum : acc_t(1);
    const auto scales = y < 0 ? ignored_row_grad_scales(d.opts)
                              : index_grad_scales(static_cast<acc_t>(grad_loss[i * grad_stride]), d.w(y), reduction,
                                                  divisor, d.opts);
    const SavedRowStats<acc_t> row_lse(lse + kRowStats * i);
    const acc_t total = d.total_weight();
    const scalar_t* xr = d.row(i);
    for (int64_t c = g.lane; c < d.classes; c += g.lanes) {
      const acc_t p = device_exp(-row_lse.neg_log_prob(static_cast<acc_t>(xr[c])));
      gr[c] = static_cast<scalar_t>(index_grad(p, c == y, d.w(c), total, scales));
    }
  }
};

// Backward, probability targets: the input's grad and/or the target's grad.
template <typename scalar_t>
struct ProbBackward : NoReduction {
  using acc_t = at::opmath_type<scalar_t>;
  Logits<scalar_t> d;
  const scalar_t* target;
  int64_t reduction;
  const scalar_t* grad_loss;
  int64_t grad_stride;
  const double* lse;
  scalar_t* grad_input;   // or null
  scalar_t* grad_target;  // or null

  template <typename Rows>
  __device__ void row(const Rows& g, int64_t i, acc_t (&)[kSums]) const {
    const scalar_t* xr = d.row(i);
    const scalar_t* tr = target + i * d.classes;
    const acc_t gi = prob_grad_scale(static_cast<acc_t>(grad_loss[i * grad_stride]), d.rows, reduction);
    const SavedRowStats<acc_t> row_lse(lse + kRowStats * i);
    if (grad_input != nullptr) {  // the same for every row
      acc_t part = 0;
      for (int64_t c = g.lane; c < d.classes; c += g.lanes) {
        part += d.w(c) * d.opts.smoothed_target(static_cast<acc_t>(tr[c]));
      }
      const acc_t weighted_sum = g.sum(part);
      for (int64_t c = g.lane; c < d.classes; c += g.lanes) {
        const acc_t p = device_exp(-row_lse.neg_log_prob(static_cast<acc_t>(xr[c])));
        const acc_t wt = d.w(c) * d.opts.smoothed_target(static_cast<acc_t>(tr[c]));
        grad_input[i * d.classes + c] = static_cast<scalar_t>(prob_input_grad(p, weighted_sum, wt, gi));
      }
    }
    if (grad_target != nullptr) {
      for (int64_t c = g.lane; c < d.classes; c += g.lanes) {
        grad_target[i * d.classes + c] =
            static_cast<scalar_t>(prob_target_grad(row_lse.neg_log_prob(static_cast<acc_t>(xr[c])), d.w(c), gi, d.opts));
      }
    }
  }
};

// The loss pass of the training step (kernels.cuh): one thread per row (lanes = 1), so the row
// can be updated in place without synchronisation. Adds the last bias, counts a correct argmax,
// and replaces the logits by the gradient of the mean loss over weight_sum rows; ignored rows get a
// zero gradient and count neither way. Sums, in float64 (the count stays exact): nll, smoothing
// term, correct rows.
template <typename scalar_t>
struct TrainStepLoss {
  using acc_t = double;
  using math_t = at::opmath_type<scalar_t>;
  static constexpr int kSums = 3;
  Logits<scalar_t> d;
  scalar_t* logits;  // d.x, written
  const scalar_t* bias;
  IndexTargets targets;
  math_t weight_sum;  // rows not ignored
  scalar_t* loss;
  int64_t* correct;

  __host__ __device__ bool reduces() const { return true; }

  template <typename Rows>
  __device__ void row(const Rows& g, int64_t i, acc_t (&sums)[kSums]) const {
    scalar_t* xr = logits + i * d.classes;
    int64_t best = 0;
    for (int64_t c = 0; c < d.classes; ++c) {
      xr[c] = static_cast<scalar_t>(static_cast<math_t>(xr[c]) + static_cast<math_t>(bias[c]));
      const scalar_t v = xr[c], m = xr[best];
      if ((v > m) || (v != v && m == m)) best = c;  // torch.argmax: the first maximum, a NaN wins
    }
    const int64_t y = targets.of(i, d.classes);
    if (y < 0) {
      for (int64_t c = 0; c < d.classes; ++c) xr[c] = scalar_t(0);
      return;
    }
    math_t row_max, log_sum;
    d.stats(g, xr, row_max, log_sum);
    sums[0] = neg_log_prob(static_cast<math_t>(xr[y]), row_max, log_sum);
    if (d.opts.smoothing) {
      math_t smooth = 0;
      for (int64_t c = 0; c < d.classes; ++c) smooth += row_max - static_cast<math_t>(xr[c]);
      sums[1] = smooth + math_t(d.classes) * log_sum;
    }
    sums[2] = best == y;
    const auto scales = index_grad_scales(math_t(1), math_t(1), kMean, weight_sum, d.opts);
    for (int64_t c = 0; c < d.classes; ++c) {
      const math_t p = device_exp(-neg_log_prob(static_cast<math_t>(xr[c]), row_max, log_sum));
      xr[c] = static_cast<scalar_t>(index_grad(p, c == y, math_t(1), math_t(d.classes), scales));
    }
  }

  __device__ void finish(const acc_t (&totals)[kSums]) const {
    *loss = static_cast<scalar_t>(index_reduced_loss(static_cast<math_t>(totals[0]), static_cast<math_t>(totals[1]),
                                                     kMean, weight_sum, d.opts));
    *correct = static_cast<int64_t>(totals[2]);
  }
};

// ---- the kernels ----

// Applies op to every row; a reducing op's block sum goes to partials[block], or, for a grid of
// one block, straight to op.finish.
template <typename Op, typename Rows>
__global__ void __launch_bounds__(kMaxThreads) rows_kernel(const Op op, int64_t rows, int lanes,
                                                           typename Op::acc_t* partials) {
  using acc_t = typename Op::acc_t;
  const Rows g(lanes);
  acc_t sums[Op::kSums];
  for (int k = 0; k < Op::kSums; ++k) sums[k] = acc_t(0);
  if (g.row < rows) op.row(g, g.row, sums);  // the same for every lane of a group
  if (!op.reduces()) return;                  // the same for the whole grid
  for (int k = 0; k < Op::kSums; ++k) {
    sums[k] = block_allreduce(g.lane == 0 ? sums[k] : acc_t(0), SumOp(), acc_t(0));
  }
  if (threadIdx.x != 0) return;
  if (gridDim.x == 1) {
    op.finish(sums);
  } else {
    for (int k = 0; k < Op::kSums; ++k) partials[int64_t(blockIdx.x) * Op::kSums + k] = sums[k];
  }
}

// Adds the per-block partials (count may be 0) in a fixed order and finishes the reduced result.
template <typename Op>
__global__ void __launch_bounds__(kFinishThreads) finish_kernel(const Op op, const typename Op::acc_t* partials,
                                                                int64_t count) {
  using acc_t = typename Op::acc_t;
  acc_t totals[Op::kSums];
  for (int k = 0; k < Op::kSums; ++k) {
    acc_t v = 0;
    for (int64_t j = threadIdx.x; j < count; j += blockDim.x) v += partials[j * Op::kSums + k];
    totals[k] = block_allreduce(v, SumOp(), acc_t(0));
  }
  if (threadIdx.x == 0) op.finish(totals);
}

int next_pow2(int64_t v) {
  int p = 1;
  while (p < v) p *= 2;
  return p;
}

// How rows map onto the grid.
struct RowsPlan {
  bool block_per_row;
  int lanes;  // per row, for warp groups
  int threads;
  int64_t blocks;
};

// lanes = 0 picks the group size from the number of classes (about two classes per lane).
RowsPlan plan_rows(int64_t rows, int64_t classes, int lanes = 0) {
  RowsPlan p{};
  if (lanes == 0 && classes > kMaxWarpClasses) {
    p.block_per_row = true;
    p.threads = std::min(kMaxThreads, std::max(128, next_pow2(ceil_div(classes, 16))));
    p.blocks = rows;
  } else {
    p.lanes = lanes != 0 ? lanes : std::min(kWarpSize, next_pow2(std::max<int64_t>(1, ceil_div(classes, 2))));
    // Few rows: one block holds them all, so a reduced loss needs no second kernel.
    const int64_t threads = rows * p.lanes;
    p.threads = threads <= kMaxThreads ? int(std::max<int64_t>(kWarpSize, ceil_div(threads, kWarpSize) * kWarpSize))
                                       : 256;
    p.blocks = ceil_div(threads, p.threads);
  }
  TORCH_CHECK(p.blocks <= std::numeric_limits<int32_t>::max(), "mnist_fast.cross_entropy: too many rows (",
              rows, ") for one CUDA grid");
  return p;
}

template <typename Op>
void launch_rows(const Op& op, const RowsPlan& plan, int64_t rows, const at::TensorOptions& acc_options) {
  using acc_t = typename Op::acc_t;
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials;
  if (op.reduces() && plan.blocks > 1) partials = at::empty({plan.blocks, Op::kSums}, acc_options);
  acc_t* partials_ptr = partials.defined() ? partials.data_ptr<acc_t>() : nullptr;
  if (plan.blocks > 0) {  // a grid of 0 blocks is a launch error
    const auto blocks = static_cast<unsigned>(plan.blocks);
    if (plan.block_per_row) {
      rows_kernel<Op, BlockRows><<<blocks, plan.threads, 0, stream>>>(op, rows, 0, partials_ptr);
    } else {
      rows_kernel<Op, WarpRows><<<blocks, plan.threads, 0, stream>>>(op, rows, plan.lanes, partials_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // Several blocks left partials; no rows at all still has a result (0, or NaN for a mean).
  if (op.reduces() && plan.blocks != 1) {
    finish_kernel<Op><<<1, kFinishThreads, 0, stream>>>(op, partials_ptr, plan.blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- host side ----

// The logits, class weights and targets of a call (the targets contiguous, class indices as
// int64); keeps the tensors it points into alive.
template <typename scalar_t>
struct LogitsHolder {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor weight, weight_total, target;
  Logits<scalar_t> logits;

  explicit LogitsHolder(const CrossEntropyCall& c)
      : target(c.kind == TargetKind::ClassIndex ? index_targets(c.target) : c.target.contiguous()),
        logits{c.input.const_data_ptr<scalar_t>(), nullptr, nullptr, c.input.size(0), c.input.size(1),
               CrossEntropyOptions<acc_t>(c.input.size(1), c.label_smoothing)} {
    if (!c.weight.has_value() || !c.weight->defined()) return;
    weight = c.weight->contiguous();
    logits.weight = weight.const_data_ptr<scalar_t>();
    // Only the class-index ops read the total, and only with smoothing.
    if (c.kind == TargetKind::ClassIndex && logits.opts.smoothing) {
      weight_total = at::sum(weight, c10::CppTypeToScalarType<acc_t>::value);
      logits.weight_total = weight_total.const_data_ptr<acc_t>();
    }
  }

  IndexTargets class_indices(int64_t ignore_index) const { return {target.const_data_ptr<int64_t>(), ignore_index}; }
  const scalar_t* probabilities() const { return target.const_data_ptr<scalar_t>(); }
};

// Partial sums of reductions are in the accumulation type.
at::TensorOptions accumulation_options(const at::Tensor& input) {
  return input.options().dtype(at::toOpMathType(input.scalar_type()));
}

// The backend of cross_entropy_impl.h.
struct CudaCrossEntropy {
  static void forward(const CrossEntropyCall& c, at::Tensor& loss, at::Tensor& lse) {
    const int64_t rows = c.input.size(0);
    const RowsPlan plan = plan_rows(rows, c.input.size(1));
    const ForwardRows out{c.reduction, lse.data_ptr<double>()};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.input.scalar_type(), "cross_entropy_forward_cuda", [&] {
      const LogitsHolder<scalar_t> h(c);
      if (c.kind == TargetKind::ClassIndex) {
        const IndexForward<scalar_t> op{out, h.logits, h.class_indices(c.ignore_index), loss.data_ptr<scalar_t>()};
        launch_rows(op, plan, rows, accumulation_options(c.input));
      } else {
        const ProbForward<scalar_t> op{out, h.logits, h.probabilities(), loss.data_ptr<scalar_t>()};
        launch_rows(op, plan, rows, accumulation_options(c.input));
      }
    });
  }

  static void backward(const CrossEntropyCall& c, const at::Tensor& grad_loss, const at::Tensor& lse,
                       at::Tensor& grad_input, at::Tensor& grad_target) {
    const at::Tensor& input = c.input;
    const int64_t rows = input.size(0), classes = input.size(1);
    // A reduced loss's grad is 0-d: every row reads element 0.
    const int64_t grad_stride = c.reduction == kNone ? grad_loss.stride(0) : 0;
    const auto acc_options = accumulation_options(input);
    const RowsPlan plan = plan_rows(rows, classes);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "cross_entropy_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const LogitsHolder<scalar_t> h(c);
      if (c.kind == TargetKind::ClassIndex) {
        at::Tensor divisor;
        if (c.reduction == kMean) {
          divisor = at::empty({}, acc_options);
          const TargetWeightSum<scalar_t> sum_op{h.logits, h.class_indices(c.ignore_index),
                                                 divisor.data_ptr<acc_t>()};
          launch_rows(sum_op, plan_rows(rows, classes, /*lanes=*/1), rows, acc_options);
        }
        const IndexBackward<scalar_t> op{{},
                                         h.logits,
                                         h.class_indices(c.ignore_index),
                                         c.reduction,
                                         grad_loss.const_data_ptr<scalar_t>(),
                                         grad_stride,
                                         lse.const_data_ptr<double>(),
                                         divisor.defined() ? divisor.const_data_ptr<acc_t>() : nullptr,
                                         grad_input.data_ptr<scalar_t>()};
        launch_rows(op, plan, rows, acc_options);
      } else {
        const ProbBackward<scalar_t> op{{},
                                        h.logits,
                                        h.probabilities(),
                                        c.reduction,
                                        grad_loss.const_data_ptr<scalar_t>(),
                                        grad_stride,
                                        lse.const_data_ptr<double>(),
                                        grad_input.defined() ? grad_input.data_ptr<scalar_t>() : nullptr,
                                        grad_target.defined() ? grad_target.data_ptr<scalar_t>() : nullptr};
        launch_rows(op, plan, rows, acc_options);
      }
    });
  }
};

}  // namespace

namespace cuda {

void train_step_loss(at::Tensor& logits, const at::Tensor& bias, const at::Tensor& target, int64_t valid_rows,
                     int64_t ignore_index, double label_smoothing, at::Tensor& grad_bias, at::Tensor& loss,
                     at::Tensor& correct) {
  const int64_t rows = logits.size(0), classes = logits.size(1);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "train_step_sgd_cuda", [&] {
    using math_t = at::opmath_type<scalar_t>;
    const TrainStepLoss<scalar_t> op{
        {logits.const_data_ptr<scalar_t>(), nullptr, nullptr, rows, classes,
         CrossEntropyOptions<math_t>(classes, label_smoothing)},
        logits.data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), {target.const_data_ptr<int64_t>(), ignore_index},
        static_cast<math_t>(valid_rows), loss.data_ptr<scalar_t>(), correct.data_ptr<int64_t>()};
    launch_rows(op, plan_rows(rows, classes, /*lanes=*/1), rows, logits.options().dtype(at::kDouble));
  });
  at::sum_out(grad_bias, logits, at::IntArrayRef{0});  // column sums of the logit grad
}

}  // namespace cuda

TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m) {
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_impl<CudaCrossEntropy>));
  m.impl("_cross_entropy_backward", TORCH_FN(cross_entropy_backward_impl<CudaCrossEntropy>));
}

}  // namespace mnist_fast
