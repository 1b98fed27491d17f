// Per-row pieces of the CPU cross-entropy, shared by the cross_entropy ops (cross_entropy.cpp) and
// the fused training step (train_step.cpp): the row statistics (max, sum of exp) and the validation
// of class-index targets. The loss and gradient formulas themselves are in row_math.h.
#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../row_math.h"

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

template <typename scalar_t, typename acc_t>
RowStats<acc_t> row_stats(const scalar_t* x, int64_t classes) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t c = 0; c < classes; ++c) m = row_math::nan_max(static_cast<acc_t>(x[c]), m);
  acc_t s = 0;
  for (int64_t c = 0; c < classes; ++c) s += std::exp(static_cast<acc_t>(x[c]) - m);
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
