"""`fastguide.enable(pipe, ...)` on real diffusers pipelines built from tiny configs (random weights, no download)."""
import pytest
import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from diffusers import guiders as dg
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

import fastguide
from fastguide import attention
from test_frequency import fresca_cfg

STEPS = 4


def _vae():
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=16)


def make_sd():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    return StableDiffusionPipeline(vae=_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def make_sdxl():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    return StableDiffusionXLPipeline(vae=_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler(steps_offset=1))


def make_sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                        pooled_projection_dim=8, out_channels=4)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(),
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def inputs(kind):
    g = torch.Generator().manual_seed(7)
    kw = dict(prompt_embeds=torch.randn(1, 5, 16, generator=g), negative_prompt_embeds=torch.randn(1, 5, 16, generator=g),
              latents=torch.randn(1, 4, 16, 16, generator=g))
    if kind != "sd":
        kw.update(pooled_prompt_embeds=torch.randn(1, 8, generator=g),
                  negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g))
    return kw


def run(pipe, kind, scale=5.0):
    with torch.no_grad():
        return pipe(**inputs(kind), num_inference_steps=STEPS, guidance_scale=scale, output_type="latent", height=16,
                    width=16).images


MAKERS = {"sd": make_sd, "sdxl": make_sdxl, "sd3": make_sd3}


def assert_close(ours, ref):
    """Within fp32 rounding of the final latents. Random-weight denoisers blow latents up to ~1e3, and the
    peers' own fp32 results move by ~4e-7 of that scale against float64, so the bound is relative to it."""
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())


@pytest.mark.parametrize("kind", list(MAKERS))
def test_cfg_equals_stock_pipeline(kind):
    pipe = MAKERS[kind]()
    stock = run(pipe, kind)
    fastguide.enable(pipe, guidance="cfg")
    ours = run(pipe, kind)
    assert_close(ours, stock)
    fastguide.disable(pipe)
    torch.testing.assert_close(run(pipe, kind), stock, rtol=0, atol=0)  # disable restores the denoiser exactly


def hand_loop(pipe, kind, combine, scale=5.0, pag_layers=None):
    """A hand-written Euler / flow-matching sampling loop around the bare denoiser:
    combine(cond, uncond, perturbed, step, t) -> guided prediction (diffusers' guiders inside)."""
    kw = inputs(kind)
    sch = pipe.scheduler
    sch.set_timesteps(STEPS)
    x = kw["latents"] * (sch.init_noise_sigma if kind == "sd" else 1.0)
    emb = torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])
    model = pipe.unet if kind == "sd" else pipe.transformer
    saved = {}
    if pag_layers:
        for name, m in attention.self_attention_layers(model):
            if any(s in name for s in pag_layers):
                saved[name] = m.processor
                m.set_processor(PAGCFGIdentitySelfAttnProcessor2_0())
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            inp = torch.cat([x, x])
            e = emb
            if pag_layers:
                inp, e = torch.cat([inp, inp[1:]]), torch.cat([e, e[1:]])
            if kind == "sd":
                pred = model(sch.scale_model_input(inp, t), t, encoder_hidden_states=e).sample
            else:
                pooled = torch.cat([kw["negative_pooled_prompt_embeds"], kw["pooled_prompt_embeds"]])
                pred = model(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=e,
                             pooled_projections=pooled).sample
            parts = pred.chunk(3 if pag_layers else 2)
            x = sch.step(combine(parts[1], parts[0], parts[2] if pag_layers else None, i, t), t, x).prev_sample
    modules = dict(model.named_modules())
    for name, proc in saved.items():
        modules[name].set_processor(proc)
    return x


def guider_combine(guider):
    def combine(cond, uncond, perturbed, step, t):
        guider.set_state(step=step, num_inference_steps=STEPS, timestep=t)
        guider.prepare_inputs({})
        return guider.forward(cond, uncond, perturbed).pred if perturbed is not None else guider.forward(cond, uncond).pred
    return combine


CASES = [
    ("sd", "apg", dict(momentum=-0.5, norm_threshold=2.0, eta=0.5),
     lambda: dg.AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_rescale=2.0, eta=0.5)),
    ("sd3", "apg", dict(momentum=0.3, norm_threshold=1.5, rescale=0.5),
     lambda: dg.AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=0.3,
                                          adaptive_projected_guidance_rescale=1.5, guidance_rescale=0.5)),
    ("sd", "cfg_zero_star", dict(zero_init_steps=1), lambda: dg.ClassifierFreeZeroStarGuidance(guidance_scale=5.0)),
    ("sd", "fdg", dict(scales=(8.0, 3.0)), lambda: dg.FrequencyDecoupledGuidance(guidance_scales=[8.0, 3.0])),
    ("sd3", "cfg", dict(rescale=0.7), lambda: dg.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.7)),
]


@pytest.mark.parametrize("kind,guidance,params,make_guider", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_guidance_equals_hand_written_loop_with_diffusers_guider(kind, guidance, params, make_guider):
    pipe = MAKERS[kind]()
    fastguide.enable(pipe, guidance=guidance, **params)
    ours = run(pipe, kind)
    fastguide.disable(pipe)
    ref = hand_loop(pipe, kind, guider_combine(make_guider()))
    assert_close(ours, ref)


def test_frequency_equals_fresca_loop():
    pipe = make_sd()
    fastguide.enable(pipe, guidance="frequency", method="fft_box", cutoff=4, scale_low=5.0 * 1.0,
                     scale_high=5.0 * 1.25)
    ours = run(pipe, "sd")
    fastguide.disable(pipe)
    ref = hand_loop(pipe, "sd", lambda c, u, p, i, t: fresca_cfg(c.double(), u.double(), 5.0, 1.0, 1.25, 4).float())
    assert_close(ours, ref)


def test_pag_equals_diffusers_pag_processors_and_guider():
    pipe = make_sd()
    fastguide.enable(pipe, guidance="pag", pag_scale=3.0, layers=["mid"])
    proc = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor
    assert isinstance(proc, attention.SwitchedPerturbation) and proc.select() is None  # identity only in its calls
    assert isinstance(pipe._fastguide.perturbation, attention.IdentityPAGProcessor)
    ours = run(pipe, "sd")
    fastguide.disable(pipe)
    assert not isinstance(pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1.processor,
                          attention.SwitchedPerturbation)
    # diffusers' PAG guider skips step 0 (start < step is strict): start=-1 keeps it on at every step
    guider = dg.PerturbedAttentionGuidance(guidance_scale=5.0, perturbed_guidance_scale=3.0,
                                           perturbed_guidance_layers=[0], perturbed_guidance_start=-1.0,
                                           perturbed_guidance_stop=1.0)
    ref = hand_loop(pipe, "sd", guider_combine(guider), pag_layers=["mid"])
    assert_close(ours, ref)
    assert (ours - run(pipe, "sd")).abs().max() > 1e-4  # PAG changed the result


def test_enable_is_idempotent_and_replaces_settings():
    pipe = make_sd()
    fastguide.enable(pipe, guidance="apg", norm_threshold=1.0)
    fastguide.enable(pipe, guidance="cfg")  # replaces, never double-wraps
    fastguide.enable(pipe, guidance="cfg")
    assert pipe._fastguide.guidance == "cfg"
    once = run(pipe, "sd")
    fastguide.disable(pipe)
    fastguide.disable(pipe)  # a no-op
    assert "forward" not in pipe.unet.__dict__
    assert_close(once, run(pipe, "sd"))


def test_works_with_torch_compile_of_the_denoiser():
    pipe = make_sd()
    fastguide.enable(pipe, guidance="apg", momentum=-0.5, norm_threshold=2.0)
    eager = run(pipe, "sd")
    pipe.unet = torch.compile(pipe.unet, backend="eager")
    assert_close(run(pipe, "sd"), eager)


def test_bad_input_lists_what_is_supported():
    pipe = make_sd()
    with pytest.raises(ValueError, match="unknown guidance 'magic'; known methods: .*'apg'"):
        fastguide.enable(pipe, guidance="magic")
    with pytest.raises(ValueError, match="takes .*not \\['bogus'\\]"):
        fastguide.enable(pipe, guidance="cfg", bogus=1)
    with pytest.raises(ValueError, match="matches no self-attention layer; available:"):
        fastguide.enable(pipe, guidance="pag", layers=["no_such_layer"])
    with pytest.raises(TypeError, match="supported pipelines: StableDiffusionPipeline"):
        fastguide.enable(object(), guidance="cfg")
    assert not fastguide.pipelines.is_enabled(pipe)  # nothing was half-applied


# --- saving network passes: Adaptive Guidance and limited-interval guidance -----------------------
def cfg_step(cond, uncond, scale=5.0):
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_ag_above_one_is_plain_cfg(kind):
    pipe = MAKERS[kind]()
    fastguide.enable(pipe, guidance="cfg")
    plain = run(pipe, kind)
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=1.5))
    ours = run(pipe, kind)
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    r = pipe.fastguide_report
    assert (r.steps, r.nfe, r.nfe_skipped, r.ag_switch_step) == (STEPS, 2 * STEPS, 0, [None])


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_ag_minus_one_is_conditional_only_after_first_step(kind):
    pipe = MAKERS[kind]()
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=-1.0))
    ours = run(pipe, kind)
    r = pipe.fastguide_report
    assert (r.nfe, r.nfe_skipped, r.ag_switch_step) == (STEPS + 1, STEPS - 1, [0])
    fastguide.disable(pipe)
    ref = hand_loop(pipe, kind, lambda c, u, p, i, t: cfg_step(c, u) if i == 0 else c)
    assert_close(ours, ref)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_interval_guidance_equals_hand_loop(kind):
    pipe = MAKERS[kind]()
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = [float(s) for s in pipe.scheduler.sigmas[:STEPS]]
    # guide steps 1 and 2 only; the policy maps timesteps to sigmas in float64 from the training schedule
    # (skip.NoiseSchedule, as the guiders do), the scheduler's table is float32: bounds 1e-6 apart from it
    lo, hi = sigmas[2] * (1 - 1e-6), sigmas[1] * (1 + 1e-6)
    fastguide.enable(pipe, guidance="cfg", interval=(lo, hi))
    ours = run(pipe, kind)
    r = pipe.fastguide_report
    assert (r.nfe, r.nfe_skipped) == (STEPS + 2, STEPS - 2)
    fastguide.disable(pipe)
    ref = hand_loop(pipe, kind, lambda c, u, p, i, t: cfg_step(c, u) if i in (1, 2) else c)
    assert_close(ours, ref)


def test_ag_with_two_samples_per_prompt_slices_every_batched_input():
    """SDXL: latents, prompt embeds and added_cond_kwargs (text_embeds, time_ids) are sliced to the needed rows."""
    pipe = make_sdxl()
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=-1.0))
    kw = inputs("sdxl")
    kw["latents"] = torch.cat([kw["latents"], kw["latents"].flip(-1)])
    with torch.no_grad():
        out = pipe(**kw, num_images_per_prompt=2, num_inference_steps=STEPS, guidance_scale=5.0,
                   output_type="latent", height=16, width=16).images
    r = pipe.fastguide_report
    assert out.shape == (2, 4, 16, 16) and torch.isfinite(out).all()
    assert (r.nfe, r.nfe_skipped, r.ag_switch_step) == (2 * (STEPS + 1), 2 * (STEPS - 1), [0, 0])


def test_enable_runs_the_twin_guider_with_its_policy():
    """enable drives the method's fastguide.diffusers guider (the modular route's object): APG's per-sample
    momentum works with AG there, so enable takes APG + AG; AG that never switches equals plain APG."""
    import fastguide.diffusers as fgd
    pipe = make_sd()
    kw = dict(momentum=-0.5, norm_threshold=2.0, eta=0.5)
    fastguide.enable(pipe, guidance="apg", **kw)
    assert type(pipe._fastguide.guider) is fgd.AdaptiveProjectedGuidance
    plain = run(pipe, "sd")
    fastguide.enable(pipe, guidance="apg", adaptive=fastguide.AG(threshold=2.0), **kw)
    assert type(pipe._fastguide.guider) is fgd.AdaptiveProjectedGuidance
    assert_close(run(pipe, "sd"), plain)
    fastguide.enable(pipe, guidance="apg", adaptive=fastguide.AG(threshold=-1.0), **kw)
    run(pipe, "sd")
    r = pipe.fastguide_report
    assert (r.nfe, r.nfe_skipped, r.ag_switch_step) == (STEPS + 1, STEPS - 1, [0])


def test_policy_bad_input():
    pipe = make_sd()
    with pytest.raises(ValueError, match="threshold must be a finite float"):
        fastguide.AG(threshold=float("nan"))
    with pytest.raises(ValueError, match="sigma_lo <= sigma_hi"):
        fastguide.enable(pipe, guidance="cfg", interval=(5.0, 1.0))
    with pytest.raises(ValueError, match="interval must be"):
        fastguide.enable(pipe, guidance="cfg", interval=(float("nan"), 1.0))
    with pytest.raises(ValueError, match="not supported with them yet"):
        fastguide.enable(pipe, guidance="pag", adaptive=fastguide.AG())
    with pytest.raises(TypeError, match="must be a fastguide.AG"):
        fastguide.enable(pipe, guidance="cfg", adaptive=0.9)
    assert not fastguide.pipelines.is_enabled(pipe)


# --- LinearAG ----------------------------------------------------------------------------------------
def test_fit_linear_ag_recovers_known_coefficients():
    g = torch.Generator().manual_seed(0)
    history = []
    for _ in range(3):
        run_, u_prev, c_prev = [], None, None
        for i in range(4):
            c = torch.randn(2, 4, 6, 6, generator=g)
            u = torch.randn(2, 4, 6, 6, generator=g) if i == 0 else 0.3 * c - 0.2 * c_prev + 0.5 * u_prev
            run_.append((c, u))
            c_prev, u_prev = c, u
        history.append(run_)
    coef = fastguide.pipelines.fit_linear_ag(history, [1, 3])
    for step in (1, 3):
        torch.testing.assert_close(torch.tensor(coef[step]), torch.tensor([0.3, -0.2, 0.5]), rtol=0, atol=1e-9)


def test_linear_ag_predicts_uncond_and_skips_its_pass():
    """Coefficients (0, 0, 1): the unconditional prediction of steps 1 and 2 is the previous step's."""
    pipe = make_sd()
    fastguide.enable(pipe, guidance="cfg", linear_ag=fastguide.LinearAG({1: (0.0, 0.0, 1.0), 2: (0.0, 0.0, 1.0)}, STEPS))
    ours = run(pipe, "sd")
    r = pipe.fastguide_report
    assert (r.nfe, r.nfe_skipped) == (2 * STEPS - 2, 2)
    fastguide.disable(pipe)
    last = {}

    def combine(c, u, p, i, t):
        if i in (1, 2):
            u = last["u"]
        last["u"] = u
        return cfg_step(c, u)
    assert_close(ours, hand_loop(pipe, "sd", combine))


def test_calibrate_linear_ag_on_tiny_pipeline():
    pipe = make_sd()
    g = torch.Generator().manual_seed(11)
    pos = [torch.randn(1, 5, 16, generator=g) for _ in range(2)]
    neg = [torch.randn(1, 5, 16, generator=g) for _ in range(2)]
    lag = fastguide.calibrate_linear_ag(pipe, pos, neg, num_inference_steps=8, guidance_scale=5.0, height=16, width=16)
    assert sorted(lag.coefficients) == [1, 3] and lag.num_inference_steps == 8
    assert not fastguide.pipelines.is_enabled(pipe)  # calibration leaves the pipeline as it found it
    fastguide.enable(pipe, guidance="cfg", linear_ag=lag)
    with torch.no_grad():
        out = pipe(**inputs("sd"), num_inference_steps=8, guidance_scale=5.0, output_type="latent", height=16,
                   width=16).images
    assert torch.isfinite(out).all()
    assert (pipe.fastguide_report.nfe, pipe.fastguide_report.nfe_skipped) == (14, 2)
    with pytest.raises(ValueError, match="cannot be combined"):
        fastguide.enable(pipe, guidance="cfg", linear_ag=lag, adaptive=fastguide.AG())
    with pytest.raises(ValueError, match="steps must lie in"):
        fastguide.calibrate_linear_ag(pipe, pos, neg, num_inference_steps=8, steps=[0])


def test_scale_schedule_per_step():
    pipe = make_sd()
    schedule = lambda step, t: 2.0 + step  # noqa: E731
    fastguide.enable(pipe, guidance="cfg", scale=schedule)
    ours = run(pipe, "sd")
    fastguide.disable(pipe)
    assert_close(ours, hand_loop(pipe, "sd", lambda c, u, p, i, t: cfg_step(c, u, 2.0 + i)))


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_ag_in_x0_space_measures_the_cosine_of_the_x0_estimates(kind, monkeypatch):
    """AG's default space: the cosine is taken between x0(cond) and x0(guided), formed from the denoiser's own
    input with the pipeline's scheduler (epsilon for SD, flow velocity for SD3)."""
    from fastguide.pipelines import _prediction
    from fastguide.skip import NoiseSchedule
    pipe = MAKERS[kind]()
    seen, calls = [], []
    real = fastguide.ops.guidance_stats
    monkeypatch.setattr(fastguide.pipelines.ops, "guidance_stats",
                        lambda c, u, g: seen.append((c.clone(), g.clone())) or real(c, u, g))
    den = pipe.transformer if kind == "sd3" else pipe.unet
    hook = den.register_forward_hook(lambda m, a, k, out: calls.append((a, k, _prediction(out).clone())),
                                     with_kwargs=True)
    fastguide.enable(pipe, guidance="cfg", adaptive=fastguide.AG(threshold=1.5))
    try:
        run(pipe, kind)
    finally:
        hook.remove()
    assert len(seen) == STEPS == len(calls)
    sched = NoiseSchedule(pipe.scheduler)
    for (args, kwargs, pred), (c_x0, g_x0) in zip(calls, seen):
        x = args[0] if args else kwargs["hidden_states"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        half = x.shape[0] // 2
        torch.testing.assert_close(g_x0, sched.x0(x[half:], pred[half:], t))
        assert not torch.allclose(g_x0, pred[half:])  # not the prediction space
