"""Triton kernels of the projection family: APG and per-group guidance statistics (see csrc/apg.cpp).

Norm groups are contiguous runs of K elements; a group is cut into tiles of CHUNK elements.
APG: `_apg_pass1` (one program per tile) reads c, u (and the momentum buffer), writes the updated
buffer and the tile's fp32 sums |m|^2, <m,c>, |c|^2; `_apg_coef` (one program per group) adds the
tiles in a fixed order into k and beta; `_apg_pass2` writes out = base + s (k m + (eta - 1) beta c).
Two passes over the big tensors, deterministic (no atomics), no host sync.
"""
import os

import torch
import triton
import triton.language as tl

POISON = os.environ.get("FASTGUIDE_POISON_OUTPUTS") == "1"


@triton.jit
def _apg_pass1(c_ptr, u_ptr, buf_ptr, part_ptr, K, nq, momentum,
               MOM: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = t // nq
    idx = (t % nq) * CHUNK + tl.arange(0, CHUNK)
    mask = idx < K
    offs = g * K + idx
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    m = c - tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MOM:
        # Stored in the inputs' dtype (as diffusers keeps its running average); the rounded value is used.
        stored = (m + momentum * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(ACC)).to(buf_ptr.dtype.element_ty)
        tl.store(buf_ptr + offs, stored, mask=mask)
        m = stored.to(ACC)
    tl.store(part_ptr + t * 3 + 0, tl.sum(m * m, axis=0).to(tl.float32))
    tl.store(part_ptr + t * 3 + 1, tl.sum(m * c, axis=0).to(tl.float32))
    tl.store(part_ptr + t * 3 + 2, tl.sum(c * c, axis=0).to(tl.float32))


@triton.jit
def _apg_coef(part_ptr, coef_ptr, nq, thr, HAS_THR: tl.constexpr, R: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    a_mm = tl.zeros([R], tl.float32)
    a_mc = tl.zeros([R], tl.float32)
    a_cc = tl.zeros([R], tl.float32)
    for start in range(0, nq, R):
        q = start + tl.arange(0, R)
        msk = q < nq
        base = part_ptr + (g * nq + q) * 3
        a_mm += tl.load(base + 0, mask=msk, other=0.0)
        a_mc += tl.load(base + 1, mask=msk, other=0.0)
        a_cc += tl.load(base + 2, mask=msk, other=0.0)
    smm = tl.sum(a_mm, axis=0)
    smc = tl.sum(a_mc, axis=0)
    scc = tl.sum(a_cc, axis=0)
    k = tl.cast(1.0, tl.float32)
    if HAS_THR:
        # thr / 0 = inf and min(1, inf) = 1, as in diffusers.
        k = tl.minimum(1.0, thr / tl.sqrt(smm))
    nc = tl.maximum(tl.sqrt(scc), 1e-12)  # F.normalize's eps
    tl.store(coef_ptr + g * 2 + 0, k)
    tl.store(coef_ptr + g * 2 + 1, k * smc / (nc * nc))


@triton.jit
def _apg_pass2(c_ptr, u_ptr, buf_ptr, out_ptr, coef_ptr, s_ptr, s, s_stride, K, nq, per_sample, eta,
               MOM: tl.constexpr, HAS_ST: tl.constexpr, ORIGINAL: tl.constexpr, ACC: tl.constexpr,
               CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = t // nq
    idx = (t % nq) * CHUNK + tl.arange(0, CHUNK)
    mask = idx < K
    offs = g * K + idx
    if HAS_ST:
        sc = tl.load(s_ptr + ((g * K) // per_sample) * s_stride).to(ACC)
    else:
        sc = tl.cast(s, ACC)
    k = tl.load(coef_ptr + g * 2).to(ACC)
    pb = (eta - 1.0) * tl.load(coef_ptr + g * 2 + 1).to(ACC)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MOM:
        m = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        m = c - u
    if ORIGINAL:
        r = c + sc * (k * m + pb * c)
    else:
        r = u + sc * (k * m + pb * c)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats(c_ptr, u_ptr, g_ptr, part_ptr, K, nq, HAS_G: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    grp = t // nq
    idx = (t % nq) * CHUNK + tl.arange(0, CHUNK)
    mask = idx < K
    offs = grp * K + idx
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(part_ptr + t * 5 + 0, tl.sum(c * u, axis=0).to(tl.float32))
    tl.store(part_ptr + t * 5 + 1, tl.sum(c * c, axis=0).to(tl.float32))
    tl.store(part_ptr + t * 5 + 2, tl.sum(u * u, axis=0).to(tl.float32))
    if HAS_G:
        gv = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(part_ptr + t * 5 + 3, tl.sum(c * gv, axis=0).to(tl.float32))
        tl.store(part_ptr + t * 5 + 4, tl.sum(gv * gv, axis=0).to(tl.float32))
    else:
        tl.store(part_ptr + t * 5 + 3, 0.0)
        tl.store(part_ptr + t * 5 + 4, 0.0)


@triton.jit
def _stats_final(part_ptr, res_ptr, nq, HAS_G: tl.constexpr, R: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    q = tl.arange(0, R)
    acc = tl.zeros([R, 8], tl.float32)
    col = tl.arange(0, 8)
    for start in range(0, nq, R):
        rows = start + q
        m = (rows[:, None] < nq) & (col[None, :] < 5)
        acc += tl.load(part_ptr + (g * nq + rows[:, None]) * 5 + col[None, :], mask=m, other=0.0)
    tot = tl.sum(acc, axis=0)  # [8]: cu, cc, uu, cg, gg, 0, 0, 0
    cu = tl.sum(tl.where(col == 0, tot, 0.0), axis=0)
    cc = tl.sum(tl.where(col == 1, tot, 0.0), axis=0)
    uu = tl.sum(tl.where(col == 2, tot, 0.0), axis=0)
    cg = tl.sum(tl.where(col == 3, tot, 0.0), axis=0)
    gg = tl.sum(tl.where(col == 4, tot, 0.0), axis=0)
    # Cosines as F.cosine_similarity: each norm clamped at 1e-8.
    nc = tl.maximum(tl.sqrt(cc), 1e-8)
    cos_cu = cu / (nc * tl.maximum(tl.sqrt(uu), 1e-8))
    if HAS_G:
        cos_cg = cg / (nc * tl.maximum(tl.sqrt(gg), 1e-8))
    else:
        cos_cg = cg * 0.0
    out = tl.where(col == 5, cos_cu, tl.where(col == 6, cos_cg, tot))
    tl.store(res_ptr + g * 7 + col, out, mask=col < 7)


def _tiles(K, chunk):
    chunk = min(chunk, triton.next_power_of_2(K))
    return chunk, triton.cdiv(K, chunk)


def apg(cond, uncond, scale_t, scale, eta, norm_threshold, momentum, momentum_buffer, group_size, original,
        *, chunk=4096, num_warps=8):
    c, u = cond.contiguous(), uncond.contiguous()
    out = torch.empty(cond.shape, dtype=cond.dtype, device=cond.device)
    if POISON:
        out.fill_(float("nan"))
    if c.numel() == 0:
        return out
    K = int(group_size)
    G = c.numel() // K
    chunk, nq = _tiles(K, chunk)
    acc = tl.float64 if cond.dtype == torch.float64 else tl.float32
    mom = momentum_buffer is not None
    buf = momentum_buffer if mom else c
    part = torch.empty((G * nq, 3), dtype=torch.float32, device=c.device)
    _apg_pass1[(G * nq,)](c, u, buf, part, K, nq, float(momentum), MOM=mom, ACC=acc, CHUNK=chunk,
                          num_warps=num_warps)
    coef = torch.empty((G, 2), dtype=torch.float32, device=c.device)
    _apg_coef[(G,)](part, coef, nq, float(norm_threshold), HAS_THR=norm_threshold > 0,
                    R=min(1024, triton.next_power_of_2(nq)))
    has_st = scale_t is not None
    _apg_pass2[(G * nq,)](c, u, buf, out, coef, scale_t if has_st else c, 0.0 if has_st else float(scale),
                          1 if has_st and scale_t.dim() == 1 else 0, K, nq, c.numel() // c.shape[0], float(eta),
                          MOM=mom, HAS_ST=has_st, ORIGINAL=bool(original), ACC=acc, CHUNK=chunk,
                          num_warps=num_warps)
    return out


def guidance_stats(cond, uncond, guided, group_size, *, chunk=4096, num_warps=8):
    c, u = cond.contiguous(), uncond.contiguous()
    K = int(group_size)
    G = c.numel() // K
    res = torch.empty((G, 7), dtype=torch.float32, device=c.device)
    if c.numel() == 0:
        return res.zero_()
    chunk, nq = _tiles(K, chunk)
    gd = guided.contiguous() if guided is not None else c
    part = torch.empty((G * nq, 5), dtype=torch.float32, device=c.device)
    _stats[(G * nq,)](c, u, gd, part, K, nq, HAS_G=guided is not None,
                      ACC=tl.float64 if cond.dtype == torch.float64 else tl.float32, CHUNK=chunk,
                      num_warps=num_warps)
    _stats_final[(G,)](part, res, nq, HAS_G=guided is not None, R=min(256, triton.next_power_of_2(nq)))
    return res
