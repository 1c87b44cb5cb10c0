// Which kernel copy runs (csrc/isa.h): the widest one this CPU supports, unless FASTGUIDE_CPU_ISA
// (baseline | avx2 | avx512) or fastguide._C.set_cpu_isa() says otherwise.
//
// CPU features come from the compiler's __builtin_cpu_supports (libgcc's cpuid reading, which also
// checks that the OS saves the AVX / AVX-512 registers), not from hand-written cpuid parsing.
// A bad FASTGUIDE_CPU_ISA is not fatal at import (fastguide._C must still load so that the error can
// be reported): every op call, and get_cpu_isa(), raises a ValueError naming the variable, its value
// and what this CPU supports, until the variable is fixed or set_cpu_isa() picks a valid ISA.
#include "isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

namespace fastguide {
namespace isa {
namespace {

constexpr const char* kNames[kNumLevels] = {"baseline", "avx2", "avx512"};

const Kernels* compiled(int level) {
  switch (level) {
    case kBaseline:
      return baseline_kernels();
    case kAvx2:
      return avx2_kernels();
    default:
      return avx512_kernels();
  }
}

bool cpu_has(int level) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();  // idempotent; needed if this runs before libgcc's own constructor
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (level == kAvx2) return avx2;
  if (level == kAvx512)
    return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
#endif
  return level == kBaseline;
}

bool usable(int level) { return compiled(level) != nullptr && cpu_has(level); }

int widest() {
  int best = kBaseline;
  for (int level = 0; level < kNumLevels; ++level)
    if (usable(level)) best = level;
  return best;
}

std::string usable_list() {
  std::string out;
  for (int level = 0; level < kNumLevels; ++level)
    if (usable(level)) out += std::string(out.empty() ? "" : ", ") + kNames[level];
  return out;
}

// -1 (invalid name) or -2 (known, not usable here) with a message; otherwise the level.
int parse(const std::string& name, std::string* why) {
  for (int level = 0; level < kNumLevels; ++level) {
    if (name != kNames[level]) continue;
    if (usable(level)) return level;
    *why = "this CPU (or this build) does not support it";
    return -2;
  }
  *why = "it is not one of baseline, avx2, avx512";
  return -1;
}

// Read once, at the first use (fastguide._C's import calls init()).
struct State {
  std::atomic<int> level{kBaseline};  // < 0: FASTGUIDE_CPU_ISA was invalid and nothing replaced it
  std::string env_error;              // written by the constructor only

  State() {
    const char* env = std::getenv("FASTGUIDE_CPU_ISA");
    if (env == nullptr || *env == '\0') {
      level = widest();
      return;
    }
    std::string why;
    level = parse(env, &why);
    if (level < 0)
      env_error = std::string("FASTGUIDE_CPU_ISA='") + env + "' is invalid: " + why + ". This CPU supports: " +
                  usable_list() + " (unset FASTGUIDE_CPU_ISA to use the widest, " + kNames[widest()] + ").";
  }
};

State& state() {
  static State s;
  return s;
}

int current_level() {
  State& s = state();
  const int level = s.level.load(std::memory_order_acquire);
  TORCH_CHECK_VALUE(level >= 0, "fastguide: ", s.env_error);
  return level;
}

}  // namespace

void init() { state(); }

std::vector<std::string> supported() {
  std::vector<std::string> out;
  for (int level = 0; level < kNumLevels; ++level)
    if (usable(level)) out.emplace_back(kNames[level]);
  return out;
}

std::string current() { return kNames[current_level()]; }

void select(const std::string& name) {
  std::string why;
  const int level = parse(name, &why);
  TORCH_CHECK_VALUE(level >= 0, "fastguide.set_cpu_isa: '", name, "' is invalid: ", why,
                    ". This CPU supports: ", usable_list(), ".");
  state().level.store(level, std::memory_order_release);
}

const Kernels& kernels(int dtype) { return compiled(current_level())[dtype]; }

}  // namespace isa
}  // namespace fastguide
