"""Triton kernels of the projection family: APG and per-group guidance statistics (see csrc/apg.cpp).

Norm groups are contiguous runs of K elements. A program works on a [GB, CHUNK] tile: GB groups,
CHUNK elements of each. Large groups (K >= chunk) take one group per program and cut it into
nq = cdiv(K, CHUNK) tiles; small groups (Flux's K = 64 under norm_dim=-1) take a whole group per row
and pack GB = chunk / next_pow2(K) groups per program, so every thread holds elements.
APG: `_apg_pass1` reads c, u (and the momentum buffer), writes the updated buffer and the tile's
sums |m|^2, <m,c>, |c|^2; `_apg_coef` adds each group's tiles in a fixed order into k and beta;
`_apg_pass2` writes out = base + s (k m + (eta - 1) beta c). Two passes over the big tensors,
deterministic (no atomics), no host sync. Sums are fp32, fp64 for fp64 inputs.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, new_output, run, scalar, scale_arg, tl_acc, warps_for


@triton.jit
def _tile(t, G, K, nq, GB: tl.constexpr, CHUNK: tl.constexpr):
    """Program t's groups [GB], element offsets [GB, CHUNK], mask, and partial-sum rows [GB] (g * nq + q)."""
    gb = t // nq
    q = t % nq
    g = gb * GB + tl.arange(0, GB)
    idx = q * CHUNK + tl.arange(0, CHUNK)
    gmask = g < G
    mask = gmask[:, None] & (idx < K)[None, :]
    return g, g[:, None] * K + idx[None, :], mask, gmask, g * nq + q


@triton.jit
def _apg_pass1(c_ptr, u_ptr, buf_ptr, part_ptr, G, K, nq, momentum: tl.float64,
               MOM: tl.constexpr, ACC: tl.constexpr, GB: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g, offs, mask, gmask, prow = _tile(t, G, K, nq, GB, CHUNK)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    m = c - tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MOM:
        # Stored in the inputs' dtype (as diffusers keeps its running average); the rounded value is used.
        stored = (m + scalar(momentum, ACC) * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(ACC)).to(
            buf_ptr.dtype.element_ty)
        tl.store(buf_ptr + offs, stored, mask=mask)
        m = stored.to(ACC)
    tl.store(part_ptr + prow * 3 + 0, tl.sum(m * m, axis=1), mask=gmask)
    tl.store(part_ptr + prow * 3 + 1, tl.sum(m * c, axis=1), mask=gmask)
    tl.store(part_ptr + prow * 3 + 2, tl.sum(c * c, axis=1), mask=gmask)


@triton.jit
def _group_sums(part_ptr, g, gmask, nq, NCOL: tl.constexpr, COL: tl.constexpr, ACC: tl.constexpr,
                GBC: tl.constexpr, R: tl.constexpr):
    """Column COL of the partial sums of groups g [GBC], added over their nq tiles in a fixed order."""
    acc = tl.zeros([GBC, R], ACC)
    for start in range(0, nq, R):
        q = start + tl.arange(0, R)
        m = gmask[:, None] & (q < nq)[None, :]
        acc += tl.load(part_ptr + (g[:, None] * nq + q[None, :]) * NCOL + COL, mask=m, other=0.0)
    return tl.sum(acc, axis=1)


@triton.jit
def _apg_coef(part_ptr, coef_ptr, G, nq, thr: tl.float64, HAS_THR: tl.constexpr, ACC: tl.constexpr,
              GBC: tl.constexpr, R: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * GBC + tl.arange(0, GBC)
    gmask = g < G
    smm = _group_sums(part_ptr, g, gmask, nq, 3, 0, ACC, GBC, R)
    smc = _group_sums(part_ptr, g, gmask, nq, 3, 1, ACC, GBC, R)
    scc = _group_sums(part_ptr, g, gmask, nq, 3, 2, ACC, GBC, R)
    k = tl.full([GBC], 1.0, ACC)
    if HAS_THR:
        # thr / 0 = inf and min(1, inf) = 1, as in diffusers.
        k = tl.minimum(1.0, scalar(thr, ACC) / tl.sqrt(smm))
    nc = tl.maximum(tl.sqrt(scc), 1e-12)  # F.normalize's eps
    tl.store(coef_ptr + g * 2 + 0, k, mask=gmask)
    tl.store(coef_ptr + g * 2 + 1, k * smc / (nc * nc), mask=gmask)


@triton.jit
def _apg_pass2(c_ptr, u_ptr, buf_ptr, out_ptr, coef_ptr, s_ptr, s: tl.float64, s_stride, G, K, nq, per_sample,
               eta: tl.float64, MOM: tl.constexpr, HAS_ST: tl.constexpr, ORIGINAL: tl.constexpr,
               ACC: tl.constexpr, GB: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g, offs, mask, gmask, prow = _tile(t, G, K, nq, GB, CHUNK)
    if HAS_ST:  # groups never straddle samples: group g is in sample g K / per_sample
        sc = tl.load(s_ptr + ((g * K) // per_sample) * s_stride, mask=gmask, other=0.0).to(ACC)[:, None]
    else:
        sc = scalar(s, ACC)
    k = tl.load(coef_ptr + g * 2, mask=gmask, other=0.0).to(ACC)[:, None]
    pb = (scalar(eta, ACC) - 1.0) * tl.load(coef_ptr + g * 2 + 1, mask=gmask, other=0.0).to(ACC)[:, None]
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
def _stats(c_ptr, u_ptr, g_ptr, part_ptr, G, K, nq, HAS_G: tl.constexpr, ACC: tl.constexpr, GB: tl.constexpr,
           CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g, offs, mask, gmask, prow = _tile(t, G, K, nq, GB, CHUNK)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(part_ptr + prow * 5 + 0, tl.sum(c * u, axis=1), mask=gmask)
    tl.store(part_ptr + prow * 5 + 1, tl.sum(c * c, axis=1), mask=gmask)
    tl.store(part_ptr + prow * 5 + 2, tl.sum(u * u, axis=1), mask=gmask)
    if HAS_G:
        gv = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(part_ptr + prow * 5 + 3, tl.sum(c * gv, axis=1), mask=gmask)
        tl.store(part_ptr + prow * 5 + 4, tl.sum(gv * gv, axis=1), mask=gmask)


@triton.jit
def _stats_final(part_ptr, res_ptr, G, nq, HAS_G: tl.constexpr, ACC: tl.constexpr, GBC: tl.constexpr,
                 R: tl.constexpr):
    g = tl.program_id(0).to(tl.int64) * GBC + tl.arange(0, GBC)
    gmask = g < G
    cu = _group_sums(part_ptr, g, gmask, nq, 5, 0, ACC, GBC, R)
    cc = _group_sums(part_ptr, g, gmask, nq, 5, 1, ACC, GBC, R)
    uu = _group_sums(part_ptr, g, gmask, nq, 5, 2, ACC, GBC, R)
    # Cosines as F.cosine_similarity: each norm clamped at 1e-8 (an empty group gives 0 / 1e-16 = 0).
    nc = tl.maximum(tl.sqrt(cc), 1e-8)
    res = res_ptr + g * 7
    tl.store(res + 0, cu.to(tl.float32), mask=gmask)
    tl.store(res + 1, cc.to(tl.float32), mask=gmask)
    tl.store(res + 2, uu.to(tl.float32), mask=gmask)
    tl.store(res + 5, (cu / (nc * tl.maximum(tl.sqrt(uu), 1e-8))).to(tl.float32), mask=gmask)
    if HAS_G:
        cg = _group_sums(part_ptr, g, gmask, nq, 5, 3, ACC, GBC, R)
        gg = _group_sums(part_ptr, g, gmask, nq, 5, 4, ACC, GBC, R)
        tl.store(res + 3, cg.to(tl.float32), mask=gmask)
        tl.store(res + 4, gg.to(tl.float32), mask=gmask)
        tl.store(res + 6, (cg / (nc * tl.maximum(tl.sqrt(gg), 1e-8))).to(tl.float32), mask=gmask)
    else:
        zero = tl.zeros([GBC], tl.float32)
        tl.store(res + 3, zero, mask=gmask)
        tl.store(res + 4, zero, mask=gmask)
        tl.store(res + 6, zero, mask=gmask)


def _tiling(G, K, chunk):
    """(GB, CHUNK, nq, num_warps): tiles of at most `chunk` elements, 16 per thread (chunk 4096: 8 warps).

    K >= chunk: one group per program, nq tiles of CHUNK = chunk. Smaller K: the whole (power-of-two
    padded) group per tile row, GB = chunk // CHUNK groups per program (no more than there are).
    """
    kp = triton.next_power_of_2(K)
    if kp >= chunk:
        return 1, chunk, triton.cdiv(K, chunk), warps_for(chunk)
    gb = min(chunk // kp, triton.next_power_of_2(G))
    return gb, kp, 1, warps_for(gb * kp)


def _final_tiling(G, nq):
    """(GBC, R) for the per-group merge: R partials per group per step, GBC groups per program, GBC R <= 1024."""
    r = min(1024, triton.next_power_of_2(nq))
    return min(1024 // r, triton.next_power_of_2(G)), r


def _groups(x, K):
    """Number of norm groups. K = 0 (a zero-size dim inside the group): the dims before the last zero-size dim."""
    if K:
        return x.numel() // K
    last = max(i for i, n in enumerate(x.shape) if n == 0)
    return int(torch.Size(x.shape[:last]).numel())


def _plan_apg(c, u, buf, out, scale_t, scale, eta, norm_threshold, momentum, K, original, *, chunk=4096):
    if c.numel() == 0:
        return []
    G = c.numel() // K
    gb, ch, nq, warps = _tiling(G, K, chunk)
    acc = tl_acc(c.dtype)
    mom = buf is not None
    buf = buf if mom else c
    part = torch.empty((G * nq, 3), dtype=c.dtype if acc == tl.float64 else torch.float32, device=c.device)
    coef = torch.empty((G, 2), dtype=part.dtype, device=c.device)
    ntiles = triton.cdiv(G, gb) * nq
    gbc, r = _final_tiling(G, nq)
    sp, sv, ss, has_st = scale_arg(scale_t, scale, c)
    return [
        Launch(_apg_pass1, (ntiles,), (c, u, buf, part, G, K, nq, float(momentum)),
               dict(MOM=mom, ACC=acc, GB=gb, CHUNK=ch), num_warps=warps),
        Launch(_apg_coef, (triton.cdiv(G, gbc),), (part, coef, G, nq, float(norm_threshold)),
               dict(HAS_THR=norm_threshold > 0, ACC=acc, GBC=gbc, R=r), num_warps=4),
        Launch(_apg_pass2, (ntiles,), (c, u, buf, out, coef, sp, sv, ss, G, K, nq, c.numel() // c.shape[0], float(eta)),
               dict(MOM=mom, HAS_ST=has_st, ORIGINAL=bool(original), ACC=acc, GB=gb, CHUNK=ch), num_warps=warps),
    ]


def apg(cond, uncond, scale_t, scale, eta, norm_threshold, momentum, momentum_buffer, group_size, original,
        *, chunk=4096):
    c, u = cond.contiguous(), uncond.contiguous()
    out = new_output(c)
    run(_plan_apg(c, u, momentum_buffer, out, scale_t, scale, eta, norm_threshold, momentum, int(group_size),
                  original, chunk=chunk))
    return out


def _plan_stats(c, u, gd, res, K, *, chunk=4096):
    G = res.shape[0]
    if G == 0:
        return []
    acc = tl_acc(c.dtype)
    plans = []
    if K == 0:  # empty groups: every partial sum is 0, one tile of zeros per group
        part = torch.zeros((G, 5), dtype=c.dtype if acc == tl.float64 else torch.float32, device=c.device)
        nq = 1
    else:
        gb, ch, nq, warps = _tiling(G, K, chunk)
        part = torch.empty((G * nq, 5), dtype=c.dtype if acc == tl.float64 else torch.float32, device=c.device)
        plans.append(Launch(_stats, (triton.cdiv(G, gb) * nq,), (c, u, gd if gd is not None else c, part, G, K, nq),
                            dict(HAS_G=gd is not None, ACC=acc, GB=gb, CHUNK=ch), num_warps=warps))
    gbc, r = _final_tiling(G, nq)
    plans.append(Launch(_stats_final, (triton.cdiv(G, gbc),), (part, res, G, nq),
                        dict(HAS_G=gd is not None, ACC=acc, GBC=gbc, R=r), num_warps=4))
    return plans


def guidance_stats(cond, uncond, guided, group_size, *, chunk=4096):
    c, u = cond.contiguous(), uncond.contiguous()
    gd = guided.contiguous() if guided is not None else None
    K = int(group_size)
    res = torch.empty((_groups(c, K), 7), dtype=torch.float32, device=c.device)
    run(_plan_stats(c, u, gd, res, K, chunk=chunk))
    return res
