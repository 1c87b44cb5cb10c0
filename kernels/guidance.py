"""Triton kernels of the guidance-combine family: CFG, PAG, CFG-Zero* (+ guidance rescale).

    out[b] = f[b] * (base + s1[b] * (c - alpha[b] * u) + s2[b] * (c - p)),  base = c or alpha[b] * u

* No per-sample statistics needed (plain CFG / PAG): one kernel, one pass over memory.
* Rescale or CFG-Zero*: `_moments` reads the inputs once and writes, per CHUNK elements, the sums
  and centred co-moments of (u, d = c - u, e = c - p) in fp32 (fp64 for fp64 inputs); `_finalize`
  (one program per sample) merges them in a fixed order into alpha and f; `_combine` writes the output.
  Two passes over the big tensors, no atomics (bitwise deterministic), no host sync.

The moments are centred per chunk (the chunk is in registers) and merged with the exact
mean-correction formula, so no E[x^2] - E[x]^2 cancellation; var(g) is w^T M w in the
(u, d, e) basis, which stays well conditioned when cond is close to uncond.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, new_output, run, scalar, scale_arg, tl_acc, warps_for

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
    base = part_ptr + t * 10  # part is ACC-typed: the partials keep the accumulation precision
    tl.store(base + 0, n)
    tl.store(base + 1, su)
    tl.store(base + 2, sd)
    tl.store(base + 3, se)
    tl.store(base + 4, tl.sum(xu * xu, axis=0))
    tl.store(base + 5, tl.sum(xu * xd, axis=0))
    tl.store(base + 6, tl.sum(xu * xe, axis=0))
    tl.store(base + 7, tl.sum(xd * xd, axis=0))
    tl.store(base + 8, tl.sum(xd * xe, axis=0))
    tl.store(base + 9, tl.sum(xe * xe, axis=0))


@triton.jit
def _load_scale(ptr, value, b, stride, HAS_T: tl.constexpr, ACC: tl.constexpr):
    """Sample b's scale: from the tensor (its own element stride; 0 for 0-d / expanded) or the fp64 value."""
    if HAS_T:
        return tl.load(ptr + b * stride).to(ACC)
    else:
        return scalar(value, ACC)


@triton.jit
def _finalize(part_ptr, coef_ptr, s1_ptr, s1: tl.float64, s1_stride, s2_ptr, s2: tl.float64, s2_stride, nchunks,
              rescale: tl.float64,
              HAS_S1T: tl.constexpr, HAS_S2T: tl.constexpr, ZERO_STAR: tl.constexpr,
              ORIGINAL: tl.constexpr, RESCALE: tl.constexpr, ACC: tl.constexpr, R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = part_ptr + b * nchunks * 10
    acc_n = tl.zeros([R], ACC)
    acc_u = tl.zeros([R], ACC)
    acc_d = tl.zeros([R], ACC)
    acc_e = tl.zeros([R], ACC)
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
    a_uu = tl.zeros([R], ACC)
    a_ud = tl.zeros([R], ACC)
    a_ue = tl.zeros([R], ACC)
    a_dd = tl.zeros([R], ACC)
    a_de = tl.zeros([R], ACC)
    a_ee = tl.zeros([R], ACC)
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
    alpha = tl.cast(1.0, ACC)
    if ZERO_STAR:
        # diffusers' cfg_zero_star_scale: <c,u> / (|u|^2 + 1e-8) from raw sums, c = u + d.
        uu = Muu + N * mu * mu
        cu = uu + Mud + N * mu * md
        alpha = cu / (uu + 1e-8)
    f = tl.cast(1.0, ACC)
    if RESCALE:
        t1 = _load_scale(s1_ptr, s1, b, s1_stride, HAS_S1T, ACC)
        t2 = _load_scale(s2_ptr, s2, b, s2_stride, HAS_S2T, ACC)
        r = scalar(rescale, ACC)
        if ORIGINAL:
            wu = 1.0 + t1 * (1.0 - alpha)
            wd = 1.0 + t1
        else:
            wu = alpha + t1 * (1.0 - alpha)
            wd = t1
        we = t2
        Mgg = wu * wu * Muu + wd * wd * Mdd + we * we * Mee + 2.0 * (wu * wd * Mud + wu * we * Mue + wd * we * Mde)
        Mcc = tl.maximum(Muu + 2.0 * Mud + Mdd, 0.0)
        # A constant guided prediction (std 0) is returned unchanged; diffusers gives NaN (#13425). A NaN
        # variance (a NaN in the sample) is not guarded: the whole sample turns NaN, as in diffusers.
        ok = (N > 1.0) & ((Mgg > 0.0) | (Mgg != Mgg))
        f = tl.where(ok, r * tl.sqrt(Mcc / tl.where(ok, Mgg, 1.0)) + (1.0 - r), 1.0)
    tl.store(coef_ptr + b * 2 + 0, alpha)
    tl.store(coef_ptr + b * 2 + 1, f)


@triton.jit
def _combine(c_ptr, u_ptr, p_ptr, out_ptr, coef_ptr, s1_ptr, s1: tl.float64, s1_stride, s2_ptr, s2: tl.float64,
             s2_stride, N, nblocks, buf_ptr, momentum: tl.float64,
             HAS_P: tl.constexpr, HAS_S1T: tl.constexpr, HAS_S2T: tl.constexpr, HAS_COEF: tl.constexpr,
             ORIGINAL: tl.constexpr, MOM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # One flat grid axis over (sample, block): axis 0 takes 2^31 - 1 programs, axes 1/2 only 65535.
    t = tl.program_id(0).to(tl.int64)
    b = t // nblocks
    idx = (t % nblocks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = b * N + idx
    t1 = _load_scale(s1_ptr, s1, b, s1_stride, HAS_S1T, ACC)
    c = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    if MOM:  # cfg_momentum: buf = (c - u) + momentum * buf, in the buffer's dtype (diffusers' MomentumBuffer)
        bv = tl.load(buf_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(buf_ptr + offs, ((c - u) + scalar(momentum, ACC) * bv).to(buf_ptr.dtype.element_ty), mask=mask)
    if HAS_COEF:
        u = u * tl.load(coef_ptr + b * 2).to(ACC)
    # diffusers' operation order, so that alpha = f = 1 reproduces its fp32 result.
    if ORIGINAL:
        r = c + t1 * (c - u)
    else:
        r = u + t1 * (c - u)
    if HAS_P:
        t2 = _load_scale(s2_ptr, s2, b, s2_stride, HAS_S2T, ACC)
        r = r + t2 * (c - tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC))
    if HAS_COEF:
        r = r * tl.load(coef_ptr + b * 2 + 1).to(ACC)
    tl.store(out_ptr + offs, r.to(out_ptr.dtype.element_ty), mask=mask)


def _plan_guide(c, u, p, out, s1_t, s1, s2_t, s2, rescale, original, zero_star, *, block=2048, chunk=4096,
                buf=None, momentum=0.0):
    """The launches for contiguous c, u (p: perturbed or None) into out; [] for an empty tensor. With `buf`
    (cfg_momentum, no rescale): the combine also updates buf = (c - u) + momentum * buf in place.

    Elementwise tiles of 2048 (combine) / 4096 (moments) elements with 16 per thread (4 / 8 warps):
    four 16-byte vectors per input per thread. All grids are 1-D (sample-major), int64 offsets.
    """
    B = c.shape[0]
    N = c.numel() // B if B else 0
    if B == 0 or N == 0:
        return []
    acc = tl_acc(c.dtype)
    s1p, s1v, s1s, has1 = scale_arg(s1_t, s1, c)
    s2p, s2v, s2s, has2 = scale_arg(s2_t, s2, c)
    has_p = p is not None
    p = p if has_p else c
    need = bool(zero_star or rescale > 0)
    plans = []
    coef = c
    if need:
        nchunks = triton.cdiv(N, chunk)
        part = torch.empty((B * nchunks, NSTATS), dtype=c.dtype if acc == tl.float64 else torch.float32,
                           device=c.device)
        plans.append(Launch(_moments, (B * nchunks,), (c, u, p, part, N, nchunks),
                            dict(HAS_P=has_p, ACC=acc, CHUNK=chunk), num_warps=warps_for(chunk)))
        coef = torch.empty((B, 2), dtype=part.dtype, device=c.device)
        plans.append(Launch(_finalize, (B,), (part, coef, s1p, s1v, s1s, s2p, s2v, s2s, nchunks, float(rescale)),
                            dict(HAS_S1T=has1, HAS_S2T=has2, ZERO_STAR=bool(zero_star), ORIGINAL=bool(original),
                                 RESCALE=bool(rescale > 0), ACC=acc, R=min(1024, triton.next_power_of_2(nchunks)))))
    nblocks = triton.cdiv(N, block)
    plans.append(Launch(_combine, (B * nblocks,), (c, u, p, out, coef, s1p, s1v, s1s, s2p, s2v, s2s, N, nblocks,
                                                   c if buf is None else buf, float(momentum)),
                        dict(HAS_P=has_p, HAS_S1T=has1, HAS_S2T=has2, HAS_COEF=need, ORIGINAL=bool(original),
                             MOM=buf is not None, ACC=acc, BLOCK=block), num_warps=warps_for(block)))
    return plans


def guide(cond, uncond, perturbed, s1_t, s1, s2_t, s2, rescale, original, zero_star, *, block=2048, chunk=4096):
    """Launch the family on cond's device. block/chunk are exposed so tests can force many blocks."""
    c = cond.contiguous()
    u = uncond.contiguous()
    p = perturbed.contiguous() if perturbed is not None else None
    out = new_output(c)
    run(_plan_guide(c, u, p, out, s1_t, s1, s2_t, s2, rescale, original, zero_star, block=block, chunk=chunk))
    return out


def cfg(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, False)


def cfg_momentum(cond, uncond, scale_t, scale, original, momentum, momentum_buffer, *, block=2048):
    c, u = cond.contiguous(), uncond.contiguous()
    out = new_output(c)
    run(_plan_guide(c, u, None, out, scale_t, scale, None, 0.0, 0.0, original, False, block=block,
                    buf=momentum_buffer, momentum=momentum))
    return out


def pag(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original):
    return guide(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original, False)


def cfg_zero_star(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, True)
