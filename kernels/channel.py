"""Triton kernels of the channel family (see csrc/channel.cpp): statistics along dim 1 at each position.

A program owns (sample b, a block of BLOCK positions) of a contiguous [B, C, S] tensor and loops over the C
channels, so each position's sums stay in registers: cfg_norm then loops again to write its output (the
second read of c, u mostly hits L2), mahiro_sim writes the block's sum of cosines and `_mahiro_final` adds the
blocks of each sample in a fixed order (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, new_output, run, scalar, scale_arg, tl_acc, warps_for


@triton.jit
def _ssqrt(x):
    r = tl.sqrt(tl.abs(x))
    return tl.where(x > 0, r, tl.where(x < 0, -r, 0.0))


@triton.jit
def _positions(s_ptr, s, s_stride, S, nblocks, HAS_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """This program's (flat id t, sample b, its BLOCK positions p, their mask, the sample's scale)."""
    t = tl.program_id(0).to(tl.int64)
    b = t // nblocks
    p = (t % nblocks) * BLOCK + tl.arange(0, BLOCK)
    if HAS_T:
        sv = tl.load(s_ptr + b * s_stride).to(ACC)
    else:
        sv = scalar(s, ACC)
    return t, b, p, p < S, sv


@triton.jit
def _channel(c_ptr, u_ptr, b, k, C, S, p, mask, sv, ACC: tl.constexpr):
    """Channel k at positions p of sample b: (offsets, c, u, g = u + s (c - u)) in ACC."""
    offs = (b * C + k) * S + p
    cv = tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC)
    uv = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    return offs, cv, uv, uv + sv * (cv - uv)


@triton.jit
def _cfg_norm(c_ptr, u_ptr, out_ptr, s_ptr, s: tl.float64, s_stride, strength: tl.float64, C, S, nblocks,
              HAS_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    t, b, p, mask, sv = _positions(s_ptr, s, s_stride, S, nblocks, HAS_T, ACC, BLOCK)
    cc = tl.zeros([BLOCK], ACC)
    gg = tl.zeros([BLOCK], ACC)
    for k in range(0, C):
        offs, cv, uv, g = _channel(c_ptr, u_ptr, b, k, C, S, p, mask, sv, ACC)
        cc += cv * cv
        gg += g * g
    f = tl.sqrt(cc) / (tl.sqrt(gg) + 1e-8)
    f = tl.where(f < 1.0, f, 1.0) * scalar(strength, ACC)
    for k in range(0, C):
        offs, cv, uv, g = _channel(c_ptr, u_ptr, b, k, C, S, p, mask, sv, ACC)
        tl.store(out_ptr + offs, (g * f).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mahiro_part(c_ptr, u_ptr, part_ptr, s_ptr, s: tl.float64, s_stride, C, S, nblocks,
                 HAS_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    t, b, p, mask, sv = _positions(s_ptr, s, s_stride, S, nblocks, HAS_T, ACC, BLOCK)
    dot = tl.zeros([BLOCK], ACC)
    aa = tl.zeros([BLOCK], ACC)
    mm = tl.zeros([BLOCK], ACC)
    for k in range(0, C):
        offs, cv, uv, g = _channel(c_ptr, u_ptr, b, k, C, S, p, mask, sv, ACC)
        a = _ssqrt(sv * uv)
        m = _ssqrt((sv * cv + g) / 2)
        dot += a * m
        aa += a * a
        mm += m * m
    cos = dot / (tl.maximum(tl.sqrt(aa), 1e-8) * tl.maximum(tl.sqrt(mm), 1e-8))
    tl.store(part_ptr + t, tl.sum(tl.where(mask, cos, 0.0), axis=0))


@triton.jit
def _mahiro_final(part_ptr, res_ptr, nblocks, S, ACC: tl.constexpr, R: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([R], ACC)
    for start in range(0, nblocks, R):
        q = start + tl.arange(0, R)
        acc += tl.load(part_ptr + b * nblocks + q, mask=q < nblocks, other=0.0)
    tl.store(res_ptr + b, (tl.sum(acc, axis=0) / S).to(res_ptr.dtype.element_ty))


def _dims(c):
    B = c.shape[0]
    C = c.shape[1]
    S = c.numel() // (B * C) if B * C else 0
    return B, C, S


def _block(S, block):
    return min(block, max(16, triton.next_power_of_2(S)))


def _plan_cfg_norm(c, u, out, scale_t, scale, strength, *, block=512):
    B, C, S = _dims(c)
    if c.numel() == 0:
        return []
    bl = _block(S, block)
    sp, sv, ss, has_t = scale_arg(scale_t, scale, c)
    nblocks = triton.cdiv(S, bl)
    return [Launch(_cfg_norm, (B * nblocks,), (c, u, out, sp, sv, ss, float(strength), C, S, nblocks),
                   dict(HAS_T=has_t, ACC=tl_acc(c.dtype), BLOCK=bl), num_warps=warps_for(bl * 4))]


def cfg_norm(cond, uncond, scale_t, scale, strength, *, block=512):
    c, u = cond.contiguous(), uncond.contiguous()
    out = new_output(c)
    run(_plan_cfg_norm(c, u, out, scale_t, scale, strength, block=block))
    return out


def _plan_mahiro(c, u, res, scale_t, scale, *, block=512):
    B, C, S = _dims(c)
    if c.numel() == 0:
        return []
    bl = _block(S, block)
    sp, sv, ss, has_t = scale_arg(scale_t, scale, c)
    nblocks = triton.cdiv(S, bl)
    acc = tl_acc(c.dtype)
    part = torch.empty((B * nblocks,), dtype=res.dtype, device=c.device)
    r = min(1024, triton.next_power_of_2(nblocks))
    return [Launch(_mahiro_part, (B * nblocks,), (c, u, part, sp, sv, ss, C, S, nblocks),
                   dict(HAS_T=has_t, ACC=acc, BLOCK=bl), num_warps=warps_for(bl * 4)),
            Launch(_mahiro_final, (B,), (part, res, nblocks, S), dict(ACC=acc, R=r), num_warps=4)]


def mahiro_sim(cond, uncond, scale_t, scale, *, block=512):
    c, u = cond.contiguous(), uncond.contiguous()
    dt = torch.float64 if c.dtype == torch.float64 else torch.float32
    res = torch.zeros((c.shape[0],), dtype=dt, device=c.device)
    run(_plan_mahiro(c, u, res, scale_t, scale, block=block))
    return res
