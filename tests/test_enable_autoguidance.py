"""`fastguide.enable(pipe, guidance="autoguidance")`: diffusers' AutoGuidance (CFG whose uncond pass skips layers,
diffusers.hooks.layer_skip) in the pipeline's one [uncond, cond] forward, the layers skipped on the uncond rows
only. Against a hand loop whose uncond pass runs under diffusers' own layer-skip hooks, on a tiny SD pipeline."""
import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, LayerSkipConfig
from diffusers.hooks.layer_skip import _apply_layer_skip_hook

import fastguide
import fastguide.diffusers as fd
from fastguide import attention, methods
from test_pipelines import STEPS, assert_close, inputs, make_sd, make_sd3, run

SCALE = 5.0
# The equalities run in float64, where the pipeline's one forward of 2B rows and the hand loop's two forwards of B rows
# agree to rounding (in float32 the random-weight UNet amplifies the batch-size-dependent rounding to ~1e-4 relative).
F64 = torch.float64
MID = "mid_block.attentions.0.transformer_blocks"      # make_sd's UNet: one BasicTransformerBlock per stack
UP = "up_blocks.1.attentions.{}.transformer_blocks"
DOWN = "down_blocks.0.attentions.0.transformer_blocks"


def hooks_loop(pipe, configs, pos, neg, latents, guided_steps=None, pooled=None):
    """Euler sampling around the bare UNet (SD; with `pooled` = (negative, positive) pooled embeddings: SD3's
    transformer, flow matching): the uncond pass under diffusers' layer-skip hooks (`configs`, as
    diffusers' AutoGuidance applies them in prepare_models), the cond pass plain, CFG. Sample i is guided at the
    steps < guided_steps[i] (Adaptive Guidance's switch) and takes its cond prediction after."""
    sch = pipe.scheduler
    sch.set_timesteps(STEPS)
    x = latents * (sch.init_noise_sigma if pooled is None else 1.0)
    model = pipe.unet if pooled is None else pipe.transformer

    def denoise(inp, t, emb, k):
        if pooled is None:
            return model(sch.scale_model_input(inp, t), t, encoder_hidden_states=emb).sample
        return model(hidden_states=inp, timestep=t.expand(inp.shape[0]), encoder_hidden_states=emb,
                     pooled_projections=pooled[k]).sample
    guided_steps = guided_steps or [STEPS] * x.shape[0]
    names = [f"AutoGuidance_{k}" for k in range(len(configs))]
    with torch.no_grad():
        for i, t in enumerate(sch.timesteps):
            for name, config in zip(names, configs):
                _apply_layer_skip_hook(model, copy.copy(config), name=name)
            try:
                uncond = denoise(x, t, neg, 0)
            finally:
                for name in names:
                    HookRegistry.check_if_exists_or_initialize(model).remove_hook(name, recurse=True)
            cond = denoise(x, t, pos, 1)
            g = uncond + SCALE * (cond - uncond)
            keep = torch.tensor([i < s for s in guided_steps])[:, None, None, None]
            x = sch.step(torch.where(keep, g, cond), t, x).prev_sample
    return x


def make_sd64():
    return make_sd().to(F64)


def inputs64():
    return {k: v.to(F64) for k, v in inputs("sd").items()}


def run64(pipe, **kw):
    with torch.no_grad():
        return pipe(**{**inputs64(), **kw}, num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent",
                    height=16, width=16).images


def forwards(unet):
    """Modules carrying an instance `forward` (a hook) and every attention processor's class: what disable restores."""
    return ([n for n, m in unet.named_modules() if "forward" in m.__dict__],
            {n: type(p).__name__ for n, p in unet.attn_processors.items()})


SKIPS = [("block", ["mid", r"up_blocks\.1\.attentions\.1"], [LayerSkipConfig([0], fqn=MID), LayerSkipConfig([0], fqn=UP.format(1))]),
         ("attention", ["down"], [LayerSkipConfig([0], fqn=DOWN, skip_ff=False)]),
         ("ff", [1, 2], [LayerSkipConfig([0], fqn=UP.format(k), skip_attention=False) for k in (0, 1)])]


@pytest.mark.parametrize("skip,layers,configs", SKIPS, ids=[s[0] for s in SKIPS])
def test_equals_diffusers_layer_skip_hooks_and_disable_restores(skip, layers, configs):
    """Per skip kind (whole block, self-attention, feed-forward; layers by name pattern or by block index in module
    order: make_sd's blocks are down.0, up.1.0, up.1.1, mid): the enabled pipeline equals the hand loop with
    diffusers' hooks on the uncond pass, in one forward of 2 rows per step; disable restores the UNet exactly."""
    pipe = make_sd64()
    before, stock = forwards(pipe.unet), run64(pipe)
    fastguide.enable(pipe, guidance="autoguidance", layers=layers, skip=skip)
    ours = run64(pipe)
    assert pipe.fastguide_report.nfe == 2 * STEPS and pipe.fastguide_report.nfe_skipped == 0
    assert (ours - stock).abs().max() > 1e-3  # the skipped layers change the result
    fastguide.disable(pipe)
    assert forwards(pipe.unet) == before
    torch.testing.assert_close(run64(pipe), stock, rtol=0, atol=0)
    kw = inputs64()
    assert_close(ours, hooks_loop(pipe, configs, kw["prompt_embeds"], kw["negative_prompt_embeds"], kw["latents"]))


def test_adaptive_guidance_skips_on_the_right_rows():
    """AG drops uncond rows per sample: [uncond of the guided samples, cond of all]; the layers are skipped on exactly
    those uncond rows. Two samples that switch at different steps, each equal to the hand loop with its own switch."""
    pipe = make_sd64()
    kw = inputs64()
    pos = torch.cat([kw["prompt_embeds"], kw["negative_prompt_embeds"]])  # sample 1: cond close to uncond
    neg = torch.cat([kw["negative_prompt_embeds"]] * 2)
    latents = torch.cat([kw["latents"]] * 2)
    fastguide.enable(pipe, guidance="autoguidance", adaptive=fastguide.AG(0.995, space="prediction"))
    ours = run64(pipe, prompt_embeds=pos, negative_prompt_embeds=neg, latents=latents)
    report = pipe.fastguide_report
    guided = [s + 1 for s in report.ag_switch_step]  # the switch step is the last guided one
    assert guided[0] != guided[1] and max(guided) < STEPS  # steps with one guided sample, then none
    assert report.nfe == 2 * STEPS + sum(guided) and report.nfe_skipped == 2 * STEPS - sum(guided)
    fastguide.disable(pipe)
    assert_close(ours, hooks_loop(pipe, [LayerSkipConfig([0], fqn=MID)], pos, neg, latents, guided_steps=guided))


def test_interval_and_dropout_zero():
    """interval=: no uncond rows outside it (nothing skipped there); dropout=0 keeps every layer (diffusers' hooks
    then return F.dropout(output, p=0)): plain CFG."""
    pipe = make_sd()
    fastguide.enable(pipe, guidance="cfg")
    cfg = run(pipe, "sd", scale=SCALE)
    fastguide.enable(pipe, guidance="autoguidance", dropout=0.0)
    assert_close(run(pipe, "sd", scale=SCALE), cfg)
    fastguide.enable(pipe, guidance="cfg", interval=(0.0, 1e-3))  # no step's sigma inside: no guidance
    ref = run(pipe, "sd", scale=SCALE)
    fastguide.enable(pipe, guidance="autoguidance", interval=(0.0, 1e-3))
    assert_close(run(pipe, "sd", scale=SCALE), ref)
    assert pipe.fastguide_report.nfe == STEPS and pipe.fastguide_report.nfe_skipped == STEPS


def test_dropout_below_one_acts_on_the_chosen_rows_only():
    """dropout < 1: the module runs on every row and F.dropout(p) (diffusers' hook, scaled by 1 / (1 - p)) acts on the
    perturbed rows' output only; the other rows are the module's output. Same draw as F.dropout on those rows."""
    torch.manual_seed(0)
    ff = make_sd().unet.mid_block.attentions[0].transformer_blocks[0].ff
    x = torch.randn(3, 5, 32)
    skip = attention.LayerSkip(skip="ff", dropout=0.5)
    undo = skip.switch(ff, lambda: skip)
    try:
        skip.rows = (0, 2, 3)
        torch.manual_seed(1)
        out = ff(x)
    finally:
        undo()
    assert "forward" not in ff.__dict__
    plain = ff(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, torch.cat([F.dropout(plain[:2], p=0.5), plain[2:]]), rtol=0, atol=0)
    assert (out[:2] == 0).any() and torch.equal(out[2:], plain[2:])


def test_shared_unet_isolation_and_pag_on_the_same_layers():
    """A second pipeline on the same UNet runs stock while the first is enabled; PAG on one pipeline and
    autoguidance skipping the self-attention of the same mid block on another keep their own perturbation."""
    p1 = make_sd()
    p2 = type(p1)(**p1.components, requires_safety_checker=False)
    stock = run(p2, "sd")
    fastguide.enable(p1, guidance="autoguidance", layers=["mid"], skip="attention")
    alone_ag = run(p1, "sd")
    torch.testing.assert_close(run(p2, "sd"), stock, rtol=0, atol=0)
    fastguide.enable(p2, guidance="pag", layers=["mid"])
    alone_pag = run(p2, "sd")
    for _ in range(2):  # interleaved calls
        torch.testing.assert_close(run(p1, "sd"), alone_ag, rtol=0, atol=0)
        torch.testing.assert_close(run(p2, "sd"), alone_pag, rtol=0, atol=0)
    fastguide.disable(p2)
    fastguide.disable(p1)
    assert forwards(p1.unet) == forwards(make_sd().unet)
    torch.testing.assert_close(run(p2, "sd"), stock, rtol=0, atol=0)


@pytest.mark.parametrize("settings,match", [
    (dict(layers=["nope"]), "layer 'nope' matches no transformer block; available: down_blocks.0.attentions.0"),
    (dict(layers=[7]), "layer index 7 out of range: 4 transformer blocks"),
    (dict(dropout=1.5), r"dropout must be a float in \[0, 1\].*got 1.5"),
    (dict(dropout=-0.1), r"dropout must be a float in \[0, 1\]"),
    (dict(skip="attn"), r"skip must be one of \['attention', 'block', 'ff'\], got 'attn'"),
])
def test_bad_settings_raise_before_anything_changes(settings, match):
    pipe = make_sd()
    before = forwards(pipe.unet)
    with pytest.raises(ValueError, match=match):
        fastguide.enable(pipe, guidance="autoguidance", **settings)
    assert not fastguide.pipelines.is_enabled(pipe) and forwards(pipe.unet) == before


def test_registry_entry_and_twin_config():
    """The entry perturbs its uncond rows (no extra branch: enable-ready, AG-capable); its guider config (pipelines
    that take a guider) maps block indices to diffusers' LayerSkipConfig(fqn='auto'), refuses name patterns."""
    m = fastguide.METHODS["autoguidance"]
    assert m.perturbed_branch == "uncond" and m.enable_ready and m.can_skip_uncond
    assert fastguide.METHODS["pag"].perturbed_branch == "perturbed" and fastguide.METHODS["cfg"].perturbed_branch is None
    p = m.check_params({"scale": 3.0, "layers": [0, 2], "skip": "ff", "dropout": 0.5, "rescale": 0.25}, "test")
    g = fd.AutoGuidance(**m.guider_config(p))
    (config,) = g.auto_guidance_config
    assert (config.indices, config.fqn, config.skip_attention, config.skip_ff, config.dropout) == ([0, 2], "auto",
                                                                                                  False, True, 0.5)
    assert g.guidance_scale == 3.0 and g.guidance_rescale == 0.25
    with pytest.raises(ValueError, match="needs layers= as block indices"):
        m.guider_config(m.check_params({}, "test"))
    with pytest.raises(ValueError, match="perturbs the rows of 'middle'"):
        methods.register(methods.Method(name="x_bad", summary="s", peer="p", params={}, combine=None,
                                        perturbation=lambda p: None, perturbs="middle"))


def test_sd3_joint_blocks():
    """SD3's JointTransformerBlocks (layers by index, as diffusers' fqn='auto' counts them): skip='ff' (its image and
    context feed-forwards) equals diffusers' hooks; skip='block' returns the block's inputs in the block's own output
    order (encoder, hidden) on the uncond rows, where diffusers 0.42's hook returns (hidden, encoder) and the next
    block fails on the shapes; skip='attention' on joint attention is refused."""
    pipe = make_sd3().to(F64)
    kw = {k: v.to(F64) for k, v in inputs("sd3").items()}
    fastguide.enable(pipe, guidance="autoguidance", layers=[0], skip="ff")
    with torch.no_grad():
        ours = pipe(**kw, num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent", height=16,
                    width=16).images
    assert pipe.fastguide_report.nfe == 2 * STEPS
    fastguide.disable(pipe)
    ref = hooks_loop(pipe, [LayerSkipConfig([0], fqn="auto", skip_attention=False)], kw["prompt_embeds"],
                     kw["negative_prompt_embeds"], kw["latents"],
                     pooled=(kw["negative_pooled_prompt_embeds"], kw["pooled_prompt_embeds"]))
    assert_close(ours, ref)
    fastguide.enable(pipe, guidance="autoguidance", layers=[0], skip="block")
    with torch.no_grad():
        assert torch.isfinite(pipe(**kw, num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent",
                                   height=16, width=16).images).all()
    with pytest.raises(ValueError, match="joint .* attention layer, is not supported: use skip='block' or 'ff'"):
        fastguide.enable(pipe, guidance="autoguidance", layers=[0], skip="attention")


def test_guider_route_installs_the_twin():
    """A pipeline that takes a guider gets fastguide.diffusers.AutoGuidance with the entry's config (block indices);
    name patterns are refused there, naming the fix, and nothing changes."""
    pytest.importorskip("sklearn", reason="the lab needs scikit-learn")
    from fastguide import lab
    pipe = lab.pipeline()
    before = pipe.guider
    with pytest.raises(ValueError, match="needs layers= as block indices"):
        fastguide.enable(pipe, guidance="autoguidance", layers=["mid"])
    assert pipe.guider is before
    fastguide.enable(pipe, guidance="autoguidance", layers=[1], dropout=0.5, scale=2.0)
    try:
        assert type(pipe.guider) is fd.AutoGuidance and pipe.guider.guidance_scale == 2.0
        assert pipe.guider.auto_guidance_config[0].indices == [1] and pipe.guider.auto_guidance_config[0].dropout == 0.5
    finally:
        fastguide.disable(pipe)
    assert pipe.guider is before


def test_refused_where_the_uncond_rows_are_not_one_batch():
    """Per-branch pipelines (Flux true CFG, ...) call the denoiser once per branch: refused, naming the pipelines
    that work; linear_ag (calibrated on plain CFG's uncond pass) too. Nothing changes."""
    from test_enable_branches import make_flux
    from fastguide.pipelines import LinearAG
    flux, _, _ = make_flux()
    with pytest.raises(ValueError, match=r"perturbs the uncond rows .* FluxPipeline calls its denoiser once per branch"):
        fastguide.enable(flux, guidance="autoguidance", layers=[0])
    pipe = make_sd()
    with pytest.raises(ValueError, match="linear_ag with guidance='autoguidance'"):
        fastguide.enable(pipe, guidance="autoguidance", linear_ag=LinearAG({1: (1.0, 0.0, 0.0)}, STEPS))
    assert not fastguide.pipelines.is_enabled(flux) and not fastguide.pipelines.is_enabled(pipe)
