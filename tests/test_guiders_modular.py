"""fastguide guiders with adaptive= / interval= inside real diffusers modular pipelines (no pipeline code).

Two modular pipelines built from tiny random-weight components: Stable Diffusion XL
(`StableDiffusionXLCoreDenoiseStep`: UNet, Euler, embeddings through the guider, latents from the pipeline's
state) and Wan 2.1 (`WanCoreDenoiseStep`: DiT, UniPC with flow sigmas, `prepare_inputs_from_block_state`).
Both take prompt embeddings directly (no text encoders, no downloads). Each run is a few seconds on CPU.
"""
import pytest
import torch
from diffusers import EulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers import guiders as dg
from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
    StableDiffusionXLCoreDenoiseStep)
from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

import fastguide
import fastguide.diffusers as fd
from fastguide.pipelines import Report
from fastguide.skip import NoiseSchedule, SkipPolicy
from test_pipelines import make_sdxl


def AG(*args, **kwargs):
    """fastguide.AG measuring in the prediction space unless told otherwise: these tests drive the policy's
    machinery with toy denoisers and no noise schedule (the x0 space is tested on its own)."""
    return fastguide.AG(*args, **{"space": "prediction", **kwargs})

STEPS, B = 4, 2


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models on a shared 2-core machine: one thread is several times faster than two contended ones.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sdxl_inputs(batch=B, seed=7):
    """Inputs of the tiny SDXL modular pipeline: embeddings (no text encoders) and 16x16 latents."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(batch, *shape, generator=g)  # noqa: E731
    return dict(prompt_embeds=r(5, 16), negative_prompt_embeds=r(5, 16), pooled_prompt_embeds=r(8),
                negative_pooled_prompt_embeds=r(8), latents=r(4, 16, 16))


def _sdxl():
    pipe = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    pipe.update_components(unet=make_sdxl().unet, scheduler=EulerDiscreteScheduler(steps_offset=1))
    return pipe, pipe.unet, sdxl_inputs(), dict(height=16, width=16)


def _wan():
    torch.manual_seed(0)
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                        num_layers=2, rope_max_seq_len=32)
    pipe = WanCoreDenoiseStep().init_pipeline()
    pipe.update_components(transformer=transformer, scheduler=UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    g = torch.Generator().manual_seed(7)
    inputs = dict(prompt_embeds=torch.randn(B, 5, 16, generator=g),
                  negative_prompt_embeds=torch.randn(B, 5, 16, generator=g),
                  latents=torch.randn(B, 4, 1, 8, 8, generator=g))  # one frame of 8x8 latents
    return pipe, pipe.transformer, inputs, dict(height=64, width=64, num_frames=1)


@pytest.fixture(scope="module", params=["sdxl", "wan"])
def kind(request):
    return request.param


_BUILT = {}


@pytest.fixture
def setup(kind):
    if kind not in _BUILT:
        _BUILT[kind] = {"sdxl": _sdxl, "wan": _wan}[kind]()
    return _BUILT[kind]


def run(setup, guider, rows=None, sample=None):
    """One pipeline call with `guider`; `rows` collects the batch size of every denoiser call (the rows the
    network actually evaluated, after the guider's slicing); `sample` runs that sample alone."""
    pipe, denoiser, inputs, size = setup
    if sample is not None:
        inputs = {k: v[sample:sample + 1] for k, v in inputs.items()}
    pipe.update_components(guider=guider)
    handle = None
    if rows is not None:  # a post-hook: it sees the rows the network evaluated, after the guider's slicing
        handle = denoiser.register_forward_hook(lambda m, a, out: rows.append(out[0].shape[0]))
    try:
        with torch.no_grad():
            return pipe(**inputs, **size, num_inference_steps=STEPS, output="latents")
    finally:
        if handle is not None:
            handle.remove()


def assert_close(ours, ref):
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5 * max(1.0, ref.abs().max().item()))


def test_never_switching_equals_diffusers(setup):
    ref = run(setup, dg.ClassifierFreeGuidance(guidance_scale=5.0))
    rows = []
    guider = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(2.0))
    assert_close(run(setup, guider, rows), ref)
    assert rows == [B, B] * STEPS
    assert guider.report == Report(steps=STEPS, nfe=2 * B * STEPS, nfe_skipped=0, ag_switch_step=[None] * B)


def test_switching_after_step_zero_skips_every_later_uncond_pass(setup):
    """AG(-1): the unconditional branch runs on step 0 only; the result is diffusers' CFG guiding step 0."""
    rows = []
    guider = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(-1.0))
    out = run(setup, guider, rows)
    assert rows == [B, B] + [B] * (STEPS - 1)
    assert guider.report == Report(steps=STEPS, nfe=2 * B + B * (STEPS - 1), nfe_skipped=B * (STEPS - 1),
                                   ag_switch_step=[0] * B)
    assert_close(out, run(setup, dg.ClassifierFreeGuidance(guidance_scale=5.0, stop=1 / STEPS)))


def test_samples_switching_at_different_steps(setup, monkeypatch):
    """A threshold between the two samples' step-0 cosines: one switches at step 0, the other later or never.
    The unconditional batch then runs on the guided row only (the pipeline's latents and timesteps sliced in
    the denoiser call), and each sample equals its own run alone."""
    seen = []
    orig = SkipPolicy.observe
    monkeypatch.setattr(SkipPolicy, "observe", lambda self, r, cos: (seen.append(list(cos)), orig(self, r, cos)))
    run(setup, fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(2.0)))
    monkeypatch.undo()
    c0 = seen[0]
    threshold = sum(c0) / 2
    rows = []
    guider = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(threshold))
    out = run(setup, guider, rows)
    first = max(range(B), key=lambda i: c0[i])
    switch = guider.report.ag_switch_step
    assert switch[first] == 0 and switch[1 - first] != 0
    assert rows[:3] == [B, B, B] and rows[3] == 1  # step 1: both conds, then the one guided row
    assert guider.report.nfe == sum(rows) and guider.report.nfe_skipped == 2 * B * STEPS - sum(rows)
    for i in range(B):
        solo = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(threshold))
        assert_close(out[i:i + 1], run(setup, solo, sample=i))
        assert solo.report.ag_switch_step == [switch[i]]


def test_interval_equals_the_diffusers_window_of_its_steps(setup):
    """interval=(lo, hi) in sigma around steps 1..2 of the pipeline's own schedule = diffusers' CFG window
    start=1/4, stop=3/4; the unconditional pass runs on those two steps only."""
    pipe = setup[0]
    ref = run(setup, dg.ClassifierFreeGuidance(guidance_scale=5.0, start=1 / STEPS, stop=3 / STEPS))
    sigma = NoiseSchedule(pipe.scheduler).sigma
    s = [sigma(t) for t in pipe.scheduler.timesteps]  # the timesteps the run just used
    assert s == sorted(s, reverse=True)
    interval = ((s[2] + s[3]) / 2, (s[0] + s[1]) / 2)
    rows = []
    guider = fd.ClassifierFreeGuidance(guidance_scale=5.0, interval=interval, scheduler=pipe.scheduler)
    assert_close(run(setup, guider, rows), ref)
    assert rows == [B] + [B, B] * 2 + [B]
    assert guider.report == Report(steps=STEPS, nfe=B * STEPS + 2 * B, nfe_skipped=2 * B, ag_switch_step=[None] * B)
