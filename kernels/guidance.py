"""Triton kernels of the guidance-combine family: CFG, PAG, CFG-Zero* (+ guidance rescale).

    out[b] = f[b] * (base + s1[b] * (c - alpha[b] * u) + s2[b] * (c - p)),  base = c or alpha[b] * u

* No per-sample statistics needed (plain CFG / PAG): one kernel, one pass over memory.
* Rescale or CFG-Zero*: `_moments` reads the inputs once and writes, per CHUNK elements, the sums
  and centred co-moments of (u, d = c - u, e = c - p) in fp32; `_finalize` (one program per
  sample) merges them in a fixed order into alpha and f; `_combine` writes the output.
  Two passes over the big tensors, no atomics (bitwise deterministic), no host sync.

The moments are centred per chunk (the chunk is in registers) and merged with the exact
mean-correction formula, so no E[x^2] - E[x]^2 cancellation; var(g) is w^T M w in the
(u, d, e) basis, which stays well conditioned when cond is close to uncond.
"""
import os

import torch
import triton
import triton.language as tl

# Set by the test suite: outputs start as NaN so an element a kernel forgets shows up.
POISON = os.environ.get("FASTGUIDE_POISON_OUTPUTS") == "1"
NSTATS = 10  # n, sum(u), sum(d), sum(e), M_uu, M_ud, M_ue, M_dd, M_de, M_ee


@triton.jit
def _moments(c_ptr, u_ptr, p_ptr, part_ptr, N, nchunks,
             HAS_P: tl.constexpr, ACC: tl.constexpr, CHUNK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = t // nchunks
    q = t % nchunks
    idx = q * CHUNK + tl.arange(0, CHUNK)
    mask = idx < N
    offs = b * N + idx
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = c - u
    if HAS_P:
        e = c - tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        e = tl.zeros_like(d)
    n = tl.minimum(N - q * CHUNK, CHUNK).to(ACC)
    su = tl.sum(u, axis=0)
    sd = tl.sum(d, axis=0)
    se = tl.sum(e, axis=0)
    xu = tl.where(mask, u - su / n, 0.0)
    xd = tl.where(mask, d - sd / n, 0.0)
    xe = tl.where(mask, e - se / n, 0.0)
    base = part_ptr + t * 10
    tl.store(base + 0, n.to(tl.float32))
    tl.store(base + 1, su.to(tl.float32))
    tl.store(base + 2, sd.to(tl.float32))
    tl.store(base + 3, se.to(tl.float32))
    tl.store(base + 4, tl.sum(xu * xu, axis=0).to(tl.float32))
    tl.store(base + 5, tl.sum(xu * xd, axis=0).to(tl.float32))
    tl.store(base + 6, tl.sum(xu * xe, axis=0).to(tl.float32))
    tl.store(base + 7, tl.sum(xd * xd, axis=0).to(tl.float32))
    tl.store(base + 8, tl.sum(xd * xe, axis=0).to(tl.float32))
    tl.store(base + 9, tl.sum(xe * xe, axis=0).to(tl.float32))


@triton.jit
def _load_scale(ptr, value, b, stride, HAS_T: tl.constexpr):
    if HAS_T:
        return tl.load(ptr + b * stride).to(tl.float32)
    else:
        return tl.cast(value, tl.float32)


@triton.jit
def _finalize(part_ptr, coef_ptr, s1_ptr, s1, s1_stride, s2_ptr, s2, s2_stride, nchunks, rescale,
              HAS_S1T: tl.constexpr, HAS_S2T: tl.constexpr, ZERO_STAR: tl.constexpr,
              ORIGINAL: tl.constexpr, RESCALE: tl.constexpr, R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = part_ptr + b * nchunks * 10
    acc_n = tl.zeros([R], tl.float32)
    acc_u = tl.zeros([R], tl.float32)
    acc_d = tl.zeros([R], tl.float32)
    acc_e = tl.zeros([R], tl.float32)
    for start in range(0, nchunks, R):
        q = start + tl.arange(0, R)
        m = q < nchunks
        acc_n += tl.load(base + q * 10 + 0, mask=m, other=0.0)
        acc_u += tl.load(base + q * 10 + 1, mask=m, other=0.0)
        acc_d += tl.load(base + q * 10 + 2, mask=m, other=0.0)
        acc_e += tl.load(base + q * 10 + 3, mask=m, other=0.0)
    N = tl.sum(acc_n, axis=0)
    mu = tl.sum(acc_u, axis=0) / N
    md = tl.sum(acc_d, axis=0) / N
    me = tl.sum(acc_e, axis=0) / N
    a_uu = tl.zeros([R], tl.float32)
    a_ud = tl.zeros([R], tl.float32)
    a_ue = tl.zeros([R], tl.float32)
    a_dd = tl.zeros([R], tl.float32)
    a_de = tl.zeros([R], tl.float32)
    a_ee = tl.zeros([R], tl.float32)
    for start in range(0, nchunks, R):
        q = start + tl.arange(0, R)
        m = q < nchunks
        n = tl.load(base + q * 10 + 0, mask=m, other=1.0)
        du = tl.where(m, tl.load(base + q * 10 + 1, mask=m, other=0.0) / n - mu, 0.0)
        dd = tl.where(m, tl.load(base + q * 10 + 2, mask=m, other=0.0) / n - md, 0.0)
        de = tl.where(m, tl.load(base + q * 10 + 3, mask=m, other=0.0) / n - me, 0.0)
        a_uu += tl.load(base + q * 10 + 4, mask=m, other=0.0) + n * du * du
        a_ud += tl.load(base + q * 10 + 5, mask=m, other=0.0) + n * du * dd
        a_ue += tl.load(base + q * 10 + 6, mask=m, other=0.0) + n * du * de
        a_dd += tl.load(base + q * 10 + 7, mask=m, other=0.0) + n * dd * dd
        a_de += tl.load(base + q * 10 + 8, mask=m, other=0.0) + n * dd * de
        a_ee += tl.load(base + q * 10 + 9, mask=m, other=0.0) + n * de * de
    Muu = tl.sum(a_uu, axis=0)
    Mud = tl.sum(a_ud, axis=0)
    Mue = tl.sum(a_ue, axis=0)
    Mdd = tl.sum(a_dd, axis=0)
    Mde = tl.sum(a_de, axis=0)
    Mee = tl.sum(a_ee, axis=0)
    alpha = tl.cast(1.0, tl.float32)
    if ZERO_STAR:
        # diffusers' cfg_zero_star_scale: <c,u> / (|u|^2 + 1e-8) from raw sums, c = u + d.
        uu = Muu + N * mu * mu
        cu = uu + Mud + N * mu * md
        alpha = cu / (uu + 1e-8)
    f = tl.cast(1.0, tl.float32)
    if RESCALE:
        t1 = _load_scale(s1_ptr, s1, b, s1_stride, HAS_S1T)
        t2 = _load_scale(s2_ptr, s2, b, s2_stride, HAS_S2T)
        if ORIGINAL:
            wu = 1.0 + t1 * (1.0 - alpha)
            wd = 1.0 + t1
        else:
            wu = alpha + t1 * (1.0 - alpha)
            wd = t1
        we = t2
        Mgg = wu * wu * Muu + wd * wd * Mdd + we * we * Mee + 2.0 * (wu * wd * Mud + wu * we * Mue + wd * we * Mde)
        Mcc = tl.maximum(Muu + 2.0 * Mud + Mdd, 0.0)
        ok = (N > 1.0) & (Mgg > 0.0)
        # A constant guided prediction (std 0) is returned unchanged; diffusers gives NaN (#13425).
        f = tl.where(ok, rescale * tl.sqrt(Mcc / tl.where(ok, Mgg, 1.0)) + (1.0 - rescale), 1.0)
    tl.store(coef_ptr + b * 2 + 0, alpha)
    tl.store(coef_ptr + b * 2 + 1, f)


@triton.jit
def _combine(c_ptr, u_ptr, p_ptr, out_ptr, coef_ptr, s1_ptr, s1, s1_stride, s2_ptr, s2, s2_stride, N,
             HAS_P: tl.constexpr, HAS_S1T: tl.constexpr, HAS_S2T: tl.constexpr, HAS_COEF: tl.constexpr,
             ORIGINAL: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = b * N + idx
    t1 = _load_scale(s1_ptr, s1, b, s1_stride, HAS_S1T).to(ACC)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_COEF:
        u = u * tl.load(coef_ptr + b * 2).to(ACC)
    # diffusers' operation order, so that alpha = f = 1 reproduces its fp32 result.
    if ORIGINAL:
        r = c + t1 * (c - u)
    else:
        r = u + t1 * (c - u)
    if HAS_P:
        t2 = _load_scale(s2_ptr, s2, b, s2_stride, HAS_S2T).to(ACC)
        r = r + t2 * (c - tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC))
    if HAS_COEF:
        r = r * tl.load(coef_ptr + b * 2 + 1).to(ACC)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def _scale_args(t, value, like):
    """(pointer tensor, float value, stride, has_tensor) for a scale given as a tensor or a float."""
    if t is None:
        return like, float(value), 0, False
    return t, 0.0, (1 if t.dim() == 1 else 0), True


def guide(cond, uncond, perturbed, s1_t, s1, s2_t, s2, rescale, original, zero_star,
          *, block=2048, chunk=4096, num_warps=8):
    """Launch the family on cond's device. block/chunk are exposed so tests can force many blocks."""
    c = cond.contiguous()
    u = uncond.contiguous()
    p = perturbed.contiguous() if perturbed is not None else c
    out = torch.empty(cond.shape, dtype=cond.dtype, device=cond.device)
    if POISON:
        out.fill_(float("nan"))
    B = c.shape[0]
    N = c.numel() // B if B else 0
    if B == 0 or N == 0:
        return out
    acc = tl.float64 if cond.dtype == torch.float64 else tl.float32
    s1p, s1v, s1s, has1 = _scale_args(s1_t, s1, c)
    s2p, s2v, s2s, has2 = _scale_args(s2_t, s2, c)
    need = bool(zero_star or rescale > 0)
    coef = c
    if need:
        nchunks = triton.cdiv(N, chunk)
        part = torch.empty((B * nchunks, NSTATS), dtype=torch.float32, device=c.device)
        _moments[(B * nchunks,)](c, u, p, part, N, nchunks, HAS_P=perturbed is not None, ACC=acc,
                                 CHUNK=chunk, num_warps=num_warps)
        coef = torch.empty((B, 2), dtype=torch.float32, device=c.device)
        _finalize[(B,)](part, coef, s1p, s1v, s1s, s2p, s2v, s2s, nchunks, float(rescale),
                        HAS_S1T=has1, HAS_S2T=has2, ZERO_STAR=bool(zero_star), ORIGINAL=bool(original),
                        RESCALE=bool(rescale > 0), R=min(1024, triton.next_power_of_2(nchunks)))
    _combine[(B, triton.cdiv(N, block))](c, u, p, out, coef, s1p, s1v, s1s, s2p, s2v, s2s, N,
                                         HAS_P=perturbed is not None, HAS_S1T=has1, HAS_S2T=has2,
                                         HAS_COEF=need, ORIGINAL=bool(original), ACC=acc, BLOCK=block,
                                         num_warps=num_warps)
    return out


def cfg(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, False)


def pag(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original):
    return guide(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original, False)


def cfg_zero_star(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, True)
