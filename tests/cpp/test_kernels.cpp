// Calls mnist_fast's CPU kernels from C++ (through the dispatcher, as a libtorch user would) and
// checks them against ATen's own ops: forward values, gradients, and errors for bad input.
#include <torch/torch.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <functional>
#include <iostream>
#include <string>

#include "ops.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "[ ok ] " : "[FAIL] ") << what << std::endl;
  if (!ok) ++failures;
}

bool close(const at::Tensor& a, const at::Tensor& b, double tol = 1e-10) {
  return a.sizes() == b.sizes() && at::allclose(a, b, tol, tol);
}

template <typename Error>
bool throws(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

void test_linear_relu() {
  const auto opts = torch::dtype(torch::kFloat64);
  auto x = torch::randn({9, 13}, opts).requires_grad_();
  auto w = torch::randn({7, 13}, opts).requires_grad_();
  auto b = torch::randn({7}, opts).requires_grad_();
  auto ours = mnist_fast::linear_relu(x, w, b);
  auto ref = torch::relu(torch::linear(x, w, b));
  check(close(ours, ref), "linear_relu forward == relu(linear)");

  auto g = torch::randn_like(ref);
  auto ours_grads = torch::autograd::grad({ours}, {x, w, b}, {g});
  auto ref_grads = torch::autograd::grad({ref}, {x, w, b}, {g});
  for (size_t i = 0; i < 3; ++i) {
    check(close(ours_grads[i], ref_grads[i]), "linear_relu gradient " + std::to_string(i) + " via autograd");
  }
  check(throws<c10::ValueError>([&] { mnist_fast::linear_relu(x, torch::randn({7, 12}, opts), b); }),
        "linear_relu rejects an in_features mismatch with ValueError");
}

void test_cross_entropy() {
  const auto opts = torch::dtype(torch::kFloat64);
  auto x = torch::randn({11, 10}, opts).requires_grad_();
  auto t = torch::randint(0, 10, {11}, torch::kLong);
  t[3] = -100;
  auto w = torch::rand({10}, opts) + 0.5;
  for (int64_t reduction : {0, 1, 2}) {
    auto [loss, lse] = mnist_fast::cross_entropy_forward(x, t, w, reduction, -100, 0.1);
    auto ref = at::cross_entropy_loss(x, t, w, reduction, -100, 0.1);
    check(close(loss, ref), "cross_entropy forward, reduction " + std::to_string(reduction));
    // Saved per row: the max and log(sum(exp(x - max))) (row_math.h's SavedRowStats).
    check(close(lse.select(1, 0), std::get<0>(x.detach().max(1))) &&
              close(lse.select(1, 0) + lse.select(1, 1), at::logsumexp(x.detach(), {1})),
          "saved row stats, reduction " + std::to_string(reduction));
    auto g = torch::rand_like(ref);
    check(close(torch::autograd::grad({loss}, {x}, {g})[0], torch::autograd::grad({ref}, {x}, {g})[0]),
          "cross_entropy gradient, reduction " + std::to_string(reduction));
  }
  auto bad = t.clone();
  bad[0] = 10;
  check(throws<c10::IndexError>([&] { mnist_fast::cross_entropy(x, bad, std::nullopt, 1, -100, 0.0); }),
        "an out-of-range class index raises IndexError");
}

}  // namespace

int main() {
  torch::manual_seed(0);
  test_linear_relu();
  test_cross_entropy();
  if (failures) std::cout << failures << " check(s) failed" << std::endl;
  return failures ? EXIT_FAILURE : EXIT_SUCCESS;
}
