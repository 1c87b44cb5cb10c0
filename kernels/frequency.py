"""Triton kernel of the frequency-split family (see fastguide/frequency.py).

low = sum_t A_H[t] @ D @ A_W[t]^T per [H, W] plane (D = cond - uncond, or x for the split). One
program per (plane, BM x BN output tile), so live state stays bounded whatever the plane's size (grid:
(planes, row tiles * column tiles), or (planes, row tiles, column tiles) for small tiles, see _col_axis):

    low[rows, cols] = sum_t sum_j ( sum_k A_H[t][rows, k] @ D[k, j] ) @ A_W[t]^T[j, cols]
                                    '------ T: [BM, BK] ------'

with j and k running over BK-blocks of the width and the height. Live accumulators: T [BM, BK] and
low [BM, BN]; tiles a [BM, BK], d [BK, BK], awt [BK, BN]. The price is that T (the first matmul) is
recomputed for every column tile, cdiv(W, BN) times: BN is as wide as the register budget allows.
The program then writes out = base + s_low * low + s_high * (d - low) for its tile.

Numerics: tl.dot with input_precision="ieee" (fp32 FMA, no TF32), fp64 for fp64 inputs; fp16 / bf16
inputs are widened to fp32 on load. The operators' entries are O(1) and sum to <= 1 per row, so fp32
products with fp32 accumulation reach ~1e-7 relative error, which the tests hold to 1e-6 (TF32 would
give ~1e-3; 3xTF32 would be close to fp32 but without a GPU here it cannot be tested against IEEE).
NTERMS is 1 (bilinear, Laplacian) or 2 (FFT box: real and imaginary parts).
"""
import torch
import triton
import triton.language as tl

from ._launch import Launch, new_output, run, scalar, scale_arg, tl_acc


@triton.jit
def _scale(ptr, value, b, rows, rmask, stride, HAS_T: tl.constexpr, ROW_SCALE: tl.constexpr, ACC: tl.constexpr):
    """The scale of plane p's sample b, or for a 2-D [B, N] input (one plane) the scale of each row's sample."""
    if HAS_T:
        if ROW_SCALE:
            return tl.load(ptr + rows.to(tl.int64) * stride, mask=rmask, other=0.0).to(ACC)[:, None]
        else:
            return tl.load(ptr + b * stride).to(ACC)
    else:
        return scalar(value, ACC)


@triton.jit
def _freq_kernel(c_ptr, u_ptr, ah_ptr, aw_ptr, out_ptr, sl_ptr, sl: tl.float64, sl_stride, sh_ptr,
                 sh: tl.float64, sh_stride, H, W, planes_per_sample, col_tiles,
                 NTERMS: tl.constexpr, SPLIT: tl.constexpr, HAS_SLT: tl.constexpr, HAS_SHT: tl.constexpr,
                 ROW_SCALE: tl.constexpr, ORIGINAL: tl.constexpr, ACC: tl.constexpr, BM: tl.constexpr,
                 BN: tl.constexpr, BK: tl.constexpr, COL_AXIS: tl.constexpr):
    p = tl.program_id(0).to(tl.int64)
    if COL_AXIS:  # grid (planes, row tiles, column tiles); col_tiles unused
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        cols = tl.program_id(2) * BN + tl.arange(0, BN)
    else:  # grid (planes, row tiles * column tiles)
        tile = tl.program_id(1)
        rows = (tile // col_tiles) * BM + tl.arange(0, BM)
        cols = (tile % col_tiles) * BN + tl.arange(0, BN)
    rmask = rows < H
    cmask = cols < W
    base = p * H * W
    low = tl.zeros([BM, BN], dtype=ACC)
    for t in tl.static_range(NTERMS):
        a_t = ah_ptr + t * H * H
        aw_t = aw_ptr + t * W * W
        for j0 in range(0, W, BK):
            js = j0 + tl.arange(0, BK)
            jmask = js < W
            tm = tl.zeros([BM, BK], dtype=ACC)
            for k0 in range(0, H, BK):
                ks = k0 + tl.arange(0, BK)
                kmask = ks < H
                a = tl.load(a_t + rows[:, None] * H + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                offs = base + ks[:, None] * W + js[None, :]
                m = kmask[:, None] & jmask[None, :]
                d = tl.load(c_ptr + offs, mask=m, other=0.0).to(ACC)
                if not SPLIT:
                    d = d - tl.load(u_ptr + offs, mask=m, other=0.0).to(ACC)
                tm = tl.dot(a.to(ACC), d, tm, input_precision="ieee")
            # A_W^T[j, n] = A_W[n, j]
            awt = tl.load(aw_t + cols[None, :] * W + js[:, None], mask=jmask[:, None] & cmask[None, :], other=0.0)
            low = tl.dot(tm, awt.to(ACC), low, input_precision="ieee")
    offs = base + rows[:, None] * W + cols[None, :]
    m = rmask[:, None] & cmask[None, :]
    if SPLIT:
        res = low
    else:
        b = p // planes_per_sample
        s_low = _scale(sl_ptr, sl, b, rows, rmask, sl_stride, HAS_SLT, ROW_SCALE, ACC)
        s_high = _scale(sh_ptr, sh, b, rows, rmask, sh_stride, HAS_SHT, ROW_SCALE, ACC)
        c = tl.load(c_ptr + offs, mask=m, other=0.0).to(ACC)
        u = tl.load(u_ptr + offs, mask=m, other=0.0).to(ACC)
        if ORIGINAL:
            res = c + s_low * low + s_high * ((c - u) - low)
        else:
            res = u + s_low * low + s_high * ((c - u) - low)
    tl.store(out_ptr + offs, res.to(out_ptr.dtype.element_ty), mask=m)


def _tiles(H, W, dtype):
    """(BM, BN, BK, num_warps, num_stages) for an H x W plane (H + W <= 512 on the matrix route).

    Chosen with bench/aot.py (sm_80 / sm_90: no spills on its named planes, see the gap below).
    The IEEE (FMA) tl.dot keeps each thread's whole slice of both operands in registers, so BK drives
    the register count as much as the [BM, BN] accumulator: BK = 16 (BK = 32 or BN = 128 reach the 255
    cap and spill). fp32 / fp16 / bf16: BM = 32, BN = 64, 150-210 registers at 4 warps. fp64 (two
    registers per element): BM = 16, BN = 64. Small planes shrink the tile to the plane (>= 16, tl.dot's
    minimum). Planes with a side < 64 take a [16, 32] tile: with the larger tile ptxas settled on an
    occupancy tier (80 / 96 / 128 / 168 registers) and spilled 8-68 bytes on 11 sweep planes; with it, 3
    sweep specialisations still spilled 8 bytes, the column-tile base (gone with the 3-D grid, see
    _col_axis; bench/NOTES.md). 4 warps, num_stages = 2: <= 12 KiB of
    shared memory; 8 warps, 2 warps, or num_stages 1 or 3 spill on more planes.
    """
    bm = min(16 if dtype == torch.float64 else 32, max(16, triton.next_power_of_2(H)))
    # <= 16-row fp32 planes wider than 64: BN = 32 (ptxas capped the [16, 64] tile at 128 registers and
    # spilled on sm_90); the first matmul they recompute per column tile is only H x H x W.
    bn = 32 if bm == 16 and W > 64 and dtype != torch.float64 else 64
    if min(H, W) < 64:  # small planes: a [16, 32] tile (the sweep's spills, see above)
        bm, bn = 16, 32
    return bm, min(bn, max(16, triton.next_power_of_2(W))), 16, 4, 2


def _col_axis(H, W, bm, bn):
    """Whether the column tile gets its own grid axis (grid (planes, row tiles, column tiles)) rather than
    tile // col_tiles, tile % col_tiles on a 2-D grid: for [16, 32]-or-smaller tiles with several column tiles.

    With the 2-D grid, ptxas spilled the column base (the integer division's result, live across the K loops:
    4 + 4 bytes, kept at an occupancy tier of 80 / 96 registers) on 3 such sweep specialisations on sm_80
    (2x48 fp32 one term, 16x33 fp16 / bf16 two terms); from its own axis it is a ctaid read and a shift, which
    ptxas recomputes. Not for the larger tiles: there the register this frees made ptxas drop a tier (fp32
    split on sm_80: 144-156 -> 128, spilling 24 bytes of the plane base; fp16 / bf16 split on unaligned planes,
    sm_90: 188 -> 168, spilling 48 bytes) instead. With one column tile, col_tiles == 1 is specialised to a constant and the division
    vanishes, so those keep the 2-D grid (2x2 fp32 spilled 8 bytes on sm_90 with the 3-D one). Both choices
    checked on every sweep specialisation by bench/aot.py --full.
    """
    return bm == 16 and bn <= 32 and triton.cdiv(W, bn) > 1


def _plan(x, y, ah, aw, out, lt, lv, ht, hv, original, split, tiles=None, col_axis=None):
    """Launches for contiguous x (cond, or the split's input), y (uncond or None) into out.
    tiles and col_axis override _tiles / _col_axis (tests)."""
    H, W = x.shape[-2], x.shape[-1]
    planes = x.numel() // (H * W) if x.numel() else 0
    if planes == 0:
        return []
    bm, bn, bk, warps, stages = tiles or _tiles(H, W, x.dtype)
    row_tiles, col_tiles = triton.cdiv(H, bm), triton.cdiv(W, bn)
    if col_axis is None:
        col_axis = _col_axis(H, W, bm, bn)
    lp, lvv, ls, has_l = scale_arg(lt, lv, x)
    hp, hvv, hs, has_h = scale_arg(ht, hv, x)
    return [Launch(_freq_kernel, (planes, row_tiles, col_tiles) if col_axis else (planes, row_tiles * col_tiles),
                   (x, y if y is not None else x, ah, aw, out, lp, lvv, ls, hp, hvv, hs,
                    H, W, max(1, planes // x.shape[0]) if x.dim() > 2 else 1, col_tiles),
                   dict(NTERMS=ah.shape[0], SPLIT=split, HAS_SLT=has_l, HAS_SHT=has_h,
                        # a 2-D [B, N] input is one plane whose row r is sample r
                        ROW_SCALE=x.dim() == 2, ORIGINAL=bool(original), ACC=tl_acc(x.dtype), BM=bm, BN=bn, BK=bk,
                        COL_AXIS=bool(col_axis)),
                   num_warps=warps, num_stages=stages)]


def _launch(x, y, ah, aw, lt, lv, ht, hv, original, split, tiles):
    x = x.contiguous()
    y = y.contiguous() if y is not None else None
    out = new_output(x)
    run(_plan(x, y, ah.contiguous(), aw.contiguous(), out, lt, lv, ht, hv, original, split, tiles))
    return out


def _test_tiles(bm, bk, bn):
    """Tile override for tests (small planes that still need several row / column / K blocks)."""
    return None if bm is None else (bm, bn, bk, 4, 2)


def frequency_cfg(cond, uncond, ah, aw, low_t, low, high_t, high, original, *, bm=None, bk=None, bn=None):
    return _launch(cond, uncond, ah, aw, low_t, low, high_t, high, original, False, _test_tiles(bm, bk, bn))


def frequency_split(x, ah, aw, *, bm=None, bk=None, bn=None):
    return _launch(x, None, ah, aw, None, 0.0, None, 0.0, False, True, _test_tiles(bm, bk, bn))
