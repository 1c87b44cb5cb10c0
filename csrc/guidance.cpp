// Fused CPU kernels of the guidance-combine family.
//
// Passes over memory:
//   * CFG / PAG without rescale: one pass (each input read once, the output written once).
//   * rescale or CFG-Zero*: pass 1 reads the inputs once and writes per-chunk moments
//     (10 numbers per 4096 elements, 1024 for fp16); pass 2 recomputes the combination and writes the output.
// Arithmetic is in at::opmath_type<T> (fp32 for fp16/bf16/fp32, fp64 for fp64 inputs: scales,
// moments and coefficients included). The element loops are in kernels.inc (one copy per ISA).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <cmath>
#include <limits>
#include <vector>

namespace fastguide {
namespace {

// Moments are taken per chunk: each chunk is summed, then centred on its own mean in a second sweep
// while it is in L1/L2, so no E[x^2] - E[x]^2 cancellation ever happens; chunks are merged with the
// exact mean-correction formula in a fixed order (deterministic, no atomics). Chunk partials are acc_t
// values (fp32, fp64 for fp64 inputs) kept in doubles. An fp16 chunk is one staging block of the kernels.
template <typename T>
constexpr int64_t kChunk = std::is_same_v<T, c10::Half> ? isa::kBlock : 4096;
// Partial layout: n, sum(u), sum(d), sum(e), then the centred co-moments of (u, d, e)
// with d = c - u and e = c - p: M_uu, M_ud, M_ue, M_dd, M_de, M_ee.
constexpr int kStats = 10;

template <typename acc_t>
struct Coef {
  acc_t alpha, s1, s2, f;
};

// Merge a sample's chunk partials and turn them into the combine coefficients.
// g = w_u u + w_d d + w_e e, so var(g) = w^T M w; c = u + d, so var(c) = M_uu + 2 M_ud + M_dd.
template <typename acc_t>
void finalize(const double* part, int64_t nchunks, bool zero_star, bool original, double rescale,
              Coef<acc_t>& k) {
  acc_t N = 0, S[3] = {};
  for (int64_t q = 0; q < nchunks; ++q) {
    const double* pq = part + q * kStats;
    N += static_cast<acc_t>(pq[0]);
    for (int v = 0; v < 3; ++v) S[v] += static_cast<acc_t>(pq[1 + v]);
  }
  const acc_t mean[3] = {S[0] / N, S[1] / N, S[2] / N};
  acc_t M[6] = {};
  static constexpr int kI[6] = {0, 0, 0, 1, 1, 2}, kJ[6] = {0, 1, 2, 1, 2, 2};
  for (int64_t q = 0; q < nchunks; ++q) {
    const double* pq = part + q * kStats;
    const acc_t n = static_cast<acc_t>(pq[0]);
    acc_t dm[3];
    for (int v = 0; v < 3; ++v) dm[v] = static_cast<acc_t>(pq[1 + v]) / n - mean[v];
    for (int t = 0; t < 6; ++t) M[t] += static_cast<acc_t>(pq[4 + t]) + n * dm[kI[t]] * dm[kJ[t]];
  }
  const acc_t Muu = M[0], Mud = M[1], Mue = M[2], Mdd = M[3], Mde = M[4], Mee = M[5];
  k.alpha = 1;
  if (zero_star) {
    // diffusers' cfg_zero_star_scale: <c,u> / (|u|^2 + 1e-8), raw (uncentred) sums.
    const acc_t uu = Muu + N * mean[0] * mean[0];
    const acc_t cu = uu + Mud + N * mean[0] * mean[1];
    k.alpha = cu / (uu + static_cast<acc_t>(1e-8));
  }
  k.f = 1;
  if (rescale > 0) {
    const acc_t a = k.alpha, s1 = k.s1, s2 = k.s2;
    const acc_t wu = original ? 1 + s1 * (1 - a) : a + s1 * (1 - a);
    const acc_t wd = original ? 1 + s1 : s1;
    const acc_t we = s2;
    const acc_t Mgg = wu * wu * Muu + wd * wd * Mdd + we * we * Mee +
                      2 * (wu * wd * Mud + wu * we * Mue + wd * we * Mde);
    const acc_t Mcc = Muu + 2 * Mud + Mdd;
    // diffusers divides by std(g) unguarded and returns NaN/inf when it is 0 (issue #13425);
    // a constant guided prediction has nothing to rescale, so it is returned unchanged (Mgg <= 0 also
    // catches a rounding-negative zero variance). A NaN variance (a NaN in the sample) is NOT guarded:
    // it makes the whole sample NaN, as in diffusers, instead of silently skipping the rescale.
    if (N > 1 && !(Mgg <= 0)) {
      const acc_t r = static_cast<acc_t>(rescale);
      k.f = r * std::sqrt(std::max(Mcc, acc_t(0)) / Mgg) + (1 - r);
    }
  }
}

template <typename T, bool HAS_P>
void guide_kernel(const at::Tensor& cond, const at::Tensor& uncond, const at::Tensor& pert,
                  const c10::optional<at::Tensor>& s1_t, double s1, const c10::optional<at::Tensor>& s2_t,
                  double s2, double rescale, bool original, bool zero_star, at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const int64_t B = cond.size(0);
  const int64_t N = B == 0 ? 0 : cond.numel() / B;
  const T* c = cond.const_data_ptr<T>();
  const T* u = uncond.const_data_ptr<T>();
  const T* p = HAS_P ? pert.const_data_ptr<T>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  if (B == 0 || N == 0) return;

  const isa::Kernels& K = kernels_for<T>();
  const std::vector<double> sv1 = scale_values(s1_t, s1, B), sv2 = scale_values(s2_t, s2, B);
  std::vector<Coef<acc_t>> coef(B);
  for (int64_t b = 0; b < B; ++b)
    coef[b] = {acc_t(1), static_cast<acc_t>(sv1[b]), HAS_P ? static_cast<acc_t>(sv2[b]) : acc_t(0), acc_t(1)};

  if (zero_star || rescale > 0) {
    constexpr int64_t chunk = kChunk<T>;
    const int64_t nchunks = (N + chunk - 1) / chunk;
    std::vector<double> part(B * nchunks * kStats);
    at::parallel_for(0, B * nchunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t b = t / nchunks, q = t % nchunks;
        const int64_t lo = b * N + q * chunk, hi = std::min(lo + chunk, (b + 1) * N);
        K.moments[HAS_P](c + lo, u + lo, HAS_P ? p + lo : nullptr, hi - lo, part.data() + t * kStats);
      }
    });
    for (int64_t b = 0; b < B; ++b)
      finalize<acc_t>(part.data() + b * nchunks * kStats, nchunks, zero_star, original, rescale, coef[b]);
  }

  // Pass 2 (or the only pass): out = f * (base + s1 * (c - alpha u) + s2 * (c - p)), in diffusers'
  // operation order (kernels.inc), so that alpha = f = 1 reproduces its fp32 result bit for bit.
  for_each_sample_run(B, N, [&](int64_t b, int64_t lo, int64_t hi) {
    const double k[4] = {coef[b].alpha, coef[b].s1, coef[b].s2, coef[b].f};
    K.combine[HAS_P](c + lo, u + lo, HAS_P ? p + lo : nullptr, o + lo, hi - lo, k, original);
  });
}

at::Tensor guide_cpu(const char* op, const at::Tensor& cond, const at::Tensor& uncond,
                     const c10::optional<at::Tensor>& perturbed, const c10::optional<at::Tensor>& s1_t,
                     double s1, const c10::optional<at::Tensor>& s2_t, double s2, double rescale, bool original,
                     bool zero_star) {
  check_inputs(op, cond, uncond, "uncond");
  if (perturbed.has_value()) check_inputs(op, cond, *perturbed, "perturbed");
  check_scale(op, s1_t, "scale", cond);
  check_scale(op, s2_t, "pag_scale", cond);
  // Kernels index flat memory: non-contiguous inputs are packed once here.
  const at::Tensor c = cond.contiguous(), u = uncond.contiguous();
  const at::Tensor p = perturbed.has_value() ? perturbed->contiguous() : at::Tensor();
  at::Tensor out = new_output(cond);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cond.scalar_type(), "fastguide_guide", [&] {
    if (p.defined())
      guide_kernel<scalar_t, true>(c, u, p, s1_t, s1, s2_t, s2, rescale, original, zero_star, out);
    else
      guide_kernel<scalar_t, false>(c, u, p, s1_t, s1, s2_t, s2, rescale, original, zero_star, out);
  });
  return out;
}

at::Tensor cfg_cpu(const at::Tensor& cond, const at::Tensor& uncond, const c10::optional<at::Tensor>& scale_t,
                   double scale, double rescale, bool original) {
  return guide_cpu("cfg", cond, uncond, c10::nullopt, scale_t, scale, c10::nullopt, 0.0, rescale, original, false);
}

at::Tensor pag_cpu(const at::Tensor& cond, const at::Tensor& uncond, const at::Tensor& perturbed,
                   const c10::optional<at::Tensor>& scale_t, double scale, const c10::optional<at::Tensor>& pag_t,
                   double pag_scale, double rescale, bool original) {
  return guide_cpu("pag", cond, uncond, perturbed, scale_t, scale, pag_t, pag_scale, rescale, original, false);
}

at::Tensor cfg_zero_star_cpu(const at::Tensor& cond, const at::Tensor& uncond,
                             const c10::optional<at::Tensor>& scale_t, double scale, double rescale, bool original) {
  return guide_cpu("cfg_zero_star", cond, uncond, c10::nullopt, scale_t, scale, c10::nullopt, 0.0, rescale,
                   original, true);
}

// APMix's CFG phase: cfg's output (its one-pass combine, so bitwise equal to cfg without rescale) and
// buf = (c - u) + momentum * buf in place, in one pass over memory: each 2048-element slice of c and u is
// read from memory by the combine and again from L1 by the momentum update (5 tensor moves, not 11).
at::Tensor cfg_momentum_cpu(const at::Tensor& cond_in, const at::Tensor& uncond_in,
                            const c10::optional<at::Tensor>& scale_t, double scale, bool original, double momentum,
                            const at::Tensor& buf) {
  check_inputs("cfg_momentum", cond_in, uncond_in, "uncond");
  check_inputs("cfg_momentum", cond_in, buf, "momentum_buffer");
  check_scale("cfg_momentum", scale_t, "scale", cond_in);
  TORCH_CHECK(buf.is_contiguous(), "fastguide.cfg_momentum: momentum_buffer must be contiguous");
  const at::Tensor c = cond_in.contiguous(), u = uncond_in.contiguous();
  at::Tensor out = new_output(c);
  const int64_t B = c.size(0), N = B == 0 ? 0 : c.numel() / B;
  if (B == 0 || N == 0) return out;
  const std::vector<double> s = scale_values(scale_t, scale, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastguide_cfg_momentum", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const isa::Kernels& K = kernels_for<scalar_t>();
    const scalar_t *cp = c.const_data_ptr<scalar_t>(), *up = u.const_data_ptr<scalar_t>();
    scalar_t* bp = buf.mutable_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const double mu = static_cast<acc_t>(momentum);
    for_each_sample_run(B, N, [&](int64_t b, int64_t lo, int64_t hi) {
      const double k[4] = {1.0, static_cast<double>(static_cast<acc_t>(s[b])), 0.0, 1.0};
      for (int64_t i = lo; i < hi; i += 2048) {
        const int64_t n = std::min<int64_t>(2048, hi - i);
        K.combine[0](cp + i, up + i, nullptr, op + i, n, k, original);
        K.momentum(cp + i, up + i, bp + i, mu, n);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("cfg_momentum", &cfg_momentum_cpu);
  m.impl("cfg", &cfg_cpu);
  m.impl("pag", &pag_cpu);
  m.impl("cfg_zero_star", &cfg_zero_star_cpu);
}

}  // namespace fastguide
