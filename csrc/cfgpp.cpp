// CFG++ sampler steps (Chung et al. 2024) as one fused pass: the guided prediction
// g = u + lambda (c - u) enters the clean-sample estimate, the unconditional u renoises.
//     x_next = a x + b g + c u
// Euler (sigma space, epsilon prediction): a = 1, b = -sigma, c = sigma_next.
// DDIM (eta = 0): a = sqrt(ab_prev / ab_t), b = -sqrt(ab_prev) sqrt(1 - ab_t) / sqrt(ab_t), c = sqrt(1 - ab_prev).
// The coefficients are computed by the Python wrappers (fastguide/ops.py); the element loop is in
// kernels.inc (one copy per ISA), in fp32 (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace fastguide {
namespace {

at::Tensor cfgpp_step_cpu(const at::Tensor& x_in, const at::Tensor& cond_in, const at::Tensor& uncond_in, double a,
                          double b, double c, const c10::optional<at::Tensor>& scale_t, double scale) {
  check_inputs("cfgpp_step", cond_in, uncond_in, "uncond");
  check_inputs("cfgpp_step", cond_in, x_in, "x");
  check_scale("cfgpp_step", scale_t, "scale", cond_in);
  const at::Tensor x = x_in.contiguous(), cd = cond_in.contiguous(), u = uncond_in.contiguous();
  at::Tensor out = new_output(cd);
  if (cd.numel() == 0) return out;
  const int64_t B = cd.size(0), per_sample = cd.numel() / B;
  const std::vector<double> lam = scale_values(scale_t, scale, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cd.scalar_type(), "fastguide_cfgpp", [&] {
    // Coefficients as the arithmetic type (fp32 unless the inputs are fp64), narrowed once here.
    using acc_t = at::opmath_type<scalar_t>;
    const isa::Kernels& K = kernels_for<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* cp = cd.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_sample_run(B, per_sample, [&](int64_t s, int64_t lo, int64_t hi) {
      K.cfgpp(xp + lo, cp + lo, up + lo, op + lo, hi - lo, acc_t(a), acc_t(b), acc_t(c), acc_t(lam[s]));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) { m.impl("cfgpp_step", &cfgpp_step_cpu); }

}  // namespace fastguide
