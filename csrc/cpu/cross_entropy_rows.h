// Validation of class-index targets, shared by the cross_entropy ops (cross_entropy.cpp) and the
// fused training step (train_step.cpp). The row loops themselves are the kernels of kernels/.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace mnist_fast {
namespace cpu {

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
