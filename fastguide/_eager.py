"""Plain-PyTorch implementations of the fastguide ops, with the ops' exact signatures.

They are registered as the CompositeExplicitAutograd kernel of each op, so they serve every
device that has no fused kernel (CPU when the C++ extension did not build, CUDA without Triton,
MPS, XPU, ...), and `fastguide bench` times them (eager and under torch.compile) as the
"same math in PyTorch" peers. Arithmetic is fp32 (fp64 for fp64 inputs), like the kernels.
"""
import torch


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(t, value, like):
    """A scale as something that broadcasts over a [B, ...] tensor: float, 0-d or [B, 1, ...]."""
    if t is None:
        return value
    t = t.to(like.dtype)
    return t.view((-1,) + (1,) * (like.dim() - 1)) if t.dim() == 1 else t


def _rescale(g, c, rescale):
    """diffusers' rescale_noise_cfg, except that a zero std(g) leaves g unchanged instead of NaN."""
    std_c = c.flatten(1).std(1)
    std_g = g.flatten(1).std(1)
    ok = std_g > 0  # also False for NaN std (one element per sample)
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
    return g.to(cond.dtype)


def cfg(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, False)


def pag(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original):
    return guide(cond, uncond, perturbed, scale_t, scale, pag_scale_t, pag_scale, rescale, original, False)


def cfg_zero_star(cond, uncond, scale_t, scale, rescale, original):
    return guide(cond, uncond, None, scale_t, scale, None, 0.0, rescale, original, True)
