#pragma once
// The kernels' dispatch table, shared by the per-ISA kernel copies (kernels_<isa>.cpp, which include
// no ATen/c10 header at all, see kernels.inc) and the ATen-side drivers (guidance.cpp, apg.cpp, ...).
//
// Every element loop of the CPU ops is compiled three times: baseline (the x86-64 / aarch64 default
// target), AVX2 + FMA + F16C and AVX-512 (F, BW, VL). isa.cpp picks one table at load time (the widest
// the CPU supports, or FASTGUIDE_CPU_ISA); the drivers (checks, allocation, at::parallel_for, per-group
// coefficients) are compiled once for the baseline and call the loops through these pointers.
#include <cstdint>
#include <string>
#include <vector>

namespace fastguide {
namespace isa {

// 16-bit storage formats as raw bits, layout-compatible with c10::Half and c10::BFloat16.
struct Fp16 {
  uint16_t x;
};
struct Bf16 {
  uint16_t x;
};

enum Dtype : int { kF32, kF64, kF16, kBF16, kNumDtypes };
enum Level : int { kBaseline, kAvx2, kAvx512, kNumLevels };

// Elements per staging block: fp16 inputs are converted to fp32 one block at a time (into stack
// buffers that stay in L1); an fp16 moments chunk is one block (see guidance.cpp).
constexpr int64_t kBlock = 1024;

// One dtype's kernels. Pointers are that dtype's storage (float, double, Fp16, Bf16); scalars are
// passed as double and narrowed to the arithmetic type inside: fp32 for fp32/fp16/bf16, fp64 for fp64
// (fp32 callers pass values that are already fp32, so the narrowing is exact).
struct Kernels {
  // guidance.cpp. Moments of one chunk (n <= kBlock for fp16), d = c - u, e = c - p:
  // out = {n, sum u, sum d, sum e, M_uu, M_ud, M_ue, M_dd, M_de, M_ee} (co-moments centred on the chunk).
  void (*moments[2])(const void* c, const void* u, const void* p, int64_t n, double* out);  // [has p]
  // out = f * (base + s1 * (c - alpha u) + s2 * (c - p)), base = alpha u (c when original); k = {alpha, s1, s2, f}.
  void (*combine[2])(const void* c, const void* u, const void* p, void* out, int64_t n, const double* k,
                     bool original);  // [has p]
  // apg.cpp pass 1: m = c - u (with momentum: buf = m + mu * buf, rounded to the storage type, m = buf);
  // out = {|m|^2, <m,c>, |c|^2}.
  void (*apg_update[2])(const void* c, const void* u, void* buf, double mu, int64_t n, double* out);  // [momentum]
  // apg.cpp pass 2: out = base + s * (k m + pb c), base = u (c when original).
  void (*apg_combine[2])(const void* c, const void* u, const void* buf, void* out, int64_t n, double k, double pb,
                         double s, bool original);  // [momentum]
  // guidance.cpp cfg_momentum: buf = (c - u) + mu * buf, rounded to the storage type once.
  void (*momentum)(const void* c, const void* u, void* buf, double mu, int64_t n);
  // apg.cpp guidance_stats: out = {<c,u>, |c|^2, |u|^2, <c,g>, |g|^2} (the last two 0 without g).
  void (*stats[2])(const void* c, const void* u, const void* g, int64_t n, double* out);  // [has g]
  // cfgpp.cpp: out = a x + b (u + lam (c - u)) + cc u.
  void (*cfgpp)(const void* x, const void* c, const void* u, void* out, int64_t n, double a, double b, double cc,
                double lam);
  // frequency.cpp: out = base + sl low + sh ((c - u) - low), base = u (c when original); low is
  // fp32 (fp64 for fp64 inputs).
  void (*freq_combine)(const void* c, const void* u, const void* low, void* out, int64_t n, double sl, double sh,
                       bool original);
};

// The [kNumDtypes] tables of each copy; nullptr for a copy that this compiler/architecture does not
// build (only the baseline exists on aarch64, NEON being part of its baseline).
const Kernels* baseline_kernels();
const Kernels* avx2_kernels();
const Kernels* avx512_kernels();

// The choice (isa.cpp).
void init();                           // reads FASTGUIDE_CPU_ISA (never throws)
std::vector<std::string> supported();  // the copies this CPU can run, narrowest first
std::string current();                 // the copy in use; c10::ValueError if FASTGUIDE_CPU_ISA is invalid
void select(const std::string& name);  // c10::ValueError if unknown or not supported here
const Kernels& kernels(int dtype);     // the kernels of the copy in use for an isa::Dtype; throws as current()

}  // namespace isa
}  // namespace fastguide
