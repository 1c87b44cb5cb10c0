"""Drop-in guiders: each fastguide twin against its diffusers guider over 30 steps, state carried."""
import pytest
import torch
from diffusers import guiders as dg

import fastguide
import fastguide.diffusers as fd

STEPS = 30
SHAPE = (2, 4, 16, 16)

# (diffusers class, constructor kwargs, number of predictions forward takes): windows, momentum, rescale.
CASES = [
    (dg.ClassifierFreeGuidance, dict(guidance_scale=7.5), 2),
    (dg.ClassifierFreeGuidance, dict(guidance_scale=5.0, guidance_rescale=0.7, start=0.2, stop=0.8), 2),
    (dg.ClassifierFreeGuidance, dict(guidance_scale=3.0, use_original_formulation=True), 2),
    (dg.AdaptiveProjectedGuidance, dict(guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5,
                                        adaptive_projected_guidance_rescale=15.0, eta=0.5), 2),
    (dg.AdaptiveProjectedGuidance, dict(guidance_scale=6.0, adaptive_projected_guidance_rescale=10.0,
                                        adaptive_projected_guidance_norm_dim=(-2, -1), guidance_rescale=0.5,
                                        start=0.1, stop=0.9), 2),
    (dg.PerturbedAttentionGuidance, dict(guidance_scale=7.0, perturbed_guidance_scale=3.0,
                                         perturbed_guidance_layers=[0], perturbed_guidance_start=0.1,
                                         perturbed_guidance_stop=0.6, start=0.0, stop=0.8), 3),
    (dg.PerturbedAttentionGuidance, dict(guidance_scale=1.0, perturbed_guidance_scale=2.5,
                                         perturbed_guidance_layers=[0], guidance_rescale=0.3), 3),
    (dg.SkipLayerGuidance, dict(guidance_scale=6.0, skip_layer_guidance_scale=2.8, skip_layer_guidance_layers=[0],
                                skip_layer_guidance_start=0.2, skip_layer_guidance_stop=0.5), 3),
    (dg.ClassifierFreeZeroStarGuidance, dict(guidance_scale=4.0, zero_init_steps=2), 2),
    (dg.ClassifierFreeZeroStarGuidance, dict(guidance_scale=4.0, zero_init_steps=0, guidance_rescale=0.6,
                                             stop=0.7), 2),
    (dg.FrequencyDecoupledGuidance, dict(guidance_scales=[10.0, 5.0]), 2),
    (dg.FrequencyDecoupledGuidance, dict(guidance_scales=[9.0, 4.0, 2.0], start=0.1, stop=0.7,
                                         parallel_weights=[0.5, 1.0, 0.8]), 2),
]


def _ids(case):
    cls, kw, _ = case
    return cls.__name__ + "(" + ",".join(f"{k}={v}" for k, v in kw.items()) + ")"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
@pytest.mark.parametrize("make", ["constructor", "guider_from"])
def test_30_steps_equal_diffusers(case, make):
    cls, kw, npred = case
    theirs = cls(**kw)
    ours = fd.GUIDERS[cls](**kw) if make == "constructor" else fd.guider_from(cls(**kw))
    assert isinstance(ours, cls) and dict(ours.config) == dict(theirs.config)
    for step in range(STEPS):
        preds = [torch.randn(SHAPE, dtype=torch.float64)]
        preds += [preds[0] + 0.5 * torch.randn(SHAPE, dtype=torch.float64) for _ in range(npred - 1)]
        preds = [p.float() for p in preds]
        for g in (theirs, ours):
            g.set_state(step=step, num_inference_steps=STEPS, timestep=torch.tensor(999 - 33 * step))
            g.prepare_inputs({})
        assert ours.num_conditions == theirs.num_conditions
        ref = theirs.forward(*preds[: theirs.num_conditions] if npred == 2 else preds).pred
        out = ours.forward(*preds[: theirs.num_conditions] if npred == 2 else preds).pred
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item(), msg=f"step {step}")


def test_config_round_trip(tmp_path):
    ours = fd.AdaptiveProjectedGuidance(guidance_scale=9.0, adaptive_projected_guidance_momentum=-0.25, eta=0.3)
    ours.save_pretrained(tmp_path)
    back = fd.AdaptiveProjectedGuidance.from_pretrained(tmp_path)
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(back.config) == public(ours.config) and type(back) is fd.AdaptiveProjectedGuidance
    theirs = dg.AdaptiveProjectedGuidance.from_pretrained(tmp_path)  # and diffusers reads ours
    assert theirs.guidance_scale == 9.0 and theirs.eta == 0.3


def test_zero_init_with_rescale_is_finite_where_diffusers_gives_nan():
    theirs = dg.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1, guidance_rescale=0.5)
    ours = fd.guider_from(theirs)
    c, u = torch.randn(SHAPE), torch.randn(SHAPE)
    for g in (theirs, ours):
        g.set_state(step=0, num_inference_steps=10, timestep=None)
    assert torch.isnan(theirs.forward(c, u).pred).all()
    assert torch.equal(ours.forward(c, u).pred, torch.zeros(SHAPE))


def test_guider_from_unsupported_lists_supported():
    class MyGuidance(dg.ClassifierFreeGuidance):  # every diffusers 0.42 guider has a twin: a user's own one
        pass

    with pytest.raises(TypeError, match="no fastguide twin for MyGuidance; supported: .*AdaptiveProjectedGuidance"):
        fd.guider_from(MyGuidance())


def test_apg_momentum_resets_at_step_zero_in_place():
    ours = fd.AdaptiveProjectedGuidance(guidance_scale=5.0, adaptive_projected_guidance_momentum=0.5)
    c, u = torch.randn(SHAPE), torch.randn(SHAPE)
    for run in range(2):
        for step in range(3):
            ours.set_state(step=step, num_inference_steps=3, timestep=None)
            ours.prepare_inputs({})
            ours.forward(c, u)
        if run == 0:
            buf = ours._fastguide_buffer.running_average
    # the second trajectory reused (zeroed) the same tensor, and ended where the first did
    assert ours._fastguide_buffer.running_average is buf
    expected = (c - u) * (1 + 0.5 + 0.25)
    torch.testing.assert_close(buf, expected)


def test_fdg_per_level_window_keeps_the_conditional_band():
    """diffusers' FDG appends a stale `pred_cond_freq` (the previous level's) for a level outside its
    window and fails on the shape mismatch; fastguide keeps that level's conditional band, as documented."""
    kw = dict(guidance_scales=[9.0, 4.0], start=[0.0, 0.5], stop=[1.0, 1.0])
    theirs, ours = dg.FrequencyDecoupledGuidance(**kw), fd.FrequencyDecoupledGuidance(**kw)
    c = torch.randn(SHAPE)
    u = c + 0.5 * torch.randn(SHAPE)
    for g in (theirs, ours):
        g.set_state(step=1, num_inference_steps=10, timestep=None)  # level 1 (low band) not started yet
    with pytest.raises(RuntimeError, match="must match the size"):
        theirs.forward(c, u)
    # low band = cond's low band (scale 1 on uncond), high band guided with 9: fdg with scales [9, 1]
    torch.testing.assert_close(ours.forward(c, u).pred, fd.frequency.fdg(c, u, [9.0, 1.0]))
    # and a pure-diffusers check of that meaning: guided high band of CFG 9 + conditional low band
    from kornia.geometry.transform import build_laplacian_pyramid
    from kornia.geometry import pyrup
    cp, up = build_laplacian_pyramid(c.double(), 2), build_laplacian_pyramid(u.double(), 2)
    expected = pyrup(cp[1]) + up[0] + 9.0 * (cp[0] - up[0])
    torch.testing.assert_close(ours.forward(c, u).pred.double(), expected, rtol=1e-5, atol=1e-5)


def _apg_steps(guiders, steps, start=0):
    for step in range(start, start + steps):
        c = torch.randn(SHAPE)
        u = c + 0.5 * torch.randn(SHAPE)
        outs = []
        for g in guiders:
            g.set_state(step=step, num_inference_steps=STEPS, timestep=None)
            g.prepare_inputs({})
            outs.append(g.forward(c, u).pred)
        for out in outs[1:]:
            torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5 * outs[0].abs().max().item(),
                                       msg=f"step {step}")


def test_apg_negative_norm_threshold_means_no_clamp_like_diffusers():
    kw = dict(guidance_scale=7.0, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=-1.0)
    _apg_steps([dg.AdaptiveProjectedGuidance(**kw), fd.AdaptiveProjectedGuidance(**kw)], 5)


def test_guider_from_mid_trajectory_keeps_the_momentum():
    """A diffusers APG guider converted after 4 steps continues from its running average (and the
    diffusers buffer keeps sharing the state, so converting back continues too)."""
    kw = dict(guidance_scale=7.0, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=8.0)
    reference, converted = dg.AdaptiveProjectedGuidance(**kw), dg.AdaptiveProjectedGuidance(**kw)
    _apg_steps([reference, converted], 4)
    ours = fd.guider_from(converted)
    _apg_steps([reference, ours], 4, start=4)
    back = dg.AdaptiveProjectedGuidance.__new__(dg.AdaptiveProjectedGuidance)
    back.__dict__.update(ours.__dict__)
    _apg_steps([reference, back], 3, start=8)


