#pragma once
// Shared by the ATen-side drivers: argument checks, the test-suite poison switch and
// the runtime ISA dispatch (the element loops themselves are in kernels.inc, see isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "isa.h"

namespace fastguide {

// FASTGUIDE_POISON_OUTPUTS=1 (set by the test suite) fills every output with NaN before the
// kernel writes it, so an element a kernel forgets cannot hide behind allocator reuse.
inline bool poison_outputs() {
  static const bool on = [] {
    const char* v = std::getenv("FASTGUIDE_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}

inline at::Tensor new_output(const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

inline void check_inputs(const char* op, const at::Tensor& cond, const at::Tensor& other, const char* name) {
  TORCH_CHECK(cond.is_floating_point(), "fastguide.", op, ": cond must be a floating tensor, got ",
              cond.scalar_type());
  TORCH_CHECK(cond.dim() >= 2, "fastguide.", op, ": cond must have >= 2 dims (batch first), got shape ",
              cond.sizes());
  TORCH_CHECK(other.sizes() == cond.sizes(), "fastguide.", op, ": ", name, " must have cond's shape ",
              cond.sizes(), ", got ", other.sizes());
  TORCH_CHECK(other.scalar_type() == cond.scalar_type(), "fastguide.", op, ": ", name,
              " must have cond's dtype ", cond.scalar_type(), ", got ", other.scalar_type());
  TORCH_CHECK(other.device() == cond.device(), "fastguide.", op, ": ", name, " must be on cond's device ",
              cond.device(), ", got ", other.device());
}

inline void check_scale(const char* op, const c10::optional<at::Tensor>& t, const char* name,
                        const at::Tensor& cond) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 0 || (t->dim() == 1 && t->size(0) == cond.size(0)), "fastguide.", op, ": ", name,
              " must be 0-d or of shape [", cond.size(0), "], got ", t->sizes());
  TORCH_CHECK(t->device() == cond.device(), "fastguide.", op, ": ", name, " must be on cond's device ",
              cond.device(), ", got ", t->device());
}

// One flat parallel loop over B samples of `per_sample` contiguous elements: fn(b, lo, hi) gets maximal
// runs [lo, hi) inside sample b (a thread's range may straddle samples), so the per-sample constants
// (scales, coefficients) are hoisted out of the element loop.
template <typename F>
void for_each_sample_run(int64_t B, int64_t per_sample, F&& fn) {
  at::parallel_for(0, B * per_sample, 32768, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t b = i / per_sample, stop = std::min(end, (b + 1) * per_sample);
      fn(b, i, stop);
      i = stop;
    }
  });
}

// Per-sample scale values on the host (CPU kernels only): B entries, in double. Kernels narrow them to
// their arithmetic type: fp32 for fp32/fp16/bf16 inputs, fp64 for fp64 inputs (a fp64 input gets its
// scales, coefficients and sums in fp64, like the plain-PyTorch math in float64).
inline std::vector<double> scale_values(const c10::optional<at::Tensor>& t, double value, int64_t B) {
  std::vector<double> out(B, value);
  if (t.has_value()) {
    const at::Tensor f = t->to(at::kDouble).contiguous();
    const double* p = f.const_data_ptr<double>();
    for (int64_t b = 0; b < B; ++b) out[b] = p[f.dim() == 0 ? 0 : b];
  }
  return out;
}

// The kernels for storage type T (float, double, c10::Half, c10::BFloat16).
template <typename T>
const isa::Kernels& kernels_for() {
  if constexpr (std::is_same_v<T, float>) return isa::kernels(isa::kF32);
  else if constexpr (std::is_same_v<T, double>) return isa::kernels(isa::kF64);
  else if constexpr (std::is_same_v<T, c10::Half>) return isa::kernels(isa::kF16);
  else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    return isa::kernels(isa::kBF16);
  }
}

}  // namespace fastguide
