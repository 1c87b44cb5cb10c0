"""Float64 references written straight from the papers' / diffusers' formulas, plus helpers.

Independent of fastguide's own code: no fastguide import here.
"""
import torch


def per_sample(scale, like):
    if isinstance(scale, torch.Tensor):
        s = scale.to(torch.float64)
        return s.view((-1,) + (1,) * (like.dim() - 1)) if s.dim() == 1 else s
    return float(scale)


def guidance_rescale(g, c, r):
    """diffusers' rescale_noise_cfg, with a zero std(g) leaving g unchanged (fastguide's documented choice);
    a NaN std (a NaN in the sample) makes the whole sample NaN, as in diffusers."""
    dims = list(range(1, g.dim()))
    std_c, std_g = c.std(dim=dims, keepdim=True), g.std(dim=dims, keepdim=True)
    rescaled = r * (g * (std_c / std_g)) + (1 - r) * g
    return torch.where(std_g == 0, g, rescaled)


def guide64(op, inputs, scale, pag_scale=0.0, rescale=0.0, original=False):
    c, u = inputs[0].double(), inputs[1].double()
    if op == "cfg_zero_star":
        cf, uf = c.flatten(1), u.flatten(1)
        alpha = (cf * uf).sum(1) / ((uf * uf).sum(1) + 1e-8)
        u = u * alpha.view((-1,) + (1,) * (c.dim() - 1))
    g = (c if original else u) + per_sample(scale, c) * (c - u)
    if op == "pag":
        g = g + per_sample(pag_scale, c) * (c - inputs[2].double())
    if rescale > 0:
        g = guidance_rescale(g, c, rescale)
    return g


def rel_err(out, ref):
    """max |out - ref| / max |ref| (NaN anywhere counts as infinite error)."""
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def mambo_guidance(cond, uncond, scale, alpha, original=False):
    """MAMBO-G (diffusers' mambo_guidance) with vector norms over every non-batch dim."""
    dims = tuple(range(1, cond.dim()))
    diff = cond - uncond
    norm = lambda x: torch.linalg.vector_norm(x, dim=dims, keepdim=True)  # noqa: E731
    ratio = norm(diff) / norm(uncond)
    weight = torch.exp(-alpha * ratio)
    s = scale * weight if original else 1.0 + (scale - 1.0) * weight
    return (cond if original else uncond) + s * diff


def tangential_cfg(cond, uncond, scale, original=False):
    """TCFG (diffusers' normalized_guidance, in the inputs' dtype): uncond projected on the first right singular
    vector of [cond; uncond] per sample, then CFG."""
    m = torch.stack([cond, uncond], 1).flatten(2)
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    v0 = vh[:, :1]
    u_proj = ((uncond.flatten(1)[:, None] @ v0.transpose(-2, -1)) @ v0).reshape(uncond.shape)
    return (cond if original else u_proj) + scale * (cond - u_proj)
