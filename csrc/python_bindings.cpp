// The Python module mnist_fast._C. Importing it registers the ops (registration.cpp and the
// kernel files); the functions below are the eager fast path: a pybind11 call into the same
// dispatcher ops costs less than going through torch.ops (see mnist_fast/functional.py).
//
// Each op releases the GIL while it runs, as torch's own bindings do, so other Python threads
// (data loading, a progress thread) keep running. pybind11 converts the arguments before the guard
// and the result after it, with the GIL held; the op itself touches no Python object (a Python
// kernel or hook it reaches, such as a fake kernel or a saved-tensor hook, takes the GIL itself).
#include <torch/extension.h>

#include "checks.h"
#include "cpu/kernels/kernels.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using without_gil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "mnist_fast compiled operators (fused Linear+ReLU and log-softmax+NLL)";
  m.def("linear_relu", &mnist_fast::linear_relu, "relu(input @ weight.T + bias)", py::arg("input"),
        py::arg("weight"), py::arg("bias") = py::none(), without_gil());
  m.def("cross_entropy", &mnist_fast::cross_entropy, "fused log-softmax + NLL of an (N, C) input",
        py::arg("input"), py::arg("target"), py::arg("weight"), py::arg("reduction"), py::arg("ignore_index"),
        py::arg("label_smoothing"), without_gil());
  m.def("train_step_sgd",
        [](const at::Tensor& input, const at::Tensor& target, const std::vector<at::Tensor>& params,
           const std::vector<at::Tensor>& momentum_buffers, const std::vector<at::Tensor>& workspace, double lr,
           double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
           int64_t ignore_index, double label_smoothing) {
          return mnist_fast::train_step_sgd(input, target, params, momentum_buffers, workspace, lr, momentum,
                                            dampening, weight_decay, nesterov, first_step, ignore_index,
                                            label_smoothing);
        },
        "one SGD step of an MLP (forward, mean cross-entropy, backward, update) in place; returns (loss, correct)",
        py::arg("input"), py::arg("target"), py::arg("params"), py::arg("momentum_buffers"), py::arg("workspace"),
        py::arg("lr"), py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"),
        py::arg("first_step"), py::arg("ignore_index"), py::arg("label_smoothing"), without_gil());
  m.def("train_step_grads",
        [](const at::Tensor& input, const at::Tensor& target, const std::vector<at::Tensor>& params,
           const std::vector<at::Tensor>& workspace, int64_t ignore_index, double label_smoothing) {
          return mnist_fast::train_step_grads(input, target, params, workspace, ignore_index, label_smoothing);
        },
        "train_step_sgd without the update: the gradients in the workspace; returns (loss, correct)",
        py::arg("input"), py::arg("target"), py::arg("params"), py::arg("workspace"), py::arg("ignore_index"),
        py::arg("label_smoothing"), without_gil());
  m.def("check_sgd_options",
        [](double lr, double momentum, double dampening, double weight_decay, bool nesterov) {
          mnist_fast::check_sgd_options(lr, momentum, dampening, weight_decay, nesterov, "mnist_fast.FusedTrainer");
        },
        "torch.optim.SGD's checks of its options (ValueError), those train_step_sgd makes", py::arg("lr"),
        py::arg("momentum"), py::arg("dampening"), py::arg("weight_decay"), py::arg("nesterov"));
  m.def("cpu_capability", []() { return std::string(mnist_fast::cpu::kernel_table().capability); },
        "the CPU kernels in use: 'default', 'avx2' or 'avx512' (ATen's capability, ATEN_CPU_CAPABILITY)");
  m.def("cuda_compiled", []() {
#ifdef MNIST_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA kernels were compiled into this build");
  // ---- fused_mlp ----
  m.def("fused_mlp",
        [](const at::Tensor& input, const std::vector<at::Tensor>& weights,
           const std::vector<std::optional<at::Tensor>>& biases, bool log_softmax) {
          return mnist_fast::fused_mlp(input, weights, mnist_fast::OptionalTensorList(biases), log_softmax);
        },
        "a whole MLP (Linear, ReLU, ..., Linear, optional log-softmax) as one op", py::arg("input"),
        py::arg("weights"), py::arg("biases"), py::arg("log_softmax") = false);
  // ---- whole-epoch training (train_epoch.cpp) ----
  // Without the GIL while the epoch runs (seconds), so that other Python threads keep going.
  m.def("train_epoch_sgd",
        [](const at::Tensor& images, const at::Tensor& labels, const at::Tensor& order, int64_t batch_size,
           const at::Tensor& lr, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& momentum_buffers,
           double momentum, double dampening, double weight_decay, bool nesterov, bool first_step,
           int64_t ignore_index, double label_smoothing, const std::optional<at::Tensor>& pixel_values) {
          return mnist_fast::train_epoch_sgd(images, labels, order, batch_size, lr, params, momentum_buffers, momentum,
                                             dampening, weight_decay, nesterov, first_step, ignore_index,
                                             label_smoothing, pixel_values);
        },
        "the SGD steps of an epoch (batches gathered by order, lr per step) in place; returns (losses, correct)",
        py::arg("images"), py::arg("labels"), py::arg("order"), py::arg("batch_size"), py::arg("lr"),
        py::arg("params"), py::arg("momentum_buffers"), py::arg("momentum"), py::arg("dampening"),
        py::arg("weight_decay"), py::arg("nesterov"), py::arg("first_step"), py::arg("ignore_index"),
        py::arg("label_smoothing"), py::arg("pixel_values") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("train_epoch_adam",
        [](const at::Tensor& images, const at::Tensor& labels, const at::Tensor& order, int64_t batch_size,
           const at::Tensor& lr, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& exp_avgs,
           const std::vector<at::Tensor>& exp_avg_sqs, int64_t step, double beta1, double beta2, double eps,
           double weight_decay, bool decoupled_weight_decay, int64_t ignore_index, double label_smoothing,
           const std::optional<at::Tensor>& pixel_values) {
          return mnist_fast::train_epoch_adam(images, labels, order, batch_size, lr, params, exp_avgs, exp_avg_sqs,
                                              step, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
                                              ignore_index, label_smoothing, pixel_values);
        },
        "the Adam steps of an epoch (batches gathered by order, lr per step) in place; returns (losses, correct)",
        py::arg("images"), py::arg("labels"), py::arg("order"), py::arg("batch_size"), py::arg("lr"),
        py::arg("params"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled_weight_decay"),
        py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("pixel_values") = py::none(),
        py::call_guard<py::gil_scoped_release>());
  // ---- Adam / AdamW update (cpu/adam.cpp) ----
  m.def("adam_update",
        [](const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
           const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& exp_avg_sqs, int64_t step,
           double lr, double beta1, double beta2, double eps, double weight_decay, bool decoupled_weight_decay) {
          mnist_fast::adam_update(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay,
                                  decoupled_weight_decay);
        },
        "torch.optim.Adam's (or AdamW's) update of every parameter given its gradient, in place",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("step"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled_weight_decay"));
}
