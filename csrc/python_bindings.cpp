// The Python module mnist_fast._C. Importing it registers the ops (registration.cpp and the
// kernel files); the functions below are the eager fast path: a pybind11 call into the same
// dispatcher ops costs less than going through torch.ops (see mnist_fast/functional.py).
#include <torch/extension.h>

#include "cpu/kernels/kernels.h"
#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mnist_fast compiled operators (fused Linear+ReLU and log-softmax+NLL)";
  m.def("linear_relu", &mnist_fast::linear_relu, "relu(input @ weight.T + bias)", py::arg("input"),
        py::arg("weight"), py::arg("bias") = py::none());
  m.def("cross_entropy", &mnist_fast::cross_entropy, "fused log-softmax + NLL of an (N, C) input",
        py::arg("input"), py::arg("target"), py::arg("weight"), py::arg("reduction"), py::arg("ignore_index"),
        py::arg("label_smoothing"));
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
        py::arg("first_step"), py::arg("ignore_index"), py::arg("label_smoothing"));
  m.def("cpu_capability", []() { return std::string(mnist_fast::cpu::kernel_table().capability); },
        "the CPU kernels in use: 'default', 'avx2' or 'avx512' (ATen's capability, ATEN_CPU_CAPABILITY)");
  m.def("cuda_compiled", []() {
#ifdef MNIST_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "whether the CUDA kernels were compiled into this build");
}
