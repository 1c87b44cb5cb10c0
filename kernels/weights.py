"""Triton twin of csrc/weights.cpp: `guide_weights`, the per-sample coefficients of the multi-pass methods from
their statistics, in one launch (one program over the whole batch) instead of 10-30 tiny torch kernels between
the statistics pass and the combine. Math in fp64 (a few flops per sample), output in the stats' dtype.
Method ids and columns: fastguide/ops.py WEIGHT_METHODS; the formulas: csrc/weights.cpp.
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, run, scale_arg

COLS = (1, 1, 2, 2, 3, 3, 2, 2, 2)


@triton.jit
def _scale(ptr, stride, value, b, mask, HAS_T: tl.constexpr, BLOCK: tl.constexpr):
    if HAS_T:
        return tl.load(ptr + b * stride, mask=mask, other=0.0).to(tl.float64)
    return tl.full([BLOCK], value, tl.float64)


@triton.jit
def _weights(st_ptr, sb, sc, out_ptr, B, s_ptr, s_stride, s_val: tl.float64, s2_ptr, s2_stride, s2_val: tl.float64,
             param: tl.float64, METHOD: tl.constexpr, K: tl.constexpr, NEED: tl.constexpr, HAS_S: tl.constexpr,
             HAS_S2: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.arange(0, BLOCK).to(tl.int64)
    mask = b < B
    x0 = tl.load(st_ptr + b * sb, mask=mask, other=0.0).to(tl.float64)
    if NEED > 1:
        x1 = tl.load(st_ptr + b * sb + sc, mask=mask, other=0.0).to(tl.float64)
        x2 = tl.load(st_ptr + b * sb + 2 * sc, mask=mask, other=1.0).to(tl.float64)  # (|u|^2: no 0 / 0 off the end)
    else:
        x1 = x0
        x2 = x0
    s = _scale(s_ptr, s_stride, s_val, b, mask, HAS_S, BLOCK)
    zero = tl.zeros([BLOCK], tl.float64)
    one = zero + 1.0
    if METHOD <= 1:  # MAG: |u| = 0 gives inf or nan, as diffusers
        ratio = tl.sqrt(tl.maximum(x1 - 2 * x0 + x2, 0.0)) / tl.sqrt(x2)
        e = tl.exp(-param * ratio)
        if METHOD == 1:
            w0 = s * e
        else:
            w0 = 1.0 + (s - 1.0) * e
        w1 = zero
        w2 = zero
    elif METHOD <= 3:  # TCFG: leading eigenvector of [[cc, cu], [cu, uu]], u' = p c + q u
        d = (x1 - x2) / 2
        r = tl.sqrt(d * d + x0 * x0)
        lam = (x1 + x2) / 2 + r
        e0 = tl.where(d >= 0, d + r, x0)
        e1 = tl.where(d >= 0, x0, r - d)
        n = tl.sqrt(e0 * e0 + e1 * e1)
        safe = tl.where(n > 0, n, 1.0)
        e0 = tl.where(n > 0, e0 / safe, 1.0)
        e1 = tl.where(n > 0, e1 / safe, 0.0)
        k = tl.where(lam > 0, (e0 * x0 + e1 * x2) / tl.where(lam > 0, lam, 1.0), 0.0)
        p = k * e0
        q = k * e1
        if METHOD == 3:
            a = 1.0 + s - s * p
            bb = -s * q
        else:
            a = s + (1.0 - s) * p
            bb = (1.0 - s) * q
        w0 = a + bb
        w1 = a
        w2 = zero
    elif METHOD <= 5:  # Perp-Neg (5: one projection for the batch)
        if METHOD == 5:
            x0 = zero + tl.sum(x0, axis=0)
            x1 = zero + tl.sum(x1, axis=0)
        alpha = tl.where(x1 > 0, x0 / tl.where(x1 > 0, x1, 1.0), 0.0)
        s2 = _scale(s2_ptr, s2_stride, s2_val, b, mask, HAS_S2, BLOCK)
        w0 = one
        w1 = s * (1.0 + s2 * alpha)
        w2 = -s * s2
    elif METHOD <= 7:  # Mahiro (7: the batch's mean similarity)
        if METHOD == 7:
            x0 = zero + tl.sum(x0, axis=0) / B
        k = 2 * (x0 + 1)
        w0 = s + k * (1.0 - s) / 4
        w1 = s
        w2 = zero
    else:  # RenormCFG
        ng = tl.sqrt(tl.maximum((1 - s) * (1 - s) * x2 + 2 * s * (1 - s) * x0 + s * s * x1, 0.0))
        nmax = param * tl.sqrt(x1)
        f = tl.where((ng >= nmax) & (ng > 0), nmax / tl.where(ng > 0, ng, 1.0), 1.0)
        w0 = f
        w1 = f * s
        w2 = zero
    ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + b * K, w0.to(ty), mask=mask)
    if K > 1:
        tl.store(out_ptr + b * K + 1, w1.to(ty), mask=mask)
    if K > 2:
        tl.store(out_ptr + b * K + 2, w2.to(ty), mask=mask)


def _plan_weights(stats, out, method, scale_t, scale, scale2_t, scale2, param):
    B = stats.shape[0]
    if B == 0:
        return []
    sb, sc = stats.stride(0), (stats.stride(1) if stats.dim() == 2 else 0)
    sp, sv, ss, has_s = scale_arg(scale_t, scale, stats)
    s2p, s2v, s2s, has_s2 = scale_arg(scale2_t, scale2, stats)
    block = max(16, triton.next_power_of_2(B))
    return [Launch(_weights, (1,), (stats, sb, sc, out, B, sp, ss, sv, s2p, s2s, s2v, float(param)),
                   dict(METHOD=method, K=COLS[method], NEED=1 if method in (6, 7) else 3, HAS_S=has_s,
                        HAS_S2=has_s2, BLOCK=block), num_warps=1)]


def guide_weights(stats, method, scale_t, scale, scale2_t, scale2, param):
    if not 0 <= method < len(COLS):
        raise ValueError(f"fastguide.guide_weights: method must be in 0..{len(COLS) - 1}, got {method}")
    out = torch.empty((stats.shape[0], COLS[method]), dtype=stats.dtype, device=stats.device)
    run(_plan_weights(stats, out, method, scale_t, scale, scale2_t, scale2, param))
    return out
