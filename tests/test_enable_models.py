"""`fastguide.enable` for methods whose branches enable builds besides cond / uncond (issue 14): a second
model's branches (RLG, autoguidance with a weak model: `models=`) and SEG's blurred-query perturbed branch.
Each against a hand-written sampling loop on a tiny StableDiffusion pipeline."""
import pytest
import torch

import fastguide
from fastguide import attention, ops
from test_methods import second_unet
from test_pipelines import STEPS, assert_close, inputs, make_sd, run

SCALE = 5.0


def sd_loop(pipe, guide, models=(), perturbed=None, layers=("mid",)):
    """Euler sampling around the bare UNets: guide(preds, step) -> prediction, preds holding each model's
    (uncond, cond) predictions (`models`: extra UNets) and, with `perturbed` (an attention processor put on
    `layers`), the pipeline UNet's perturbed cond rows."""
    kw = inputs("sd")
    sch = pipe.scheduler
    sch.set_timesteps(STEPS)
    x = kw["latents"] * sch.init_noise_sigma
    emb = torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])
    if perturbed is not None:
        attention.apply_pag(pipe.unet, list(layers), processor=perturbed)
    try:
        with torch.no_grad():
            for i, t in enumerate(sch.timesteps):
                inp = sch.scale_model_input(torch.cat([x, x]), t)
                own = pipe.unet(torch.cat([inp, inp[1:]]) if perturbed is not None else inp, t,
                                encoder_hidden_states=torch.cat([emb, emb[1:]]) if perturbed is not None else emb).sample
                preds = {"main": own[:2], "perturbed": own[2:]}
                for k, m in enumerate(models):
                    preds[k] = m(inp, t, encoder_hidden_states=emb).sample
                x = sch.step(guide(preds, i), t, x).prev_sample
    finally:
        if perturbed is not None:
            attention.remove_pag(pipe.unet)
    return x


def test_weak_model_autoguidance_equals_hand_loop():
    """Karras et al.'s autoguidance with a separate weak model: weak + s (cond - weak), both on the prompt; the
    pipeline's UNet runs only its cond rows (no uncond pass)."""
    pipe, weak = make_sd(), second_unet()
    fastguide.enable(pipe, guidance="weak_model", models={"weak": weak})
    ours = run(pipe, "sd", scale=SCALE)
    assert pipe.fastguide_report.nfe == 2 * STEPS  # one cond row per model and step
    fastguide.disable(pipe)
    ref = sd_loop(pipe, lambda p, i: p[0][1:] + SCALE * (p["main"][1:] - p[0][1:]), models=[weak])
    assert_close(ours, ref)


def test_rlg_equals_hand_loop():
    """RLG: (1 - w) CFG(ref) + w CFG(rl), the pipeline's UNet the RL-tuned one, models={'ref': base}."""
    pipe, ref_unet = make_sd(), second_unet()
    fastguide.enable(pipe, guidance="rlg", rl_scale=1.5, models={"ref": ref_unet})
    ours = run(pipe, "sd", scale=SCALE)
    assert pipe.fastguide_report.nfe == 4 * STEPS
    fastguide.disable(pipe)

    def guide(p, i):
        (u, c), (ru, rc) = p["main"].chunk(2), p[0].chunk(2)
        g_rl, g_ref = u + SCALE * (c - u), ru + SCALE * (rc - ru)
        return -0.5 * g_ref + 1.5 * g_rl
    assert_close(ours, sd_loop(pipe, guide, models=[ref_unet]))


def test_seg_equals_hand_loop_with_the_seg_processor():
    pipe = make_sd()
    fastguide.enable(pipe, guidance="seg", seg_scale=3.0, blur_sigma=2.0, layers=["mid"])
    ours = run(pipe, "sd", scale=SCALE)
    assert pipe.fastguide_report.nfe == 3 * STEPS
    fastguide.disable(pipe)
    ref = sd_loop(pipe, lambda p, i: ops.pag(p["main"][1:], p["main"][:1], p["perturbed"], SCALE, 3.0),
                  perturbed=attention.SEGProcessor(blur_sigma=2.0))
    assert_close(ours, ref)
    fastguide.enable(pipe, guidance="pag", pag_scale=3.0, layers=["mid"])
    assert (run(pipe, "sd", scale=SCALE) - ours).abs().max() > 1e-4  # SEG's blur is not PAG's identity


def test_seg_and_pag_on_one_shared_unet_keep_their_own_perturbation():
    p1 = make_sd()
    p2 = type(p1)(**p1.components, requires_safety_checker=False)
    fastguide.enable(p1, guidance="seg", blur_sigma=2.0)
    alone_seg = run(p1, "sd")
    fastguide.enable(p2, guidance="pag")
    alone_pag = run(p2, "sd")
    for _ in range(2):  # interleaved calls: each pipeline's layers perturb its own way
        torch.testing.assert_close(run(p1, "sd"), alone_seg, rtol=0, atol=0)
        torch.testing.assert_close(run(p2, "sd"), alone_pag, rtol=0, atol=0)


def test_models_are_checked_before_anything_changes():
    pipe = make_sd()
    with pytest.raises(ValueError, match=r"takes models=\{'weak': <module>\}"):
        fastguide.enable(pipe, guidance="weak_model")
    with pytest.raises(ValueError, match=r"takes models=\{'ref': <module>\}, got \['weak'\]"):
        fastguide.enable(pipe, guidance="rlg", models={"weak": second_unet()})
    with pytest.raises(ValueError, match="the pipeline's own denoiser"):
        fastguide.enable(pipe, guidance="weak_model", models={"weak": pipe.unet})
    with pytest.raises(ValueError, match="takes no models="):
        fastguide.enable(pipe, guidance="cfg", models={"weak": second_unet()})
    with pytest.raises(ValueError, match="needs middle_prompt="):
        fastguide.enable(pipe, guidance="dual_cfg")
    assert not fastguide.pipelines.is_enabled(pipe)


def make_ip2p():
    from diffusers import StableDiffusionInstructPix2PixPipeline, UNet2DConditionModel
    sd = make_sd()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # make_sd's UNet taking the image latents as 4 more channels
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    return StableDiffusionInstructPix2PixPipeline(**{**sd.components, "unet": unet}, requires_safety_checker=False)


def ip2p(pipe, **kw):
    g = torch.Generator().manual_seed(4)
    args = {k: v for k, v in inputs("sd").items() if k != "latents"}
    with torch.no_grad():
        return pipe(**args, image=torch.rand(1, 3, 16, 16, generator=g), num_inference_steps=STEPS,
                    guidance_scale=SCALE, image_guidance_scale=1.8, output_type="latent",
                    generator=torch.Generator().manual_seed(3), **kw).images


def test_instruct_pix2pix_dual_cfg_equals_stock():
    """InstructPix2Pix batches [text, image, uncond]: guidance='dual_cfg' (ComfyUI's DualCFGGuider, regular) is its
    own text + image guidance, the scales following the call's guidance_scale and image_guidance_scale."""
    pipe = make_ip2p()
    stock = ip2p(pipe)
    fastguide.enable(pipe, guidance="dual_cfg")
    assert_close(ip2p(pipe), stock)
    assert pipe.fastguide_report.nfe == 3 * STEPS
    fastguide.enable(pipe, guidance="dual_cfg", nested=True)
    assert (ip2p(pipe) - stock).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"batches \[text, image, uncond\].*use one of \['dual_cfg'\]"):
        fastguide.enable(pipe, guidance="cfg")
    fastguide.disable(pipe)
    torch.testing.assert_close(ip2p(pipe), stock, rtol=0, atol=0)
