// torch.optim.Adam / AdamW's update as one pass over each parameter on the CPU: exp_avg,
// exp_avg_sq and the parameter are read and written once, given the gradient (FusedTrainer takes
// it from the train step's workspace). The pass is the dispatched kernel of kernels/ (row_math's
// formulas: torch.optim.Adam's single-tensor path, with its order of operations and roundings);
// here are the checks and the split between threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernels/kernels.h"

namespace mnist_fast {
namespace {

constexpr const char* kOp = "mnist_fast.adam_update";
constexpr int64_t kGrain = 32768;

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
  for (size_t i = 0; i < params.size(); ++i) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, params[i].scalar_type(), "adam_update_cpu", [&] {
      const row_math::AdamOptions<at::opmath_type<scalar_t>> options(step, lr, beta1, beta2, eps, weight_decay,
                                                                     decoupled_weight_decay);
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* g = grads[i].data_ptr<scalar_t>();
      scalar_t* m = exp_avgs[i].data_ptr<scalar_t>();
      scalar_t* v = exp_avg_sqs[i].data_ptr<scalar_t>();
      const auto& kernels = cpu::kernels<scalar_t>();
      at::parallel_for(0, params[i].numel(), kGrain, [&](int64_t first, int64_t last) {
        kernels.adam(p + first, g + first, m + first, v + first, last - first, options);
      });
    });
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, CPU, m) {
  m.impl("adam_update", TORCH_FN(adam_update_cpu));
}

}  // namespace mnist_fast
