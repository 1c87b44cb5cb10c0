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


# --- FreSca's Fourier filter: the official code and ComfyUI's node ------------------------------------
def fresca_fourier_filter(x, scale_low, scale_high, freq_cutoff):
    """FreSca's `Fourier_filter` (github.com/WikiChao/FreSca, core/fresca.py), transcribed line by line for a
    (B, C, H, W) input, except that it computes in x's dtype (the original casts to float32). One cutoff,
    clamped at min(H // 2, W // 2), for both axes."""
    x_freq = torch.fft.fftn(x, dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))
    B, C, H, W = x_freq.shape
    crow, ccol = H // 2, W // 2
    freq_cutoff = min(freq_cutoff, min(crow, ccol))
    mask = torch.full((B, C, H, W), scale_high, device=x.device, dtype=x.dtype)
    mask[..., crow - freq_cutoff:crow + freq_cutoff, ccol - freq_cutoff:ccol + freq_cutoff] = scale_low
    x_freq.mul_(mask)
    return torch.fft.ifftn(torch.fft.ifftshift(x_freq, dim=(-2, -1)), dim=(-2, -1)).real


def comfyui_fourier_filter(x, scale_low, scale_high, freq_cutoff):
    """ComfyUI's `Fourier_filter` (comfy_extras/nodes_fresca.py, the FreSca node), transcribed line by line,
    in x's dtype (the original casts to float32). Each non-(B, C) axis clamped at its own n // 2 (for a 5-D
    input it narrows the box along dim 2 too, which the FFT does not transform)."""
    x_freq = torch.fft.fftn(x, dim=(-2, -1))
    x_freq = torch.fft.fftshift(x_freq, dim=(-2, -1))
    mask = torch.ones(x_freq.shape, device=x.device, dtype=x.dtype) * scale_high
    m = mask
    for d in range(len(x_freq.shape) - 2):
        dim = d + 2
        cc = x_freq.shape[dim] // 2
        f_c = min(freq_cutoff, cc)
        m = m.narrow(dim, cc - f_c, f_c * 2)
    m[:] = scale_low
    x_freq = x_freq * mask
    x_freq = torch.fft.ifftshift(x_freq, dim=(-2, -1))
    return torch.fft.ifftn(x_freq, dim=(-2, -1)).real
