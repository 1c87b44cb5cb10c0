"""CFG++ sampler steps against ComfyUI's k-diffusion formula and the paper's DDIM step."""
import pytest
import torch

import fastguide
from fastguide.kernels import cfgpp as triton_cfgpp
from reference import rel_err
from test_pipelines import make_sd


def comfy_euler_cfg_pp(x, cond_eps, uncond_eps, lam, sigma, sigma_next):
    """ComfyUI sample_euler_cfg_pp for an epsilon model, in its denoiser (x0) terms."""
    cond_x0, uncond_x0 = x - sigma * cond_eps, x - sigma * uncond_eps
    denoised = uncond_x0 + lam * (cond_x0 - uncond_x0)  # CFG on the denoised predictions, scale lambda
    d = (x - uncond_x0) / sigma                           # to_d with the unconditional denoised
    return denoised + d * sigma_next


def paper_ddim_cfg_pp(x, cond_eps, uncond_eps, lam, a_t, a_prev):
    eps = uncond_eps + lam * (cond_eps - uncond_eps)
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    return a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * uncond_eps


def triple(shape, dtype=torch.float32, device="cpu"):
    return [torch.randn(shape, dtype=torch.float64).to(dtype=dtype, device=device) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 4, 9, 7), (3, 5, 11), (2, 3, 4, 5, 6)], ids=str)
def test_euler_equals_comfyui(dtype, shape):
    x, c, u = triple(shape, dtype)
    out = fastguide.cfgpp_euler_step(x, c, u, 0.6, sigma=7.3, sigma_next=4.1)
    ref = comfy_euler_cfg_pp(x.double(), c.double(), u.double(), 0.6, 7.3, 4.1)
    tol = 1e-6 if dtype == torch.float32 else 2 * rel_err(
        comfy_euler_cfg_pp(x, c, u, 0.6, 7.3, 4.1), ref)  # twice PyTorch's own error in dtype
    assert out.dtype == dtype and rel_err(out, ref) <= tol


def test_ddim_equals_paper_and_per_sample_lambda():
    x, c, u = triple((3, 4, 8, 8))
    lam = torch.tensor([0.0, 0.4, 1.0])
    out = fastguide.cfgpp_ddim_step(x, c, u, lam, alpha_prod_t=0.3, alpha_prod_prev=0.45)
    ref = paper_ddim_cfg_pp(x.double(), c.double(), u.double(), lam.double().view(-1, 1, 1, 1), 0.3, 0.45)
    assert rel_err(out, ref) <= 1e-6


def test_triton_kernel():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x, c, u = triple((3, 5, 11), device=dev)
    lam = torch.tensor([0.2, 0.5, 0.9], device=dev)
    out = triton_cfgpp.cfgpp_step(x, c, u, 1.0, -5.0, 3.0, lam, 0.0, block=32)  # 55 per sample: 2 blocks + tail
    ref = comfy_euler_cfg_pp(x.cpu().double(), c.cpu().double(), u.cpu().double(),
                             lam.cpu().double().view(-1, 1, 1), 5.0, 3.0)
    assert rel_err(out.cpu(), ref) <= 1e-6


def test_tiny_pipeline_euler_loop_equals_comfyui_loop():
    """A CFG++ Euler sampling loop on a real (tiny) SD UNet with diffusers' Euler sigmas: our fused step vs
    ComfyUI's formula, same network evaluations."""
    pipe = make_sd()
    sch = pipe.scheduler
    sch.set_timesteps(4)
    emb = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(4)) * sch.init_noise_sigma
    results = []
    for fused in (True, False):
        x = x0.clone()
        with torch.no_grad():
            for i, t in enumerate(sch.timesteps):
                sigma, sigma_next = float(sch.sigmas[i]), float(sch.sigmas[i + 1])
                inp = torch.cat([x, x]) / (sigma ** 2 + 1) ** 0.5  # Euler's scale_model_input
                uncond, cond = pipe.unet(inp, t, encoder_hidden_states=emb).sample.chunk(2)
                x = (fastguide.cfgpp_euler_step(x, cond, uncond, 0.7, sigma, sigma_next) if fused
                     else comfy_euler_cfg_pp(x, cond, uncond, 0.7, sigma, sigma_next))
        results.append(x)
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6 * results[1].abs().max().item())


def test_opcheck():
    x, c, u = triple((2, 3, 5))
    torch.library.opcheck(torch.ops.fastguide.cfgpp_step.default, (x, c, u, 1.0, -2.0, 1.5, None, 0.5))
    torch.library.opcheck(torch.ops.fastguide.cfgpp_step.default, (x, c, u, 0.9, -0.2, 0.3, torch.tensor([0.1, 0.2]), 0.0))


def test_bad_input():
    x, c, u = triple((2, 3, 5))
    with pytest.raises(ValueError, match=r"lambda\) in \[0, 1\], got 1.5"):
        fastguide.cfgpp_euler_step(x, c, u, 1.5, 2.0, 1.0)
    out = fastguide.cfgpp_euler_step(x, c, u, 1.5, 2.0, 1.0, allow_extrapolation=True)
    assert rel_err(out, comfy_euler_cfg_pp(x.double(), c.double(), u.double(), 1.5, 2.0, 1.0)) <= 1e-6
    with pytest.raises(ValueError, match="sigma must be a finite float"):
        fastguide.cfgpp_euler_step(x, c, u, 0.5, float("nan"), 1.0)
    with pytest.raises(ValueError, match="x must have cond's shape"):
        fastguide.cfgpp_euler_step(x[:1], c, u, 0.5, 2.0, 1.0)
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        fastguide.cfgpp_ddim_step(x, c, u, 0.5, 0.0, 0.5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_cfgpp_guider_makes_ddim_take_the_cfgpp_step(set_alpha_to_one):
    """CFGPlusPlusGuidance's output, stepped by diffusers' DDIMScheduler, equals the fused CFG++ DDIM step on every
    step of a trajectory (its output is CFG at the per-step scale lambda c1 / (c1 - c2))."""
    from diffusers import DDIMScheduler

    import fastguide.diffusers as fgd
    sch = DDIMScheduler(clip_sample=False, set_alpha_to_one=set_alpha_to_one)
    n = 10
    sch.set_timesteps(n)
    guider = fgd.CFGPlusPlusGuidance(guidance_scale=0.6, scheduler=sch)
    g = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for i, t in enumerate(sch.timesteps):
        guider.set_state(i, n, t)
        guider.prepare_inputs({})
        ours = sch.step(guider.forward(c, u).pred, t, x).prev_sample
        prev = int(t) - 1000 // n
        a_prev = float(sch.alphas_cumprod[prev]) if prev >= 0 else float(sch.final_alpha_cumprod)
        ref = fastguide.cfgpp_ddim_step(x, c, u, 0.6, float(sch.alphas_cumprod[int(t)]), a_prev)
        if not set_alpha_to_one and int(t) == 0:  # a_prev == a_t: DDIM's update ignores the prediction
            torch.testing.assert_close(ours, x, rtol=1e-6, atol=1e-6)
            continue
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)  # DDIM's alphas are fp32 tensors
    with pytest.raises(ValueError, match="clip_sample=False"):
        fgd.CFGPlusPlusGuidance(guidance_scale=0.6, scheduler=DDIMScheduler()).set_state(0, n, 999)
    with pytest.raises(ValueError, match="needs scheduler=pipe.scheduler, a DDIMScheduler"):
        fgd.CFGPlusPlusGuidance(guidance_scale=0.6).set_state(0, n, 999)
