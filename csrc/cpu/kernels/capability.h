// Which capabilities this compiler builds besides DEFAULT. Only a preprocessor test: it is included
// before the target pragma of capability_*.cpp, ahead of any code.
#pragma once

// x86-64 with g++ (the AVX2/AVX-512 kernels are compiled through #pragma GCC target); anything else
// (aarch64, clang) builds the DEFAULT kernels only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MNIST_FAST_X86_CAPABILITIES 1
#else
#define MNIST_FAST_X86_CAPABILITIES 0
#endif
