// The AVX-512 (F, BW, VL) copy of the kernels (csrc/kernels.inc), selected at run time on CPUs that
// have them (isa.cpp); see kernels_avx2.cpp for the pragma approach. 512-bit vectors are asked for
// explicitly (GCC's generic tuning would otherwise stay at 256 bits for auto-vectorised loops).
#include "isa.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,prefer-vector-width=512")
#define FASTGUIDE_ISA_NS avx512
#define FASTGUIDE_ISA_LEVEL 2
#include "kernels.inc"
#pragma GCC pop_options

const fastguide::isa::Kernels* fastguide::isa::avx512_kernels() { return fastguide::avx512::kTable; }
#else
const fastguide::isa::Kernels* fastguide::isa::avx512_kernels() { return nullptr; }
#endif
