// Fused CPU kernels of the projection family: APG (Sadat et al.) and per-group guidance statistics.
//
// Norm groups are contiguous runs of K = group_size elements of the flattened, contiguous input
// (the Python wrapper permutes the reduced dims of `norm_dim` to the end first). Each group is
// split into chunks of at most kChunk elements; a chunk's sums are accumulated in SIMD lanes (fp32,
// fp64 for fp64 inputs) and the chunks of a group are added in a fixed order: deterministic, no atomics.
// The element loops are in kernels.inc (one copy per ISA); fp64 inputs get fp64 scales, eta, threshold,
// momentum and sums.
//
// APG, two passes over memory:
//   pass 1 reads c, u (and the momentum buffer), writes the updated buffer in place and sums
//          |m|^2, <m, c>, |c|^2 per group, m = (c - u) [+ momentum * buffer];
//   pass 2 reads c, u (and the buffer) and writes
//          out = base + s * (k m + (eta - 1) beta c),  base = u (c when original),
//          k = min(1, threshold / |m|) (1 without threshold), beta = k <m, c> / max(|c|, 1e-12)^2.
// That is diffusers' normalized_guidance: parallel = beta c, orthogonal = k m - parallel,
// update = orthogonal + eta * parallel, with its F.normalize eps and its min(1, thr / 0) = 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace fastguide {
namespace {

constexpr int64_t kChunk = 8192;

struct Layout {
  int64_t G, K, nq, B, per_sample;  // groups, group size, chunks per group, batch, elements per sample
  int64_t lo(int64_t t) const { return (t / nq) * K + (t % nq) * kChunk; }
  int64_t hi(int64_t t) const { return std::min(lo(t) + kChunk, (t / nq + 1) * K); }
  int64_t sample(int64_t g) const { return (g * K) / per_sample; }
};

// group_size may be 0 only for an empty input: then there are cond.size(0) empty groups (one per
// sample, what the wrappers' default norm_dim=None means).
Layout layout_of(const at::Tensor& cond, int64_t group_size, const char* op) {
  const int64_t numel = cond.numel();
  TORCH_CHECK(group_size >= 1 ? numel % group_size == 0 : group_size == 0 && numel == 0, "fastguide.", op,
              ": group_size must divide ", numel, " elements (0 only for an empty input), got ", group_size);
  Layout L;
  L.K = group_size;
  L.G = group_size ? numel / group_size : cond.size(0);
  L.nq = (L.K + kChunk - 1) / kChunk;
  L.B = cond.size(0);
  L.per_sample = L.B ? numel / L.B : 1;
  return L;
}

// Tasks are (group, chunk) pairs; a grain of ~32K elements keeps tiny groups from becoming tiny tasks.
template <typename F>
void for_each_chunk(const Layout& L, F&& fn) {
  if (L.G * L.nq == 0) return;  // an empty input
  const int64_t len = std::min(L.K, kChunk);
  at::parallel_for(0, L.G * L.nq, std::max<int64_t>(1, 32768 / len), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) fn(t, L.lo(t), L.hi(t));
  });
}

template <typename T, bool MOM>
void apg_kernel(const at::Tensor& cond, const at::Tensor& uncond, at::Tensor* buffer, const Layout& L,
                const std::vector<double>& scale, double eta, double thr, double momentum, bool original,
                at::Tensor& out) {
  using acc_t = at::opmath_type<T>;
  const isa::Kernels& K = kernels_for<T>();
  const T* c = cond.const_data_ptr<T>();
  const T* u = uncond.const_data_ptr<T>();
  T* buf = MOM ? buffer->mutable_data_ptr<T>() : nullptr;
  T* o = out.mutable_data_ptr<T>();
  // The momentum as the arithmetic type (fp32 unless the inputs are fp64).
  const double mu = static_cast<acc_t>(momentum);

  std::vector<double> part(L.G * L.nq * 3);
  for_each_chunk(L, [&](int64_t t, int64_t lo, int64_t hi) {
    K.apg_update[MOM](c + lo, u + lo, MOM ? buf + lo : nullptr, mu, hi - lo, part.data() + t * 3);
  });

  // Per-group coefficients (k, beta), chunks summed in order.
  std::vector<acc_t> kk(L.G), beta(L.G);
  for (int64_t g = 0; g < L.G; ++g) {
    acc_t smm = 0, smc = 0, scc = 0;
    for (int64_t q = 0; q < L.nq; ++q) {
      const double* p = part.data() + (g * L.nq + q) * 3;
      smm += static_cast<acc_t>(p[0]);
      smc += static_cast<acc_t>(p[1]);
      scc += static_cast<acc_t>(p[2]);
    }
    // thr / 0 = inf and min(1, inf) = 1, as in diffusers.
    const acc_t k = thr > 0 ? std::min<acc_t>(1, static_cast<acc_t>(thr) / std::sqrt(smm)) : acc_t(1);
    const acc_t nc = std::max<acc_t>(std::sqrt(scc), static_cast<acc_t>(1e-12));
    kk[g] = k;
    beta[g] = k * smc / (nc * nc);
  }

  const acc_t em1 = static_cast<acc_t>(eta) - 1;
  for_each_chunk(L, [&](int64_t t, int64_t lo, int64_t hi) {
    const int64_t g = t / L.nq;
    K.apg_combine[MOM](c + lo, u + lo, MOM ? buf + lo : nullptr, o + lo, hi - lo, kk[g], em1 * beta[g],
                       static_cast<acc_t>(scale[L.sample(g)]), original);
  });
}

at::Tensor apg_cpu(const at::Tensor& cond_in, const at::Tensor& uncond_in, const c10::optional<at::Tensor>& scale_t,
                   double scale, double eta, double norm_threshold, double momentum,
                   const c10::optional<at::Tensor>& momentum_buffer, int64_t group_size, bool original) {
  check_inputs("apg", cond_in, uncond_in, "uncond");
  check_scale("apg", scale_t, "scale", cond_in);
  TORCH_CHECK(norm_threshold >= 0, "fastguide.apg: norm_threshold must be >= 0, got ", norm_threshold);
  if (momentum_buffer.has_value()) {
    check_inputs("apg", cond_in, *momentum_buffer, "momentum_buffer");
    TORCH_CHECK(momentum_buffer->is_contiguous(), "fastguide.apg: momentum_buffer must be contiguous");
  }
  const Layout L = layout_of(cond_in, group_size, "apg");
  const at::Tensor c = cond_in.contiguous(), u = uncond_in.contiguous();
  at::Tensor out = new_output(c);
  if (c.numel() == 0) return out;
  const std::vector<double> s = scale_values(scale_t, scale, L.B);
  at::Tensor buf = momentum_buffer.has_value() ? *momentum_buffer : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastguide_apg", [&] {
    if (buf.defined())
      apg_kernel<scalar_t, true>(c, u, &buf, L, s, eta, norm_threshold, momentum, original, out);
    else
      apg_kernel<scalar_t, false>(c, u, nullptr, L, s, eta, norm_threshold, momentum, original, out);
  });
  return out;
}

// One pass: per group <c,u>, |c|^2, |u|^2, <c,g>, |g|^2, cos(c,u), cos(c,g) -> [G, 7] fp32
// (the guided columns are 0 without `guided`; an empty group gives zeros, cosines included).
template <typename T, bool HAS_G>
void stats_kernel(const T* c, const T* u, const T* gd, const Layout& L, float* res) {
  using acc_t = at::opmath_type<T>;
  const isa::Kernels& K = kernels_for<T>();
  std::vector<double> part(L.G * L.nq * 5);
  for_each_chunk(L, [&](int64_t t, int64_t lo, int64_t hi) {
    K.stats[HAS_G](c + lo, u + lo, HAS_G ? gd + lo : nullptr, hi - lo, part.data() + t * 5);
  });
  for (int64_t g = 0; g < L.G; ++g) {
    acc_t a[5] = {};
    for (int64_t q = 0; q < L.nq; ++q)
      for (int j = 0; j < 5; ++j) a[j] += static_cast<acc_t>(part[(g * L.nq + q) * 5 + j]);
    for (int j = 0; j < 5; ++j) res[g * 7 + j] = static_cast<float>(a[j]);
    // Cosines as F.cosine_similarity: each norm clamped at 1e-8.
    const acc_t eps = static_cast<acc_t>(1e-8);
    const acc_t nc = std::max(std::sqrt(a[1]), eps);
    res[g * 7 + 5] = static_cast<float>(a[0] / (nc * std::max(std::sqrt(a[2]), eps)));
    res[g * 7 + 6] = HAS_G ? static_cast<float>(a[3] / (nc * std::max(std::sqrt(a[4]), eps))) : 0.0f;
  }
}

at::Tensor guidance_stats_cpu(const at::Tensor& cond_in, const at::Tensor& uncond_in,
                              const c10::optional<at::Tensor>& guided, int64_t group_size) {
  check_inputs("guidance_stats", cond_in, uncond_in, "uncond");
  if (guided.has_value()) check_inputs("guidance_stats", cond_in, *guided, "guided");
  const Layout L = layout_of(cond_in, group_size, "guidance_stats");
  const at::Tensor c = cond_in.contiguous(), u = uncond_in.contiguous();
  const at::Tensor gd = guided.has_value() ? guided->contiguous() : at::Tensor();
  at::Tensor res = at::empty({L.G, 7}, c.options().dtype(at::kFloat));
  if (poison_outputs()) res.fill_(std::numeric_limits<double>::quiet_NaN());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "fastguide_stats", [&] {
    if (gd.defined())
      stats_kernel<scalar_t, true>(c.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(),
                                   gd.const_data_ptr<scalar_t>(), L, res.mutable_data_ptr<float>());
    else
      stats_kernel<scalar_t, false>(c.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), nullptr, L,
                                    res.mutable_data_ptr<float>());
  });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("apg", &apg_cpu);
  m.impl("guidance_stats", &guidance_stats_cpu);
}

}  // namespace fastguide
