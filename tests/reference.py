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
