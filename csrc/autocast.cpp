// Autocast for the forward ops: under torch.autocast each op casts its inputs as the stock op it
// replaces does (ATen's autocast policy), so a fused model gives the dtypes a stock one gives.
//   linear_relu, fused_mlp's GEMMs   lower precision, as F.linear
//   cross_entropy                     float32, as F.cross_entropy (CPU and CUDA)
//   fused_mlp's final log-softmax     float32 on CUDA, as F.log_softmax there; on the CPU stock
//                                     keeps log_softmax in the lower precision, and so does this
// float64 tensors are left alone, as stock does. The backward ops need no autocast kernel:
// autograd calls them on the dtypes the forward saw.
#include <ATen/autocast_mode.h>
#include <ATen/ops/log_softmax.h>
#include <torch/library.h>

#include "ops.h"

namespace mnist_fast {
namespace {

using at::autocast::cached_cast;

template <c10::DeviceType device>
constexpr c10::DispatchKey kAutocastKey =
    device == c10::DeviceType::CPU ? c10::DispatchKey::AutocastCPU : c10::DispatchKey::AutocastCUDA;

template <c10::DeviceType device>
at::Tensor linear_relu_autocast(const at::Tensor& input, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey<device>);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  return linear_relu(cached_cast(dtype, input, device), cached_cast(dtype, weight, device),
                     cached_cast(dtype, bias, device));
}

template <c10::DeviceType device>
std::tuple<at::Tensor, at::Tensor> cross_entropy_forward_autocast(const at::Tensor& input, const at::Tensor& target,
                                                                  const std::optional<at::Tensor>& weight,
                                                                  int64_t reduction, int64_t ignore_index,
                                                                  double label_smoothing) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey<device>);
  // target: class indices are not floating point and stay as they are; probabilities go to float32.
  return cross_entropy_forward(cached_cast(at::kFloat, input, device), cached_cast(at::kFloat, target, device),
                               cached_cast(at::kFloat, weight, device), reduction, ignore_index, label_smoothing);
}

template <c10::DeviceType device>
std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_forward_autocast(const at::Tensor& input,
                                                                          at::TensorList weights,
                                                                          const OptionalTensorList& biases,
                                                                          bool log_softmax) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey<device>);
  const auto dtype = at::autocast::get_autocast_dtype(device);
  OptionalTensorList cast_biases;
  cast_biases.reserve(biases.size());
  for (size_t l = 0; l < biases.size(); ++l) cast_biases.push_back(cached_cast(dtype, biases.get(l), device));
  const bool float32_log_softmax = log_softmax && device == c10::DeviceType::CUDA;
  auto [output, hidden] = fused_mlp_forward(cached_cast(dtype, input, device), cached_cast(dtype, weights, device),
                                            cast_biases, log_softmax && !float32_log_softmax);
  if (float32_log_softmax) output = at::log_softmax(cached_cast(at::kFloat, output, device), -1);
  return {output, hidden};
}

}  // namespace

TORCH_LIBRARY_IMPL(mnist_fast, AutocastCPU, m) {
  m.impl("linear_relu", TORCH_FN(linear_relu_autocast<c10::DeviceType::CPU>));
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_autocast<c10::DeviceType::CPU>));
  m.impl("fused_mlp_forward", TORCH_FN(fused_mlp_forward_autocast<c10::DeviceType::CPU>));
}

TORCH_LIBRARY_IMPL(mnist_fast, AutocastCUDA, m) {
  m.impl("linear_relu", TORCH_FN(linear_relu_autocast<c10::DeviceType::CUDA>));
  m.impl("cross_entropy_forward", TORCH_FN(cross_entropy_forward_autocast<c10::DeviceType::CUDA>));
  m.impl("fused_mlp_forward", TORCH_FN(fused_mlp_forward_autocast<c10::DeviceType::CUDA>));
}

}  // namespace mnist_fast
