// Per-element and per-row arithmetic of the fused ops, shared by the CPU and the CUDA kernels.
//
// Everything here is a small inline function that is __host__ __device__ under nvcc and a plain
// inline function under g++. Functions whose value type is a template parameter V (besides the
// accumulation type acc_t of the options) also run on the CPU kernels' at::vec::Vectorized<acc_t>. The kernels differ only in how they walk rows (loops and
// at::parallel_for on the CPU, warps and blocks on the GPU); the formulas they apply are these, so
// the CPU test suite exercises the very arithmetic the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MNIST_FAST_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MNIST_FAST_HOST_DEVICE inline
#endif

namespace mnist_fast {
namespace row_math {

// Same numbering as at::Reduction, so Python can pass the usual codes.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// ---------------------------------------------------------------------------------------------
// Linear+ReLU epilogues. NaN behaves as in torch.relu / threshold_backward: relu(NaN) = NaN and
// the gradient flows through a NaN output.

template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t bias_relu(acc_t gemm, acc_t bias) {
  const acc_t v = gemm + bias;
  return v < acc_t(0) ? acc_t(0) : v;
}

template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t relu_grad(acc_t grad, acc_t output) {
  return output <= acc_t(0) ? acc_t(0) : grad;
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy = log-softmax + NLL, with the options of F.cross_entropy.
//
// A row x of C logits is summarised by m = max(x), s = sum(exp(x - m)) and lse = m + log(s).
// -log p[c] = lse - x[c] is evaluated as (m - x[c]) + log(s), and backward gets m and log(s) apart
// (SavedRowStats): their sum would lose log(s) once |m| is large (at m = 1e17 even float64's lse
// is m, and p = exp(x - lse) comes out 1 for every maximal logit).
// With class-index targets y, label smoothing eps and class weights w (all ones when absent):
//   nll    = w[y] * (lse - x[y])
//   smooth = sum_c w[c] * ((m - x[c]) + log(s)), evaluated term by term as stock does, W = sum_c w[c]
//   loss   = (1 - eps) * nll + eps / C * smooth
// and d loss / d x[c] = p[c] (a + b W) - b w[c] - a [c == y],  a = (1 - eps) w[y] g, b = eps / C g,
// p = softmax(x), g the incoming grad: stock's log_softmax backward, dlsm - p * sum(dlsm) with
// dlsm[c] = -a [c == y] - b w[c], term for term, so that a NaN or inf weight gives NaN where stock
// does and nowhere else (the b terms are absent without smoothing, as in stock: no 0 * inf).
// Ignored rows have a = b = 0 (a NaN logit or, with smoothing, an inf weight still gives NaN there).
// The smoothing sum adds non-negative terms (m - x[c]) + log(s) only: no cancellation.
//
// With probability targets t (a row of C values) the smoothed target is t' = (1 - eps) t + eps / C:
//   loss = sum_c w[c] t'[c] (lse - x[c])
//   d loss / d x[c] = p[c] S - w[c] t'[c],  S = sum_c w[c] t'[c]
//   d loss / d t[c] = (1 - eps) w[c] (lse - x[c])

template <typename acc_t>
struct CrossEntropyOptions {
  acc_t on_target;   // 1 - eps: weight of the one-hot (or given) target
  acc_t per_class;   // eps / C: mass spread over every class
  bool smoothing;    // eps > 0; when false the smoothing terms are never evaluated (as in stock)

  MNIST_FAST_HOST_DEVICE CrossEntropyOptions(int64_t num_classes, double label_smoothing)
      : on_target(acc_t(1.0 - label_smoothing)),
        per_class(num_classes > 0 ? acc_t(label_smoothing / double(num_classes)) : acc_t(0)),
        smoothing(label_smoothing > 0.0) {}

  template <typename V>
  MNIST_FAST_HOST_DEVICE V smoothed_target(V t) const {
    return smoothing ? t * V(on_target) + V(per_class) : t;
  }
};

// -log softmax(x)[c] from the row's max and log(sum(exp(x - max))).
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t neg_log_prob(acc_t x, acc_t row_max, acc_t log_sum_exp) {
  return (row_max - x) + log_sum_exp;
}

// The row statistics saved by the forward for the backward: kRowStats float64 values per row,
// m and log(s) (see above), written and read only through these two functions.
constexpr int64_t kRowStats = 2;

template <typename acc_t>
MNIST_FAST_HOST_DEVICE void save_row_stats(double* stats, acc_t row_max, acc_t log_sum) {
  stats[0] = static_cast<double>(row_max);
  stats[1] = static_cast<double>(log_sum);
}

template <typename acc_t>
struct SavedRowStats {
  acc_t max;
  acc_t log_sum;
  MNIST_FAST_HOST_DEVICE explicit SavedRowStats(const double* stats)
      : max(static_cast<acc_t>(stats[0])), log_sum(static_cast<acc_t>(stats[1])) {}
  MNIST_FAST_HOST_DEVICE acc_t neg_log_prob(acc_t x) const {
    return (max - x) + log_sum;
  }
};

// NaN-propagating maximum, so a NaN logit gives a NaN loss as in stock log_softmax.
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t nan_max(acc_t a, acc_t b) {
  return (a != a || a > b) ? a : b;
}

// ---- class-index targets ----

// Loss of one row (reduction 'none').
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t index_row_loss(acc_t nll, acc_t smooth, const CrossEntropyOptions<acc_t>& o) {
  return o.smoothing ? o.on_target * nll + o.per_class * smooth : nll;
}

// Reduction 'mean' divides both terms by the summed weight w[y] of the rows that are not ignored
// (their count when no weight is given), as stock does: 0/0 = NaN when every row is ignored.

// Reduced loss ('sum' or 'mean') from the summed per-row nll and smooth terms.
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t index_reduced_loss(acc_t nll_sum, acc_t smooth_sum, int64_t reduction,
                                                acc_t target_weight_sum, const CrossEntropyOptions<acc_t>& o) {
  const acc_t loss = index_row_loss(nll_sum, smooth_sum, o);
  return reduction == kMean ? loss / target_weight_sum : loss;
}

// Per-row scales of the gradient (see above); a row that is ignored has a = b = 0.
template <typename acc_t>
struct IndexGradScales {
  acc_t a;
  acc_t b;
  bool smoothing;
};

template <typename acc_t>
MNIST_FAST_HOST_DEVICE IndexGradScales<acc_t> index_grad_scales(acc_t grad_loss, acc_t target_weight,
                                                                int64_t reduction, acc_t target_weight_sum,
                                                                const CrossEntropyOptions<acc_t>& o) {
  const acc_t g = reduction == kMean ? grad_loss / target_weight_sum : grad_loss;
  IndexGradScales<acc_t> s;
  s.a = (o.smoothing ? o.on_target : acc_t(1)) * target_weight * g;
  s.b = o.smoothing ? o.per_class * g : acc_t(0);
  s.smoothing = o.smoothing;
  return s;
}

template <typename acc_t>
MNIST_FAST_HOST_DEVICE IndexGradScales<acc_t> ignored_row_grad_scales(const CrossEntropyOptions<acc_t>& o) {
  return {acc_t(0), acc_t(0), o.smoothing};
}

// p (a + b W), the part of every class's gradient that does not depend on the class.
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t index_grad_row_scale(acc_t weight_sum, const IndexGradScales<acc_t>& s) {
  return s.smoothing ? s.a + s.b * weight_sum : s.a;
}

// The gradient of a class that is not the target: p (a + b W) - b w[c] (row_scale = a + b W).
template <typename V>
MNIST_FAST_HOST_DEVICE V index_grad_class(V p, V row_scale, V b, V class_weight, bool smoothing) {
  const V g = p * row_scale;
  return smoothing ? g - b * class_weight : g;
}

template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t index_grad(acc_t p, bool is_target, acc_t class_weight, acc_t weight_sum,
                                        const IndexGradScales<acc_t>& s) {
  const acc_t g = index_grad_class(p, index_grad_row_scale(weight_sum, s), s.b, class_weight, s.smoothing);
  return is_target ? g - s.a : g;
}

// ---- probability targets ----

// One class's share of the row loss: w t' (-log p), written literally so that a zero target
// against a -inf logit gives NaN exactly as stock's -(log_softmax * t' * w) does.
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t prob_loss_term(acc_t neg_log_p, acc_t weighted_target) {
  return weighted_target * neg_log_p;
}

// Divisor of reduction 'mean' for probability targets: the number of rows (stock: numel / C).
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t prob_reduced_loss(acc_t loss_sum, int64_t rows, int64_t reduction) {
  return reduction == kMean ? loss_sum / acc_t(rows) : loss_sum;
}

// Gradient scale of every row: the incoming grad, divided by the row count for 'mean'.
template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t prob_grad_scale(acc_t grad_loss, int64_t rows, int64_t reduction) {
  return reduction == kMean ? grad_loss / acc_t(rows) : grad_loss;
}

template <typename acc_t>
MNIST_FAST_HOST_DEVICE acc_t prob_input_grad(acc_t p, acc_t weighted_target_sum, acc_t weighted_target,
                                             acc_t g) {
  return g * (p * weighted_target_sum - weighted_target);
}

template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V prob_target_grad(V neg_log_p, V class_weight, V g, const CrossEntropyOptions<acc_t>& o) {
  return g * V(o.smoothing ? o.on_target : acc_t(1)) * class_weight * neg_log_p;
}

// ---------------------------------------------------------------------------------------------
// SGD update of one parameter element, in torch.optim.SGD's order of operations and with its
// roundings: each of its `x.add(y, alpha=a)` is one fused multiply-add x + a * y (ATen's vector
// kernel), each mul_ one rounded product:
//   g   = grad + weight_decay * param                        (when weight_decay != 0)
//   buf = g on the first step, else momentum * buf + (1 - dampening) * g   (when momentum != 0)
//   d   = g + momentum * buf if nesterov, else buf           (g when momentum == 0)
//   param = param - lr * d

// a * b + c, rounded once. The CPU kernels' at::vec::Vectorized takes at::vec::fmadd (found by
// argument-dependent lookup); these overloads serve scalars (the CUDA kernels).
MNIST_FAST_HOST_DEVICE float fmadd(float a, float b, float c) { return ::fmaf(a, b, c); }
MNIST_FAST_HOST_DEVICE double fmadd(double a, double b, double c) { return ::fma(a, b, c); }

template <typename acc_t>
struct SgdOptions {
  acc_t lr;
  acc_t momentum;
  acc_t one_minus_dampening;
  acc_t weight_decay;
  bool nesterov;
  bool first_step;  // no momentum buffer yet: it starts as a copy of the gradient

  MNIST_FAST_HOST_DEVICE SgdOptions(double lr_, double momentum_, double dampening, double weight_decay_,
                                    bool nesterov_, bool first_step_)
      : lr(acc_t(lr_)),
        momentum(acc_t(momentum_)),
        one_minus_dampening(acc_t(1.0 - dampening)),
        weight_decay(acc_t(weight_decay_)),
        nesterov(nesterov_),
        first_step(first_step_) {}
};

// The decayed gradient g.
template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V sgd_decayed_grad(V grad, V param, const SgdOptions<acc_t>& o) {
  return o.weight_decay != acc_t(0) ? fmadd(param, V(o.weight_decay), grad) : grad;
}

// The new momentum buffer from the old one and g.
template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V sgd_momentum_buffer(V buf, V g, const SgdOptions<acc_t>& o) {
  return o.first_step ? g : fmadd(g, V(o.one_minus_dampening), buf * V(o.momentum));
}

// The step direction d from g and the new buffer.
template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V sgd_direction(V g, V buf, const SgdOptions<acc_t>& o) {
  return o.nesterov ? fmadd(buf, V(o.momentum), g) : buf;
}

template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V sgd_param(V param, V direction, const SgdOptions<acc_t>& o) {
  return fmadd(direction, V(-o.lr), param);
}

// ---------------------------------------------------------------------------------------------
// Adam / AdamW update of one parameter element, in the order of operations of torch.optim.Adam's
// single-tensor path and with its roundings (ATen's vector kernels: lerp_ and addcmul_ are one
// fused multiply-add each, addcdiv_ is value * t1 / t2 + self rounded op by op). `stored` rounds
// a value to the tensor's type where torch writes an intermediate tensor (identity for float and
// double; bfloat16 and float16 compute in float):
//   g   = grad + weight_decay * param                    (Adam with weight_decay != 0)
//   param = param * (1 - lr * weight_decay)              (AdamW)
//   m   = m.lerp(g, 1 - beta1)
//   v   = (v * beta2) + (1 - beta2) * g * g
//   param = param + (-step_size * m) / (sqrt(v) / sqrt(bias_correction2) + eps)
// with sqrt as torch.sqrt computes it (kernels.h's torch_sqrt), step_size = lr / bias_correction1
// and the bias corrections in double, as Python computes them.

template <typename acc_t>
struct AdamOptions {
  acc_t weight_decay;     // Adam's L2 term (0 for AdamW)
  acc_t decay_factor;     // AdamW's 1 - lr * weight_decay (1 for Adam)
  acc_t lerp_weight;      // 1 - beta1
  acc_t beta2;
  acc_t one_minus_beta2;
  acc_t neg_step_size;    // -lr / bias_correction1
  acc_t bias_correction2_sqrt;
  acc_t eps;
  bool grad_decay;        // Adam with weight_decay != 0: the L2 term joins the gradient
  bool param_decay;       // AdamW with weight_decay != 0: the parameter decays first

  MNIST_FAST_HOST_DEVICE AdamOptions(int64_t step, double lr, double beta1, double beta2_, double eps_,
                                     double weight_decay_, bool decoupled)
      : weight_decay(acc_t(decoupled ? 0.0 : weight_decay_)),
        decay_factor(acc_t(decoupled ? 1.0 - lr * weight_decay_ : 1.0)),
        lerp_weight(acc_t(1.0 - beta1)),
        beta2(acc_t(beta2_)),
        one_minus_beta2(acc_t(1.0 - beta2_)),
        neg_step_size(acc_t(-(lr / (1.0 - ::pow(beta1, double(step)))))),
        bias_correction2_sqrt(acc_t(::pow(1.0 - ::pow(beta2_, double(step)), 0.5))),
        eps(acc_t(eps_)),
        grad_decay(!decoupled && weight_decay_ != 0.0),
        param_decay(decoupled && weight_decay_ != 0.0) {}
};

// torch.lerp(m, g, w): its two formulas, each one fused multiply-add.
template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V adam_exp_avg(V m, V g, const AdamOptions<acc_t>& o) {
  const acc_t w = o.lerp_weight;
  return w < acc_t(0.5) ? fmadd(V(w), g - m, m) : fmadd(V(w - acc_t(1)), g - m, g);
}

// exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2); `stored` rounds the product as mul_ stores it.
template <typename V, typename acc_t, typename Stored>
MNIST_FAST_HOST_DEVICE V adam_exp_avg_sq(V v, V g, const AdamOptions<acc_t>& o, const Stored& stored) {
  return fmadd(V(o.one_minus_beta2) * g, g, stored(v * V(o.beta2)));
}

// (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps), each result stored, from root =
// exp_avg_sq.sqrt() (the kernels take it as torch.sqrt computes it).
template <typename V, typename acc_t, typename Stored>
MNIST_FAST_HOST_DEVICE V adam_denom(V root, const AdamOptions<acc_t>& o, const Stored& stored) {
  return stored(stored(root / V(o.bias_correction2_sqrt)) + V(o.eps));
}

// param.addcdiv_(exp_avg, denom, value=-step_size).
template <typename V, typename acc_t>
MNIST_FAST_HOST_DEVICE V adam_param(V param, V m, V denom, const AdamOptions<acc_t>& o) {
  return param + V(o.neg_step_size) * m / denom;
}

}  // namespace row_math
}  // namespace mnist_fast
