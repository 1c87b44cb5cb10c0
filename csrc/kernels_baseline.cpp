// The baseline copy of the kernels (csrc/kernels.inc): the compiler's default target (x86-64 with
// SSE2, or aarch64 with NEON), runs on every CPU. Always compiled; the fallback of the dispatch.
#include "isa.h"

#define FASTGUIDE_ISA_NS baseline
#define FASTGUIDE_ISA_LEVEL 0
#include "kernels.inc"

const fastguide::isa::Kernels* fastguide::isa::baseline_kernels() { return fastguide::baseline::kTable; }
