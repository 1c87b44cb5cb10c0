"""Triton kernel of the CFG++ sampler step (see csrc/cfgpp.cpp): x_next = a x + b (u + lam (c - u)) + c_u u."""
import triton
import triton.language as tl

from ._launch import Launch, new_output, run, scalar, scale_arg, tl_acc, warps_for


@triton.jit
def _cfgpp(x_ptr, c_ptr, u_ptr, out_ptr, lam_ptr, lam: tl.float64, lam_stride, N, nblocks,
           a: tl.float64, b: tl.float64, cu: tl.float64,
           HAS_T: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # One flat grid axis over (sample, block), int64 offsets: no 65535 cap on blocks per sample.
    t = tl.program_id(0).to(tl.int64)
    s = t // nblocks
    idx = (t % nblocks) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    offs = s * N + idx
    if HAS_T:
        lv = tl.load(lam_ptr + s * lam_stride).to(ACC)
    else:
        lv = scalar(lam, ACC)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = u + lv * (tl.load(c_ptr + offs, mask=mask, other=0.0).to(ACC) - u)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    out = scalar(a, ACC) * x + scalar(b, ACC) * g + scalar(cu, ACC) * u
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def _plan_cfgpp(x, cd, u, out, a, b, c, scale_t, scale, *, block=2048):
    """Launches for contiguous x, cd, u into out ([] when empty): 2048-element tiles, 16 per thread."""
    B = cd.shape[0]
    N = cd.numel() // B if B else 0
    if N == 0:
        return []
    sp, sv, ss, has_t = scale_arg(scale_t, scale, cd)
    nblocks = triton.cdiv(N, block)
    return [Launch(_cfgpp, (B * nblocks,), (x, cd, u, out, sp, sv, ss, N, nblocks, float(a), float(b), float(c)),
                   dict(HAS_T=has_t, ACC=tl_acc(cd.dtype), BLOCK=block), num_warps=warps_for(block))]


def cfgpp_step(x, cond, uncond, a, b, c, scale_t, scale, *, block=2048):
    x, cd, u = x.contiguous(), cond.contiguous(), uncond.contiguous()
    out = new_output(cd)
    run(_plan_cfgpp(x, cd, u, out, a, b, c, scale_t, scale, block=block))
    return out
