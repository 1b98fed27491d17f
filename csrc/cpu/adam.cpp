// torch.optim.Adam / AdamW's update as one pass over each parameter on the CPU: exp_avg,
// exp_avg_sq and the parameter are read and written once, given the gradient (FusedTrainer takes
// it from the train step's workspace). The arithmetic is that of torch.optim.Adam's single-tensor
// path, in the same order and precision (the bias corrections in double, as Python computes them,
// then every operation in the tensor's opmath type), so the results agree within rounding.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

namespace mnist_fast {
namespace {

constexpr const char* kOp = "mnist_fast.adam_update";
constexpr int64_t kGrain = 32768;

template <typename acc_t>
struct AdamScalars {
  acc_t lr, beta1_complement, beta2, beta2_complement, eps, weight_decay, decay_factor, step_size, bc2_sqrt;
};

// The value as stored in the tensor: torch rounds every intermediate tensor to scalar_t.
template <typename scalar_t>
inline at::opmath_type<scalar_t> stored(at::opmath_type<scalar_t> x) {
  return static_cast<at::opmath_type<scalar_t>>(static_cast<scalar_t>(x));
}

template <typename scalar_t, bool kDecoupled, bool kDecay>
void adam_pass(scalar_t* __restrict__ p, const scalar_t* __restrict__ g, scalar_t* __restrict__ m,
               scalar_t* __restrict__ v, int64_t n, const AdamScalars<at::opmath_type<scalar_t>>& s) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = 0; k < n; ++k) {
    acc_t pk = static_cast<acc_t>(p[k]);
    acc_t gk = static_cast<acc_t>(g[k]);
    if constexpr (kDecay && !kDecoupled) gk = stored<scalar_t>(gk + s.weight_decay * pk);  // Adam: grad.add(param, alpha=wd)
    if constexpr (kDecay && kDecoupled) pk = stored<scalar_t>(pk * s.decay_factor);        // AdamW: param.mul_(1 - lr * wd)
    // exp_avg.lerp_(grad, 1 - beta1), with lerp's two formulas
    const acc_t mk = static_cast<acc_t>(m[k]), w = s.beta1_complement;
    const acc_t m_new = stored<scalar_t>(w < acc_t(0.5) ? mk + w * (gk - mk) : gk - (gk - mk) * (acc_t(1) - w));
    // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    const acc_t v_new = stored<scalar_t>(stored<scalar_t>(static_cast<acc_t>(v[k]) * s.beta2) +
                                         s.beta2_complement * gk * gk);
    // denom = (exp_avg_sq.sqrt() / sqrt(bias_correction2)).add_(eps)
    const acc_t denom = stored<scalar_t>(stored<scalar_t>(stored<scalar_t>(std::sqrt(v_new)) / s.bc2_sqrt) + s.eps);
    m[k] = static_cast<scalar_t>(m_new);
    v[k] = static_cast<scalar_t>(v_new);
    p[k] = static_cast<scalar_t>(pk - s.step_size * (m_new / denom));  // param.addcdiv_(exp_avg, denom, -step_size)
  }
}

void check_list(at::TensorList list, at::TensorList params, const char* what) {
  TORCH_CHECK_VALUE(list.size() == params.size(), kOp, ": expected one ", what, " per parameter (", params.size(),
                    "), got ", list.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(list[i].scalar_type() == params[i].scalar_type() && list[i].device() == params[i].device(),
                     kOp, ": expected ", what, " ", i, " of its parameter's dtype and device (", params[i].scalar_type(),
                     " on ", params[i].device(), "), got ", list[i].scalar_type(), " on ", list[i].device());
    TORCH_CHECK_VALUE(list[i].sizes() == params[i].sizes() && list[i].is_contiguous(), kOp, ": expected ", what, " ",
                      i, " to be contiguous of shape ", params[i].sizes(), ", got ", list[i].sizes());
  }
}

void adam_update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     int64_t step, double lr, double beta1, double beta2, double eps, double weight_decay,
                     bool decoupled_weight_decay) {
  // torch.optim.Adam's checks and messages.
  TORCH_CHECK_VALUE(lr >= 0.0, kOp, ": Invalid learning rate: ", lr);
  TORCH_CHECK_VALUE(eps >= 0.0, kOp, ": Invalid epsilon value: ", eps);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, kOp, ": Invalid beta parameter at index 0: ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, kOp, ": Invalid beta parameter at index 1: ", beta2);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, kOp, ": Invalid weight_decay value: ", weight_decay);
  TORCH_CHECK_VALUE(step >= 1, kOp, ": step counts from 1, got ", step);
  for (size_t i = 0; i < params.size(); ++i) {
    TORCH_CHECK_TYPE(at::isFloatingType(params[i].scalar_type()) && params[i].device().is_cpu(), kOp,
                     ": expected floating-point CPU parameters, got ", params[i].scalar_type(), " on ",
                     params[i].device());
    TORCH_CHECK_VALUE(params[i].is_contiguous(), kOp, ": parameter ", i, " must be contiguous (updated in place)");
  }
  check_list(grads, params, "gradient");
  check_list(exp_avgs, params, "exp_avg");
  check_list(exp_avg_sqs, params, "exp_avg_sq");
  // As Python computes them from the float step.
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "adam_update_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const AdamScalars<acc_t> s{static_cast<acc_t>(lr), static_cast<acc_t>(1.0 - beta1), static_cast<acc_t>(beta2),
                                 static_cast<acc_t>(1.0 - beta2), static_cast<acc_t>(eps),
                                 static_cast<acc_t>(weight_decay), static_cast<acc_t>(1.0 - lr * weight_decay),
                                 static_cast<acc_t>(lr / bias_correction1),
                                 static_cast<acc_t>(std::sqrt(bias_correction2))};
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      scalar_t* m = exp_avgs[i].data_ptr<scalar_t>();
      scalar_t* v = exp_avg_sqs[i].data_ptr<scalar_t>();
      const bool decay = weight_decay != 0.0;
      at::parallel_for(0, params[i].numel(), kGrain, [&](int64_t first, int64_t last) {
        const int64_t n = last - first;
        if (!decay) {
          adam_pass<scalar_t, false, false>(p + first, g + first, m + first, v + first, n, s);
        } else if (decoupled_weight_decay) {
          adam_pass<scalar_t, true, true>(p + first, g + first, m + first, v + first, n, s);
        } else {
          adam_pass<scalar_t, false, true>(p + first, g + first, m + first, v + first, n, s);
        }
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("adam_update", TORCH_FN(adam_update_cpu));
}

}  // namespace mnist_fast
