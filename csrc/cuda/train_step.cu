// One SGD training step of an MLP on CUDA: the CPU kernel's algorithm (cpu/train_step.cpp) with the
// GEMMs and column sums in ATen (cuBLAS, CUB reductions) and the elementwise / per-row parts as
// kernels applying row_math.h's formulas, all on the current stream.
//
// Status: compiled here (no GPU on these machines), never run. The CPU kernel is the tested one.
// The epilogue and mask kernels are deliberately plain; once the `cuda` branch's Linear+ReLU
// kernels are merged they should be shared through a header, as the CPU ones are
// (cpu/linear_relu_kernels.h).
//
// Class indices are validated on the host before anything is written: this costs one
// device-to-host copy of two counters per step (the price of an IndexError instead of a device
// assert), and gives the host the denominator of the mean.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../checks.h"

namespace mnist_fast {
namespace {

using namespace row_math;
constexpr const char* kOp = "mnist_fast.train_step_sgd";
constexpr int kThreads = 256;
const int64_t kRowDims[] = {0};
const at::IntArrayRef kRowDim(kRowDims);  // column sums: reduce over rows

int blocks_for(int64_t n) {
  return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535));
}

// out[r, c] = relu(out[r, c] + bias[c]) over a contiguous (rows, cols) matrix.
template <typename scalar_t>
__global__ void bias_relu_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ bias, int64_t n,
                                 int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    out[k] = static_cast<scalar_t>(bias_relu(static_cast<acc_t>(out[k]), static_cast<acc_t>(bias[k % cols])));
  }
}

// g = relu_grad(g, y) in place.
template <typename scalar_t>
__global__ void relu_mask_kernel(scalar_t* __restrict__ g, const scalar_t* __restrict__ y, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    g[k] = static_cast<scalar_t>(relu_grad(static_cast<acc_t>(g[k]), static_cast<acc_t>(y[k])));
  }
}

// One thread per row of the logits: adds the last bias, counts a correct argmax, writes the row's
// nll and smoothing terms and replaces the logits by d loss / d logits (mean over weight_sum rows).
template <typename scalar_t>
__global__ void loss_rows_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ bias,
                                 const int64_t* __restrict__ y, int64_t rows, int64_t classes, int64_t ignore_index,
                                 double label_smoothing, at::opmath_type<scalar_t> weight_sum,
                                 at::opmath_type<scalar_t>* __restrict__ row_terms, int64_t* __restrict__ row_hit) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  scalar_t* row = x + i * classes;
  const CrossEntropyOptions<acc_t> opts(classes, label_smoothing);
  int64_t best = 0;
  for (int64_t c = 0; c < classes; ++c) {
    row[c] = static_cast<scalar_t>(static_cast<acc_t>(row[c]) + static_cast<acc_t>(bias[c]));
    const scalar_t v = row[c], m = row[best];
    if ((v > m) || (v != v && m == m)) best = c;  // torch.argmax: first maximum, NaN wins
  }
  row_hit[i] = y[i] != ignore_index && best == y[i];  // ignored rows count neither way
  row_terms[2 * i] = acc_t(0);
  row_terms[2 * i + 1] = acc_t(0);
  if (y[i] == ignore_index) {
    for (int64_t c = 0; c < classes; ++c) row[c] = scalar_t(0);
    return;
  }
  acc_t mx = static_cast<acc_t>(row[0]);
  for (int64_t c = 1; c < classes; ++c) mx = nan_max(static_cast<acc_t>(row[c]), mx);
  acc_t s = 0;
  for (int64_t c = 0; c < classes; ++c) s += ::exp(static_cast<acc_t>(row[c]) - mx);
  const acc_t log_sum = ::log(s);
  row_terms[2 * i] = neg_log_prob(static_cast<acc_t>(row[y[i]]), mx, log_sum);
  if (opts.smoothing) {
    acc_t smooth = 0;
    for (int64_t c = 0; c < classes; ++c) smooth += mx - static_cast<acc_t>(row[c]);
    row_terms[2 * i + 1] = smooth + acc_t(classes) * log_sum;
  }
  const auto scales = index_grad_scales(acc_t(1), acc_t(1), kMean, weight_sum, opts);
  for (int64_t c = 0; c < classes; ++c) {
    const acc_t p = ::exp(-neg_log_prob(static_cast<acc_t>(row[c]), mx, log_sum));
    row[c] = static_cast<scalar_t>(index_grad(p, c == y[i], acc_t(1), acc_t(classes), scales));
  }
}

// One block: the reduced loss and the correct count, summed in row order (deterministic).
template <typename scalar_t>
__global__ void loss_total_kernel(const at::opmath_type<scalar_t>* __restrict__ row_terms,
                                  const int64_t* __restrict__ row_hit, int64_t rows, int64_t classes,
                                  double label_smoothing, at::opmath_type<scalar_t> weight_sum,
                                  scalar_t* __restrict__ loss, int64_t* __restrict__ correct) {
  using acc_t = at::opmath_type<scalar_t>;
  if (threadIdx.x != 0) return;
  acc_t nll = 0, smooth = 0;
  int64_t hits = 0;
  for (int64_t i = 0; i < rows; ++i) {
    nll += row_terms[2 * i];
    smooth += row_terms[2 * i + 1];
    hits += row_hit[i];
  }
  *loss = static_cast<scalar_t>(
      index_reduced_loss(nll, smooth, kMean, weight_sum, CrossEntropyOptions<acc_t>(classes, label_smoothing)));
  *correct = hits;
}

template <typename scalar_t>
__global__ void sgd_kernel(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ buf,
                           int64_t n, SgdOptions<at::opmath_type<scalar_t>> o) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const acc_t pk = static_cast<acc_t>(p[k]);
    const acc_t gk = sgd_decayed_grad(static_cast<acc_t>(g[k]), pk, o);
    acc_t d = gk;
    if (buf != nullptr) {
      const acc_t b = sgd_momentum_buffer(o.first_step ? acc_t(0) : static_cast<acc_t>(buf[k]), gk, o);
      buf[k] = static_cast<scalar_t>(b);
      d = sgd_direction(gk, b, o);
    }
    p[k] = static_cast<scalar_t>(sgd_param(pk, d, o));
  }
}

// Raises IndexError for the first class index out of range; returns the number of rows not ignored.
int64_t validate_targets(const at::Tensor& target, int64_t classes, int64_t ignore_index) {
  const auto used = target.ne(ignore_index);
  const auto bad = used.logical_and(target.lt(0).logical_or(target.ge(classes)));
  const auto counts = at::stack({bad.sum(), used.sum()}).cpu();
  const int64_t* c = counts.data_ptr<int64_t>();
  if (c[0] > 0) {
    const int64_t row = at::nonzero(bad).select(1, 0)[0].item<int64_t>();
    const int64_t value = target[row].item<int64_t>();
    TORCH_CHECK_INDEX(false, kOp, ": Target ", value, " is out of bounds for ", classes, " classes (row ", row, ").");
  }
  return c[1];
}

std::tuple<at::Tensor, at::Tensor> train_step_sgd_cuda(const at::Tensor& input_, const at::Tensor& target_,
                                                       at::TensorList params, at::TensorList momentum_buffers,
                                                       at::TensorList workspace, double lr, double momentum,
                                                       double dampening, double weight_decay, bool nesterov,
                                                       bool first_step, int64_t ignore_index, double label_smoothing) {
  check_train_step_args(input_, target_, params, momentum_buffers, workspace, lr, momentum, dampening, weight_decay,
                        nesterov, label_smoothing);
  const c10::cuda::CUDAGuard guard(input_.device());
  const auto input = input_.contiguous();
  const auto target = target_.contiguous();
  const int64_t rows = input.size(0);
  const int64_t layers = static_cast<int64_t>(params.size() / 2);
  const int64_t classes = params[2 * layers - 2].size(0);
  const int64_t valid_rows = validate_targets(target, classes, ignore_index);
  auto stream = at::cuda::getCurrentCUDAStream();

  auto W = [&](int64_t l) -> const at::Tensor& { return params[2 * l]; };
  auto B = [&](int64_t l) -> const at::Tensor& { return params[2 * l + 1]; };
  auto Z = [&](int64_t l) -> at::Tensor { return workspace[l]; };
  auto G = [&](int64_t l) -> at::Tensor { return workspace[layers + l]; };
  auto A = [&](int64_t l) -> const at::Tensor& { return l < 0 ? input : workspace[l]; };
  auto grad_of = [&](int64_t k) -> at::Tensor { return workspace[2 * layers - 1 + k]; };

  at::Tensor loss = at::empty({}, input.options());
  at::Tensor correct = at::empty({}, input.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "train_step_sgd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t weight_sum = static_cast<acc_t>(valid_rows);
    for (int64_t l = 0; l < layers; ++l) {
      auto z = Z(l);
      at::mm_out(z, A(l - 1), W(l).t());
      if (l + 1 < layers && z.numel() > 0) {
        bias_relu_kernel<scalar_t><<<blocks_for(z.numel()), kThreads, 0, stream>>>(
            z.data_ptr<scalar_t>(), B(l).data_ptr<scalar_t>(), z.numel(), z.size(1));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    auto logits = Z(layers - 1);
    auto row_terms = at::empty({std::max<int64_t>(rows, 1), 2}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    auto row_hit = at::zeros({std::max<int64_t>(rows, 1)}, input.options().dtype(at::kLong));
    if (rows > 0) {
      loss_rows_kernel<scalar_t><<<blocks_for(rows), kThreads, 0, stream>>>(
          logits.data_ptr<scalar_t>(), B(layers - 1).data_ptr<scalar_t>(), target.data_ptr<int64_t>(), rows, classes,
          ignore_index, label_smoothing, weight_sum, row_terms.data_ptr<acc_t>(), row_hit.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    loss_total_kernel<scalar_t><<<1, 32, 0, stream>>>(row_terms.data_ptr<acc_t>(), row_hit.data_ptr<int64_t>(), rows,
                                                       classes, label_smoothing, weight_sum,
                                                       loss.data_ptr<scalar_t>(), correct.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    {
      auto gb = grad_of(2 * layers - 1);
      at::sum_out(gb, logits, kRowDim);
    }

    const SgdOptions<acc_t> opts(lr, momentum, dampening, weight_decay, nesterov, first_step);
    for (int64_t l = layers - 1; l >= 0; --l) {
      const at::Tensor dz = l == layers - 1 ? Z(l) : G(l);
      if (l > 0) {
        auto g = G(l - 1);
        at::mm_out(g, dz, W(l));
        if (g.numel() > 0) {
          relu_mask_kernel<scalar_t><<<blocks_for(g.numel()), kThreads, 0, stream>>>(
              g.data_ptr<scalar_t>(), Z(l - 1).data_ptr<scalar_t>(), g.numel());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        auto gb = grad_of(2 * l - 1);
        at::sum_out(gb, g, kRowDim);
      }
      auto gw = grad_of(2 * l);
      at::mm_out(gw, dz.t(), A(l - 1));
      for (int64_t k = 2 * l; k <= 2 * l + 1; ++k) {
        const int64_t n = params[k].numel();
        if (n == 0) continue;
        scalar_t* buf = momentum != 0.0 ? momentum_buffers[k].data_ptr<scalar_t>() : nullptr;
        sgd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(params[k].data_ptr<scalar_t>(),
                                                                      grad_of(k).data_ptr<scalar_t>(), buf, n, opts);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return {loss, correct};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CUDA, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_cuda));
}

}  // namespace mnist_fast
