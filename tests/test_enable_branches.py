"""`fastguide.enable` on pipelines that call the denoiser once per branch (issue 11): Flux true CFG, QwenImage,
Wan 2.1 / 2.2 (two experts, guidance_scale_2) and HunyuanVideo. The guided prediction replaces the pipeline's
combine at scheduler.step; both branches run as one forward where the two calls' arguments allow it.
Tiny random-weight transformers, latents out (no VAE, no text encoders: embeddings passed in)."""
import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, HunyuanVideoPipeline,
                       HunyuanVideoTransformer3DModel, QwenImagePipeline, QwenImageTransformer2DModel,
                       UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel)
from diffusers import guiders as dg

import fastguide

SCALE = 4.0


def _embeds(generator, batch, tokens, dim, pooled=None, mask=False, negative=True, neg_tokens=None):
    kw = {}
    for prefix, n in [("", tokens)] + ([("negative_", neg_tokens or tokens)] if negative else []):
        kw[f"{prefix}prompt_embeds"] = torch.randn(batch, n, dim, generator=generator)
        if pooled:
            kw[f"{prefix}pooled_prompt_embeds"] = torch.randn(batch, pooled, generator=generator)
        if mask == "qwen":
            kw[f"{prefix}prompt_embeds_mask"] = torch.ones(batch, n, dtype=torch.long)
        elif mask:
            kw[f"{prefix}prompt_attention_mask"] = torch.ones(batch, n, dtype=torch.long)
    return kw


def make_flux(batch=2, **kw):
    torch.manual_seed(0)
    tr = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                axes_dims_rope=[4, 4, 8])
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=tr)
    args = dict(_embeds(torch.Generator().manual_seed(1), batch, 8, 32, pooled=32, **kw), true_cfg_scale=SCALE,
                height=32, width=32)
    return pipe, args, "images"


def make_qwen(batch=1, **kw):
    torch.manual_seed(0)
    tr = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                                     num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False,
                                     axes_dims_rope=(8, 4, 4))
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=tr)
    args = dict(_embeds(torch.Generator().manual_seed(1), batch, 7, 16, mask="qwen", **kw), true_cfg_scale=SCALE,
                height=32, width=32)
    return pipe, args, "images"


def _wan_transformer(seed):
    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                 out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2, rope_max_seq_len=32)


def _wan_scheduler():
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def make_wan(batch=2, **kw):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_wan_scheduler(),
                       transformer=_wan_transformer(0))
    args = dict(_embeds(torch.Generator().manual_seed(1), batch, 5, 16, **kw), guidance_scale=SCALE,
                height=16, width=16, num_frames=5)
    return pipe, args, "frames"


def make_wan22(batch=1, **kw):
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=_wan_scheduler(),
                       transformer=_wan_transformer(0), transformer_2=_wan_transformer(1), boundary_ratio=0.8)
    args = dict(_embeds(torch.Generator().manual_seed(1), batch, 5, 16, **kw), guidance_scale=SCALE,
                guidance_scale_2=2.0, height=16, width=16, num_frames=5)
    return pipe, args, "frames"


def make_hunyuan_video(batch=2, **kw):
    torch.manual_seed(0)
    tr = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10,
                                        num_layers=1, num_single_layers=1, num_refiner_layers=1, patch_size=1,
                                        patch_size_t=1, guidance_embeds=True, text_embed_dim=16,
                                        pooled_projection_dim=8, rope_axes_dim=(2, 4, 4))
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=tr, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder_2=None, tokenizer_2=None)
    args = dict(_embeds(torch.Generator().manual_seed(1), batch, 6, 16, pooled=8, mask=True, **kw),
                true_cfg_scale=SCALE, height=16, width=16, num_frames=5)
    return pipe, args, "frames"


PIPELINES = {"flux": make_flux, "qwenimage": make_qwen, "wan": make_wan, "wan2.2": make_wan22,
             "hunyuanvideo": make_hunyuan_video}


def run(pipe, args, out, steps=4, **kw):
    with torch.no_grad():
        return getattr(pipe(**args, **kw, num_inference_steps=steps, output_type="latent",
                            generator=torch.Generator().manual_seed(3)), out)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cfg_equals_stock_batched_and_per_branch(name):
    pipe, args, out = PIPELINES[name]()
    stock = run(pipe, args, out)
    fastguide.enable(pipe, guidance="cfg")
    batched = run(pipe, args, out)
    report = pipe.fastguide_report
    assert report.steps == 4 and report.branch_batched == 4
    assert report.nfe == 2 * 4 * stock.shape[0] and report.nfe_skipped == 0
    # one forward of 2B rows differs from two of B by the denoiser's own batch rounding
    torch.testing.assert_close(batched, stock, rtol=1e-5, atol=1e-5)
    fastguide.enable(pipe, guidance="cfg", batch_branches=False)
    torch.testing.assert_close(run(pipe, args, out), stock, rtol=0, atol=0)  # the pipeline's calls, fused combine
    assert pipe.fastguide_report.branch_batched == 0
    fastguide.disable(pipe)
    for module in (pipe.transformer, getattr(pipe, "transformer_2", None)):
        if module is not None:
            assert "forward" not in module.__dict__ and "cache_context" not in module.__dict__
    assert "step" not in pipe.scheduler.__dict__
    torch.testing.assert_close(run(pipe, args, out), stock, rtol=0, atol=0)


def hand_loop(pipe, args, out, combine):
    """The stock pipeline, its combine replaced by `combine(cond, uncond, step)`: the transformer's outputs
    recorded in call order (cond, then uncond), scheduler.step given the combine instead of the pipeline's."""
    seen, step = [], [0]
    handles = [m.register_forward_hook(lambda mod, a, o: seen.append(o[0])) for m in
               (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    inner = pipe.scheduler.step

    def step_fn(model_output, *a, **k):
        cond, uncond = seen[-2:]
        pred = combine(cond, uncond, step[0])
        step[0] += 1
        return inner(pred, *a, **k)

    pipe.scheduler.step = step_fn
    try:
        return run(pipe, args, out)
    finally:
        del pipe.scheduler.step
        for h in handles:
            h.remove()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_apg_equals_the_pipeline_driven_by_diffusers_guider(name):
    pipe, args, out = PIPELINES[name]()
    settings = dict(momentum=-0.5, norm_threshold=2.0, eta=0.5)
    fastguide.enable(pipe, guidance="apg", **settings)
    ours = run(pipe, args, out)
    fastguide.disable(pipe)
    guider = dg.AdaptiveProjectedGuidance(guidance_scale=SCALE, adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_rescale=2.0, eta=0.5)
    split = {}

    def combine(cond, uncond, i):
        if name == "wan2.2":  # the low-noise expert's steps use guidance_scale_2
            guider.guidance_scale = SCALE if i < split["high"] else 2.0
        guider.set_state(i, 4, None)
        guider.prepare_inputs({})  # step 0: a fresh momentum buffer
        g = guider.forward(cond, uncond).pred
        if name == "qwenimage":  # the pipeline's renorm after its combine
            g = g * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(g, dim=-1, keepdim=True))
        return g

    if name == "wan2.2":  # which steps ran the high-noise expert: those with t >= boundary (the pipeline's rule)
        pipe.scheduler.set_timesteps(4)
        boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
        split["high"] = int((pipe.scheduler.timesteps >= boundary).sum())
        assert 0 < split["high"] < 4  # both experts take part
    reference = hand_loop(pipe, args, out, combine)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert (ours - run(pipe, args, out)).abs().max() > 1e-3  # APG is not CFG here


@pytest.mark.parametrize("name", list(PIPELINES))
def test_adaptive_guidance_and_interval_skip_uncond_calls(name):
    pipe, args, out = PIPELINES[name]()
    stock = run(pipe, args, out)
    b = stock.shape[0]
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=2.0))  # never switches: CFG
    torch.testing.assert_close(run(pipe, args, out), stock, rtol=1e-5, atol=1e-5)
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=-1.0))  # uncond on step 0 only
    run(pipe, args, out)
    report = pipe.fastguide_report
    assert report.ag_switch_step == [0] * b and report.nfe == 4 * b + b and report.nfe_skipped == 3 * b
    sigmas = pipe.scheduler.sigmas[:4]
    lo, hi = float(sigmas[2]) - 1e-3, float(sigmas[1]) + 1e-3  # steps 1 and 2
    fastguide.enable(pipe, guidance="cfg", interval=(lo, hi))
    run(pipe, args, out)
    assert pipe.fastguide_report.nfe == 4 * b + 2 * b and pipe.fastguide_report.nfe_skipped == 2 * b


def test_adaptive_guidance_per_sample_equals_solo_runs():
    """Samples that switch at different steps: the uncond call runs the remaining rows only, and each sample's
    result equals its own run at batch 1."""
    pipe, args, out = make_flux()
    latents = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(9))
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=0.995))  # x0 space: Flux's sigmas
    both = run(pipe, args, out, steps=6, latents=latents)
    switch = pipe.fastguide_report.ag_switch_step
    assert switch[0] != switch[1], switch  # the case under test: samples switch at different steps
    for i in range(2):
        solo = {k: v[i:i + 1] if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        alone = run(pipe, solo, out, steps=6, latents=latents[i:i + 1])
        assert pipe.fastguide_report.ag_switch_step == [switch[i]]
        torch.testing.assert_close(both[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_branches_of_different_shapes_run_as_two_calls():
    """QwenImage prompts of different token lengths cannot share a forward: two calls, still the fused combine."""
    pipe, args, out = make_qwen(neg_tokens=4)
    stock = run(pipe, args, out)
    fastguide.enable(pipe, guidance="cfg")
    torch.testing.assert_close(run(pipe, args, out), stock, rtol=0, atol=0)
    assert pipe.fastguide_report.branch_batched == 0 and pipe.fastguide_report.nfe == 8


def test_no_negative_prompt_runs_stock():
    """Flux without a negative prompt runs no true CFG: the cond calls pass through."""
    pipe, args, out = make_flux(negative=False)
    stock = run(pipe, args, out)
    fastguide.enable(pipe, guidance="apg", momentum=-0.5)
    torch.testing.assert_close(run(pipe, args, out), stock, rtol=0, atol=0)
    assert pipe.fastguide_report.nfe == 0


def test_shared_transformer_and_scheduler_stay_independent():
    pipe, args, out = make_flux()
    other = FluxPipeline(**pipe.components)
    stock = run(other, args, out)
    fastguide.enable(pipe, guidance="apg", momentum=-0.5, norm_threshold=1.0)
    guided = run(pipe, args, out)
    torch.testing.assert_close(run(other, args, out), stock, rtol=0, atol=0)
    assert (guided - stock).abs().max() > 1e-3


def test_refused_settings_name_the_fix():
    pipe, args, out = make_flux()
    with pytest.raises(ValueError, match="perturbed branch"):
        fastguide.enable(pipe, guidance="pag")
    with pytest.raises(ValueError, match="linear_ag"):
        fastguide.enable(pipe, guidance="cfg", linear_ag=fastguide.LinearAG({1: (1.0, 0.0, 0.0)}, 4))
    with pytest.raises(TypeError, match="batch_branches"):
        fastguide.enable(pipe, guidance="cfg", batch_branches="yes")
    assert not fastguide.pipelines.is_enabled(pipe)


def test_a_call_outside_the_branch_contexts_raises():
    pipe, args, out = make_flux()
    fastguide.enable(pipe, guidance="cfg")
    original = type(pipe.transformer).cache_context
    pipe.transformer.__dict__.pop("cache_context")  # the pipeline's calls no longer say their branch
    try:
        with pytest.raises(RuntimeError, match="cache_context"):
            run(pipe, args, out)
    finally:
        fastguide.disable(pipe)
    assert type(pipe.transformer).cache_context is original
