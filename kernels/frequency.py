"""Triton kernel of the frequency-split family (see fastguide/frequency.py).

One program per (plane, block of BM rows): it forms D = cond - uncond tile by tile, computes
T1 = A_H[rows] @ D (loop over K blocks), then for each block of BN columns low = T1 @ A_W^T[:, cols]
and writes out = base + s_low * low + s_high * (d - low) for its rows and columns. Both matmuls use
tl.dot with input_precision="ieee": fp32-exact, no TF32. Each program re-reads its plane once per
term (from L2); a plane's operator matrices are shared by every program.
NTERMS is 1 (bilinear, Laplacian) or 2 (FFT box: real and imaginary parts).
"""
import os

import torch
import triton
import triton.language as tl

POISON = os.environ.get("FASTGUIDE_POISON_OUTPUTS") == "1"


@triton.jit
def _t1(c_ptr, u_ptr, a_ptr, base, rows, cols, H, W, SPLIT: tl.constexpr, ACC: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, WP: tl.constexpr):
    """A[rows, :] @ D[:, cols] for one plane (D = c - u, or c alone when SPLIT)."""
    acc = tl.zeros([BM, WP], dtype=ACC)
    rmask = rows < H
    cmask = cols < W
    for k0 in range(0, H, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks < H
        a = tl.load(a_ptr + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        offs = base + ks[:, None] * W + cols[None, :]
        m = kmask[:, None] & cmask[None, :]
        d = tl.load(c_ptr + offs, mask=m, other=0.0).to(ACC)
        if not SPLIT:
            d = d - tl.load(u_ptr + offs, mask=m, other=0.0).to(ACC)
        acc += tl.dot(a.to(ACC), d, input_precision="ieee")
    return acc


@triton.jit
def _freq_kernel(c_ptr, u_ptr, ah_ptr, aw_ptr, out_ptr, sl_ptr, sl, sl_stride, sh_ptr, sh, sh_stride,
                 H, W, planes_per_sample,
                 NTERMS: tl.constexpr, SPLIT: tl.constexpr, HAS_SLT: tl.constexpr, HAS_SHT: tl.constexpr,
                 ORIGINAL: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                 BN: tl.constexpr, WP: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BM + tl.arange(0, BM)
    cols = tl.arange(0, WP)
    base = p * H * W
    t1a = _t1(c_ptr, u_ptr, ah_ptr, base, rows, cols, H, W, SPLIT, ACC, BM, BK, WP)
    if NTERMS == 2:
        t1b = _t1(c_ptr, u_ptr, ah_ptr + H * H, base, rows, cols, H, W, SPLIT, ACC, BM, BK, WP)
    b = p // planes_per_sample
    if not SPLIT:
        if HAS_SLT:
            s_low = tl.load(sl_ptr + b * sl_stride).to(ACC)
        else:
            s_low = tl.cast(sl, ACC)
        if HAS_SHT:
            s_high = tl.load(sh_ptr + b * sh_stride).to(ACC)
        else:
            s_high = tl.cast(sh, ACC)
    rmask = rows < H
    ks = tl.arange(0, WP)
    for n0 in range(0, WP, BN):
        ns = n0 + tl.arange(0, BN)
        nmask = ns < W
        wm = (ks[:, None] < W) & nmask[None, :]
        # A_W^T[k, n] = A_W[n, k]
        awt = tl.load(aw_ptr + ns[None, :] * W + ks[:, None], mask=wm, other=0.0).to(ACC)
        low = tl.dot(t1a, awt, input_precision="ieee")
        if NTERMS == 2:
            awt2 = tl.load(aw_ptr + W * W + ns[None, :] * W + ks[:, None], mask=wm, other=0.0).to(ACC)
            low += tl.dot(t1b, awt2, input_precision="ieee")
        offs = base + rows[:, None] * W + ns[None, :]
        m = rmask[:, None] & nmask[None, :]
        if SPLIT:
            res = low
        else:
            c = tl.load(c_ptr + offs, mask=m, other=0.0).to(ACC)
            u = tl.load(u_ptr + offs, mask=m, other=0.0).to(ACC)
            if ORIGINAL:
                res = c + s_low * low + s_high * ((c - u) - low)
            else:
                res = u + s_low * low + s_high * ((c - u) - low)
        tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=m)


def _launch(x, y, ah, aw, lt, lv, ht, hv, original, split, bm, bk, bn):
    x = x.contiguous()
    y = y.contiguous() if y is not None else x
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if POISON:
        out.fill_(float("nan"))
    H, W = x.shape[-2], x.shape[-1]
    planes = x.numel() // (H * W) if x.numel() else 0
    if planes == 0:
        return out
    wp = max(16, triton.next_power_of_2(W))
    acc = tl.float64 if x.dtype == torch.float64 else tl.float32
    _freq_kernel[(planes, triton.cdiv(H, bm))](
        x, y, ah.contiguous(), aw.contiguous(), out,
        lt if lt is not None else x, float(lv), 1 if lt is not None and lt.dim() == 1 else 0,
        ht if ht is not None else x, float(hv), 1 if ht is not None and ht.dim() == 1 else 0,
        H, W, max(1, planes // x.shape[0]) if x.dim() > 2 else 1,
        NTERMS=ah.shape[0], SPLIT=split, HAS_SLT=lt is not None, HAS_SHT=ht is not None, ORIGINAL=bool(original),
        ACC=acc, BM=bm, BK=bk, BN=min(bn, wp), WP=wp)
    return out


def frequency_cfg(cond, uncond, ah, aw, low_t, low, high_t, high, original, *, bm=32, bk=32, bn=64):
    return _launch(cond, uncond, ah, aw, low_t, low, high_t, high, original, False, bm, bk, bn)


def frequency_split(x, ah, aw, *, bm=32, bk=32, bn=64):
    return _launch(x, None, ah, aw, None, 0.0, None, 0.0, False, True, bm, bk, bn)
