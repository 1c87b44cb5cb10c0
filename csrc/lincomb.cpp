// The multi-branch family: methods that mix K predictions (dual CFG / InstructPix2Pix, Perp-Neg, two-model
// guidance such as RLG and autoguidance, Mahiro's final mix).
//   lincomb:    out = w0 p0 + sum_{k>=1} wk (pk - p0), weights per sample ([B, K] tensor) or K floats; one pass.
//   diff_stats: per contiguous group of group_size elements, <a - r, b - r>, |a - r|^2, |b - r|^2; one pass.
// Differences are taken before the products (as CFG's u + s (c - u)), so the close predictions cancel exactly.
// Arithmetic in fp32 (fp64 for fp64 inputs, which also get fp64 weights and fp64 statistics).
// The schemas are defined in Python (fastguide/ops.py SCHEMAS); this file registers only the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

namespace fastguide {
namespace {

constexpr int64_t kMaxPreds = 4;

template <typename scalar_t, int K>
void lincomb_run(const scalar_t* const* p, scalar_t* out, int64_t n, const at::opmath_type<scalar_t>* w) {
  // Local restrict pointers and weights: without them the stores to out may alias the inputs and the weights,
  // and the loop is neither hoisted nor vectorised (16x slower than cfg's loop).
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* __restrict__ p0 = p[0];
  const scalar_t* __restrict__ p1 = K > 1 ? p[1] : p[0];
  const scalar_t* __restrict__ p2 = K > 2 ? p[2] : p[0];
  const scalar_t* __restrict__ p3 = K > 3 ? p[3] : p[0];
  scalar_t* __restrict__ o = out;
  const acc_t w0 = w[0], w1 = K > 1 ? w[1] : acc_t(0), w2 = K > 2 ? w[2] : acc_t(0), w3 = K > 3 ? w[3] : acc_t(0);
  for (int64_t i = 0; i < n; ++i) {
    const acc_t x0 = static_cast<acc_t>(p0[i]);
    acc_t r = w0 * x0;
    if constexpr (K > 1) r = r + w1 * (static_cast<acc_t>(p1[i]) - x0);
    if constexpr (K > 2) r = r + w2 * (static_cast<acc_t>(p2[i]) - x0);
    if constexpr (K > 3) r = r + w3 * (static_cast<acc_t>(p3[i]) - x0);
    o[i] = static_cast<scalar_t>(r);
  }
}

at::Tensor lincomb_cpu(at::TensorList preds_in, const c10::optional<at::Tensor>& weights_t,
                       c10::ArrayRef<double> weights) {
  const int64_t K = static_cast<int64_t>(preds_in.size());
  TORCH_CHECK(K >= 1 && K <= kMaxPreds, "fastguide.lincomb: takes 1 to ", kMaxPreds, " predictions, got ", K);
  for (int64_t k = 1; k < K; ++k) check_inputs("lincomb", preds_in[0], preds_in[k], "preds[k]");
  const at::Tensor& p0 = preds_in[0];
  TORCH_CHECK(p0.is_floating_point() && p0.dim() >= 2, "fastguide.lincomb: preds must be floating tensors with "
              ">= 2 dims (batch first), got ", p0.scalar_type(), " of shape ", p0.sizes());
  const int64_t B = p0.size(0);
  if (weights_t.has_value()) {
    const at::Tensor& w = *weights_t;
    TORCH_CHECK((w.dim() == 1 && w.size(0) == K) || (w.dim() == 2 && w.size(0) == B && w.size(1) == K),
                "fastguide.lincomb: weights_t must be of shape [", K, "] or [", B, ", ", K, "], got ", w.sizes());
    TORCH_CHECK(w.device() == p0.device(), "fastguide.lincomb: weights_t must be on the predictions' device");
  } else {
    TORCH_CHECK(static_cast<int64_t>(weights.size()) == K, "fastguide.lincomb: ", K, " weights expected, got ",
                weights.size());
  }
  std::vector<at::Tensor> preds;
  for (const at::Tensor& p : preds_in) preds.push_back(p.contiguous());
  at::Tensor out = new_output(preds[0]);
  if (p0.numel() == 0) return out;
  const int64_t per_sample = p0.numel() / B;
  // Host weights [B][K] in double (CPU tensors: no device sync).
  std::vector<double> w(B * K);
  if (weights_t.has_value()) {
    const at::Tensor f = weights_t->to(at::kDouble).contiguous();
    const double* fp = f.const_data_ptr<double>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) w[b * K + k] = fp[(f.dim() == 2 ? b * K : 0) + k];
  } else {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) w[b * K + k] = weights[k];
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p0.scalar_type(), "fastguide_lincomb", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> wa(w.begin(), w.end());  // narrowed once: fp32 unless the inputs are fp64
    std::array<const scalar_t*, kMaxPreds> ptrs{};
    for (int64_t k = 0; k < K; ++k) ptrs[k] = preds[k].const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_sample_run(B, per_sample, [&](int64_t s, int64_t lo, int64_t hi) {
      const scalar_t* p[kMaxPreds] = {ptrs[0] + lo, K > 1 ? ptrs[1] + lo : nullptr, K > 2 ? ptrs[2] + lo : nullptr,
                                      K > 3 ? ptrs[3] + lo : nullptr};
      const acc_t* ws = wa.data() + s * K;
      switch (K) {  // K as a template argument: the inner loop is unrolled and vectorised
        case 1: lincomb_run<scalar_t, 1>(p, op + lo, hi - lo, ws); break;
        case 2: lincomb_run<scalar_t, 2>(p, op + lo, hi - lo, ws); break;
        case 3: lincomb_run<scalar_t, 3>(p, op + lo, hi - lo, ws); break;
        default: lincomb_run<scalar_t, 4>(p, op + lo, hi - lo, ws); break;
      }
    });
  });
  return out;
}

at::Tensor diff_stats_cpu(const at::Tensor& base_in, const at::Tensor& a_in, const at::Tensor& b_in,
                          int64_t group_size) {
  check_inputs("diff_stats", base_in, a_in, "a");
  check_inputs("diff_stats", base_in, b_in, "b");
  TORCH_CHECK(group_size >= 0, "fastguide.diff_stats: group_size must be >= 0, got ", group_size);
  const at::Tensor r = base_in.contiguous(), a = a_in.contiguous(), b = b_in.contiguous();
  const auto res_type = r.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t G = group_size ? r.numel() / group_size : r.size(0);
  TORCH_CHECK(group_size == 0 || r.numel() % group_size == 0, "fastguide.diff_stats: group_size ", group_size,
              " does not divide ", r.numel(), " elements");
  at::Tensor res = at::zeros({G, 3}, r.options().dtype(res_type));
  if (group_size == 0 || G == 0) return res;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "fastguide_diff_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.const_data_ptr<scalar_t>();
    // Fixed chunks of 4096 elements per group, added in order: deterministic for any thread count.
    constexpr int64_t kChunk = 4096;
    const int64_t nq = (group_size + kChunk - 1) / kChunk;
    std::vector<acc_t> part(G * nq * 3);
    at::parallel_for(0, G * nq, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t g = t / nq, q = t % nq;
        const int64_t lo = g * group_size + q * kChunk, hi = std::min(lo + kChunk, (g + 1) * group_size);
        // kLanes independent partial sums (vectorised without reassociation), added in lane order at the end.
        constexpr int kLanes = 16;
        acc_t ab[kLanes] = {}, aa[kLanes] = {}, bb[kLanes] = {};
        int64_t i = lo;
        for (; i + kLanes <= hi; i += kLanes) {
          for (int l = 0; l < kLanes; ++l) {
            const acc_t x0 = static_cast<acc_t>(rp[i + l]);
            const acc_t da = static_cast<acc_t>(ap[i + l]) - x0, db = static_cast<acc_t>(bp[i + l]) - x0;
            ab[l] = ab[l] + da * db;
            aa[l] = aa[l] + da * da;
            bb[l] = bb[l] + db * db;
          }
        }
        for (int l = 0; i < hi; ++i, ++l) {
          const acc_t x0 = static_cast<acc_t>(rp[i]);
          const acc_t da = static_cast<acc_t>(ap[i]) - x0, db = static_cast<acc_t>(bp[i]) - x0;
          ab[l] = ab[l] + da * db;
          aa[l] = aa[l] + da * da;
          bb[l] = bb[l] + db * db;
        }
        acc_t sab = 0, saa = 0, sbb = 0;
        for (int l = 0; l < kLanes; ++l) {
          sab = sab + ab[l];
          saa = saa + aa[l];
          sbb = sbb + bb[l];
        }
        part[t * 3 + 0] = sab;
        part[t * 3 + 1] = saa;
        part[t * 3 + 2] = sbb;
      }
    });
    using res_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    res_t* out = res.mutable_data_ptr<res_t>();
    for (int64_t g = 0; g < G; ++g)
      for (int c = 0; c < 3; ++c) {
        acc_t s = 0;
        for (int64_t q = 0; q < nq; ++q) s = s + part[(g * nq + q) * 3 + c];
        out[g * 3 + c] = static_cast<res_t>(s);
      }
  });
  return res;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastguide, CPU, m) {
  m.impl("lincomb", &lincomb_cpu);
  m.impl("diff_stats", &diff_stats_cpu);
}

}  // namespace fastguide
