// Picks the kernel table of the CPU capability in use: the one ATen's own kernels use
// (at::get_cpu_capability(): the CPU's best, or ATEN_CPU_CAPABILITY=default|avx2|avx512), lowered
// to what this CPU can run (ATen takes ATEN_CPU_CAPABILITY=avx512 at its word).
#include <ATen/Version.h>

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

}  // namespace cpu
}  // namespace mnist_fast
