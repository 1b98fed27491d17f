// exp() for the CPU kernels' inner loops. libm's expf is an opaque call per element, which keeps
// the compiler from vectorizing the softmax loops; this inline, branch-free version (Cephes'
// range reduction and polynomial, within 2 ulp of expf for normal results) vectorizes. float64 keeps std::exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mnist_fast {
namespace cpu {

inline float exp_vectorizable(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;       // ln 2 split in two so that n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kMin = -103.972084f;        // below: exp rounds to 0 in float
  constexpr float kMax = 88.7228391f;          // above: overflow to inf
  const float clamped = x < kMin ? kMin : (x > kMax ? kMax : x);
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: floor() is a libm call on baseline x86-64.
  constexpr float kRound = 12582912.0f;
  const float n = (clamped * kLog2e + kRound) - kRound;
  const float r = (clamped - n * kLn2Hi) - n * kLn2Lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // 2^n as two normal floats 2^(n/2) * 2^(n - n/2): n spans [-150, 128], beyond one exponent field.
  const int32_t n1 = static_cast<int32_t>(n) / 2, n2 = static_cast<int32_t>(n) - n1;
  const int32_t bits1 = (n1 + 127) << 23, bits2 = (n2 + 127) << 23;
  float scale1, scale2;
  std::memcpy(&scale1, &bits1, sizeof scale1);
  std::memcpy(&scale2, &bits2, sizeof scale2);
  float result = p * scale1 * scale2;
  result = x < kMin ? 0.0f : result;
  result = x > kMax ? INFINITY : result;
  return x != x ? x : result;  // NaN in, NaN out
}

// exp in the accumulation type of a kernel: the fast path for float, libm for double.
inline float exp_acc(float x) { return exp_vectorizable(x); }
inline double exp_acc(double x) { return std::exp(x); }

}  // namespace cpu
}  // namespace mnist_fast
