// CPU kernels of the frequency-split family (see fastguide/frequency.py for the operators).
//
// low(d) = sum_t A_H[t] @ d @ A_W[t]^T is two batched GEMMs per term on the [planes, H, W] view
// (ATen/BLAS, fp32 exact on CPU); the guided combination
//     out = base + s_low * low + s_high * (d - low),  base = uncond (cond when original)
// is one fused pass that re-reads cond and uncond (d is not kept from the GEMM input), in kernels.inc
// (one copy per ISA), in fp32 (fp64 for fp64 inputs, whose operators are fp64 too).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace fastguide {
namespace {

void check_operators(const char* op, const at::Tensor& x, const at::Tensor& ah, const at::Tensor& aw) {
  TORCH_CHECK(x.dim() >= 2, "fastguide.", op, ": input must be [..., H, W], got ", x.sizes());
  const int64_t H = x.size(-2), W = x.size(-1);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(ah.dim() == 3 && ah.size(1) == H && ah.size(2) == H && aw.dim() == 3 && aw.size(0) == ah.size(0) &&
                  aw.size(1) == W && aw.size(2) == W,
              "fastguide.", op, ": operators must be [T, H, H] and [T, W, W] for H=", H, ", W=", W, ", got ",
              ah.sizes(), " and ", aw.sizes());
  TORCH_CHECK(ah.scalar_type() == acc && aw.scalar_type() == acc, "fastguide.", op, ": operators must be ", acc,
              ", got ", ah.scalar_type(), " and ", aw.scalar_type());
  TORCH_CHECK(ah.device() == x.device() && aw.device() == x.device(), "fastguide.", op,
              ": operators must be on the input's device ", x.device());
}

at::Tensor lowpass(const at::Tensor& d, const at::Tensor& ah, const at::Tensor& aw) {
  at::Tensor low = at::matmul(at::matmul(ah[0], d), aw[0].t());
  for (int64_t t = 1; t < ah.size(0); ++t) low.add_(at::matmul(at::matmul(ah[t], d), aw[t].t()));
  return low;
}

at::Tensor frequency_cfg_cpu(const at::Tensor& cond_in, const at::Tensor& uncond_in, const at::Tensor& ah,
                             const at::Tensor& aw, const c10::optional<at::Tensor>& low_t, double low,
                             const c10::optional<at::Tensor>& high_t, double high, bool original) {
  check_inputs("frequency_cfg", cond_in, uncond_in, "uncond");
  check_operators("frequency_cfg", cond_in, ah, aw);
  check_scale("frequency_cfg", low_t, "scale_low", cond_in);
  check_scale("frequency_cfg", high_t, "scale_high", cond_in);
  const at::Tensor c = cond_in.contiguous(), u = uncond_in.contiguous();
  at::Tensor out = new_output(c);
  if (c.numel() == 0) return out;
  const int64_t B = c.size(0), per_sample = c.numel() / B;
  const std::vector<double> sl = scale_values(low_t, low, B), sh = scale_values(high_t, high, B);
  const at::Tensor d = c.to(ah.scalar_type()) - u.to(ah.scalar_type());
  const at::Tensor lo = lowpass(d, ah, aw).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastguide_freq_cfg", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const isa::Kernels& K = kernels_for<scalar_t>();
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    const acc_t* lp = lo.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_sample_run(B, per_sample, [&](int64_t b, int64_t lo, int64_t hi) {
      K.freq_combine(cp + lo, up + lo, lp + lo, op + lo, hi - lo, acc_t(sl[b]), acc_t(sh[b]), original);
    });
  });
  return out;
}

at::Tensor frequency_split_cpu(const at::Tensor& x, const at::Tensor& ah, const at::Tensor& aw) {
  TORCH_CHECK(x.is_floating_point(), "fastguide.frequency_split: x must be a floating tensor, got ", x.scalar_type());
  check_operators("frequency_split", x, ah, aw);
  at::Tensor out = new_output(x);
  if (x.numel() == 0) return out;
  out.copy_(lowpass(x.to(ah.scalar_type()), ah, aw));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("frequency_cfg", &frequency_cfg_cpu);
  m.impl("frequency_split", &frequency_split_cpu);
}

}  // namespace fastguide
