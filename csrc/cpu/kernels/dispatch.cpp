// Picks the kernel table of the CPU capability in use: the one ATen's own kernels use
// (at::get_cpu_capability(): the CPU's best, or ATEN_CPU_CAPABILITY=default|avx2|avx512), lowered
// to what this CPU can run (ATen takes ATEN_CPU_CAPABILITY=avx512 at its word).
#include <ATen/Config.h>
#include <ATen/Version.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "capability.h"
#include "kernels.h"

namespace mnist_fast {
namespace cpu {

namespace DEFAULT {
const KernelTable& table();
}
#if MNIST_FAST_X86_CAPABILITIES
namespace AVX2 {
const KernelTable& table();
}
namespace AVX512 {
const KernelTable& table();
}
#endif

namespace {

const KernelTable& choose() {
#if MNIST_FAST_X86_CAPABILITIES
  const std::string wanted = at::get_cpu_capability();
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (wanted == "AVX512" && avx512) return AVX512::table();
  if ((wanted == "AVX512" || wanted == "AVX2") && avx2) return AVX2::table();
#endif
  return DEFAULT::table();
}

}  // namespace

const KernelTable& kernel_table() {
  static const KernelTable& chosen = choose();
  return chosen;
}

#if AT_MKL_ENABLED()
}  // namespace cpu
}  // namespace mnist_fast
extern "C" {
// MKL's VML (LP64, exported by libtorch_cpu), with the mode ATen's at::vml::vsqrt passes:
// VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE.
void vmsSqrt(int n, const float* a, float* r, long long mode);
void vmdSqrt(int n, const double* a, double* r, long long mode);
}
namespace mnist_fast {
namespace cpu {
namespace {
constexpr long long kTorchVmlMode = 0x2 | 0x140000 | 0x100;

template <typename scalar_t, typename F>
void vml_in_place(scalar_t* x, int64_t n, F vml) {
  for (int64_t done = 0; done < n;) {
    const int chunk = static_cast<int>(std::min<int64_t>(n - done, INT_MAX));
    vml(chunk, x + done, x + done, kTorchVmlMode);
    done += chunk;
  }
}
}  // namespace

void torch_sqrt(float* x, int64_t n) { vml_in_place(x, n, vmsSqrt); }
void torch_sqrt(double* x, int64_t n) { vml_in_place(x, n, vmdSqrt); }
#else
void torch_sqrt(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
}
void torch_sqrt(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::sqrt(x[i]);
}
#endif

}  // namespace cpu
}  // namespace mnist_fast
