// The kernels for x86-64 CPUs with AVX-512 F/BW/VL/DQ (Skylake-X, Zen 4 and later), ATen's AVX512
// capability: see kernels.h and capability_avx2.cpp.
#include "capability.h"

#if MNIST_FAST_X86_CAPABILITIES
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define MNIST_FAST_CAPABILITY_NAME "avx512"
#include "kernels_impl.h"
#endif
