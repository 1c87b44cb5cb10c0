"""Triton kernel of the CFG++ sampler step (see csrc/cfgpp.cpp): x_next = a x + b (u + lam (c - u)) + c_u u."""
import os

import torch
import triton
import triton.language as tl

POISON = os.environ.get("FASTGUIDE_POISON_OUTPUTS") == "1"


@triton.jit
def _cfgpp(x_ptr, c_ptr, u_ptr, out_ptr, lam_ptr, lam, lam_stride, N, a, b, cu,
           HAS_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    idx = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = s * N + idx
    if HAS_T:
        lv = tl.load(lam_ptr + s * lam_stride).to(ACC)
    else:
        lv = tl.cast(lam, ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = u + lv * (tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC) - u)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (a * x + b * g + cu * u).to(out_ptr.dtype.element_ty), mask=mask)


def cfgpp_step(x, cond, uncond, a, b, c, scale_t, scale, *, block=2048, num_warps=8):
    x, cd, u = x.contiguous(), cond.contiguous(), uncond.contiguous()
    out = torch.empty(cd.shape, dtype=cd.dtype, device=cd.device)
    if POISON:
        out.fill_(float("nan"))
    B = cd.shape[0]
    N = cd.numel() // B if B else 0
    if N == 0:
        return out
    has_t = scale_t is not None
    _cfgpp[(B, triton.cdiv(N, block))](x, cd, u, out, scale_t if has_t else cd, 0.0 if has_t else float(scale),
                                       1 if has_t and scale_t.dim() == 1 else 0, N, float(a), float(b), float(c),
                                       HAS_T=has_t, ACC=tl.float64 if cd.dtype == torch.float64 else tl.float32,
                                       BLOCK=block, num_warps=num_warps)
    return out
