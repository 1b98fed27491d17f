// The kernels for x86-64 CPUs with AVX2 and FMA (Haswell, Zen and later): see kernels.h.
// The ISA is set here rather than by compiler flags, so that setup.py compiles every source alike.
#include "capability.h"

#if MNIST_FAST_X86_CAPABILITIES
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
// g++ has fixed the ISA macros before it reads a target pragma; the vector and Sleef headers test them.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define MNIST_FAST_CAPABILITY_NAME "avx2"
#include "kernels_impl.h"
#endif
