"""What "step" means to `fastguide.enable` (issue 11): the index into the call's num_inference_steps. A
second-order scheduler evaluates the model twice per step (Heun: at t_i, then the correction at t_{i+1});
both evaluations share the step index. A trajectory starts with each pipeline call."""
from collections import Counter

import pytest
import torch
from diffusers import (DPMSolverMultistepScheduler, HeunDiscreteScheduler, KDPM2DiscreteScheduler,
                       StableDiffusionImg2ImgPipeline)
from diffusers import guiders as dg

import fastguide
from test_pipelines import STEPS, assert_close, cfg_step, guider_combine, hand_loop, inputs, make_sd, run

SCHEDULERS = {
    "heun": (HeunDiscreteScheduler, {}),
    "kdpm2": (KDPM2DiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"solver_order": 2}),
}


def make(name):
    pipe = make_sd()
    cls, kw = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)
    return pipe


def step_of_call(name):
    """The step index of each denoiser evaluation, from the scheduler's timestep layout: two-evaluation
    schedulers run 2 N - 1 evaluations (the last step has no correction), grouped (0, 1), (2, 3), ..."""
    sch = SCHEDULERS[name][0].from_config(make_sd().scheduler.config, **SCHEDULERS[name][1])
    sch.set_timesteps(STEPS)
    calls = len(sch.timesteps)
    assert calls == (2 * STEPS - 1 if name != "dpm++2m" else STEPS)
    return [i // 2 for i in range(calls)] if calls > STEPS else list(range(calls))


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_schedule_sees_each_step_index_the_expected_number_of_times(name):
    pipe = make(name)
    seen = []

    def schedule(step, t):
        seen.append(step)
        return 2.0 + step
    fastguide.enable(pipe, guidance="cfg", scale=schedule)
    ours = run(pipe, "sd")
    expected = step_of_call(name)
    assert pipe.fastguide_report.steps == STEPS  # before: 7 with Heun
    assert seen == expected
    assert Counter(seen) == Counter(expected)
    fastguide.disable(pipe)
    assert_close(ours, hand_loop(pipe, "sd", lambda c, u, p, i, t: cfg_step(c, u, 2.0 + expected[i])))


@pytest.mark.parametrize("name", ["heun", "dpm++2m"])
def test_cfg_zero_star_zero_init_is_exactly_the_first_step(name):
    pipe = make(name)
    fastguide.enable(pipe, guidance="cfg_zero_star", zero_init_steps=1)
    ours = run(pipe, "sd")
    fastguide.disable(pipe)
    steps = step_of_call(name)
    combine = guider_combine(dg.ClassifierFreeZeroStarGuidance(guidance_scale=5.0, zero_init_steps=1))
    ref = hand_loop(pipe, "sd", lambda c, u, p, i, t: combine(c, u, p, steps[i], t))
    assert_close(ours, ref)
    if name == "heun":  # zeroing only the first evaluation (the old per-evaluation count) is a different result
        first_only = hand_loop(pipe, "sd", lambda c, u, p, i, t: combine(c, u, p, i, t))
        assert (first_only - ours).abs().max() > 1e-3


def test_linear_ag_refuses_two_evaluation_schedulers_before_any_work():
    pipe = make("heun")
    fastguide.enable(pipe, guidance="cfg", linear_ag=fastguide.LinearAG({1: (0.0, 0.0, 1.0)}, STEPS))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="HeunDiscreteScheduler evaluates the model twice per step"):
        run(pipe, "sd")
    assert not calls and fastguide.pipelines._ACTIVE.get() is None
    pos = [torch.randn(1, 5, 16)]
    with pytest.raises(ValueError, match="evaluates the model twice per step"):
        fastguide.calibrate_linear_ag(pipe, pos, pos, num_inference_steps=STEPS, guidance_scale=5.0, height=16, width=16)
    assert pipe._fastguide.linear_ag is not None  # calibration put the previous settings back


def test_a_trajectory_starts_with_each_pipeline_call():
    """An interrupted call at t ~ 999 then an img2img call starting lower (t ~ 500): the second call's first
    step is step 0 (before: counted on from the first call, because its timesteps did not increase)."""
    pipe = StableDiffusionImg2ImgPipeline(**make_sd().components, requires_safety_checker=False)
    seen = []
    fastguide.enable(pipe, guidance="cfg", scale=lambda step, t: seen.append(step) or 5.0)
    image = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))

    def stop(p, i, t, kw):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        pipe(**inputs("sd"), image=image, strength=1.0, num_inference_steps=STEPS, output_type="latent",
             callback_on_step_end=stop)
    seen.clear()
    with torch.no_grad():
        pipe(**inputs("sd"), image=image, strength=0.5, num_inference_steps=STEPS, output_type="latent")
    assert seen == [0, 1] and pipe.fastguide_report.steps == 2
