// The AVX2 + FMA + F16C copy of the kernels (csrc/kernels.inc), selected at run time on CPUs that have
// them (isa.cpp). Per-function target pragma rather than a per-file -mavx2: setuptools compiles every
// source with the same flags, and the pragma only reaches code after it. Every #include comes first,
// so no header function is compiled for AVX2 (see kernels.inc on the ODR trap). GCC only: other
// compilers (and other architectures) build the baseline alone.
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTGUIDE_ISA_NS avx2
#define FASTGUIDE_ISA_LEVEL 1
#include "kernels.inc"
#pragma GCC pop_options

const fastguide::isa::Kernels* fastguide::isa::avx2_kernels() { return fastguide::avx2::kTable; }
#else
const fastguide::isa::Kernels* fastguide::isa::avx2_kernels() { return nullptr; }
#endif
