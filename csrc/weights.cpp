// guide_weights: the per-sample coefficients of the multi-pass methods (MAG, TCFG, Perp-Neg, Mahiro, RenormCFG),
// computed from their statistics pass in one call, for the combine pass that follows (cfg or lincomb).
// Without it each method spent 10-30 small [B]-sized torch ops between its two fused passes (a kernel launch
// each on a GPU, ~10 us each on CPU: more than both passes at SD1.5 size).
//   stats: [B, k] (or [B]) fp32 / fp64, the statistics pass's output; columns 0..2 = <x,y>, |x|^2, |y|^2
//          (guidance_stats: x = cond, y = uncond; diff_stats: x = cond - empty, y = uncond - empty), Mahiro: sim.
//   out:   [B, K] in stats' dtype (K per method, fastguide/ops.py WEIGHT_METHODS); the math is in double.
// Each method's formula is written once here, once in kernels/weights.py and once in fastguide/_eager.py
// (the float64 reference), in the same order of operations.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "common.h"

namespace fastguide {
namespace {

enum Method : int64_t {
  kMag = 0, kMagOriginal, kTcfg, kTcfgOriginal, kPerpNeg, kPerpNegBatch, kMahiro, kMahiroBatch, kRenorm, kMethods
};
constexpr int64_t kCols[kMethods] = {1, 1, 2, 2, 3, 3, 2, 2, 2};   // output columns
constexpr int64_t kNeed[kMethods] = {3, 3, 3, 3, 3, 3, 1, 1, 3};   // stats columns read

// TCFG: u' = p c + q u, the projection of u on the leading eigenvector e of the Gram matrix
// G = [[cc, cu], [cu, uu]] (= U S^2 U^T of [c; u]): lam = m + r, m = (cc + uu) / 2, r = |((cc - uu) / 2, cu)|;
// e from the better-conditioned row of (G - lam I); p = e0 k, q = e1 k, k = <u, e-combination> / lam.
// e's sign cancels. A multiple of the identity (any e) takes e = (1, 0), as LAPACK's SVD of a diagonal matrix.
inline void tcfg_pq(double cu, double cc, double uu, double& p, double& q) {
  const double d = (cc - uu) / 2, r = std::sqrt(d * d + cu * cu), lam = (cc + uu) / 2 + r;
  double e0 = d >= 0 ? d + r : cu, e1 = d >= 0 ? cu : r - d;
  const double n = std::sqrt(e0 * e0 + e1 * e1);
  if (n > 0) {
    e0 /= n;
    e1 /= n;
  } else {
    e0 = 1;
    e1 = 0;
  }
  const double k = lam > 0 ? (e0 * cu + e1 * uu) / lam : 0.0;
  p = k * e0;
  q = k * e1;
}

template <typename T>
void weights_run(const T* st, int64_t sb, int64_t sc, int64_t B, int64_t method, const std::vector<double>& s,
                 const std::vector<double>& s2, double param, T* out) {
  const int64_t K = kCols[method];
  auto col = [&](int64_t b, int64_t c) { return static_cast<double>(st[b * sb + c * sc]); };
  // Perp-Neg / Mahiro as ComfyUI: one projection / one similarity for the whole batch.
  double sum0 = 0, sum1 = 0;
  if (method == kPerpNegBatch || method == kMahiroBatch) {
    for (int64_t b = 0; b < B; ++b) {
      sum0 += col(b, 0);
      if (method == kPerpNegBatch) sum1 += col(b, 1);
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    double w[3] = {0, 0, 0};
    switch (method) {
      case kMag:
      case kMagOriginal: {  // |u| = 0: inf or nan, as diffusers
        const double cu = col(b, 0), cc = col(b, 1), uu = col(b, 2);
        const double ratio = std::sqrt(std::max(cc - 2 * cu + uu, 0.0)) / std::sqrt(uu);
        const double e = std::exp(-param * ratio);
        w[0] = method == kMagOriginal ? s[b] * e : 1.0 + (s[b] - 1.0) * e;
        break;
      }
      case kTcfg:
      case kTcfgOriginal: {  // out = a c + b u as lincomb([u, c]): weights (a + b, a)
        double p, q;
        tcfg_pq(col(b, 0), col(b, 1), col(b, 2), p, q);
        const double a = method == kTcfgOriginal ? 1.0 + s[b] - s[b] * p : s[b] + (1.0 - s[b]) * p;
        const double bb = method == kTcfgOriginal ? -s[b] * q : (1.0 - s[b]) * q;
        w[0] = a + bb;
        w[1] = a;
        break;
      }
      case kPerpNeg:
      case kPerpNegBatch: {  // lincomb([empty, cond, uncond]); |P| = 0: no projection
        const double pn = method == kPerpNegBatch ? sum0 : col(b, 0), pp = method == kPerpNegBatch ? sum1 : col(b, 1);
        const double alpha = pp > 0 ? pn / pp : 0.0;
        w[0] = 1.0;
        w[1] = s[b] * (1.0 + s2[b] * alpha);
        w[2] = -s[b] * s2[b];
        break;
      }
      case kMahiro:
      case kMahiroBatch: {  // lincomb([uncond, cond])
        const double sim = method == kMahiroBatch ? (B ? sum0 / static_cast<double>(B) : 0.0) : col(b, 0);
        const double k = 2 * (sim + 1);
        w[0] = s[b] + k * (1.0 - s[b]) / 4;
        w[1] = s[b];
        break;
      }
      default: {  // kRenorm: |g|^2 from the Gram sums, g = u + s (c - u); lincomb([uncond, cond])
        const double cu = col(b, 0), cc = col(b, 1), uu = col(b, 2), sv = s[b];
        const double gg = std::max((1 - sv) * (1 - sv) * uu + 2 * sv * (1 - sv) * cu + sv * sv * cc, 0.0);
        const double ng = std::sqrt(gg), nmax = param * std::sqrt(cc);
        const double f = (ng >= nmax && ng > 0) ? nmax / ng : 1.0;
        w[0] = f;
        w[1] = f * sv;
        break;
      }
    }
    for (int64_t k = 0; k < K; ++k) out[b * K + k] = static_cast<T>(w[k]);
  }
}

at::Tensor guide_weights_cpu(const at::Tensor& stats, int64_t method, const c10::optional<at::Tensor>& scale_t,
                             double scale, const c10::optional<at::Tensor>& scale2_t, double scale2, double param) {
  TORCH_CHECK(method >= 0 && method < kMethods, "fastguide.guide_weights: method must be in 0..", kMethods - 1,
              ", got ", method);
  TORCH_CHECK((stats.dim() == 1 || stats.dim() == 2) &&
                  (stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble),
              "fastguide.guide_weights: stats must be a float32 or float64 tensor [B] or [B, k], got ",
              stats.scalar_type(), " of shape ", stats.sizes());
  const int64_t B = stats.size(0), ncols = stats.dim() == 2 ? stats.size(1) : 1;
  TORCH_CHECK(ncols >= kNeed[method], "fastguide.guide_weights: method ", method, " reads ", kNeed[method],
              " stats columns, got ", ncols);
  for (const auto* t : {&scale_t, &scale2_t}) {
    if (!t->has_value()) continue;
    TORCH_CHECK((*t)->dim() == 0 || ((*t)->dim() == 1 && (*t)->size(0) == B), "fastguide.guide_weights: scales "
                "must be 0-d or of shape [", B, "], got ", (*t)->sizes());
    TORCH_CHECK((*t)->device() == stats.device(), "fastguide.guide_weights: scales must be on the stats' device");
  }
  const std::vector<double> s = scale_values(scale_t, scale, B), s2 = scale_values(scale2_t, scale2, B);
  at::Tensor out = at::empty({B, kCols[method]}, stats.options());
  const int64_t sb = stats.stride(0), sc = stats.dim() == 2 ? stats.stride(1) : 0;
  AT_DISPATCH_FLOATING_TYPES(stats.scalar_type(), "fastguide_guide_weights", [&] {
    weights_run<scalar_t>(stats.const_data_ptr<scalar_t>(), sb, sc, B, method, s, s2, param,
                          out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) { m.impl("guide_weights", &guide_weights_cpu); }

}  // namespace fastguide
