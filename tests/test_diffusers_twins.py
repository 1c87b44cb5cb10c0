"""The diffusers 0.42 guiders twinned last (MAG, TCFG, AutoGuidance, APMix, SEG, LTX-2): each twin against its
diffusers guider over the steps of a trajectory (state carried), same config, save / load, the skipping policy
on the cond / uncond ones, and the places where diffusers 0.42 is wrong (documented, fastguide right)."""
import pytest
import torch
from diffusers import guiders as dg

import fastguide
import fastguide.diffusers as fd

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
                                           adaptive_projected_guidance_rescale=0.0, adaptive_projected_guidance_start_step=2), 2),
    (dg.LTX2Guidance, dict(guidance_scale=3.0, stg_scale=1.0, modality_scale=3.0, spatio_temporal_guidance_blocks=[1]), 4),
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
