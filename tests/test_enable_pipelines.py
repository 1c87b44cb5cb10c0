"""Which pipelines `fastguide.enable` takes (issue 11): img2img / inpaint variants of SD and SDXL, subclasses,
diffusers' PAG pipelines, SD3's skip_guidance_layers, PixArt-Sigma; clear errors for the rest. Tiny random-weight pipelines."""
import pytest
import torch
from diffusers import (EulerDiscreteScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel,
                       StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPAGPipeline,
                       StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline,
                       StableDiffusionXLPAGPipeline)
from diffusers import guiders as dg
from diffusers.utils.torch_utils import randn_tensor

import fastguide
from test_pipelines import STEPS, _vae, assert_close, guider_combine, inputs, make_sd, make_sd3, make_sdxl, run


def call(pipe, kind, scale=5.0, **kw):
    with torch.no_grad():
        return pipe(**inputs(kind), num_inference_steps=STEPS, guidance_scale=scale, output_type="latent",
                    generator=torch.Generator().manual_seed(3), **kw).images


def image_kwargs(variant):
    g = torch.Generator().manual_seed(5)
    if variant == "img2img":  # 4 channels: the pipeline takes it as latents (no VAE encode)
        return dict(image=torch.randn(1, 4, 16, 16, generator=g), strength=0.75)
    return dict(image=torch.rand(1, 3, 16, 16, generator=g),  # in [0, 1], as diffusers expects of tensors
                mask_image=(torch.rand(1, 1, 16, 16, generator=g) > 0.5).float(), height=16, width=16, strength=0.75)


VARIANTS = {
    "sd-img2img": (lambda: StableDiffusionImg2ImgPipeline(**make_sd().components, requires_safety_checker=False),
                   "sd", "img2img"),
    "sd-inpaint": (lambda: StableDiffusionInpaintPipeline(**make_sd().components, requires_safety_checker=False),
                   "sd", "inpaint"),
    "sdxl-img2img": (lambda: StableDiffusionXLImg2ImgPipeline(**make_sdxl().components), "sdxl", "img2img"),
    "sdxl-inpaint": (lambda: StableDiffusionXLInpaintPipeline(**make_sdxl().components), "sdxl", "inpaint"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_img2img_and_inpaint_cfg_equals_stock(name):
    make, kind, variant = VARIANTS[name]
    pipe = make()
    stock = call(pipe, kind, **image_kwargs(variant))
    fastguide.enable(pipe, guidance="cfg")
    assert_close(call(pipe, kind, **image_kwargs(variant)), stock)
    assert pipe.fastguide_report.steps == 3  # strength 0.75 of 4 steps
    fastguide.disable(pipe)
    torch.testing.assert_close(call(pipe, kind, **image_kwargs(variant)), stock, rtol=0, atol=0)


def img2img_hand_loop(pipe, combine, strength=0.75):
    """StableDiffusionImg2ImgPipeline's sampling written out around the bare UNet (latent image input):
    the last `strength` of the Euler schedule, starting from the image noised to the first of those steps."""
    kw, image = inputs("sd"), image_kwargs("img2img")["image"]
    sch = pipe.scheduler
    sch.set_timesteps(STEPS)
    start = STEPS - min(int(STEPS * strength), STEPS)
    timesteps = sch.timesteps[start:]
    sch.set_begin_index(start)
    noise = randn_tensor(image.shape, generator=torch.Generator().manual_seed(3), dtype=image.dtype)
    x = sch.add_noise(image, noise, timesteps[:1])
    emb = torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            pred = pipe.unet(sch.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=emb).sample
            uncond, cond = pred.chunk(2)
            x = sch.step(combine(cond, uncond, None, i, t), t, x).prev_sample
    return x


def test_img2img_apg_equals_hand_loop_with_diffusers_guider():
    pipe, _, _ = VARIANTS["sd-img2img"]
    pipe = pipe()
    stock = call(pipe, "sd", **image_kwargs("img2img"))
    assert_close(img2img_hand_loop(pipe, lambda c, u, p, i, t: u + 5.0 * (c - u)), stock)  # the loop is the pipeline's
    fastguide.enable(pipe, guidance="apg", momentum=-0.5, norm_threshold=2.0, eta=0.5)
    ours = call(pipe, "sd", **image_kwargs("img2img"))
    fastguide.disable(pipe)
    guider = dg.AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                          adaptive_projected_guidance_rescale=2.0, eta=0.5)
    assert_close(ours, img2img_hand_loop(pipe, guider_combine(guider)))
    assert (ours - stock).abs().max() > 1e-3  # APG is not CFG here


def test_subclass_of_a_supported_pipeline():
    class MyPipeline(StableDiffusionPipeline):
        pass
    pipe = MyPipeline(**make_sd().components, requires_safety_checker=False)
    stock = run(pipe, "sd")
    fastguide.enable(pipe, guidance="cfg")
    assert type(pipe).__name__ == "MyPipeline" and isinstance(pipe, MyPipeline)
    assert_close(run(pipe, "sd"), stock)
    fastguide.disable(pipe)
    assert type(pipe) is MyPipeline


def test_unsupported_pipeline_names_the_supported_ones_and_the_guider_route():
    from diffusers import StableDiffusionXLInstructPix2PixPipeline  # batches three ways: not a CFG pair
    pipe = StableDiffusionXLInstructPix2PixPipeline(**{k: v for k, v in make_sdxl().components.items()
                                                      if k not in ("image_encoder", "feature_extractor")})
    with pytest.raises(TypeError, match=r"StableDiffusionXLInstructPix2PixPipeline is not supported; supported pipelines: "
                                        r"StableDiffusionPipeline, StableDiffusionImg2ImgPipeline.*fastguide.diffusers"):
        fastguide.enable(pipe)
    assert not fastguide.pipelines.is_enabled(pipe)


@pytest.mark.parametrize("attr,make", [("unet", make_sd), ("transformer", make_sd3)])
def test_missing_denoiser_is_named(attr, make):
    pipe = make()
    setattr(pipe, attr, None)
    with pytest.raises(ValueError, match=f"has {attr}=None.*build the pipeline with its {attr}"):
        fastguide.enable(pipe)
    assert not fastguide.pipelines.is_enabled(pipe)


# --- diffusers' PAG pipelines: their own [uncond, cond, perturbed] batch, fused ------------------------
def make_pag(kind):
    if kind == "sd":
        return StableDiffusionPAGPipeline(**make_sd().components, requires_safety_checker=False, pag_applied_layers=["mid"])
    return StableDiffusionXLPAGPipeline(**make_sdxl().components, pag_applied_layers=["mid"])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
@pytest.mark.parametrize("pag", [dict(pag_scale=3.0), dict(pag_scale=3.0, pag_adaptive_scale=0.002), dict(pag_scale=0.0)],
                         ids=["pag", "adaptive", "off"])
def test_pag_pipeline_cfg_equals_stock(kind, pag):
    pipe = make_pag(kind)
    stock = call(pipe, kind, height=16, width=16, **pag)
    fastguide.enable(pipe, guidance="cfg")
    assert_close(call(pipe, kind, height=16, width=16, **pag), stock)
    r = pipe.fastguide_report
    assert (r.steps, r.nfe) == (STEPS, STEPS * (3 if pag["pag_scale"] else 2))
    if pag["pag_scale"]:  # the pipeline's PAG acted (against the same pipeline without it)
        assert (stock - call(pipe, kind, height=16, width=16, pag_scale=0.0)).abs().max() > 1e-3


def test_pag_pipeline_refuses_what_it_cannot_fuse():
    pipe = make_pag("sd")
    with pytest.raises(ValueError, match="guidance='pag' on StableDiffusionPAGPipeline, which perturbs its own layers"):
        fastguide.enable(pipe, guidance="pag")
    fastguide.enable(pipe, guidance="apg", norm_threshold=1.0)
    with pytest.raises(ValueError, match=r"pag_scale=3.0 batches \[uncond, cond, perturbed\].*guidance='apg'.*pag_scale=0"):
        call(pipe, "sd", height=16, width=16, pag_scale=3.0)
    assert fastguide.pipelines._ACTIVE.get() is None
    out = call(pipe, "sd", height=16, width=16, pag_scale=0.0)  # plain CFG batch: any method
    assert torch.isfinite(out).all() and pipe.fastguide_report.nfe == 2 * STEPS


# --- SD3: skip_guidance_layers makes an extra conditional-only call -------------------------------------
@pytest.mark.parametrize("images", [1, 2])
def test_sd3_skip_guidance_layers_equals_stock(images):
    pipe = make_sd3()
    g = torch.Generator().manual_seed(9)
    kw = {k: torch.cat([v, torch.randn(v.shape, generator=g)][:images]) for k, v in inputs("sd3").items()}
    kw.update(skip_guidance_layers=[0], skip_layer_guidance_start=0.0, skip_layer_guidance_stop=1.0, height=16, width=16)

    def sd3(p):
        with torch.no_grad():
            return p(**kw, num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent").images
    stock = sd3(pipe)
    fastguide.enable(pipe, guidance="cfg")
    ours = sd3(pipe)  # before: IndexError (one image) / wrong latents (two)
    assert_close(ours, stock)
    # steps 1..3 of 4 ran the skip-layer pass (i > 0 and i < 4): B rows each, counted, not split
    assert (pipe.fastguide_report.steps, pipe.fastguide_report.nfe) == (STEPS, images * (2 * STEPS + 3))
    fastguide.disable(pipe)
    kw["skip_guidance_layers"] = None
    assert (sd3(pipe) - stock).abs().max() > 1e-3  # the skip-layer term acted


# --- PixArt-Sigma: CFG decided by the call's guidance_scale, learned-sigma output channels ------------
def make_pixart():
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=8, num_layers=1, patch_size=2, attention_head_dim=8, num_attention_heads=2, caption_channels=16,
        in_channels=4, out_channels=8, cross_attention_dim=16, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6)
    return PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=_vae(), transformer=transformer,
                               scheduler=EulerDiscreteScheduler(steps_offset=1))


def pixart_inputs():
    return dict(inputs("sd"), prompt_attention_mask=torch.ones(1, 5), negative_prompt_attention_mask=torch.ones(1, 5))


def pixart(pipe, scale=5.0):
    with torch.no_grad():
        return pipe(**pixart_inputs(), negative_prompt=None, num_inference_steps=STEPS, guidance_scale=scale,
                    output_type="latent", height=16, width=16, use_resolution_binning=False).images


def test_pixart_sigma_cfg_equals_stock():
    pipe = make_pixart()
    stock, unguided = pixart(pipe), pixart(pipe, scale=1.0)
    fastguide.enable(pipe, guidance="cfg")
    assert_close(pixart(pipe), stock)
    assert pipe.fastguide_report.steps == STEPS
    torch.testing.assert_close(pixart(pipe, scale=1.0), unguided, rtol=0, atol=0)  # no CFG: passes through


def test_pixart_sigma_apg_guides_the_prediction_channels_only():
    """The transformer outputs [eps, learned sigma]; the pipeline keeps eps after CFG. APG's norms and
    projection must see eps alone, as in a hand loop that guides eps with diffusers' guider."""
    pipe = make_pixart()
    fastguide.enable(pipe, guidance="apg", momentum=-0.5, norm_threshold=2.0, eta=0.5)
    ours = pixart(pipe)
    fastguide.disable(pipe)
    combine = guider_combine(dg.AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                                          adaptive_projected_guidance_rescale=2.0, eta=0.5))
    kw, sch = pixart_inputs(), pipe.scheduler
    sch.set_timesteps(STEPS)
    x = kw["latents"] * sch.init_noise_sigma
    emb = torch.cat([kw["negative_prompt_embeds"], kw["prompt_embeds"]])
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            pred = pipe.transformer(sch.scale_model_input(torch.cat([x, x]), t), encoder_hidden_states=emb,
                                    encoder_attention_mask=torch.ones(2, 5), timestep=t.expand(2),
                                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
            uncond, cond = pred[:, :4].chunk(2)
            x = sch.step(combine(cond, uncond, None, i, t), t, x).prev_sample
    assert_close(ours, x)


def test_guider_pipeline_takes_per_sample_tensor_params_without_a_twin():
    """A pipeline that takes a guider (the lab's DigitsPipeline): a method without a twin runs as the registry's
    MultiBranchGuidance, whose combine takes per-sample tensors (parameters and the scale: each sample equals a run
    with its own floats); a twin guider's config holds numbers: a tensor there is refused before anything changes."""
    pytest.importorskip("sklearn", reason="the lab needs scikit-learn")
    from fastguide import lab
    pipe = lab.pipeline()

    def enabled(guidance, **params):
        fastguide.enable(pipe, guidance=guidance, **params)
        try:
            return pipe(class_labels=[1, 4], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                        output_type="latent").images
        finally:
            fastguide.disable(pipe)

    both = enabled("frequency", cutoff=1, scale_low=torch.tensor([1.0, 0.5]), scale_high=torch.tensor([4.0, 2.0]))
    for i, (lo, hi) in enumerate(((1.0, 4.0), (0.5, 2.0))):
        assert_close(both[i], enabled("frequency", cutoff=1, scale_low=lo, scale_high=hi)[i])
    both = enabled("cfg_norm", scale=torch.tensor([3.0, 5.0]), strength=0.9)
    for i, s in enumerate((3.0, 5.0)):
        assert_close(both[i], enabled("cfg_norm", scale=s, strength=0.9)[i])
    with pytest.raises(ValueError, match=r"runs as fastguide.diffusers.ClassifierFreeGuidance here, whose config takes "
                                         r"numbers: per-sample tensor parameters \['scale'\] cannot be honoured"):
        fastguide.enable(pipe, guidance="cfg", scale=torch.tensor([3.0, 5.0]))
    assert pipe.guider is None and not hasattr(pipe, "fastguide_report")
