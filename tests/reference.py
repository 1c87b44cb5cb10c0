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


# --- ComfyUI's guidance nodes, transcribed (comfy_extras/nodes_*.py); inputs in, the node's arithmetic out ---
def comfy_cfg_function(cond_pred, uncond_pred, cond_scale):
    """comfy.samplers.cfg_function without model options: plain CFG."""
    return uncond_pred + (cond_pred - uncond_pred) * cond_scale


def comfy_dual_cfg(pos, middle, negative, cfg1, cfg2, nested=False):
    """nodes_custom_sampler.py Guider_DualCFG.predict_noise (out = [negative, middle, positive])."""
    out = [negative, middle, pos]
    if nested:
        pred_text = comfy_cfg_function(out[2], out[1], cfg1)
        return out[0] + cfg2 * (pred_text - out[0])
    return comfy_cfg_function(out[1], out[0], cfg2) + (out[2] - out[1]) * cfg1


def diffusers_ip2p(noise_pred_text, noise_pred_image, noise_pred_uncond, guidance_scale, image_guidance_scale):
    """diffusers StableDiffusionInstructPix2PixPipeline's guidance (chunk order text, image, uncond)."""
    return (noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_image)
            + image_guidance_scale * (noise_pred_image - noise_pred_uncond))


def comfy_perp_neg(noise_pred_pos, noise_pred_neg, noise_pred_nocond, neg_scale, cond_scale):
    """nodes_perpneg.py perp_neg: the projection sums over the whole batch."""
    pos = noise_pred_pos - noise_pred_nocond
    neg = noise_pred_neg - noise_pred_nocond
    perp = neg - ((torch.mul(neg, pos).sum()) / (torch.norm(pos) ** 2)) * pos
    perp_neg = perp * neg_scale
    return noise_pred_nocond + cond_scale * (pos - perp_neg)


def rlg64(cond, uncond, ref_cond, ref_uncond, scale, w):
    """Reinforcement Learning Guidance (Jin et al. 2025) with CFG on each model: (1 - w) g_ref + w g_rl."""
    c, u, rc, ru = (t.double() for t in (cond, uncond, ref_cond, ref_uncond))
    g_rl = u + per_sample(scale, c) * (c - u)
    g_ref = ru + per_sample(scale, c) * (rc - ru)
    w = per_sample(w, c)
    return (1 - w) * g_ref + w * g_rl


def comfy_cfg_norm(cond_p, pred_text_, strength):
    """nodes_cfg.py CFGNorm's post-CFG function (cond_p = cond_denoised, pred_text_ = denoised)."""
    norm_full_cond = torch.norm(cond_p, dim=1, keepdim=True)
    norm_pred_text = torch.norm(pred_text_, dim=1, keepdim=True)
    scale = (norm_full_cond / (norm_pred_text + 1e-8)).clamp(min=0.0, max=1.0)
    return pred_text_ * scale * strength


def comfy_mahiro(cond_p, uncond_p, scale, cfg):
    """nodes_mahiro.py mahiro_normd (cfg = args['denoised'], the CFG result)."""
    import torch.nn.functional as F
    leap = cond_p * scale
    u_leap = uncond_p * scale
    merge = (leap + cfg) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = F.cosine_similarity(normu, normm).mean()
    simsc = 2 * (sim + 1)
    return (simsc * cfg + (4 - simsc) * leap) / 4


def comfy_renorm_cfg(cond_denoised, uncond_denoised, cond_scale, renorm_cfg, in_channels, sigma=0.0, cfg_trunc=100):
    """nodes_lumina2.py RenormCFG's cfg function, returned as the CFG result (the node returns x - result and
    ComfyUI's cfg_function takes x - that). Its `if` on a norm tensor needs batch 1."""
    if sigma < cfg_trunc:
        cond_eps, uncond_eps = cond_denoised[:, :in_channels], uncond_denoised[:, :in_channels]
        cond_rest = cond_denoised[:, in_channels:]
        half_eps = uncond_eps + cond_scale * (cond_eps - uncond_eps)
        if float(renorm_cfg) > 0.0:
            ori_pos_norm = torch.linalg.vector_norm(cond_eps, dim=tuple(range(1, len(cond_eps.shape))), keepdim=True)
            max_new_norm = ori_pos_norm * float(renorm_cfg)
            new_pos_norm = torch.linalg.vector_norm(half_eps, dim=tuple(range(1, len(half_eps.shape))), keepdim=True)
            if new_pos_norm >= max_new_norm:
                half_eps = half_eps * (max_new_norm / new_pos_norm)
    else:
        half_eps, cond_rest = cond_denoised[:, :in_channels], cond_denoised[:, in_channels:]
    return torch.cat([half_eps, cond_rest], dim=1)


def comfy_euler_ancestral_cfg_pp(x, cond_eps, uncond_eps, lam, sigma, sigma_next, eta, s_noise, noise):
    """One step of ComfyUI sample_euler_ancestral_cfg_pp for an epsilon model (alpha_s = alpha_t = 1), in its
    denoiser terms; get_ancestral_step inlined."""
    denoised = comfy_cfg_function(x - sigma * cond_eps, x - sigma * uncond_eps, lam)
    uncond_denoised = x - sigma * uncond_eps
    if sigma_next == 0:
        return denoised
    d = (x - uncond_denoised) / sigma
    if not eta:
        sigma_down, sigma_up = sigma_next, 0.0
    else:
        sigma_up = min(sigma_next, eta * (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5)
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    x = denoised + sigma_down * d
    if eta > 0 and s_noise > 0:
        x = x + noise * s_noise * sigma_up
    return x


def comfy_dpmpp_2m_cfg_pp(x, eps_pairs, lam, sigmas):
    """ComfyUI sample_dpmpp_2m_cfg_pp for an epsilon model: eps_pairs[i] = (cond_eps, uncond_eps) at step i
    (a function of x), sigmas as Python floats; returns every x."""
    import math
    t_fn = lambda s: -math.log(s) if s > 0 else math.inf  # noqa: E731
    old_uncond_denoised, xs = None, []
    for i in range(len(sigmas) - 1):
        c, u = eps_pairs(i, x)
        denoised = comfy_cfg_function(x - sigmas[i] * c, x - sigmas[i] * u, lam)
        uncond_denoised = x - sigmas[i] * u
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_uncond_denoised is None or sigmas[i + 1] == 0:
            denoised_mix = -math.exp(-h) * uncond_denoised
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_mix = -math.exp(-h) * uncond_denoised - math.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond_denoised)
        x = denoised + denoised_mix + math.exp(-h) * x
        old_uncond_denoised = uncond_denoised
        xs.append(x)
    return xs


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
