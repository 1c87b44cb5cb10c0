// Guidance with statistics along the channel dim (dim 1) at each position, ComfyUI's post-CFG nodes:
//   cfg_norm:   g = u + s (c - u); out = g * clamp(|c| / (|g| + 1e-8), 0, 1) * strength       (CFGNorm)
//   mahiro_sim: per sample, the mean over positions of cos(ssqrt(s u), ssqrt((s c + g) / 2)), ssqrt(x) =
//               sign(x) sqrt(|x|), cosines as F.cosine_similarity (each norm clamped at 1e-8)    (Mahiro)
// Inputs are [B, C, S...] (S = the positions, 1 for a 2-D input), contiguous after packing. Work items are
// (sample, block of kPos positions): the channel loop accumulates per-position sums in small arrays, so each
// element is read once for the statistics (cfg_norm reads c, u again for the output, from cache).
// Arithmetic in fp32 (fp64 for fp64 inputs). Schemas are defined in Python (fastguide/ops.py SCHEMAS).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace fastguide {
namespace {

constexpr int64_t kPos = 256;

template <typename acc_t>
inline acc_t ssqrt(acc_t x) {  // sign(x) sqrt(|x|); +-0 for +-0 (a zero either way in the sums)
  return std::copysign(std::sqrt(std::abs(x)), x);
}

// The element loops, on restrict pointers (one channel row of n positions). Mahiro's sqrt vectorises because
// setup.py passes -fno-math-errno (a pragma or attribute does not do it): 2-4x faster mahiro_sim on CPU.
template <typename scalar_t, typename acc_t>
void cfg_norm_sums(const scalar_t* __restrict__ c, const scalar_t* __restrict__ u, int64_t n, acc_t s,
                   acc_t* __restrict__ cc, acc_t* __restrict__ gg) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t cv = static_cast<acc_t>(c[i]), uv = static_cast<acc_t>(u[i]);
    const acc_t g = uv + s * (cv - uv);
    cc[i] = cc[i] + cv * cv;
    gg[i] = gg[i] + g * g;
  }
}

template <typename scalar_t, typename acc_t>
void cfg_norm_write(const scalar_t* __restrict__ c, const scalar_t* __restrict__ u, int64_t n, acc_t s,
                    const acc_t* __restrict__ f, scalar_t* __restrict__ o) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t cv = static_cast<acc_t>(c[i]), uv = static_cast<acc_t>(u[i]);
    o[i] = static_cast<scalar_t>((uv + s * (cv - uv)) * f[i]);
  }
}

template <typename scalar_t, typename acc_t>
void mahiro_sums(const scalar_t* __restrict__ c, const scalar_t* __restrict__ u, int64_t n, acc_t s,
                 acc_t* __restrict__ dot, acc_t* __restrict__ aa, acc_t* __restrict__ mm) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t cv = static_cast<acc_t>(c[i]), uv = static_cast<acc_t>(u[i]);
    const acc_t g = uv + s * (cv - uv);
    const acc_t a = ssqrt(s * uv), m = ssqrt((s * cv + g) / 2);
    dot[i] = dot[i] + a * m;
    aa[i] = aa[i] + a * a;
    mm[i] = mm[i] + m * m;
  }
}

at::Tensor cfg_norm_cpu(const at::Tensor& cond_in, const at::Tensor& uncond_in, const c10::optional<at::Tensor>& scale_t,
                        double scale, double strength) {
  check_inputs("cfg_norm", cond_in, uncond_in, "uncond");
  check_scale("cfg_norm", scale_t, "scale", cond_in);
  const at::Tensor c = cond_in.contiguous(), u = uncond_in.contiguous();
  at::Tensor out = new_output(c);
  if (c.numel() == 0) return out;
  const int64_t B = c.size(0), C = c.size(1), S = c.numel() / (B * C);
  const int64_t nblk = (S + kPos - 1) / kPos;
  const std::vector<double> sv = scale_values(scale_t, scale, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastguide_cfg_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const acc_t st = acc_t(strength);
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      acc_t cc[kPos], gg[kPos];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nblk, p0 = (t % nblk) * kPos, n = std::min(kPos, S - p0);
        const acc_t s = acc_t(sv[b]);
        for (int64_t i = 0; i < n; ++i) cc[i] = gg[i] = 0;
        for (int64_t k = 0; k < C; ++k) {
          const int64_t base = (b * C + k) * S + p0;
          cfg_norm_sums(cp + base, up + base, n, s, cc, gg);
        }
        for (int64_t i = 0; i < n; ++i) {  // f = clamp(|c| / (|g| + 1e-8), 0, 1) * strength, as the node
          acc_t f = std::sqrt(cc[i]) / (std::sqrt(gg[i]) + acc_t(1e-8));
          cc[i] = (f < 1 ? f : acc_t(1)) * st;
        }
        for (int64_t k = 0; k < C; ++k) {
          const int64_t base = (b * C + k) * S + p0;
          cfg_norm_write(cp + base, up + base, n, s, cc, op + base);
        }
      }
    });
  });
  return out;
}

at::Tensor mahiro_sim_cpu(const at::Tensor& cond_in, const at::Tensor& uncond_in,
                          const c10::optional<at::Tensor>& scale_t, double scale) {
  check_inputs("mahiro_sim", cond_in, uncond_in, "uncond");
  check_scale("mahiro_sim", scale_t, "scale", cond_in);
  const at::Tensor c = cond_in.contiguous(), u = uncond_in.contiguous();
  const int64_t B = c.size(0), C = c.size(1), S = B && C ? c.numel() / (B * C) : 0;
  const auto res_type = c.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor res = at::zeros({B}, c.options().dtype(res_type));
  if (c.numel() == 0) return res;  // no positions (or no channels: every cosine 0): mean 0, as the eager math
  const int64_t nblk = (S + kPos - 1) / kPos;
  const std::vector<double> sv = scale_values(scale_t, scale, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastguide_mahiro_sim", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* cp = c.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    std::vector<acc_t> part(B * nblk);  // per block: the sum of its cosines, added in block order below
    at::parallel_for(0, B * nblk, 1, [&](int64_t begin, int64_t end) {
      acc_t dot[kPos], aa[kPos], mm[kPos];
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nblk, p0 = (t % nblk) * kPos, n = std::min(kPos, S - p0);
        const acc_t s = acc_t(sv[b]);
        for (int64_t i = 0; i < n; ++i) dot[i] = aa[i] = mm[i] = 0;
        for (int64_t k = 0; k < C; ++k) {
          const int64_t base = (b * C + k) * S + p0;
          mahiro_sums(cp + base, up + base, n, s, dot, aa, mm);
        }
        acc_t sum = 0;
        const acc_t eps = acc_t(1e-8);
        for (int64_t i = 0; i < n; ++i) {
          const acc_t na = std::max(std::sqrt(aa[i]), eps), nm = std::max(std::sqrt(mm[i]), eps);
          sum = sum + dot[i] / (na * nm);
        }
        part[t] = sum;
      }
    });
    using res_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    res_t* rp = res.mutable_data_ptr<res_t>();
    for (int64_t b = 0; b < B; ++b) {
      acc_t s = 0;
      for (int64_t q = 0; q < nblk; ++q) s = s + part[b * nblk + q];
      rp[b] = static_cast<res_t>(s / acc_t(S));
    }
  });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("cfg_norm", &cfg_norm_cpu);
  m.impl("mahiro_sim", &mahiro_sim_cpu);
}

}  // namespace fastguide
