// Per-row pieces of the CPU cross-entropy, shared by the cross_entropy ops (cross_entropy.cpp) and
// the fused training step (train_step.cpp): the row statistics (max, sum of exp) and the validation
// of class-index targets. The loss and gradient formulas themselves are in row_math.h.
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../row_math.h"
#include "fast_exp.h"

namespace mnist_fast {
namespace cpu {

// Row statistics: m = max(x) and s = sum(exp(x - m)).
template <typename acc_t>
struct RowStats {
  acc_t max;
  acc_t sum_exp;
  acc_t log_sum_exp() const { return std::log(sum_exp); }
  double lse() const { return static_cast<double>(max) + static_cast<double>(log_sum_exp()); }
};

// Reductions over a row run in kLanes independent lanes, which the compiler vectorizes without
// reassociating (it may not reorder one float sum), then combine the lanes in a fixed order.
constexpr int64_t kLanes = 16;

template <typename acc_t, typename Value, typename Combine>
acc_t lane_reduce(int64_t n, acc_t init, const Value& value, const Combine& combine) {
  acc_t lanes[kLanes];
  std::fill(lanes, lanes + kLanes, init);
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = combine(lanes[l], value(c + l));
  }
  acc_t out = init;
  for (; c < n; ++c) out = combine(out, value(c));
  for (int64_t l = 0; l < kLanes; ++l) out = combine(out, lanes[l]);
  return out;
}

template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_stats(const scalar_t* x, int64_t classes) {
  auto logit = [x](int64_t c) { return static_cast<acc_t>(x[c]); };
  // A NaN logit may be skipped by this max; it still makes exp(x - m), and so the row, NaN.
  const acc_t m = lane_reduce<acc_t>(classes, -std::numeric_limits<acc_t>::infinity(), logit,
                                     [](acc_t a, acc_t b) { return b > a ? b : a; });
  const acc_t s = lane_reduce<acc_t>(classes, acc_t(0), [&](int64_t c) { return exp_acc(logit(c) - m); },
                                     [](acc_t a, acc_t b) { return a + b; });
  return {m, s};
}

// Class-index targets: validates every target (the only place that does) and returns the summed
// weight of the rows that are not ignored, the denominator of reduction 'mean'.
template <typename acc_t>
acc_t index_target_weight_sum(const int64_t* target, int64_t rows, int64_t classes, const acc_t* weight,
                              int64_t ignore_index, const char* op = "mnist_fast.cross_entropy") {
  acc_t total = 0;
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t y = target[i];
    if (y == ignore_index) continue;
    TORCH_CHECK_INDEX(y >= 0 && y < classes, op, ": Target ", y,
                      " is out of bounds for ", classes, " classes (row ", i, ").");
    total += weight ? weight[y] : acc_t(1);
  }
  return total;
}

}  // namespace cpu
}  // namespace mnist_fast
