"""Plain-PyTorch implementations of the fastguide ops, with the ops' exact signatures.

They are registered as the CompositeExplicitAutograd kernel of each op, so they serve every
device that has no fused kernel (CPU when the C++ extension did not build, CUDA without Triton,
MPS, XPU, ...), and `fastguide bench` times them (eager and under torch.compile) as the
"same math in PyTorch" peers. Arithmetic is fp32 (fp64 for fp64 inputs), like the kernels.
"""
import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _out(x, like):
    """x in like's dtype, contiguous: the layout the fake implementations promise (inputs may be
    channels-last or transposed, and elementwise math keeps their strides)."""
    return x.to(like.dtype).contiguous()


def _per_sample(t, value, like):
    """A scale as something that broadcasts over a [B, ...] tensor: float, 0-d or [B, 1, ...]."""
    if t is None:
        return value
    t = t.to(like.dtype)
    return t.view((-1,) + (1,) * (like.dim() - 1)) if t.dim() == 1 else t


def _rescale(g, c, rescale):
    """diffusers' rescale_noise_cfg, except that a zero std(g) leaves g unchanged instead of NaN.
    A non-finite std (a NaN/inf in the sample) propagates to the whole sample, as in diffusers:
    guarding it too would silently skip the rescale and hide the bad value."""
    std_c = c.flatten(1).std(1)
    std_g = g.flatten(1).std(1)
    ok = std_g != 0  # True for NaN
    f = torch.where(ok, rescale * std_c / torch.where(ok, std_g, 1.0) + (1.0 - rescale), 1.0)
    return g * f.view((-1,) + (1,) * (g.dim() - 1))


def guide(cond, uncond, perturbed, s1_t, s1, s2_t, s2, rescale, original, zero_star):
    acc = _acc(cond)
    c, u = cond.to(acc), uncond.to(acc)
    if zero_star:
        alpha = (c * u).flatten(1).sum(1) / ((u * u).flatten(1).sum(1) + 1e-8)
        u = u * alpha.view((-1,) + (1,) * (c.dim() - 1))
    g = (c if original else u) + _per_sample(s1_t, s1, c) * (c - u)
    if perturbed is not None:
        g = g + _per_sample(s2_t, s2, c) * (c - perturbed.to(acc))
    if rescale > 0:
        g = _rescale(g, c, rescale)
    return _out(g, cond)


def cfg(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, False)


def pag(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original):
    return guide(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original, False)


def cfg_zero_star(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, True)


def cfg_momentum(cond, uncond, scale_t, scale, original, momentum, momentum_buffer):
    """cfg without rescale, and the momentum buffer = (c - u) + momentum * buffer in place (fp32, fp64 for fp64
    inputs, rounded once to the buffer's dtype: diffusers' MomentumBuffer.update in fp32)."""
    out = cfg(cond, uncond, scale_t, scale, 0.0, original)
    acc = _acc(cond)
    m = cond.to(acc) - uncond.to(acc)
    momentum_buffer.copy_((m + momentum * momentum_buffer.to(acc)).detach())  # state: values, never the graph
    return out


def apg(cond, uncond, scale_t, scale, eta, norm_threshold, momentum, momentum_buffer, group_size, original):
    """diffusers' normalized_guidance on contiguous groups of `group_size` elements, in fp32 (fp64 for
    fp64 inputs). Differentiable in cond, uncond and scale_t: `fastguide.apg` runs it when a gradient
    is needed (the op's schema mutates the buffer, so it has no registered formula)."""
    acc = _acc(cond)
    c = cond.to(acc).reshape(-1, group_size)
    u = uncond.to(acc).reshape(-1, group_size)
    m = c - u
    if momentum_buffer is not None:
        stored = (m + momentum * momentum_buffer.to(acc).reshape(m.shape)).to(cond.dtype)
        # The buffer is state: it takes the values, never the graph (a gradient does not flow into
        # earlier steps through it; fastguide.apg documents it).
        momentum_buffer.copy_(stored.detach().view(momentum_buffer.shape))
        m = stored.to(acc)
    k = torch.ones((m.shape[0], 1), dtype=acc, device=m.device)
    if norm_threshold > 0:
        k = torch.clamp(norm_threshold / m.norm(dim=1, keepdim=True), max=1.0)
    nc = c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    beta = k * (m * c).sum(1, keepdim=True) / (nc * nc)
    if scale_t is None:
        s = scale
    else:
        s = scale_t.to(acc)
        if s.dim() == 1:  # one scale per sample; groups never straddle samples here
            s = s.repeat_interleave(m.shape[0] // s.shape[0]).view(-1, 1)
    out = (c if original else u) + s * (k * m + (eta - 1.0) * beta * c)
    return _out(out.view(cond.shape), cond)


def guidance_stats(cond, uncond, guided, group_size):
    acc = _acc(cond)
    if group_size == 0:  # an empty input: one empty group per sample (zero sums, cosines 0), as the kernels
        return torch.zeros((cond.shape[0], 7), dtype=torch.float32, device=cond.device)
    c = cond.to(acc).reshape(-1, group_size)
    u = uncond.to(acc).reshape(-1, group_size)
    cols = [(c * u).sum(1), (c * c).sum(1), (u * u).sum(1)]
    if guided is not None:
        g = guided.to(acc).reshape(-1, group_size)
        cols += [(c * g).sum(1), (g * g).sum(1)]
    else:
        cols += [torch.zeros_like(cols[0])] * 2
    nc = cols[1].sqrt().clamp_min(1e-8)
    cols.append(cols[0] / (nc * cols[2].sqrt().clamp_min(1e-8)))
    cols.append(cols[3] / (nc * cols[4].sqrt().clamp_min(1e-8)) if guided is not None else torch.zeros_like(nc))
    return torch.stack(cols, 1).to(torch.float32)


def _lowpass(x, ah, aw):
    """sum_t A_H[t] @ x @ A_W[t]^T over the last two dims."""
    low = ah[0] @ x @ aw[0].T
    for t in range(1, ah.shape[0]):
        low = low + ah[t] @ x @ aw[t].T
    return low


def frequency_split(x, ah, aw):
    return _out(_lowpass(x.to(ah.dtype), ah, aw), x)


def frequency_cfg(cond, uncond, ah, aw, low_t, low, high_t, high, original):
    acc = ah.dtype
    c, u = cond.to(acc), uncond.to(acc)
    d = c - u
    lo = _lowpass(d, ah, aw)
    out = (c if original else u) + _per_sample(low_t, low, c) * lo + _per_sample(high_t, high, c) * (d - lo)
    return _out(out, cond)


def cfgpp_step(x, cond, uncond, a, b, c, scale_t, scale):
    acc = _acc(cond)
    u = uncond.to(acc)
    g = u + _per_sample(scale_t, scale, u) * (cond.to(acc) - u)
    return _out(a * x.to(acc) + b * g + c * u, cond)


def lincomb(preds, weights_t, weights):
    p0 = preds[0]
    acc = _acc(p0)
    x0 = p0.to(acc)
    if weights_t is not None:  # [K] or [B, K]: column k as a float or a [B, 1, ...] per-sample weight
        w = weights_t.to(acc)
        ws = [w[k] if w.dim() == 1 else w[:, k].reshape((-1,) + (1,) * (p0.dim() - 1)) for k in range(len(preds))]
    else:
        ws = list(weights)
    out = ws[0] * x0
    for k in range(1, len(preds)):
        out = out + ws[k] * (preds[k].to(acc) - x0)
    return _out(out, p0)


def diff_stats(base, a, b, group_size):
    acc = _acc(base)
    if group_size == 0:  # an empty input: zero sums per sample, as the kernels
        return torch.zeros((base.shape[0], 3), dtype=acc, device=base.device)
    r = base.to(acc).reshape(-1, group_size)
    da = a.to(acc).reshape(-1, group_size) - r
    db = b.to(acc).reshape(-1, group_size) - r
    return torch.stack([(da * db).sum(1), (da * da).sum(1), (db * db).sum(1)], 1)


def cfg_norm(cond, uncond, scale_t, scale, strength):
    acc = _acc(cond)
    c, u = cond.to(acc), uncond.to(acc)
    g = u + _per_sample(scale_t, scale, c) * (c - u)
    f = (c.norm(dim=1, keepdim=True) / (g.norm(dim=1, keepdim=True) + 1e-8)).clamp(max=1.0)
    return _out(g * f * strength, cond)


def _ssqrt(x):
    return x.abs().sqrt() * x.sign()


def mahiro_sim(cond, uncond, scale_t, scale):
    acc = _acc(cond)
    B = cond.shape[0]
    if cond.numel() == 0:
        return torch.zeros((B,), dtype=acc, device=cond.device)
    c, u = cond.to(acc), uncond.to(acc)
    s = _per_sample(scale_t, scale, c)
    g = u + s * (c - u)
    a, m = _ssqrt(s * u), _ssqrt((s * c + g) / 2)
    cos = (a * m).sum(1) / (a.norm(dim=1).clamp_min(1e-8) * m.norm(dim=1).clamp_min(1e-8))
    return cos.reshape(B, -1).mean(1)


# guide_weights' methods (fastguide/ops.py WEIGHT_METHODS): output columns of each, by id.
WEIGHT_COLS = (1, 1, 2, 2, 3, 3, 2, 2, 2)


def _tcfg_pq(cu, cc, uu):
    """TCFG's u' = p c + q u (csrc/weights.cpp tcfg_pq): the leading eigenvector e of [[cc, cu], [cu, uu]]."""
    d = (cc - uu) / 2
    r = (d * d + cu * cu).sqrt()
    lam = (cc + uu) / 2 + r
    e0, e1 = torch.where(d >= 0, d + r, cu), torch.where(d >= 0, cu, r - d)
    n = (e0 * e0 + e1 * e1).sqrt()
    safe = torch.where(n > 0, n, 1.0)
    e0, e1 = torch.where(n > 0, e0 / safe, 1.0), torch.where(n > 0, e1 / safe, 0.0)
    k = torch.where(lam > 0, (e0 * cu + e1 * uu) / torch.where(lam > 0, lam, 1.0), 0.0)
    return k * e0, k * e1


def guide_weights(stats, method, scale_t, scale, scale2_t, scale2, param):
    x = stats.double()
    x = x[:, None] if x.dim() == 1 else x
    B = x.shape[0]

    def sc(t, v):
        return torch.full((B,), v, dtype=torch.float64, device=x.device) if t is None else t.double().expand(B)

    s, s2 = sc(scale_t, scale), sc(scale2_t, scale2)
    if method in (5, 7):  # one projection / similarity for the batch
        x = (x.sum(0, keepdim=True) if method == 5 else x.mean(0, keepdim=True)).expand(B, -1)
    if method in (0, 1):  # MAG
        cu, cc, uu = x[:, 0], x[:, 1], x[:, 2]
        e = torch.exp(-param * ((cc - 2 * cu + uu).clamp_min(0).sqrt() / uu.sqrt()))
        cols = [s * e if method == 1 else 1.0 + (s - 1.0) * e]
    elif method in (2, 3):  # TCFG: a c + b u as lincomb([u, c])
        p, q = _tcfg_pq(x[:, 0], x[:, 1], x[:, 2])
        a, b = (1.0 + s - s * p, -s * q) if method == 3 else (s + (1.0 - s) * p, (1.0 - s) * q)
        cols = [a + b, a]
    elif method in (4, 5):  # Perp-Neg: lincomb([empty, cond, uncond])
        pn, pp = x[:, 0], x[:, 1]
        alpha = torch.where(pp > 0, pn / torch.where(pp > 0, pp, 1.0), 0.0)
        cols = [torch.ones_like(s), s * (1.0 + s2 * alpha), -s * s2]
    elif method in (6, 7):  # Mahiro: lincomb([uncond, cond])
        k = 2 * (x[:, 0] + 1)
        cols = [s + k * (1.0 - s) / 4, s]
    elif method == 8:  # RenormCFG: lincomb([uncond, cond])
        cu, cc, uu = x[:, 0], x[:, 1], x[:, 2]
        ng = ((1 - s) * (1 - s) * uu + 2 * s * (1 - s) * cu + s * s * cc).clamp_min(0).sqrt()
        nmax = param * cc.sqrt()
        f = torch.where((ng >= nmax) & (ng > 0), nmax / torch.where(ng > 0, ng, 1.0), 1.0)
        cols = [f, f * s]
    else:
        raise ValueError(f"fastguide.guide_weights: method must be in 0..{len(WEIGHT_COLS) - 1}, got {method}")
    return torch.stack(cols, 1).to(stats.dtype)
