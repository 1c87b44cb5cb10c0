"""Frequency-split guidance: FreSca (FFT box), FreCaS FA-CFG (bilinear down/up) and diffusers' FDG
(kornia Laplacian pyramid), all through one separable low-pass operator.

Each low-pass filter here acts separably and linearly on the last two dims, so for an [H, W] plane
    low(X) = sum_t  A_H[t] @ X @ A_W[t]^T
with small real matrices built once in float64 and cached per (method, size, parameters, device, dtype):
    fft_box   Re(F^-1 diag(box) F) on each axis: two terms (real parts, minus imaginary parts), because
              FreSca's box [c - k, c + k) (c = n // 2, k the clamped cutoff, see _params) is not symmetric
              around DC for even sizes, nor for odd ones when k = c
    bilinear  up(down(.)) with F.interpolate(mode="bilinear", align_corners=False): one term
    laplacian P_i = pyrup^i o pyrdown^i as kornia computes them (5-tap [1 4 6 4 1]/16 blur, reflect
              border, bilinear resize). A Laplacian pyramid rebuilds exactly, so level i of the rebuilt
              output is (P_i - P_{i+1}) applied at full size, and FDG's per-level CFG is
              out = base + s_0 d + sum_{i>=1} (s_i - s_{i-1}) P_i d; two levels = one term, P_1.
The guided result `uncond + scale_low * low(d) + scale_high * (d - low(d))`, d = cond - uncond, is the
op `fastguide::frequency_cfg` (CPU: ATen matmul + a fused combine; CUDA: one Triton kernel per (plane,
BM x BN output tile) doing both matmuls in IEEE fp32 — no TF32 — and the combine, see kernels/frequency.py).
"""
import math
import numbers
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from . import _eager, ops

METHODS = ("fft_box", "bilinear", "laplacian")
# Route per shape. The matrix route costs T * 2 N (H + W) flops per plane and is one fused kernel; the direct
# route (torch.fft / F.interpolate, several passes) costs O(N log N) / O(N). Measured on CPU: the matrix
# route wins at 128 x 128 (SDXL) and 60 x 104 (video) planes and loses 5x at 4096 x 64 (Flux's packed
# tokens), so planes with H + W above this bound take the direct route (FFT box and bilinear).
MATRIX_MAX_SIDE_SUM = 512
_CACHE_SIZE = 64
_cache = OrderedDict()  # (method, n, param, device, dtype) -> [T, n, n] tensor
# Samplers run in threads (servers, one pipeline per request): get + move_to_end + evict must be atomic.
# Building a missing entry happens outside the lock (two threads may build the same one; both are equal).
_cache_lock = threading.Lock()


def _cached(key, build):
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    value = build()
    with _cache_lock:
        _cache[key] = value
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return value


def _axis_operators(method, n, param):
    """float64 CPU matrices [T, n, n] of the 1-D low-pass operator along one axis."""
    eye = torch.eye(n, dtype=torch.float64)
    if method == "fft_box":
        # FreSca: fftshift, box [c - k, c + k) with c = n // 2 and k <= c already clamped (_params), ifftshift.
        a = torch.fft.ifft(_box(n, param)[:, None] * torch.fft.fft(eye, dim=0), dim=0)
        # Re((R + iI) X (R' + iI')^T) = R X R'^T - I X I'^T: the second term carries the sign on one axis.
        return a.real, a.imag
    if method == "bilinear":
        down = F.interpolate(eye[None], size=param, mode="linear", align_corners=False)[0]  # [n, m]
        up = F.interpolate(down[None], size=n, mode="linear", align_corners=False)[0]       # [n, n]
        return (up.T.contiguous(),)  # rows: output index; x -> up(down(x)) is x @ up, so A = up^T
    if method == "laplacian":
        # P_level = pyrup^level o pyrdown^level along one axis, as kornia computes it.
        a = eye
        for i in range(param):
            a = _pyr_down_up(n >> i)[0] @ a
        for i in reversed(range(param)):
            a = _pyr_down_up(n >> i)[1] @ a
        return (a,)
    raise AssertionError(method)


def _pyr_down_up(n):
    """kornia's pyrdown [n//2, n] and pyrup [n, n//2] along one axis, as matrices acting on columns:
    5-tap [1, 4, 6, 4, 1]/16 blur with reflect border, bilinear resize (align_corners=False)."""
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64).view(1, 1, 5) / 16.0

    def blur(rows):  # each row is a signal
        return F.conv1d(F.pad(rows[:, None], (2, 2), mode="reflect"), k)[:, 0]

    def resize(rows, size):
        return F.interpolate(rows[None], size=size, mode="linear", align_corners=False)[0]

    down = resize(blur(torch.eye(n, dtype=torch.float64)), n // 2).T.contiguous()
    up = blur(resize(torch.eye(n // 2, dtype=torch.float64), n)).T.contiguous()
    return down, up


@torch._dynamo.assume_constant_result
def operators(method, H, W, param_h, param_w, device, dtype):
    """(A_H [T,H,H], A_W [T,W,W]) on device in dtype (fp32, or fp64 for fp64 inputs), LRU-cached.

    torch.compile runs it at trace time and keeps the result as a constant of the graph: no cache
    guards, so no recompile when the cache fills on the first call.
    """
    def build():
        ah = _axis_operators(method, H, param_h)
        aw = _axis_operators(method, W, param_w)
        if method == "fft_box":
            aw = (aw[0], -aw[1])
        return torch.stack(ah).to(device=device, dtype=dtype), torch.stack(aw).to(device=device, dtype=dtype)

    return _cached((method, H, W, param_h, param_w, str(device), dtype), build)


def _box(n, k):
    """FreSca's 1-D box on the unshifted spectrum: ones on [n//2 - k, n//2 + k) of the fftshifted axis
    (0 <= k <= n // 2, so the slice never wraps), ifftshifted. float64."""
    c = n // 2
    assert 0 <= k <= c, (n, k)
    m = torch.zeros(n, dtype=torch.float64)
    m[c - k:c + k] = 1.0
    return torch.fft.ifftshift(m)


@torch._dynamo.assume_constant_result
def _fft_mask(H, W, ch, cw, device, dtype):
    """FreSca's box on the unshifted spectrum: the outer product of two 1-D boxes."""
    return _cached(("fft_mask", H, W, ch, cw, str(device), dtype),
                   lambda: (_box(H, ch)[:, None] * _box(W, cw)[None, :]).to(device=device, dtype=dtype))


def _direct(method, H, W):
    return method in ("fft_box", "bilinear") and H + W > MATRIX_MAX_SIDE_SUM


def _direct_lowpass(x, method, ph, pw):
    """The direct route's low band of x ([..., H, W], fp32/fp64): torch.fft (cuFFT on GPU) or F.interpolate."""
    H, W = x.shape[-2:]
    if method == "fft_box":
        return torch.fft.ifft2(torch.fft.fft2(x) * _fft_mask(H, W, ph, pw, x.device, x.dtype)).real
    planes = x.reshape(-1, 1, H, W)
    low = F.interpolate(F.interpolate(planes, size=(ph, pw), mode="bilinear"), size=(H, W), mode="bilinear")
    return low.view(x.shape)


CUTOFF_CLAMPS = ("fresca", "comfyui")


def _params(op, x, method, cutoff, size, levels=None, cutoff_clamp="fresca"):
    if x.dim() < 2:
        raise ValueError(f"fastguide.{op}: input must be [..., H, W], got shape {tuple(x.shape)}")
    H, W = x.shape[-2], x.shape[-1]
    if H < 2 or W < 2:
        raise ValueError(f"fastguide.{op}: H and W must be >= 2, got {H}x{W}")
    if method == "fft_box":
        if not isinstance(cutoff, numbers.Integral) or isinstance(cutoff, bool) or cutoff < 0:
            raise ValueError(f"fastguide.{op}: method='fft_box' needs cutoff= an int >= 0 (frequency indices), "
                             f"got {cutoff!r}")
        # FreSca's code (core/fresca.py) clamps one cutoff at min(H // 2, W // 2) for both axes; ComfyUI's
        # node clamps each axis at its own n // 2. They differ only when cutoff > min(H, W) // 2 and
        # H // 2 != W // 2. Either way the box [n//2 - k, n//2 + k) never covers index n - 1 of an odd axis.
        if cutoff_clamp == "fresca":
            k = min(int(cutoff), H // 2, W // 2)
            return k, k
        if cutoff_clamp == "comfyui":
            return min(int(cutoff), H // 2), min(int(cutoff), W // 2)
        raise ValueError(f"fastguide.{op}: cutoff_clamp must be one of {CUTOFF_CLAMPS}, got {cutoff_clamp!r}")
    if method == "bilinear":
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, numbers.Integral) and s >= 1 for s in size)):
            raise ValueError(f"fastguide.{op}: method='bilinear' needs size=(h, w), the low band's resolution, "
                             f"got {size!r}")
        if size[0] > H or size[1] > W:
            raise ValueError(f"fastguide.{op}: size {tuple(size)} is larger than the input's {H}x{W}")
        return int(size[0]), int(size[1])
    if method == "laplacian":
        return levels, levels
    raise ValueError(f"fastguide.{op}: method must be one of {METHODS}, got {method!r}")


def frequency_split(x, *, method="fft_box", cutoff=None, size=None, cutoff_clamp="fresca"):
    """(low, high) with low + high == x, for x of shape [..., H, W] (any leading dims).

    method="fft_box": FreSca's box: frequency rows [H//2 - k, H//2 + k) and columns [W//2 - k, W//2 + k)
    of the fftshifted spectrum, k = min(cutoff, H // 2, W // 2) as in FreSca's code (cutoff 0: nothing is
    low). `cutoff_clamp="comfyui"`: each axis clamped at its own n // 2 instead, as ComfyUI's FreSca node
    does (the same box unless cutoff > min(H, W) // 2 and H // 2 != W // 2). The box holds the whole
    spectrum only for even H == W with cutoff >= H // 2 (comfyui: even H and W, cutoff >= max(H, W) // 2):
    on an odd axis it never holds the last shifted index.
    method="bilinear": FreCaS, low = bilinear resize to `size=(h, w)` and back.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"fastguide.frequency_split: x must be a floating tensor, got {getattr(x, 'dtype', type(x))}")
    ph, pw = _params("frequency_split", x, method, cutoff, size, cutoff_clamp=cutoff_clamp)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if _direct(method, x.shape[-2], x.shape[-1]):
        low = _direct_lowpass(x.to(acc), method, ph, pw).to(x.dtype)
        return low, x - low
    ah, aw = operators(method, x.shape[-2], x.shape[-1], ph, pw, x.device, acc)
    low = ops._op["frequency_split"](x, ah, aw)
    return low, x - low


def frequency_cfg(cond, uncond, scale_low, scale_high, *, method="fft_box", cutoff=None, size=None, rescale=0.0,
                  original=False, cutoff_clamp="fresca"):
    """`uncond + scale_low * low(d) + scale_high * high(d)`, d = cond - uncond (`cond + ...` when original),
    then guidance rescale. FreSca-on-CFG (method="fft_box", cutoff=, cutoff_clamp= as in `frequency_split`)
    and FreCaS FA-CFG (method="bilinear", size=) in one fused op. Scales: float, 0-d tensor or [B] tensor.
    Inputs [B, ..., H, W]. Differentiable in cond, uncond and tensor scales.
    """
    ops._check_pair("frequency_cfg", cond, uncond, "uncond")
    if cond.dim() < 3:
        # [B, N] would be one H=B x W=N plane: the low-pass would mix samples. Not a guidance input.
        raise ValueError(f"fastguide.frequency_cfg: inputs must be [B, ..., H, W] (>= 3 dims, batch first), got shape "
                         f"{tuple(cond.shape)}; for one plane per sample use cond[:, None]")
    ph, pw = _params("frequency_cfg", cond, method, cutoff, size, cutoff_clamp=cutoff_clamp)
    return _guided(cond, uncond, scale_low, scale_high, method, ph, pw, rescale, original)


def _guided(cond, uncond, scale_low, scale_high, method, ph, pw, rescale, original, op="frequency_cfg"):
    lt, lv = ops._scale(op, "scale_low", scale_low, cond)
    ht, hv = ops._scale(op, "scale_high", scale_high, cond)
    r = ops._rescale(op, rescale)
    acc = torch.float64 if cond.dtype == torch.float64 else torch.float32
    if _direct(method, cond.shape[-2], cond.shape[-1]):
        c, u = cond.to(acc), uncond.to(acc)
        d = c - u
        low = _direct_lowpass(d, method, ph, pw)
        out = ((c if original else u) + _eager._per_sample(lt, lv, c) * low
               + _eager._per_sample(ht, hv, c) * (d - low)).to(cond.dtype)
    else:
        ah, aw = operators(method, cond.shape[-2], cond.shape[-1], ph, pw, cond.device, acc)
        out = ops._op["frequency_cfg"](cond, uncond, ah, aw, lt, lv, ht, hv, bool(original))
    if r > 0:
        out = ops._op["cfg"](cond, out, None, 0.0, r, False)  # = rescale(out, cond, r)
    return out


def fdg(cond, uncond, scales, *, levels=None, parallel_weights=None, rescale=0.0, rescale_space="data",
        original=False):
    """diffusers' `FrequencyDecoupledGuidance(guidance_scales=scales, guidance_rescale=rescale,
    parallel_weights=parallel_weights, use_original_formulation=original, guidance_rescale_space=rescale_space)
    .forward(cond, uncond).pred` (kornia Laplacian pyramid), inputs [B, C, H, W].

    `scales` go from the highest-frequency level to the lowest, like diffusers'; `levels` defaults to
    len(scales). Two levels without parallel weights (diffusers' default) run as one fused
    frequency_cfg; more levels, parallel weights or rescale_space="freq" run the pyramid explicitly with
    the same cached operators (plain PyTorch, fp32). kornia reflect-pads sides that are not powers of two
    (or not divisible by 2^(levels-1)) and returns a larger tensor; fdg raises for those shapes instead.
    """
    ops._check_pair("fdg", cond, uncond, "uncond")
    if isinstance(scales, (torch.Tensor, numbers.Real)) or not hasattr(scales, "__len__"):
        raise TypeError(f"fastguide.fdg: scales must be a list with one scale per level (high to low), got "
                        f"{type(scales).__name__}")
    # Each level's scale as given (float, 0-d or [B] tensor: a tensor is never read on the host), checked
    # like every op's scale; weights and rescales are plain finite floats.
    scales = list(scales)
    for i, v in enumerate(scales):
        ops._scale("fdg", f"scales[{i}]", v, cond)
    L = len(scales) if levels is None else int(levels)
    if L < 1 or L != len(scales):
        raise ValueError(f"fastguide.fdg: need one scale per level (levels={levels!r}, {len(scales)} scales)")
    if cond.dim() != 4:
        raise ValueError(f"fastguide.fdg: inputs must be [B, C, H, W] like kornia's pyramid, got {tuple(cond.shape)}")
    H, W = cond.shape[-2:]
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    stride = 1 << (L - 1)
    if (not (pow2(H) or pow2(W))) or (L > 1 and (H % stride or W % stride)):
        raise ValueError(f"fastguide.fdg: {H}x{W} would be reflect-padded by kornia (sides must include a power of "
                         f"two and be divisible by 2^(levels-1) = {stride}); diffusers then returns a larger tensor")
    pw = [1.0] * L if parallel_weights is None else _per_level("parallel_weights", parallel_weights, L)
    rs = _per_level("rescale", rescale, L)
    if rescale_space not in ("data", "freq"):
        raise ValueError(f"fastguide.fdg: rescale_space must be 'data' or 'freq', got {rescale_space!r}")
    if L == 2 and all(math.isclose(p, 1.0) for p in pw) and (rescale_space == "data" or not any(rs)):
        return _guided(cond, uncond, scales[1], scales[0], "laplacian", 1, 1, rs[0] if rescale_space == "data"
                       else 0.0, original, op="fdg")
    return _fdg_explicit(cond, uncond, scales, pw, rs, rescale_space, original)


def _per_level(name, value, L):
    """A float or one float per level, each finite, as a list of L floats."""
    values = [value] * L if isinstance(value, numbers.Real) else list(value)
    if len(values) != L:
        raise ValueError(f"fastguide.fdg: {name} needs one value per level ({L}), got {len(values)}")
    ops._finite("fdg", **{f"{name}[{i}]": v for i, v in enumerate(values)})
    return [float(v) for v in values]


def _fdg_explicit(cond, uncond, scales, pw, rs, rescale_space, original):
    """The general FDG, as diffusers runs it: a Laplacian pyramid per input (levels at their own
    resolutions, via the cached pyrdown/pyrup matrices), CFG with optional parallel/orthogonal weighting
    and rescale per level, then the pyramid rebuilt. Plain PyTorch in fp32."""
    L = len(scales)
    acc = torch.float64 if cond.dtype == torch.float64 else torch.float32
    H, W = cond.shape[-2:]
    mats = [(tuple(m.to(cond.device, acc) for m in _pyr_down_up(H >> i)),
             tuple(m.to(cond.device, acc) for m in _pyr_down_up(W >> i))) for i in range(L - 1)]

    def pyramid(x):
        gauss = [x]
        for (dh, _), (dw, _) in mats:
            gauss.append(dh @ gauss[-1] @ dw.T)
        return [gauss[i] - mats[i][0][1] @ gauss[i + 1] @ mats[i][1][1].T for i in range(L - 1)] + [gauss[-1]]

    cb, ub = pyramid(cond.to(acc)), pyramid(uncond.to(acc))
    guided = []
    for i in range(L):
        shift = cb[i] - ub[i]
        if not math.isclose(pw[i], 1.0):
            dims = list(range(1, shift.dim()))
            v1 = F.normalize(cb[i], dim=dims)
            par = (shift * v1).sum(dims, keepdim=True) * v1
            shift = pw[i] * par + (shift - par)
        st, sv = ops._scale("fdg", f"scales[{i}]", scales[i], cond)
        g = (cb[i] if original else ub[i]) + _eager._per_sample(st, sv, shift) * shift
        if rescale_space == "freq" and rs[i] > 0:
            g = ops.rescale(g, cb[i], rs[i])
        guided.append(g)
    out = guided[-1]
    for i in range(L - 2, -1, -1):
        out = mats[i][0][1] @ out @ mats[i][1][1].T + guided[i]
    if rescale_space == "data" and rs[0] > 0:
        out = ops.rescale(out, cond.to(acc), rs[0])
    return out.to(cond.dtype)
