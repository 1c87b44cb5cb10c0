"""Backward formulas of the fastguide ops, registered with `torch.library.register_autograd` (fastguide/ops.py).

Each formula is plain PyTorch on the saved inputs, so it runs on every device and torch.compile traces it
(AOTAutograd puts it in the backward graph). Arithmetic as in the forward: fp32, fp64 for fp64 inputs (the
frequency ops: the operators' dtype); the gradients come back in each input's dtype. Tensor scales
(`scale_t`, `pag_scale_t`, `low_t`, `high_t`) get gradients too: summed to their shape (0-d or [B]). Where a
derivative does not exist (a clamp's ends, the norm of a zero vector) the formulas follow PyTorch's conventions
(torch.clamp, torch.norm's 0 at 0); at 0, where autograd of the eager formula gives NaN, mahiro_sim's sign-sqrt
has derivative 0 (_ssqrt_grad).

`FORMULAS[name] = (setup_context, backward)`. An op with no entry (apg, cfg_momentum: their schemas mutate the
momentum buffer, which register_autograd refuses) gets an Autograd kernel that raises when a gradient is needed
(ops.py); the public `fastguide.apg` then routes through the differentiable eager math instead.
"""
import torch

from ._eager import _acc, _lowpass, _per_sample


def _view(x):
    return (-1,) + (1,) * (x.dim() - 1)


def _sum1(x):
    """Per-sample sum of a [B, ...] tensor: [B]."""
    return x.flatten(1).sum(1)


def _scale_grad(t, prod, needed):
    """The gradient of a tensor scale from the per-element product `grad * d out/d scale`: summed over
    everything (0-d scale) or per sample ([B] scale), in the scale's dtype; None without a tensor."""
    if t is None or not needed:
        return None
    g = prod.sum() if t.dim() == 0 else _sum1(prod)
    return g.to(t.dtype)


def _cast(g, like, needed):
    return g.to(like.dtype) if needed and g is not None else None


# --- cfg, pag, cfg_zero_star (+ guidance rescale) --------------------------------------------------
def _guide_setup(ctx, cond, uncond, perturbed, s1_t, s1, s2_t, s2, rescale, original):
    ctx.save_for_backward(cond, uncond, perturbed, s1_t, s2_t)
    ctx.s1, ctx.s2, ctx.rescale, ctx.original = s1, s2, rescale, original


def _guide_backward(ctx, grad, zero_star, i_s1, i_s2=None):
    """out = f * g,  g = base + s1 (c - a u) + s2 (c - p),  base = a u (c when original),
    a = <c, u> / (|u|^2 + 1e-8) per sample for CFG-Zero* (1 otherwise),
    f = r std(c) / std(g) + 1 - r per sample when rescale r > 0 and std(g) != 0 (1 otherwise)."""
    cond, uncond, pert, s1_t, s2_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    acc = _acc(cond)
    c, u, G = cond.to(acc), uncond.to(acc), grad.to(acc)
    s1 = _per_sample(s1_t, ctx.s1, c)
    s2 = _per_sample(s2_t, ctx.s2, c) if pert is not None else 0.0
    p = pert.to(acc) if pert is not None else None
    if zero_star:
        D = _sum1(u * u) + 1e-8
        alpha = (_sum1(c * u) / D).view(_view(c))
        ua = alpha * u
    else:
        ua = u
    gc_direct = None
    if ctx.rescale > 0:
        # The guided prediction before the rescale, and the rescale's derivative (unbiased std like
        # diffusers, over all non-batch dims; a zero std(g) leaves g unchanged, as the kernels do).
        g = (c if ctx.original else ua) + s1 * (c - ua)
        if p is not None:
            g = g + s2 * (c - p)
        n = c[0].numel()
        r = ctx.rescale
        gm = g - g.flatten(1).mean(1).view(_view(g))
        cm = c - c.flatten(1).mean(1).view(_view(c))
        sg = (_sum1(gm * gm) / (n - 1)).sqrt()
        sc = (_sum1(cm * cm) / (n - 1)).sqrt()
        ok = (sg != 0) & (n > 1)  # True for a NaN std: the NaN propagates, as in the forward
        sg1 = torch.where(ok, sg, 1.0)
        f = torch.where(ok, r * sc / sg1 + (1.0 - r), 1.0)
        q = _sum1(G * g)  # <grad, g>
        # d std(x) / dx = (x - mean) / ((n - 1) std(x)); at std(c) = 0 it does not exist: 0 is taken.
        kg = torch.where(ok, -r * sc * q / (sg1 ** 3 * (n - 1)), 0.0)
        kc = torch.where(ok & (sc != 0), r * q / (sg1 * torch.where(sc != 0, sc, 1.0) * (n - 1)), 0.0)
        G = f.view(_view(g)) * G + kg.view(_view(g)) * gm
        gc_direct = kc.view(_view(c)) * cm
    # The linear part: dg/dc = [original] + s1 + s2, dg/d(a u) = [not original] - s1, dg/dp = -s2.
    gc = G * ((1.0 if ctx.original else 0.0) + s1 + s2)
    if gc_direct is not None:
        gc = gc + gc_direct
    gua = G * ((0.0 if ctx.original else 1.0) - s1)
    if zero_star:
        gu = alpha * gua
        k = (_sum1(gua * u) / D).view(_view(u))  # d a / dc = u / D,  d a / du = (c - 2 a u) / D
        gc = gc + k * u
        gu = gu + k * (c - 2.0 * alpha * u)
    else:
        gu = gua
    gp = -s2 * G if p is not None else None
    gs1 = _scale_grad(s1_t, G * (c - ua), need[i_s1])
    gs2 = _scale_grad(s2_t, G * (c - p), need[i_s2]) if p is not None else None
    return _cast(gc, cond, need[0]), _cast(gu, uncond, need[1]), _cast(gp, cond, p is not None), gs1, gs2


def _cfg_setup(ctx, inputs, output):
    cond, uncond, scale_t, scale, rescale, original = inputs
    _guide_setup(ctx, cond, uncond, None, scale_t, scale, None, 0.0, rescale, original)


def _cfg_backward(ctx, grad):
    gc, gu, _, gs, _ = _guide_backward(ctx, grad, zero_star=False, i_s1=2)
    return gc, gu, gs, None, None, None


def _cfg_zero_star_backward(ctx, grad):
    gc, gu, _, gs, _ = _guide_backward(ctx, grad, zero_star=True, i_s1=2)
    return gc, gu, gs, None, None, None


def _pag_setup(ctx, inputs, output):
    cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original = inputs
    _guide_setup(ctx, cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original)


def _pag_backward(ctx, grad):
    gc, gu, gp, gs1, gs2 = _guide_backward(ctx, grad, zero_star=False, i_s1=3, i_s2=5)
    return gc, gu, (gp if ctx.needs_input_grad[2] else None), gs1, None, gs2, None, None, None


# --- frequency_cfg, frequency_split ----------------------------------------------------------------
def _lowpass_t(x, ah, aw):
    """The adjoint of low(x) = sum_t A_H[t] x A_W[t]^T: sum_t A_H[t]^T x A_W[t]."""
    return _lowpass(x, ah.transpose(1, 2), aw.transpose(1, 2))


def _operator_grads(gl, x, ah, aw, need_h, need_w):
    """Gradients of <gl, low(x)> w.r.t. A_H and A_W (summed over every plane): gl A_W[t] x^T, gl^T A_H[t] x."""
    gh = gw = None
    if need_h:
        gh = torch.stack([(gl @ aw[t] @ x.transpose(-1, -2)).reshape(-1, *ah.shape[1:]).sum(0)
                          for t in range(ah.shape[0])]).to(ah.dtype)
    if need_w:
        gw = torch.stack([(gl.transpose(-1, -2) @ ah[t] @ x).reshape(-1, *aw.shape[1:]).sum(0)
                          for t in range(aw.shape[0])]).to(aw.dtype)
    return gh, gw


def _frequency_cfg_setup(ctx, inputs, output):
    cond, uncond, ah, aw, low_t, low, high_t, high, original = inputs
    ctx.save_for_backward(cond, uncond, ah, aw, low_t, high_t)
    ctx.low, ctx.high, ctx.original = low, high, original


def _frequency_cfg_backward(ctx, grad):
    """out = base + s_high d + (s_low - s_high) low(d), d = c - u, base = u (c when original)."""
    cond, uncond, ah, aw, low_t, high_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    acc = ah.dtype
    c, u, G = cond.to(acc), uncond.to(acc), grad.to(acc)
    sl, sh = _per_sample(low_t, ctx.low, c), _per_sample(high_t, ctx.high, c)
    gl = (sl - sh) * G
    gd = sh * G + _lowpass_t(gl, ah, aw)
    gc = gd + G if ctx.original else gd
    gu = -gd if ctx.original else G - gd
    gsl = gsh = gah = gaw = None
    if need[4] or need[6] or need[2] or need[3]:
        d = c - u
        if need[4] or need[6]:
            lo = _lowpass(d, ah, aw)
            gsl = _scale_grad(low_t, G * lo, need[4])
            gsh = _scale_grad(high_t, G * (d - lo), need[6])
        gah, gaw = _operator_grads(gl, d, ah, aw, need[2], need[3])
    return _cast(gc, cond, need[0]), _cast(gu, uncond, need[1]), gah, gaw, gsl, None, gsh, None, None


def _frequency_split_setup(ctx, inputs, output):
    x, ah, aw = inputs
    ctx.save_for_backward(x, ah, aw)


def _frequency_split_backward(ctx, grad):
    x, ah, aw = ctx.saved_tensors
    need = ctx.needs_input_grad
    G = grad.to(ah.dtype)
    gx = _cast(_lowpass_t(G, ah, aw), x, need[0])
    gah, gaw = _operator_grads(G, x.to(ah.dtype), ah, aw, need[1], need[2]) if need[1] or need[2] else (None, None)
    return gx, gah, gaw


# --- cfgpp_step -----------------------------------------------------------------------------------
def _cfgpp_setup(ctx, inputs, output):
    x, cond, uncond, a, b, c, scale_t, scale = inputs
    ctx.save_for_backward(x, cond, uncond, scale_t)
    ctx.a, ctx.b, ctx.c, ctx.scale = a, b, c, scale


def _cfgpp_backward(ctx, grad):
    """out = a x + b (u + s (cond - u)) + c u."""
    x, cond, uncond, scale_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    acc = _acc(cond)
    G = grad.to(acc)
    s = _per_sample(scale_t, ctx.scale, G)
    gx = _cast(ctx.a * G, x, need[0])
    gc = _cast(ctx.b * s * G, cond, need[1])
    gu = _cast((ctx.b * (1.0 - s) + ctx.c) * G, uncond, need[2])
    gs = None
    if need[6]:
        gs = _scale_grad(scale_t, ctx.b * G * (cond.to(acc) - uncond.to(acc)), True)
    return gx, gc, gu, None, None, None, gs, None


# --- guidance_stats ---------------------------------------------------------------------------------
def _stats_setup(ctx, inputs, output):
    cond, uncond, guided, group_size = inputs
    ctx.save_for_backward(cond, uncond, guided)
    ctx.group_size = group_size


def _cos_grads(x, y, sxy, sxx, syy, gcos):
    """Gradients of cos = <x,y> / (max(|x|, 1e-8) max(|y|, 1e-8)) per group (rows): the clamp's
    derivative is 0 below 1e-8, as F.cosine_similarity's."""
    nx, ny = sxx.sqrt(), syy.sqrt()
    ex, ey = nx.clamp_min(1e-8), ny.clamp_min(1e-8)
    cos = sxy / (ex * ey)
    kx = torch.where(nx > 1e-8, cos / (ex * ex), 0.0)
    ky = torch.where(ny > 1e-8, cos / (ey * ey), 0.0)
    w = (gcos / (ex * ey))[:, None]
    return w * y - (gcos * kx)[:, None] * x, w * x - (gcos * ky)[:, None] * y


def _stats_backward(ctx, grad):
    """Columns <c,u>, |c|^2, |u|^2, <c,g>, |g|^2, cos(c,u), cos(c,g) per group of group_size elements."""
    cond, uncond, guided = ctx.saved_tensors
    need = ctx.needs_input_grad
    K = ctx.group_size
    if K == 0:  # an empty input: nothing to differentiate
        return (_cast(torch.zeros_like(cond), cond, need[0]), _cast(torch.zeros_like(uncond), uncond, need[1]),
                None if guided is None else _cast(torch.zeros_like(guided), guided, need[2]), None)
    acc = _acc(cond)
    c, u = cond.to(acc).reshape(-1, K), uncond.to(acc).reshape(-1, K)
    G = grad.to(acc)
    scu, scc, suu = (c * u).sum(1), (c * c).sum(1), (u * u).sum(1)
    gc = G[:, 0, None] * u + 2.0 * G[:, 1, None] * c
    gu = G[:, 0, None] * c + 2.0 * G[:, 2, None] * u
    dc, du = _cos_grads(c, u, scu, scc, suu, G[:, 5])
    gc, gu, gg = gc + dc, gu + du, None
    if guided is not None:
        g = guided.to(acc).reshape(-1, K)
        gc = gc + G[:, 3, None] * g
        gg = G[:, 3, None] * c + 2.0 * G[:, 4, None] * g
        dc, dg = _cos_grads(c, g, (c * g).sum(1), scc, (g * g).sum(1), G[:, 6])
        gc, gg = gc + dc, gg + dg
        gg = _cast(gg.view(guided.shape), guided, need[2])
    return _cast(gc.view(cond.shape), cond, need[0]), _cast(gu.view(uncond.shape), uncond, need[1]), gg, None


# --- lincomb ---------------------------------------------------------------------------------------
def _lincomb_setup(ctx, inputs, output):
    preds, weights_t, weights = inputs
    if weights_t is None and weights:
        # autograd cannot return a gradient structure for a non-empty float[]: the public wrapper passes the
        # weights as a tensor whenever a gradient may be needed
        raise RuntimeError("fastguide::lincomb with float weights has no autograd formula; call "
                           "fastguide.ops.lincomb(...) or pass the weights as a tensor (weights_t)")
    ctx.k = len(preds)
    ctx.save_for_backward(*preds, *(() if weights_t is None else (weights_t,)))
    ctx.has_t = weights_t is not None


def _lincomb_backward(ctx, grad):
    """out = w0 p0 + sum_k wk (pk - p0): d/dp0 = w0 - sum_k wk, d/dpk = wk (per sample for [B, K] weights);
    d/dwk = <grad, pk - p0> (k >= 1), <grad, p0> (k = 0), summed per sample or over everything."""
    saved = ctx.saved_tensors
    preds, wt = saved[:ctx.k], (saved[ctx.k] if ctx.has_t else None)
    need_preds = ctx.needs_input_grad[0]
    acc = _acc(preds[0])
    G = grad.to(acc)
    w = wt.to(acc)
    ws = [w[k] if w.dim() == 1 else w[:, k].reshape(_view(G)) for k in range(ctx.k)]
    grads = None
    if need_preds:  # (one flag for the whole list)
        rest = sum(ws[1:]) if ctx.k > 1 else 0.0
        grads = [((ws[0] - rest) * G).to(preds[0].dtype)] + [(ws[k] * G).to(preds[k].dtype) for k in range(1, ctx.k)]
    gw = None
    if ctx.needs_input_grad[1]:
        x0 = preds[0].to(acc)
        cols = [G * x0] + [G * (preds[k].to(acc) - x0) for k in range(1, ctx.k)]
        gw = torch.stack([c.sum() if wt.dim() == 1 else _sum1(c) for c in cols], -1).to(wt.dtype)
    # a list for the Tensor[] argument (the structure of the inputs); float[] weights get no gradient
    return grads if grads is not None else [None] * ctx.k, gw, []


# --- diff_stats (Perp-Neg's projection) ---------------------------------------------------------------
def _diff_stats_setup(ctx, inputs, output):
    base, a, b, group_size = inputs
    ctx.save_for_backward(base, a, b)
    ctx.group_size = group_size


def _diff_stats_backward(ctx, grad):
    """Columns <da, db>, |da|^2, |db|^2 per group, da = a - r, db = b - r:
    d/da = G0 db + 2 G1 da,  d/db = G0 da + 2 G2 db,  d/dr = -(d/da + d/db)."""
    base, a, b = ctx.saved_tensors
    need = ctx.needs_input_grad
    K = ctx.group_size
    if K == 0:  # an empty input: nothing to differentiate
        return tuple(_cast(torch.zeros_like(x), x, n) for x, n in zip((base, a, b), need)) + (None,)
    acc = _acc(base)
    r = base.to(acc).reshape(-1, K)
    da, db = a.to(acc).reshape(-1, K) - r, b.to(acc).reshape(-1, K) - r
    G = grad.to(acc)
    ga = G[:, 0, None] * db + 2.0 * G[:, 1, None] * da
    gb = G[:, 0, None] * da + 2.0 * G[:, 2, None] * db
    gr = -(ga + gb) if need[0] else None
    return (_cast(gr.view(base.shape) if gr is not None else None, base, need[0]),
            _cast(ga.view(a.shape), a, need[1]), _cast(gb.view(b.shape), b, need[2]), None)


# --- cfg_norm, mahiro_sim (statistics along dim 1 at each position) -----------------------------------
def _channel_setup(ctx, inputs, output):
    cond, uncond, scale_t, scale = inputs[:4]
    ctx.save_for_backward(cond, uncond, scale_t)
    ctx.scale = scale
    ctx.strength = inputs[4] if len(inputs) > 4 else None


def _safe_div(x, y):
    """x / y where y != 0, 0 elsewhere (no NaN from 0 / 0 in either branch)."""
    return torch.where(y != 0, x / torch.where(y != 0, y, 1.0), 0.0)


def _cfg_norm_backward(ctx, grad):
    """out = strength f g per position, g = u + s (c - u), f = min(r, 1), r = |c| / (|g| + 1e-8), norms along dim 1.
    Derivatives as PyTorch's autograd of that formula (the eager one and ComfyUI's): the clamp passes r's
    gradient where r <= 1 (both ends included, like torch.clamp; r >= 0 always, so the node's clamp at 0 only
    matters at |c| = 0, where d|c|/dc is taken as 0 like torch.norm's). With q = <G, g> along dim 1:
        dL/dg = strength (f G - [r <= 1] q |c| / (|g| + 1e-8)^2 g / |g|),
        dL/dc (through |c|) = strength [r <= 1] q / (|g| + 1e-8) c / |c|,
    then dg/dc = s, dg/du = 1 - s, dg/ds = c - u (summed to the scale's shape)."""
    cond, uncond, scale_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    acc = _acc(cond)
    c, u, G = cond.to(acc), uncond.to(acc), grad.to(acc)
    s = _per_sample(scale_t, ctx.scale, c)
    g = u + s * (c - u)
    nc, ng = c.norm(dim=1, keepdim=True), g.norm(dim=1, keepdim=True)
    den = ng + 1e-8
    r = nc / den
    f = r.clamp(max=1.0)
    st = ctx.strength
    kr = torch.where(r <= 1.0, st * (G * g).sum(1, keepdim=True), 0.0)  # dL/dr
    gg = (st * f) * G - _safe_div(kr * nc / (den * den), ng) * g
    gc = s * gg + _safe_div(kr / den, nc) * c
    gu = (1.0 - s) * gg
    gs = _scale_grad(scale_t, gg * (c - u), need[2])
    return _cast(gc, cond, need[0]), _cast(gu, uncond, need[1]), gs, None, None


def _ssqrt_grad(x):
    """d ssqrt(x) / dx = 1 / (2 sqrt|x|), ssqrt(x) = sign(x) sqrt(|x|). At x = 0 the derivative is infinite and
    autograd of the eager formula (`x.abs().sqrt() * x.sign()`, ComfyUI's) gives NaN for that element (sqrt's
    backward divides 0 by 0), a NaN that the scale's gradient sums into. Here it is 0 at x = 0: finite, and
    the convention PyTorch takes for other derivatives that do not exist at 0 (torch.norm, torch.abs)."""
    ax = x.abs()
    return torch.where(ax > 0, 0.5 / torch.where(ax > 0, ax, 1.0).sqrt(), 0.0)


def _mahiro_sim_backward(ctx, grad):
    """sim_b = mean over positions of cos(a, m), a = ssqrt(s u), m = ssqrt((s c + g) / 2) = ssqrt(s c + (1 - s) u / 2),
    cosines along dim 1 with each norm clamped at 1e-8 (_cos_grads: the clamp's derivative 0 below it)."""
    cond, uncond, scale_t = ctx.saved_tensors
    need = ctx.needs_input_grad
    acc = _acc(cond)
    if cond.numel() == 0:  # sim is a constant 0
        gs = _scale_grad(scale_t, torch.zeros((cond.shape[0], 1), dtype=acc, device=cond.device), need[2])
        return (_cast(torch.zeros_like(cond), cond, need[0]), _cast(torch.zeros_like(uncond), uncond, need[1]),
                gs, None)
    c, u = cond.to(acc), uncond.to(acc)
    C = c.shape[1]
    S = c[0, 0].numel()
    s = _per_sample(scale_t, ctx.scale, c)
    xa, xm = s * u, (s * c + (u + s * (c - u))) / 2  # as the forward rounds them (its zeros are exact zeros)
    a, m = xa.sign() * xa.abs().sqrt(), xm.sign() * xm.abs().sqrt()
    # positions as rows of C channels: [B, C, S...] -> [B * S, C]
    rows = lambda x: x.movedim(1, -1).reshape(-1, C)  # noqa: E731
    back = lambda x: x.reshape(c.movedim(1, -1).shape).movedim(-1, 1)  # noqa: E731
    ar, mr = rows(a), rows(m)
    gcos = (grad.to(acc) / S).repeat_interleave(S)  # dL/dcos per position, positions of a sample together
    ga, gm = _cos_grads(ar, mr, (ar * mr).sum(1), (ar * ar).sum(1), (mr * mr).sum(1), gcos)
    ga, gm = back(ga) * _ssqrt_grad(xa), back(gm) * _ssqrt_grad(xm)  # dL/dxa, dL/dxm
    gc = s * gm
    gu = s * ga + (1.0 - s) * 0.5 * gm
    gs = _scale_grad(scale_t, ga * u + gm * (c - 0.5 * u), need[2])
    return _cast(gc, cond, need[0]), _cast(gu, uncond, need[1]), gs, None


FORMULAS = {
    "lincomb": (_lincomb_setup, _lincomb_backward),
    "cfg": (_cfg_setup, _cfg_backward),
    "pag": (_pag_setup, _pag_backward),
    "cfg_zero_star": (_cfg_setup, _cfg_zero_star_backward),
    "guidance_stats": (_stats_setup, _stats_backward),
    "frequency_cfg": (_frequency_cfg_setup, _frequency_cfg_backward),
    "frequency_split": (_frequency_split_setup, _frequency_split_backward),
    "cfgpp_step": (_cfgpp_setup, _cfgpp_backward),
    "diff_stats": (_diff_stats_setup, _diff_stats_backward),
    "cfg_norm": (_channel_setup, _cfg_norm_backward),
    "mahiro_sim": (_channel_setup, _mahiro_sim_backward),
}
