"""Triton kernels of the multi-branch family (see csrc/lincomb.cpp).

`lincomb`: out = w0 p0 + sum_{k >= 1} wk (pk - p0) for K = 1..4 predictions, one pass, weights per sample
(a [B, K] tensor, any strides) or K floats. Differences before products, like CFG's `u + s (c - u)`: the
terms that cancel (the predictions are close) are subtracted exactly first.
`diff_stats`: per contiguous group, <a - r, b - r>, |a - r|^2, |b - r|^2 (Perp-Neg's projection), as
partial sums per tile then a fixed-order merge (apg.py's tiling): deterministic, no atomics, no host sync.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, new_output, run, scalar, tl_acc, warps_for
from .apg import _final_tiling, _group_sums, _groups, _tile, _tiling


@triton.jit
def _weight(w_ptr, w_sb, w_sk, s, k: tl.constexpr, wv, HAS_T: tl.constexpr, ACC: tl.constexpr):
    if HAS_T:
        return tl.load(w_ptr + s * w_sb + k * w_sk).to(ACC)
    return scalar(wv, ACC)


@triton.jit
def _lincomb(p0, p1, p2, p3, out_ptr, w_ptr, w_sb, w_sk, w0: tl.float64, w1: tl.float64, w2: tl.float64,
             w3: tl.float64, N, nblocks, K: tl.constexpr, HAS_T: tl.constexpr, ACC: tl.constexpr,
             BLOCK: tl.constexpr):
    # One flat grid axis over (sample, block), int64 offsets (as kernels/cfgpp.py).
    t = tl.program_id(0).to(tl.int64)
    s = t // nblocks
    idx = (t % nblocks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = s * N + idx
    x0 = tl.load(p0 + offs, mask=mask, other=0.0).to(ACC)
    out = _weight(w_ptr, w_sb, w_sk, s, 0, w0, HAS_T, ACC) * x0
    if K > 1:
        out += _weight(w_ptr, w_sb, w_sk, s, 1, w1, HAS_T, ACC) * (tl.load(p1 + offs, mask=mask, other=0.0).to(ACC) - x0)
    if K > 2:
        out += _weight(w_ptr, w_sb, w_sk, s, 2, w2, HAS_T, ACC) * (tl.load(p2 + offs, mask=mask, other=0.0).to(ACC) - x0)
    if K > 3:
        out += _weight(w_ptr, w_sb, w_sk, s, 3, w3, HAS_T, ACC) * (tl.load(p3 + offs, mask=mask, other=0.0).to(ACC) - x0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _plan_lincomb(preds, out, weights_t, weights, *, block=2048):
    """Launches for contiguous preds (1..4) into out ([] when empty)."""
    p0 = preds[0]
    B = p0.shape[0]
    N = p0.numel() // B if B else 0
    if N == 0:
        return []
    K = len(preds)
    ptrs = list(preds) + [p0] * (4 - K)
    if weights_t is not None:
        w2 = weights_t if weights_t.dim() == 2 else weights_t.view(1, -1).expand(B, K)  # [K]: stride 0 over samples
        wt, sb, sk, ws = w2, w2.stride(0), w2.stride(1), [0.0] * 4
    else:
        wt, sb, sk, ws = p0, 0, 0, [float(w) for w in weights] + [0.0] * (4 - K)
    nblocks = triton.cdiv(N, block)
    return [Launch(_lincomb, (B * nblocks,), (*ptrs, out, wt, sb, sk, *ws, N, nblocks),
                   dict(K=K, HAS_T=weights_t is not None, ACC=tl_acc(p0.dtype), BLOCK=block),
                   num_warps=warps_for(block))]


def lincomb(preds, weights_t, weights, *, block=2048):
    preds = [p.contiguous() for p in preds]
    out = new_output(preds[0])
    run(_plan_lincomb(preds, out, weights_t, weights, block=block))
    return out


@triton.jit
def _dstats(r_ptr, a_ptr, b_ptr, part_ptr, G, K, nq, ACC: tl.constexpr, GB: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g, offs, mask, gmask, prow = _tile(t, G, K, nq, GB, CHUNK)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(ACC)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC) - r
    b = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC) - r
    tl.store(part_ptr + prow * 3 + 0, tl.sum(a * b, axis=1), mask=gmask)
    tl.store(part_ptr + prow * 3 + 1, tl.sum(a * a, axis=1), mask=gmask)
    tl.store(part_ptr + prow * 3 + 2, tl.sum(b * b, axis=1), mask=gmask)


@triton.jit
def _dstats_final(part_ptr, res_ptr, G, nq, ACC: tl.constexpr, GBC: tl.constexpr, R: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * GBC + tl.arange(0, GBC)
    gmask = g < G
    for col in tl.static_range(3):
        v = _group_sums(part_ptr, g, gmask, nq, 3, col, ACC, GBC, R)
        tl.store(res_ptr + g * 3 + col, v.to(res_ptr.dtype.element_ty), mask=gmask)


def _plan_dstats(r, a, b, res, K, *, chunk=4096):
    G = res.shape[0]
    if G == 0:
        return []
    acc = tl_acc(r.dtype)
    if acc == tl.float64:  # three fp64 differences and sums per element: 4096-element tiles spill on sm_80
        chunk = min(chunk, 2048)
    plans = []
    if K == 0:  # empty groups: zero sums
        part, nq = torch.zeros((G, 3), dtype=res.dtype, device=r.device), 1
    else:
        gb, ch, nq, warps = _tiling(G, K, chunk)
        part = torch.empty((G * nq, 3), dtype=res.dtype, device=r.device)
        plans.append(Launch(_dstats, (triton.cdiv(G, gb) * nq,), (r, a, b, part, G, K, nq),
                            dict(ACC=acc, GB=gb, CHUNK=ch), num_warps=warps))
    gbc, rr = _final_tiling(G, nq)
    plans.append(Launch(_dstats_final, (triton.cdiv(G, gbc),), (part, res, G, nq), dict(ACC=acc, GBC=gbc, R=rr),
                        num_warps=4))
    return plans


def diff_stats(base, a, b, group_size, *, chunk=4096):
    r, a, b = base.contiguous(), a.contiguous(), b.contiguous()
    K = int(group_size)
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    res = torch.empty((_groups(r, K), 3), dtype=dt, device=r.device)
    run(_plan_dstats(r, a, b, res, K, chunk=chunk))
    return res
