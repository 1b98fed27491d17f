// The kernels for every CPU (baseline ISA of the build: SSE2 on x86-64, NEON on aarch64): see kernels.h.
#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#define MNIST_FAST_CAPABILITY_NAME "default"
#include "kernels_impl.h"
