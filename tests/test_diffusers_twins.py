"""The diffusers 0.42 guiders twinned last (MAG, TCFG, AutoGuidance, APMix, SEG, LTX-2): each twin against its
diffusers guider over the steps of a trajectory (state carried), same config, save / load, the skipping policy
on the cond / uncond ones, and the places where diffusers 0.42 is wrong (documented, fastguide right)."""
import pytest
import torch
from diffusers import guiders as dg

import fastguide
import fastguide.diffusers as fd
from reference import mambo_guidance, tangential_cfg

STEPS = 12
SHAPE = (2, 64, 12)  # [B, tokens, channels]: diffusers 0.42 MAG fails on 4-d inputs (test below)

# (diffusers class, constructor kwargs, number of predictions forward takes)
CASES = [
    (dg.MagnitudeAwareGuidance, dict(guidance_scale=10.0, alpha=8.0), 2),
    (dg.MagnitudeAwareGuidance, dict(guidance_scale=6.0, alpha=2.0, guidance_rescale=0.6, start=0.2, stop=0.8), 2),
    (dg.MagnitudeAwareGuidance, dict(guidance_scale=4.0, alpha=1.0, use_original_formulation=True), 2),
    (dg.TangentialClassifierFreeGuidance, dict(guidance_scale=7.5), 2),
    (dg.TangentialClassifierFreeGuidance, dict(guidance_scale=5.0, guidance_rescale=0.7, stop=0.7), 2),
    (dg.TangentialClassifierFreeGuidance, dict(guidance_scale=3.0, use_original_formulation=True, start=0.1), 2),
    (dg.AutoGuidance, dict(guidance_scale=3.0, auto_guidance_layers=[0], dropout=1.0), 2),
    (dg.AutoGuidance, dict(guidance_scale=2.0, auto_guidance_layers=1, dropout=0.5, guidance_rescale=0.5,
                           use_original_formulation=True, stop=0.6), 2),
    (dg.AdaptiveProjectedMixGuidance, dict(), 2),
    (dg.AdaptiveProjectedMixGuidance, dict(guidance_scale=4.0, adaptive_projected_guidance_scale=8.0,
                                           adaptive_projected_guidance_momentum=-0.3, eta=0.5, guidance_rescale=0.5,
                                           adaptive_projected_guidance_start_step=3, start=0.1, stop=0.9), 2),
    (dg.AdaptiveProjectedMixGuidance, dict(adaptive_projected_guidance_momentum=None, use_original_formulation=True,
                                           adaptive_projected_guidance_rescale=0.0,
                                           adaptive_projected_guidance_start_step=2), 2),
    (dg.SmoothedEnergyGuidance, dict(guidance_scale=5.0, seg_guidance_scale=2.8, seg_guidance_layers=[0],
                                     seg_guidance_start=0.1, seg_guidance_stop=0.7, stop=0.9), 3),
    (dg.SmoothedEnergyGuidance, dict(guidance_scale=1.0, seg_guidance_scale=3.0, seg_guidance_layers=[0],
                                     guidance_rescale=0.5, use_original_formulation=True), 3),
    (dg.LTX2Guidance, dict(guidance_scale=3.0, stg_scale=1.0, modality_scale=3.0,
                           spatio_temporal_guidance_blocks=[1]), 4),
    (dg.LTX2Guidance, dict(guidance_scale=4.0, stg_scale=0.5, guidance_rescale=0.7, start=0.2), 4),
    (dg.LTX2Guidance, dict(guidance_scale=1.0, modality_scale=2.0, stop=0.5), 4),
    (dg.LTX2Guidance, dict(stg_scale=2.0, modality_scale=1.5, guidance_rescale=0.3), 4),
]


def _ids(case):
    cls, kw, _ = case
    return cls.__name__ + "(" + ",".join(f"{k}={v}" for k, v in kw.items()) + ")"


def _preds(n, dtype=torch.float32, shape=SHAPE):
    base = torch.randn(shape, dtype=torch.float64)
    return [base] + [base + 0.5 * torch.randn(shape, dtype=torch.float64) for _ in range(n - 1)]


def _forward(g, preds):
    if isinstance(g, dg.LTX2Guidance):  # the denoiser passes the active predictions by name
        names = g.active_predictions()
        every = dict(zip(dg.LTX2Guidance._input_predictions, preds))
        return g.forward(**{k: every[k] for k in names}).pred
    if len(preds) == 3:  # SEG: cond, uncond, cond_seg by position, disabled ones unused
        return g.forward(*preds).pred
    return g.forward(*preds[: g.num_conditions]).pred


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("make", ["constructor", "guider_from"])
def test_steps_equal_diffusers(case, make):
    cls, kw, npred = case
    theirs = cls(**kw)
    ours = fd.GUIDERS[cls](**kw) if make == "constructor" else fd.guider_from(cls(**kw))
    assert isinstance(ours, cls) and type(ours).__name__ == cls.__name__
    assert dict(ours.config) == dict(theirs.config)
    for step in range(STEPS):
        preds = [p.float() for p in _preds(npred)]
        for g in (theirs, ours):
            g.set_state(step=step, num_inference_steps=STEPS, timestep=torch.tensor(999 - 80 * step))
            if not isinstance(g, dg.LTX2Guidance):
                g.prepare_inputs({})
        assert ours.num_conditions == theirs.num_conditions
        ref, out = _forward(theirs, preds), _forward(ours, preds)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=2e-5 * ref.abs().max().item(), msg=f"step {step}")


# --- dtypes, tensor-free edge cases, the registry's combine ---------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cls,kw", [(dg.MagnitudeAwareGuidance, dict(guidance_scale=6.0, alpha=2.0)),
                                    (dg.TangentialClassifierFreeGuidance,
                                     dict(guidance_scale=6.0, guidance_rescale=0.5)),
                                    (dg.LTX2Guidance, dict(guidance_scale=3.0, stg_scale=1.0, modality_scale=2.0))],
                         ids=["mag", "tcfg", "ltx2"])
def test_dtypes_against_diffusers_in_float64(cls, kw, dtype, tol):
    """Against diffusers' guider run in float64 on the same (rounded) inputs: float64 inputs get float64 norms,
    Gram matrices and scales (diffusers' TCFG itself computes in fp32: compared with its float64 math)."""
    preds = [p.to(dtype) for p in _preds(4)]
    theirs, ours = cls(**kw), fd.GUIDERS[cls](**kw)
    for g in (theirs, ours):
        g.set_state(step=0, num_inference_steps=STEPS, timestep=torch.tensor(999))
    if cls is dg.TangentialClassifierFreeGuidance:  # diffusers' normalized_guidance casts to fp32: its math in fp64
        from diffusers.guiders.guider_utils import rescale_noise_cfg
        c, u = preds[0].double(), preds[1].double()
        ref = rescale_noise_cfg(tangential_cfg(c, u, 6.0), c, 0.5)
    else:
        ref = _forward(theirs, [p.double() for p in preds])
    out = _forward(ours, preds)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol * ref.abs().max().item())


def test_registry_entries_name_their_twins_and_configs():
    """Each new registry entry builds its twin from its parameters (the guider route of `enable`)."""
    for name, cls in [("mag", fd.MagnitudeAwareGuidance), ("tcfg", fd.TangentialClassifierFreeGuidance),
                      ("apg_mix", fd.AdaptiveProjectedMixGuidance), ("ltx2", fd.LTX2Guidance)]:
        m = fastguide.METHODS[name]
        p = m.check_params({**m.example, "scale": 4.0, "rescale": 0.25}, "test")
        g = getattr(fd, m.twin)(**m.guider_config(p))
        assert type(g) is cls and g.guidance_scale == 4.0 and g.guidance_rescale == 0.25


def test_apg_mix_entry_equals_the_twin_over_a_trajectory():
    """The registry's combine (enable's route) and the twin agree step by step, momentum carried in both."""
    m = fastguide.METHODS["apg_mix"]
    p = m.check_params({"scale": 4.0, "start_step": 2, "apg_scale": 7.0, "eta": 0.3}, "test")
    state, twin = m.new_state(p), fd.AdaptiveProjectedMixGuidance(**m.guider_config(p))
    for step in range(6):
        c, u = [x.float() for x in _preds(2)]
        twin.set_state(step=step, num_inference_steps=6, timestep=torch.tensor(999 - step))
        twin.prepare_inputs({})
        torch.testing.assert_close(m.combine({"cond": c, "uncond": u}, p, state, step), twin.forward(c, u).pred)


def test_apg_mix_failed_step_leaves_the_momentum_as_it_was():
    m = fastguide.METHODS["apg_mix"]
    p = m.check_params({"scale": 4.0, "start_step": 5}, "test")
    buf = m.new_state(p)
    c, u = [x.float() for x in _preds(2)]
    m.combine({"cond": c, "uncond": u}, p, buf, 0)
    before = buf.running_average.clone()
    for bad in ({"cond": c, "uncond": u[:1]}, {"cond": c, "uncond": u.double()}):
        with pytest.raises((ValueError, TypeError), match="uncond"):
            m.combine(bad, p, buf, 1)
    with pytest.raises(ValueError, match="scale"):
        m.combine({"cond": c, "uncond": u}, {**p, "scale": float("nan")}, buf, 1)
    assert torch.equal(buf.running_average, before)
    with pytest.raises(ValueError, match="momentum_buffer must match cond"):  # another trajectory's shape
        m.combine({"cond": c[:1], "uncond": u[:1]}, p, buf, 1)
    assert torch.equal(buf.running_average, before)


def test_ltx2_twin_names_a_missing_prediction():
    g = fd.LTX2Guidance(guidance_scale=3.0, stg_scale=1.0)
    g.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    c = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=r"\['pred_cond', 'pred_uncond', 'pred_cond_stg'\]; pred_cond_stg is missing"):
        g.forward(c, c)


def test_ltx2_entry_rejects_original():
    m = fastguide.METHODS["ltx2"]
    p = m.check_params({"scale": 3.0, "original": True}, "test")
    c = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="original=True does not apply"):
        m.combine({"cond": c, "uncond": c, "perturbed": c}, p, None, 0)


# --- save / load -----------------------------------------------------------------------------------------------
SAVE = [(fd.MagnitudeAwareGuidance, dict(guidance_scale=9.0, alpha=3.0, adaptive=fastguide.AG(0.98, "prediction"))),
        (fd.TangentialClassifierFreeGuidance, dict(guidance_scale=6.0, use_original_formulation=True)),
        (fd.AutoGuidance, dict(guidance_scale=2.5, auto_guidance_layers=[0, 1], dropout=1.0)),
        (fd.AdaptiveProjectedMixGuidance, dict(adaptive_projected_guidance_start_step=3, eta=0.25)),
        (fd.SmoothedEnergyGuidance, dict(seg_guidance_layers=[1], seg_blur_sigma=3.0)),
        (fd.LTX2Guidance, dict(guidance_scale=3.0, stg_scale=1.0, spatio_temporal_guidance_blocks=[2]))]


@pytest.mark.parametrize("cls,kw", SAVE, ids=[c.__name__ for c, _ in SAVE])
def test_save_load_round_trip(tmp_path, cls, kw):
    ours = cls(**kw)
    ours.save_pretrained(tmp_path)
    back = cls.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert type(back) is cls and public(back.config) == public(ours.config)
    assert (back._skip is None) == (ours._skip is None)
    theirs = next(b for b in cls.__mro__ if b.__module__.startswith("diffusers.guiders"))
    loaded = theirs.from_pretrained(tmp_path)  # diffusers reads ours (and ignores the policy entries)
    expect = {k: v for k, v in public(ours.config).items() if k not in fd.POLICY_ARGS}
    assert type(loaded) is theirs and {k: v for k, v in public(loaded.config).items() if k in expect} == expect


# --- the skipping policy on the cond / uncond twins ----------------------------------------------------------
class _BlockDenoiser(torch.nn.Module):
    """Per-sample toy denoiser on [B, tokens, 4] made of diffusers BasicTransformerBlocks (so AutoGuidance's
    layer skip applies); records the rows of every call."""

    def __init__(self):
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock
        torch.manual_seed(3)
        self.transformer_blocks = torch.nn.ModuleList([BasicTransformerBlock(4, 1, 4) for _ in range(2)])
        self.calls = []

    def forward(self, latents, t, emb=None):
        self.calls.append(latents.shape[0])
        h = latents + emb[:, None, :]
        for block in self.transformer_blocks:
            h = block(h)
        return torch.tanh(h * (1 + 0.001 * float(t)))


def _run(guider, cond_emb, uncond_emb, x, steps=5):
    den = _BlockDenoiser()
    for i in range(steps):
        t = torch.tensor(float(999 - 150 * i))
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs({"emb": (cond_emb, uncond_emb)})
        for batch in batches:
            guider.prepare_models(den)
            batch.noise_pred = den(x, t, emb=batch.emb)
            guider.cleanup_models(den)
        x = x - 0.1 * guider(batches).pred
    return x, den.calls


def _policy_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g), torch.randn(2, 16, 4, generator=g)


def _skip1():
    from diffusers.hooks import LayerSkipConfig
    return LayerSkipConfig(indices=[1], fqn="auto", dropout=1.0)


POLICY = [(dg.MagnitudeAwareGuidance, lambda: dict(guidance_scale=5.0, alpha=1.0)),
          (dg.TangentialClassifierFreeGuidance, lambda: dict(guidance_scale=4.0)),
          (dg.AutoGuidance, lambda: dict(guidance_scale=3.0, auto_guidance_config=_skip1()))]


@pytest.mark.parametrize("cls,kw", POLICY, ids=[c.__name__ for c, _ in POLICY])
def test_adaptive_guidance_on_the_cond_uncond_twins(cls, kw):
    """Never switching (threshold 1.5): diffusers' guider exactly, every row evaluated (AutoGuidance: its layer
    skip on the unconditional batch). AG(-1): one unconditional pass, equal to diffusers' guider stopping
    after step 0."""
    ref, ref_calls = _run(cls(**kw()), *_policy_inputs())
    out, calls = _run(fd.GUIDERS[cls](**kw(), adaptive=fastguide.AG(1.5, "prediction")), *_policy_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == ref_calls == [2, 2] * 5
    ours = fd.GUIDERS[cls](**kw(), adaptive=fastguide.AG(-1.0, "prediction"))
    out, calls = _run(ours, *_policy_inputs())
    ref, _ = _run(cls(**kw(), stop=1 / 5), *_policy_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [2, 2, 2, 2, 2, 2] and ours.report.ag_switch_step == [0, 0]


def test_autoguidance_layers_where_diffusers_crashes():
    """auto_guidance_layers=[1] in diffusers 0.42 makes LayerSkipConfig(indices=1) and its hook fails on
    len(1) at the first unconditional batch; the twin runs it as auto_guidance_config(indices=[1]) does,
    and the layer skip matters (the result differs from plain CFG)."""
    with pytest.raises(TypeError, match="has no len"):
        _run(dg.AutoGuidance(guidance_scale=3.0, auto_guidance_layers=[1], dropout=1.0), *_policy_inputs())
    out, _ = _run(fd.AutoGuidance(guidance_scale=3.0, auto_guidance_layers=[1], dropout=1.0), *_policy_inputs())
    ref, _ = _run(dg.AutoGuidance(guidance_scale=3.0, auto_guidance_config=_skip1()), *_policy_inputs())
    cfg, _ = _run(dg.ClassifierFreeGuidance(guidance_scale=3.0), *_policy_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    converted = fd.guider_from(dg.AutoGuidance(guidance_scale=3.0, auto_guidance_layers=[1], dropout=1.0))
    torch.testing.assert_close(_run(converted, *_policy_inputs())[0], ref, rtol=1e-5, atol=1e-5)
    assert (out - cfg).abs().max() > 1e-3


APMIX = dict(guidance_scale=4.0, adaptive_projected_guidance_scale=6.0, adaptive_projected_guidance_start_step=1,
             adaptive_projected_guidance_rescale=4.0, eta=0.5)


def test_apg_mix_never_switching_equals_diffusers():
    from test_guiders_skipping import AG, protocol_run, _inputs
    ref, ref_calls = protocol_run(dg.AdaptiveProjectedMixGuidance(**APMIX), *_inputs())
    ours = fd.AdaptiveProjectedMixGuidance(**APMIX, adaptive=AG(1.5))
    out, calls = protocol_run(ours, *_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == ref_calls and ours.report.nfe_skipped == 0


def test_apg_mix_samples_switching_at_different_steps_equal_their_solo_runs():
    """AG switching samples at different steps: each sample's trajectory (its momentum advancing on its own
    guided steps, across the CFG and the APG phase) equals the sample run alone."""
    from test_guiders_skipping import test_samples_switching_at_different_steps_equal_their_solo_runs as switching
    switching(fd.AdaptiveProjectedMixGuidance, APMIX)


def test_guiders_with_extra_branches_refuse_a_policy():
    assert {"MagnitudeAwareGuidance", "TangentialClassifierFreeGuidance", "AutoGuidance",
            "AdaptiveProjectedMixGuidance"} <= set(fd.SKIPPING)
    assert not {"SmoothedEnergyGuidance", "LTX2Guidance"} & set(fd.SKIPPING)
    for cls, kw in [(fd.LTX2Guidance, {}), (fd.SmoothedEnergyGuidance, dict(seg_guidance_layers=[0]))]:
        with pytest.raises(ValueError, match="cannot do"):
            cls(**kw, adaptive=fastguide.AG(0.9, "prediction"))


# --- where diffusers 0.42 is wrong -------------------------------------------------------------------------------
def test_mag_on_image_shaped_predictions_where_diffusers_raises():
    """diffusers' mambo_guidance takes torch.norm over 3 dims, which torch refuses for [B, C, H, W]; the twin
    follows the formula (vector norms over all non-batch dims), as on [B, N, C] where diffusers runs."""
    c, u = [p.float() for p in _preds(2, shape=(2, 4, 8, 8))]
    theirs, ours = dg.MagnitudeAwareGuidance(guidance_scale=7.0, alpha=4.0), fd.MagnitudeAwareGuidance(
        guidance_scale=7.0, alpha=4.0)
    with pytest.raises(RuntimeError, match="dim must be a 2-tuple"):
        theirs.forward(c, u)
    ref = mambo_guidance(c.double(), u.double(), 7.0, 4.0)
    torch.testing.assert_close(ours.forward(c, u).pred.double(), ref, rtol=1e-5, atol=1e-5)


def test_tcfg_is_conditional_where_diffusers_raises():
    """diffusers' TCFG reads self._num_outputs_prepared, which nothing sets: its is_conditional raises, so a
    modular pipeline cannot run it. The twin counts prepared batches like every other guider."""
    theirs, ours = dg.TangentialClassifierFreeGuidance(), fd.TangentialClassifierFreeGuidance()
    with pytest.raises(AttributeError, match="is_conditional"):  # (a property raising AttributeError)
        theirs.is_conditional
    ours.set_state(step=0, num_inference_steps=4, timestep=torch.tensor(999))
    ours.prepare_models(torch.nn.Identity())
    assert ours.is_conditional
    ours.prepare_models(torch.nn.Identity())
    assert not ours.is_conditional


# --- SEG: the blur, the processor (enable's single batch) and the twin's hooks (the guider's own batch) ---------
from diffusers.hooks import HookRegistry  # noqa: E402
from diffusers.hooks.smoothed_energy_guidance_utils import (SmoothedEnergyGuidanceConfig,  # noqa: E402
                                                            _apply_smoothed_energy_guidance_hook, _gaussian_blur_2d)

from fastguide import attention  # noqa: E402

SIGMAS = [1.5, 9999999.0]  # a finite blur (kernel 11, clamped to the grid) and diffusers' default "infinite" one


def _diffusers_blur(q, sigma, branch):
    """diffusers' _gaussian_blur_2d forced into `branch` ("conv": its Gaussian conv, "mean": its mean)."""
    k = -(-6 * sigma // 1) + 1 - (-(-6 * sigma // 1)) % 2
    return _gaussian_blur_2d(q, int(min(k, 10 ** 6)), sigma, -1.0 if branch == "conv" else float("inf"))


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("seq", [64, 70, 49])
def test_seg_blur_is_the_official_branch_of_diffusers_blur(sigma, seq):
    """Finite sigma: Gaussian conv; sigma > threshold: the mean query (official SEG). Both equal diffusers'
    function taking that branch; tokens past the square grid (seq 70) stay as they are."""
    q = torch.randn(3, seq, 6)
    ref = _diffusers_blur(q.clone(), sigma, "conv" if sigma < 9999 else "mean")
    out = attention.seg_blur_(q.clone(), sigma)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 64:], q[:, 64:])


def test_diffusers_blur_swaps_the_branches():
    """diffusers 0.42 (its own threshold 9999.9): any finite sigma gives the mean query (sigma 2 == sigma 4),
    and the default "infinite" sigma a Gaussian conv (not the mean)."""
    q = torch.randn(2, 64, 5)
    run = lambda s: _gaussian_blur_2d(q.clone(), int(6 * s) + 1 - int(6 * s) % 2, s, 9999.9)  # noqa: E731
    mean = q.mean(1, keepdim=True).expand_as(q)
    torch.testing.assert_close(run(2.0), run(4.0))
    torch.testing.assert_close(run(2.0), mean)
    assert (run(9999999.0) - mean).abs().max() > 1e-2
    assert (attention.seg_blur_(q.clone(), 2.0) - mean).abs().max() > 1e-2


def tiny_sd3():
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4).eval()


def _model(kind):
    """(model, fqn of its block stack, call(model, rows) -> prediction, the attention module SEG perturbs)."""
    g = torch.Generator().manual_seed(5)
    if kind == "unet":
        from fastguide.bench import tiny_unet
        model = tiny_unet("cpu")
        x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
        t = torch.tensor([500.0, 500.0])
        fqn = "down_blocks.0.attentions.0.transformer_blocks"
        call = lambda m, r: m(x[r], t[r], encoder_hidden_states=e[r]).sample  # noqa: E731
        layer = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    else:
        model = tiny_sd3()
        x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 5, 32, generator=g)
        p = torch.randn(2, 16, generator=g)
        fqn = "transformer_blocks"
        call = lambda m, r: m(x[r], encoder_hidden_states=e[r], pooled_projections=p[r],  # noqa: E731
                              timestep=torch.tensor([500.0, 500.0])[r]).sample
        layer = model.transformer_blocks[0].attn
    return model, fqn, call, layer


def _diffusers_hooked(model, fqn, sigma, branch):
    """diffusers' SEG hooks on block 0, their blur forced into `branch`."""
    _apply_smoothed_energy_guidance_hook(model, SmoothedEnergyGuidanceConfig([0], fqn=fqn), sigma, name="seg")
    for m in model.modules():
        hook = m._diffusers_hook.get_hook("seg") if hasattr(m, "_diffusers_hook") else None
        if hook is not None:
            hook.blur_threshold_inf = -1.0 if branch == "conv" else float("inf")


@pytest.mark.parametrize("sigma", SIGMAS)
@pytest.mark.parametrize("kind", ["unet", "sd3"])
def test_seg_processor_equals_diffusers_hooks(kind, sigma):
    """One batch [x0, x1] with SEGProcessor(perturbed=1) on the layer: row 0 is the plain model, row 1 the model
    with diffusers' SEG hook on that layer's to_q (its blur taking the official branch). UNet self-attention
    and SD3 joint attention."""
    model, fqn, call, layer = _model(kind)
    with torch.no_grad():
        plain = call(model, slice(0, 1))
        stock = layer.processor
        layer.set_processor(attention.SEGProcessor(sigma, perturbed=1))
        out = call(model, slice(0, 2))
        layer.set_processor(stock)
        _diffusers_hooked(model, fqn, sigma, "conv" if sigma < 9999 else "mean")
        ref = call(model, slice(1, 2))
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("seg", recurse=True)
    torch.testing.assert_close(out[:1], plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1:], ref, rtol=1e-5, atol=1e-5)
    assert (ref - call(model, slice(1, 2))).abs().max() > 1e-4  # the blur changes the prediction


def test_seg_twin_blurs_its_seg_batch_where_diffusers_does_not():
    """The guider protocol on a tiny SD3 transformer: the twin's third batch runs with the blur (equal to the
    processor route), its hooks are gone after cleanup; diffusers' guider never installs its hooks (its
    prepare_models does not count the batches), so its pred_cond_seg is pred_cond."""
    model, _, call, layer = _model("sd3")
    rows = slice(0, 1)
    with torch.no_grad():
        plain = call(model, rows)
        stock = layer.processor
        layer.set_processor(attention.SEGProcessor(2.0, perturbed=2))
        blurred = call(model, slice(0, 2))[rows]
        layer.set_processor(stock)
        make = lambda m: m.SmoothedEnergyGuidance(guidance_scale=5.0, seg_guidance_layers=[0],  # noqa: E731
                                                   seg_blur_sigma=2.0)
        for g, expect in [(make(fd), blurred), (fd.guider_from(make(dg)), blurred), (make(dg), plain)]:
            g.set_state(step=1, num_inference_steps=4, timestep=torch.tensor(500.0))
            outs = []
            for _ in range(g.num_conditions):
                g.prepare_models(model)
                outs.append(call(model, rows))
                g.cleanup_models(model)
            assert g.num_conditions == 3
            torch.testing.assert_close(outs[0], plain)
            torch.testing.assert_close(outs[2], expect, rtol=1e-5, atol=1e-5)
        assert (blurred - plain).abs().max() > 1e-4
        torch.testing.assert_close(call(model, rows), plain)  # hooks removed


def test_gated_seg_processor_runs_the_layers_own_processor_when_closed(monkeypatch):
    """One SDPA over the whole batch (no chunk / cat of the rows); closed: the layer's own processor."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
    torch.manual_seed(0)
    attn, x = Attention(query_dim=16, heads=2, dim_head=8).eval(), torch.randn(3, 16, 16)
    is_open = [True]
    proc = attention.GatedSEGProcessor(lambda: is_open[0], AttnProcessor2_0(), 2.0, perturbed=1)
    batches, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *a, **k: (batches.append(q.shape[0]), sdpa(q, *a, **k))[1])
    with torch.no_grad():
        ref = attention.SEGProcessor(2.0, perturbed=1)(attn, x)
        assert batches == [3]
        torch.testing.assert_close(proc(attn, x), ref)
        torch.testing.assert_close(ref[:2], AttnProcessor2_0()(attn, x[:2]), rtol=1e-5, atol=1e-6)
        is_open[0] = False
        torch.testing.assert_close(proc(attn, x), AttnProcessor2_0()(attn, x))
    with pytest.raises(ValueError, match="blur_sigma must be a finite float > 0"):
        attention.SEGProcessor(0.0)


# --- enable on a pipeline that takes a guider (the lab's trained DigitsPipeline) ------------------------------
@pytest.mark.parametrize("name,settings,theirs", [
    ("tcfg", dict(scale=3.0, rescale=0.3), lambda: dg.TangentialClassifierFreeGuidance(guidance_scale=3.0,
                                                                                         guidance_rescale=0.3)),
    ("apg_mix", dict(scale=3.0, apg_scale=5.0, start_step=2, eta=0.5, norm_threshold=3.0),
     lambda: dg.AdaptiveProjectedMixGuidance(guidance_scale=3.0, adaptive_projected_guidance_scale=5.0, eta=0.5,
                                             adaptive_projected_guidance_start_step=2,
                                             adaptive_projected_guidance_rescale=3.0)),
], ids=["tcfg", "apg_mix"])
def test_enable_installs_the_twin_and_equals_diffusers_guider_in_the_lab_pipeline(name, settings, theirs):
    pytest.importorskip("sklearn", reason="the lab needs scikit-learn")
    from fastguide import lab
    pipe = lab.pipeline()
    run = lambda guider: pipe(class_labels=[1, 4, 7], num_inference_steps=6, guider=guider,  # noqa: E731
                              generator=torch.Generator().manual_seed(0), output_type="latent").images
    ref = run(theirs())
    fastguide.enable(pipe, guidance=name, **settings)
    try:
        assert type(pipe.guider) is getattr(fd, fastguide.METHODS[name].twin)
        torch.testing.assert_close(run(None), ref, rtol=1e-5, atol=1e-5)
    finally:
        fastguide.disable(pipe)


# --- the registry's combines: per-sample tensor scales, strides, torch.compile ----------------------------------
def _combine(name, preds, scale, **over):
    m = fastguide.METHODS[name]
    p = m.check_params({**m.example, **over}, "test")
    p["scale"] = scale
    return m.combine(dict(zip(("cond", "uncond", "perturbed"), preds)), p, None, 3)


@pytest.mark.parametrize("name", ["mag", "tcfg", "ltx2"])
def test_combine_takes_per_sample_tensor_scales_and_strided_inputs(name):
    """A [B] scale tensor equals each sample run with its own float; non-contiguous inputs equal contiguous."""
    preds = [p.float().transpose(1, 2) for p in _preds(3, shape=(3, 12, 20))]  # [3, 20, 12] views
    scale = torch.tensor([2.0, 5.5, 9.0])
    out = _combine(name, preds, scale, rescale=0.4)
    for i in range(3):
        one = _combine(name, [p[i:i + 1].contiguous() for p in preds], float(scale[i]), rescale=0.4)
        torch.testing.assert_close(out[i:i + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mag", "tcfg", "ltx2"])
def test_combine_compiles_fullgraph_without_recompiles(name):
    import torch._dynamo.testing
    counter = torch._dynamo.testing.CompileCounter()
    fn = torch.compile(lambda s, *xs: _combine(name, list(xs), s), backend=counter, fullgraph=True)
    preds = [p.float() for p in _preds(3)]
    scale = torch.empty(2)
    for step in range(4):
        scale.copy_(torch.tensor([2.0 + step, 6.0 - step]))
        torch.testing.assert_close(fn(scale, *preds), _combine(name, preds, scale.clone()), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_precision_against_float64_on_sd_sized_predictions():
    """[2, 4096, 64] (a 1024 px SD3 latent in tokens). TCFG: fastguide's Gram route stays at fp32 rounding of the
    float64 result. (diffusers' fp32 SVD of the [2, 2, 262144] stack was off by 1.5e-2 of the result with this
    project's CPU torch 2.13: v0 wrong at 4e-3 from LAPACK's fp32 reductions; not asserted, it depends on the
    LAPACK build.) MAG with |c - u| = 0.01 |c|: within 1e-5 (the cancellation in its norms, see methods.mag)."""
    c = torch.randn(2, 4096, 64, dtype=torch.float64)
    u = c + 0.5 * torch.randn_like(c)
    rel = lambda x, ref: ((x.double() - ref).abs().max() / ref.abs().max()).item()  # noqa: E731
    assert rel(fastguide.methods.tcfg(c.float(), u.float(), 7.5), tangential_cfg(c, u, 7.5)) < 2e-6
    u = c + 0.01 * torch.randn_like(c)
    assert rel(fastguide.methods.mag(c.float(), u.float(), 10.0, 8.0), mambo_guidance(c, u, 10.0, 8.0)) < 1e-5
