// One SGD training step of an MLP on the CPU, in one op: forward, cross-entropy, backward and the
// torch.optim.SGD update, on workspaces the caller allocates once per batch size. The passes are
// train_step_impl.h's; here they are split between torch's intra-op threads, so that a step, not
// only each GEMM, uses every core (a batch-64 step's GEMMs are too small for MKL to split well):
//   by rows     (contiguous blocks of the batch): the forward through the layers, the loss rows,
//               and each layer's input grad G_{l-1} = dZ_l W_l with its ReLU mask. A worker's rows
//               flow through these passes without waiting for the others.
//   by features (blocks of weight rows): each layer's weight grad dZ_l^T A_{l-1}, its bias grad
//               (the workers' column sums over their rows, added in worker order) and the update;
//               and the first layer's forward when its weight is the larger operand (small batches).
// One barrier before each layer's feature pass: it reads dZ_l of every row, and it may update W_l
// only once every worker has read it. The blocks are a fixed function of the thread count, so a
// step is deterministic for a given thread count; on one thread it is the sequential step. The
// GEMMs are BLAS calls on each worker's blocks (gemm.h); the other passes are the dispatched
// kernels of kernels/, with the per-element and per-row formulas of row_math.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/ParallelGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <optional>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../train_step_impl.h"
#include "cross_entropy_rows.h"
#include "gemm.h"
#include "kernels/kernels.h"

namespace mnist_fast {
namespace {

using namespace row_math;
constexpr const char* kOp = "mnist_fast.train_step_sgd";
// A batch splits between threads only when each gets at least this many rows.
constexpr int64_t kMinRowsPerThread = 8;
// Blocks of rows and of features are multiples of these (whole vectors, whole cache lines).
constexpr int64_t kRowBlock = 8, kFeatureBlock = 16;

// [first, last) of worker t of n over `size` items in blocks of `block` (empty for idle workers).
std::pair<int64_t, int64_t> share(int64_t size, int64_t t, int64_t n, int64_t block) {
  const int64_t per = (size + n - 1) / n;
  const int64_t chunk = (per + block - 1) / block * block;
  return {std::min(size, t * chunk), std::min(size, (t + 1) * chunk)};
}

// argmax as torch.argmax (the first maximum, a NaN beats any number); the rows [first, last) whose
// argmax is their target (ignored rows count neither way).
template <typename scalar_t>
int64_t count_correct(const scalar_t* logits, const int64_t* y, int64_t first, int64_t last, int64_t classes,
                      int64_t ignore_index) {
  int64_t correct = 0;
  for (int64_t i = first; i < last; ++i) {
    const scalar_t* row = logits + i * classes;
    int64_t best = 0;
    for (int64_t c = 1; c < classes; ++c) {
      const scalar_t v = row[c], m = row[best];
      if ((v > m) || (v != v && m == m)) best = c;
    }
    correct += y[i] != ignore_index && best == y[i];
  }
  return correct;
}

// The tensors of one step as pointers, and the per-worker results.
template <typename scalar_t>
struct Step {
  using acc_t = at::opmath_type<scalar_t>;
  int64_t rows, layers, threads;
  std::vector<int64_t> in, out;  // per layer: in_features, out_features
  const scalar_t* x;
  const int64_t* y;
  std::vector<scalar_t*> w, b, z, g, gw, gb, mw, mb;  // z: outputs (last: logits, then their grad); g: hidden grads
  std::optional<SgdOptions<acc_t>> sgd;
  int64_t ignore_index;
  acc_t valid_rows;
  CrossEntropyOptions<acc_t> ce_opts{1, 0.0};
  std::vector<double> stats;        // (rows, kRowStats) of the loss rows
  std::vector<acc_t> column_sums;   // (threads, sum of out_l): each worker's bias grads over its rows
  std::vector<int64_t> bias_offset;  // layer l's place in a worker's column sums
  std::vector<acc_t> loss_sums;     // (threads, 2): nll and smoothing sums
  std::vector<int64_t> correct;     // (threads,)

  acc_t* sums_of(int64_t t, int64_t l) { return column_sums.data() + t * bias_offset.back() + bias_offset[l]; }
  // Layer l's input A_{l-1}, and d loss / d Z_l (the last layer's over its logits).
  const scalar_t* input_of(int64_t l) const { return l == 0 ? x : z[l - 1]; }
  const scalar_t* grad_of(int64_t l) const { return l == layers - 1 ? z[l] : g[l]; }
  // Worker t's rows.
  std::pair<int64_t, int64_t> rows_of(int64_t t) const { return share(rows, t, threads, kRowBlock); }

  // Worker t of `threads`; barrier() waits for every worker. A worker that fails (nothing in it
  // should: the arguments are checked, the memory allocated) skips the rest of its work but still
  // meets every barrier; the first error is raised once all have finished.
  std::exception_ptr error;
  std::atomic<bool> failed{false};
  template <typename F>
  void guarded(const F& work) {
    if (failed.load()) return;
    try {
      work();
    } catch (...) {
      if (!failed.exchange(true)) error = std::current_exception();
    }
  }

  // The first layer's forward by features when its weight outweighs the input rows a worker would
  // get (a batch-64 step: 128x784 against 32x784): each worker then packs only its part of W_0, and
  // the part it updates stays in its core's cache from one step to the next.
  bool first_layer_by_features() const { return threads > 1 && layers > 1 && out[0] * threads >= rows; }

  template <typename Barrier>
  void run(int64_t t, const Barrier& barrier) {
    const bool by_features = first_layer_by_features();
    if (by_features) {
      guarded([&] { first_layer_forward(t); });
      barrier();
    }
    guarded([&] { forward_and_loss(t, by_features ? 1 : 0); });
    for (int64_t l = layers - 1; l >= 0; --l) {
      guarded([&] { input_grad(t, l); });
      // (the weight grads of layer 0 read only the input and dZ_0, complete since layer 1's barrier)
      if (l > 0 || layers == 1) barrier();
      guarded([&] { update(t, l); });
    }
  }

  // Layer 0's forward for worker t's features, every row.
  void first_layer_forward(int64_t t) {
    const auto features = share(out[0], t, threads, kFeatureBlock);
    const int64_t f0 = features.first, width = features.second - f0;
    if (width == 0) return;
    cpu::gemm(false, true, rows, width, in[0], x, in[0], w[0] + f0 * in[0], in[0], z[0] + f0, out[0]);
    const auto& k = cpu::kernels<scalar_t>();
    for (int64_t i = 0; i < rows; ++i) k.bias_relu(z[0] + i * out[0] + f0, b[0] + f0, 1, width, /*relu=*/true);
  }

  // The forward from layer `from` on and the loss, for worker t's rows.
  void forward_and_loss(int64_t t, int64_t from) {
    const auto& k = cpu::kernels<scalar_t>();
    const int64_t last = layers - 1;
    const auto [r0, r1] = rows_of(t);
    const int64_t n = r1 - r0;
    for (int64_t l = from; l < layers && n > 0; ++l) {
      cpu::gemm(false, true, n, out[l], in[l], input_of(l) + r0 * in[l], in[l], w[l], in[l], z[l] + r0 * out[l],
                out[l]);
      if (l < last) k.bias_relu(z[l] + r0 * out[l], b[l], n, out[l], /*relu=*/true);
    }
    // loss rows: last bias, argmax, the cross_entropy op's kernels (mean), the logit grad written
    // over the logits, and its column sums
    if (n > 0) {
      const int64_t C = out[last];
      scalar_t* logits = z[last];
      k.bias_relu(logits + r0 * C, b[last], n, C, /*relu=*/false);
      correct[t] = count_correct(logits, y, r0, r1, C, ignore_index);
      cpu::CrossEntropyArgs<scalar_t> a;
      a.input = logits;
      a.target = y;
      a.classes = C;
      a.rows = rows;
      a.ignore_index = ignore_index;
      a.reduction = kMean;
      a.opts = ce_opts;
      a.weight_total = acc_t(C);
      a.target_weight_sum = valid_rows;
      a.grad_scalar = acc_t(1);
      a.grad_input = logits;
      a.stats = stats.data();
      k.cross_entropy_forward(a, r0, r1, loss_sums.data() + 2 * t);
      k.cross_entropy_backward(a, r0, r1);
      acc_t* sums = sums_of(t, last);
      for (int64_t i = r0; i < r1; ++i) {
        for (int64_t c = 0; c < C; ++c) sums[c] += static_cast<acc_t>(logits[i * C + c]);
      }
    }
  }

  // The input grad of layer l for worker t's rows, then its ReLU mask with the bias grad sums.
  void input_grad(int64_t t, int64_t l) {
    if (l == 0) return;
    const auto [r0, r1] = rows_of(t);
    const int64_t n = r1 - r0;
    if (n == 0) return;
    scalar_t* grad = g[l - 1] + r0 * in[l];
    cpu::gemm(false, false, n, in[l], out[l], grad_of(l) + r0 * out[l], out[l], w[l], in[l], grad, in[l]);
    const cpu::MaskGradArgs<scalar_t> m{grad, in[l], 1, z[l - 1] + r0 * in[l], grad, n, in[l]};
    for (int64_t c0 = 0; c0 < in[l]; c0 += cpu::kMaskColumns) {
      cpu::kernels<scalar_t>().mask_grad(m, c0, std::min(cpu::kMaskColumns, in[l] - c0), sums_of(t, l - 1) + c0);
    }
  }

  // The weight and bias grads of layer l's features of worker t, and their update.
  void update(int64_t t, int64_t l) {
    const auto features = share(out[l], t, threads, kFeatureBlock);
    const int64_t f0 = features.first, f1 = features.second;
    if (f0 == f1) return;
    cpu::gemm(true, false, f1 - f0, in[l], rows, grad_of(l) + f0, out[l], input_of(l), in[l], gw[l] + f0 * in[l],
              in[l]);
    for (int64_t j = f0; j < f1; ++j) {
      acc_t total = sums_of(0, l)[j];
      for (int64_t u = 1; u < threads; ++u) total += sums_of(u, l)[j];
      gb[l][j] = static_cast<scalar_t>(total);
    }
    if (!sgd) return;
    const auto& k = cpu::kernels<scalar_t>();
    k.sgd(w[l] + f0 * in[l], gw[l] + f0 * in[l], mw[l] ? mw[l] + f0 * in[l] : nullptr, (f1 - f0) * in[l], *sgd);
    k.sgd(b[l] + f0, gb[l] + f0, mb[l] ? mb[l] + f0 : nullptr, f1 - f0, *sgd);
  }
};

// The threads a step of `rows` rows runs on: torch's intra-op threads, unless the batch is too
// small to share or the call is already on one of them.
int64_t step_threads(int64_t rows) {
#ifdef _OPENMP
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows / kMinRowsPerThread));
#else
  return 1;
#endif
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> cpu_step(const at::Tensor& input_, const at::Tensor& target_, at::TensorList params,
                                            at::TensorList momentum_buffers, at::TensorList workspace,
                                            const SgdArgs* sgd, int64_t ignore_index, double label_smoothing) {
  using acc_t = at::opmath_type<scalar_t>;
  const TrainStepTensors s{input_.contiguous(), params, workspace};
  const at::Tensor target = target_.contiguous();
  Step<scalar_t> st;
  st.rows = s.input.size(0);
  st.layers = s.layers();
  const int64_t last = st.layers - 1, classes = s.weight(last).size(0);
  // Every target is validated before anything is written.
  st.valid_rows = static_cast<acc_t>(cpu::index_target_weight_sum<double>(target.data_ptr<int64_t>(), st.rows,
                                                                          classes, nullptr, ignore_index, kOp));
  st.x = s.input.data_ptr<scalar_t>();
  st.y = target.data_ptr<int64_t>();
  st.ignore_index = ignore_index;
  st.ce_opts = CrossEntropyOptions<acc_t>(classes, label_smoothing);
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
  const bool momentum = sgd && sgd->momentum != 0.0;
  st.bias_offset.push_back(0);
  for (int64_t l = 0; l < st.layers; ++l) {
    st.in.push_back(s.weight(l).size(1));
    st.out.push_back(s.weight(l).size(0));
    st.w.push_back(ptr(s.weight(l)));
    st.b.push_back(ptr(s.bias(l)));
    st.z.push_back(ptr(s.output(l)));
    st.g.push_back(l < last ? ptr(s.output_grad(l)) : nullptr);
    st.gw.push_back(ptr(s.param_grad(2 * l)));
    st.gb.push_back(ptr(s.param_grad(2 * l + 1)));
    st.mw.push_back(momentum ? ptr(momentum_buffers[2 * l]) : nullptr);
    st.mb.push_back(momentum ? ptr(momentum_buffers[2 * l + 1]) : nullptr);
    st.bias_offset.push_back(st.bias_offset.back() + st.out.back());
  }
  if (sgd) {
    st.sgd.emplace(sgd->lr, sgd->momentum, sgd->dampening, sgd->weight_decay, sgd->nesterov, sgd->first_step);
  }
  auto run_on = [&](int64_t threads) {
    st.threads = threads;
    st.stats.resize(st.rows * kRowStats);
    st.column_sums.assign(threads * st.bias_offset.back(), acc_t(0));
    st.loss_sums.assign(2 * threads, acc_t(0));
    st.correct.assign(threads, 0);
  };
  run_on(step_threads(st.rows));
  bool ran = st.threads == 1;
  if (ran) {
    st.run(0, [] {});
  } else {
#ifdef _OPENMP
#pragma omp parallel num_threads(st.threads)
    {
      // Every worker or none: OpenMP may give fewer threads than asked (then all run on this one).
      if (omp_get_num_threads() == st.threads) {
        const cpu::SingleThreadedBlas blas_on_this_thread;
        const c10::ParallelGuard in_parallel(true);
        st.run(omp_get_thread_num(), [] {
#pragma omp barrier
        });
#pragma omp single
        ran = true;
      }
    }
#endif
    if (!ran) {
      run_on(1);
      st.run(0, [] {});
    }
  }
  if (st.error) std::rethrow_exception(st.error);
  acc_t nll = 0, smooth = 0;
  int64_t hits = 0;
  for (int64_t t = 0; t < st.threads; ++t) {
    nll += st.loss_sums[2 * t];
    smooth += st.loss_sums[2 * t + 1];
    hits += st.correct[t];
  }
  at::Tensor loss = at::empty({}, s.input.options());
  at::Tensor correct = at::empty({}, s.input.options().dtype(at::kLong));
  *loss.data_ptr<scalar_t>() = static_cast<scalar_t>(index_reduced_loss(nll, smooth, kMean, st.valid_rows, st.ce_opts));
  *correct.data_ptr<int64_t>() = hits;
  return {loss, correct};
}

std::tuple<at::Tensor, at::Tensor> cpu_train_step(const at::Tensor& input, const at::Tensor& target,
                                                  at::TensorList params, at::TensorList momentum_buffers,
                                                  at::TensorList workspace, const SgdArgs* sgd, int64_t ignore_index,
                                                  double label_smoothing) {
  std::tuple<at::Tensor, at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "train_step_sgd_cpu", [&] {
    result = cpu_step<scalar_t>(input, target, params, momentum_buffers, workspace, sgd, ignore_index, label_smoothing);
  });
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("train_step_sgd", TORCH_FN(train_step_sgd_impl<cpu_train_step>));
  m.impl("train_step_grads", TORCH_FN(train_step_grads_impl<cpu_train_step>));
}

}  // namespace mnist_fast
