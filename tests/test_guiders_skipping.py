"""adaptive= / interval= / linear_ag= on fastguide.diffusers guiders, at the guider protocol level.

`protocol_run` is a hand-written denoising loop that drives a guider exactly like diffusers' modular denoise
blocks do (set_state -> prepare_inputs -> prepare_models / denoiser / cleanup_models per batch -> guider(batches)),
with a per-sample "denoiser" whose prediction depends only on its own row, so a batched run can be checked row
by row. The real modular pipelines are in test_guiders_modular.py.
"""
import re

import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers import guiders as dg

import fastguide
import fastguide.diffusers as fd
from fastguide.pipelines import Report, fit_linear_ag
from fastguide.skip import NoiseSchedule


def AG(*args, **kwargs):
    """fastguide.AG measuring in the prediction space unless told otherwise: these tests drive the policy's
    machinery with toy denoisers and no noise schedule (the x0 space is tested on its own)."""
    return fastguide.AG(*args, **{"space": "prediction", **kwargs})

B, N = 3, 6
SHAPE = (B, 4, 8, 8)
TIMESTEPS = [999 - 166 * i for i in range(N)]
APG_MOMENTUM = dict(guidance_scale=5.0, eta=0.5, adaptive_projected_guidance_momentum=-0.5,
                    adaptive_projected_guidance_rescale=4.0)


class RowDenoiser(torch.nn.Module):
    """A per-sample toy denoiser: out[i] = f(latents[i], t, emb[i]); records the rows of every call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, latents, t, emb=None):
        assert latents.shape[0] == emb.shape[0], "latents and embeddings must have the same rows"
        self.calls.append(latents.shape[0])
        w = 1 + 0.001 * float(t)
        return torch.tanh(latents * w + emb[:, :, None, None])


def protocol_run(guider, cond_emb, uncond_emb, latents, steps=N, timesteps=TIMESTEPS):
    """A denoising loop following diffusers' modular denoise blocks (SDXL / QwenImage style: the pipeline
    passes the latents from its own state, the embeddings through the guider). Returns the final latents."""
    den = RowDenoiser()
    x = latents.clone()
    for i in range(steps):
        t = torch.tensor(float(timesteps[i]))
        guider.set_state(step=i, num_inference_steps=steps, timestep=t)
        batches = guider.prepare_inputs({"emb": (cond_emb, uncond_emb)})
        assert len(batches) == guider.num_conditions
        for batch in batches:
            guider.prepare_models(den)
            batch.noise_pred = den(x, t, emb=batch.emb)
            guider.cleanup_models(den)
        x = x - 0.1 * guider(batches).pred
    return x, den.calls


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 4, generator=g), torch.randn(B, 4, generator=g), torch.randn(SHAPE, generator=g))


def test_never_switching_equals_diffusers():
    """threshold > 1 never switches: every step equals diffusers' own guider, with every row evaluated."""
    for theirs, ours in [(dg.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.5),
                          fd.ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.5,
                                                    adaptive=AG(1.5))),
                         (dg.ClassifierFreeZeroStarGuidance(guidance_scale=4.0),
                          fd.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, adaptive=AG(1.5))),
                         (dg.FrequencyDecoupledGuidance(guidance_scales=[6.0, 3.0]),
                          fd.FrequencyDecoupledGuidance(guidance_scales=[6.0, 3.0], adaptive=AG(1.5))),
                         (dg.AdaptiveProjectedGuidance(**APG_MOMENTUM),
                          fd.AdaptiveProjectedGuidance(**APG_MOMENTUM, adaptive=AG(1.5)))]:
        ref, ref_calls = protocol_run(theirs, *_inputs())
        out, calls = protocol_run(ours, *_inputs())
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert calls == ref_calls == [B, B] * N
        assert ours.report == Report(steps=N, nfe=2 * B * N, nfe_skipped=0, ag_switch_step=[None] * B)


def test_threshold_minus_one_evaluates_uncond_on_step_zero_only():
    """AG(-1) switches every sample after step 0: one unconditional pass in the whole trajectory, and the
    result is diffusers' CFG guiding step 0 only (stop=1/N)."""
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(-1.0))
    out, calls = protocol_run(ours, *_inputs())
    ref, _ = protocol_run(dg.ClassifierFreeGuidance(guidance_scale=5.0, stop=1 / N), *_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [B, B] + [B] * (N - 1)
    assert ours.report == Report(steps=N, nfe=2 * B + B * (N - 1), nfe_skipped=B * (N - 1), ag_switch_step=[0] * B)


def test_cfg_zero_star_zero_init_is_not_judged_by_ag():
    """CFG-Zero*'s zero-init step predicts zeros (no guidance of cond to judge): AG(-1) switches after the
    first guided step, 1. Same result as diffusers' CFG-Zero* guiding steps 0..1 (stop=2/N)."""
    ours = fd.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1, adaptive=AG(-1.0))
    out, calls = protocol_run(ours, *_inputs())
    ref, _ = protocol_run(dg.ClassifierFreeZeroStarGuidance(guidance_scale=4.0, zero_init_steps=1, stop=2 / N),
                          *_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [B, B, B, B] + [B] * (N - 2)
    assert ours.report.ag_switch_step == [1] * B and ours.report.nfe_skipped == B * (N - 2)


def _cosines(guider_cls, **kw):
    """Per step, per sample cos(cond, guided) of a never-switching run (AG's inputs)."""
    seen = []
    g = guider_cls(**kw, adaptive=AG(1.5))
    orig = g._skip.observe
    g._skip.observe = lambda rows, cos: (seen.append(list(cos)), orig(rows, cos))
    protocol_run(g, *_inputs())
    return seen


@pytest.mark.parametrize("cls,kw", [(fd.ClassifierFreeGuidance, dict(guidance_scale=5.0)),
                                    (fd.FrequencyDecoupledGuidance, dict(guidance_scales=[6.0, 3.0])),
                                    (fd.AdaptiveProjectedGuidance, dict(guidance_scale=5.0, eta=0.5)),
                                    (fd.AdaptiveProjectedGuidance, APG_MOMENTUM)],
                         ids=["cfg", "fdg", "apg", "apg-momentum"])
def test_samples_switching_at_different_steps_equal_their_solo_runs(cls, kw):
    """A threshold between the samples' cosines: they switch at different steps, the unconditional batch is
    sliced to the rows still guided (embeddings in the batch, latents through prepare_models), and each
    sample's trajectory equals the same sample run alone (APG: each sample's momentum advances on the steps
    it is guided)."""
    cos0 = _cosines(cls, **kw)[0]
    order = sorted(range(B), key=lambda i: cos0[i])
    threshold = (cos0[order[0]] + cos0[order[1]]) / 2  # the lowest sample stays guided at step 0, the others switch
    guider = cls(**kw, adaptive=AG(threshold))
    cond, uncond, lat = _inputs()
    out, calls = protocol_run(guider, cond, uncond, lat)
    switch = guider.report.ag_switch_step
    assert switch[order[1]] == switch[order[2]] == 0 and switch[order[0]] != 0
    assert calls[:3] == [B, B, B] and calls[3] == 1  # step 1: all conds, then the one still-guided row
    assert guider.report.nfe == sum(calls) and guider.report.nfe_skipped == 2 * B * N - sum(calls)
    for i in range(B):
        solo = cls(**kw, adaptive=AG(threshold))
        ref, _ = protocol_run(solo, cond[i:i + 1], uncond[i:i + 1], lat[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], ref, rtol=1e-5, atol=1e-5)
        assert solo.report.ag_switch_step == [switch[i]]


def test_interval_equals_the_diffusers_window_of_its_steps():
    """interval in sigma, mapped from each step's timestep by the scheduler's noise schedule: the steps whose
    sigma lies inside are guided, the others evaluate cond only. Bounds between the sigmas of steps 1|2 and
    4|5 guide steps 2..4 = diffusers' window start=2/N, stop=5/N."""
    sched = EulerDiscreteScheduler()
    sigma = NoiseSchedule(sched).sigma
    s = [sigma(t) for t in TIMESTEPS]
    interval = ((s[4] + s[5]) / 2, (s[1] + s[2]) / 2)
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, interval=interval, scheduler=sched)
    out, calls = protocol_run(ours, *_inputs())
    ref, _ = protocol_run(dg.ClassifierFreeGuidance(guidance_scale=5.0, start=2 / N, stop=5 / N), *_inputs())
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [B, B] + [B, B] * 3 + [B]  # cond only at steps 0, 1 and 5
    assert ours.report == Report(steps=N, nfe=B * N + 3 * B, nfe_skipped=3 * B, ag_switch_step=[None] * B)


def test_apg_momentum_with_an_interval_equals_the_diffusers_window():
    """Outside the interval no guidance and no momentum update: diffusers' APG with the same steps' window."""
    sched = FlowMatchEulerDiscreteScheduler()
    ts = [1000 * (1 - i / N) for i in range(N)]  # flow matching: sigma = t / 1000
    ours = fd.AdaptiveProjectedGuidance(**APG_MOMENTUM, interval=(0.4, 0.9), scheduler=sched)  # sigmas .833 .667 .5
    out, calls = protocol_run(ours, *_inputs(), timesteps=ts)
    theirs = dg.AdaptiveProjectedGuidance(**APG_MOMENTUM, start=1 / N, stop=4 / N)
    ref, _ = protocol_run(theirs, *_inputs(), timesteps=ts)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert calls == [B] + [B, B] * 3 + [B] + [B]  # cond only at steps 0, 4, 5


def test_linear_ag_predicts_uncond_at_its_steps():
    """At a LinearAG step only cond is evaluated; uncond = a cond_i + b cond_{i-1} + c uncond_{i-1}."""
    a, b, c = 0.6, -0.3, 0.7
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, linear_ag=fastguide.LinearAG({2: (a, b, c)}, N))
    cond, uncond, lat = _inputs()
    out, calls = protocol_run(ours, cond, uncond, lat)
    assert calls == [B, B, B, B, B] + [B, B] * 3
    assert ours.report == Report(steps=N, nfe=2 * B * N - B, nfe_skipped=B, ag_switch_step=[])
    # the same loop by hand
    den, x, prev = RowDenoiser(), lat.clone(), None
    for i, t in enumerate(TIMESTEPS):
        t = torch.tensor(float(t))
        pc, pu = den(x, t, emb=cond), den(x, t, emb=uncond)
        if i == 2:
            pu = a * pc + b * prev[0] + c * prev[1]
        prev = (pc, pu)
        x = x - 0.1 * fastguide.cfg(pc, pu, 5.0)
    torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5)


def test_recording_calibrates_linear_ag_in_any_pipeline():
    """recording(guider) collects each run's per-step (cond, uncond); fit_linear_ag turns them into a LinearAG
    that the same guider then runs with (fewer unconditional passes)."""
    guider = fd.ClassifierFreeGuidance(guidance_scale=5.0)
    with fd.recording(guider) as runs:
        for seed in (0, 1):
            protocol_run(guider, *_inputs(seed))
    assert guider._recording is None and len(runs) == 2 and all(sorted(r) == list(range(N)) for r in runs)
    cond, uncond, lat = _inputs(1)
    den = RowDenoiser()
    t0 = torch.tensor(float(TIMESTEPS[0]))
    assert torch.equal(runs[1][0][0], den(lat, t0, emb=cond)) and torch.equal(runs[1][0][1], den(lat, t0, emb=uncond))
    linear_ag = fastguide.LinearAG(fit_linear_ag(runs, [2, 4]), N)
    calibrated = guider.new(linear_ag=linear_ag)
    out, calls = protocol_run(calibrated, *_inputs(2))
    full, _ = protocol_run(guider, *_inputs(2))
    assert calibrated.report.nfe == 2 * B * N - 2 * B and len(calls) == 2 * N - 2
    # an approximation of full CFG, not CFG -- and a much better one than skipping guidance at those steps
    naive, _ = protocol_run(guider.new(linear_ag=fastguide.LinearAG({2: (1, 0, 0), 4: (1, 0, 0)}, N)), *_inputs(2))
    assert 0 < (out - full).abs().max() < 0.5 * (naive - full).abs().max()
    with pytest.raises(TypeError, match="recording: guider must be one of"):
        with fd.recording(dg.ClassifierFreeGuidance()):
            pass


def test_linear_ag_checks_the_step_count_before_the_run():
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, linear_ag=fastguide.LinearAG({2: (1, 0, 0)}, N))
    with pytest.raises(ValueError, match=r"calibrated for 6 steps, the pipeline runs num_inference_steps=8"):
        ours.set_state(step=0, num_inference_steps=8, timestep=torch.tensor(999.0))
    # a LinearAG step whose previous step did not evaluate uncond (CFG window off there)
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, start=0.4, linear_ag=fastguide.LinearAG({2: (1, 0, 0)}, N))
    with pytest.raises(ValueError, match="LinearAG step 2 is predicted from step 1"):
        protocol_run(ours, *_inputs())


def test_report_resets_at_step_zero_and_num_conditions_is_full_between_runs():
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(-1.0))
    protocol_run(ours, *_inputs())
    first = ours.report
    # before the next loop, pipelines read num_conditions to decide whether to encode negative prompts
    assert ours.num_conditions == 2
    protocol_run(ours, *_inputs())
    assert ours.report is not first and ours.report == first


def test_a_failed_forward_leaves_the_state_intact():
    ours = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(-1.0))
    c, u = torch.randn(SHAPE), torch.randn(SHAPE)
    ours.set_state(step=0, num_inference_steps=N, timestep=torch.tensor(999.0))
    with pytest.raises(ValueError, match="expects an unconditional prediction of 3 rows, got 2"):
        ours.forward(c, u[:2])
    assert ours.report == Report(steps=1) and ours._skip.done is None
    torch.testing.assert_close(ours.forward(c, u).pred, fastguide.cfg(c, u, 5.0))
    assert ours._skip.done == [True] * B


@pytest.mark.parametrize("make", [
    lambda: EulerDiscreteScheduler(steps_offset=1),
    lambda: EulerDiscreteScheduler(timestep_spacing="trailing"),
    lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
], ids=["euler-leading", "euler-trailing", "flowmatch-shift3", "unipc-flow"])
def test_noise_schedule_gives_the_schedulers_own_sigmas(make):
    sched = make()
    sched.set_timesteps(7)
    schedule = NoiseSchedule(sched)
    ours = [schedule.sigma(t) for t in sched.timesteps]
    theirs = [float(s) for s in sched.sigmas[:len(sched.timesteps)]]
    tol = 1.5e-3 if isinstance(sched, UniPCMultistepScheduler) else 1e-5  # UniPC rounds timesteps to ints
    assert ours == pytest.approx(theirs, rel=1e-5, abs=tol)


# --- construction errors ----------------------------------------------------------------------------
def test_bad_policy_arguments_raise_at_construction():
    with pytest.raises(TypeError, match=r"adaptive must be a fastguide.AG .*got float 0.9"):
        fd.ClassifierFreeGuidance(adaptive=0.9)
    with pytest.raises(TypeError, match=r"adaptive must be a fastguide.AG .*got dict"):
        fd.ClassifierFreeGuidance(adaptive={"threshold": 0.9})  # the config form is for from_config only
    with pytest.raises(ValueError, match=r"interval needs sigma_lo <= sigma_hi, got \(5.0, 1.0\)"):
        fd.ClassifierFreeGuidance(interval=(5.0, 1.0), scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match=r"interval must be \(sigma_lo, sigma_hi\), two numbers, got \(1, 2, 3\)"):
        fd.ClassifierFreeGuidance(interval=(1, 2, 3), scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="pass scheduler=pipe.scheduler"):
        fd.ClassifierFreeGuidance(interval=(0.3, 5.0))
    with pytest.raises(TypeError, match="scheduler must be a diffusers scheduler"):
        fd.ClassifierFreeGuidance(interval=(0.3, 5.0), scheduler="euler")
    with pytest.raises(TypeError, match="linear_ag must be a fastguide.LinearAG"):
        fd.ClassifierFreeGuidance(linear_ag={2: (1, 0, 0)})
    with pytest.raises(ValueError, match=r"linear_ag step 0 must be an int in \[1, 6\)"):
        fd.ClassifierFreeGuidance(linear_ag=fastguide.LinearAG({0: (1, 0, 0)}, 6))
    with pytest.raises(ValueError, match="linear_ag cannot be combined with adaptive or interval"):
        fd.ClassifierFreeGuidance(adaptive=AG(), linear_ag=fastguide.LinearAG({2: (1, 0, 0)}, 6))


@pytest.mark.parametrize("make", [
    lambda **p: fd.PerturbedAttentionGuidance(perturbed_guidance_layers=[0], **p),
    lambda **p: fd.SkipLayerGuidance(skip_layer_guidance_layers=[0], **p),
], ids=["pag", "slg"])
def test_guiders_that_cannot_skip_say_so_at_construction(make):
    for policy in (dict(adaptive=AG(0.99)), dict(interval=(0.1, 1.0), scheduler=EulerDiscreteScheduler()),
                   dict(linear_ag=fastguide.LinearAG({2: (1, 0, 0)}, 6))):
        with pytest.raises(ValueError, match=rf"{next(iter(policy))} skips the unconditional pass per sample, "
                                             r"which this guider cannot do \(.+\); guiders that can: "
                                             + re.escape(str(sorted(fd.SKIPPING)))):
            make(**policy)
    make()  # and without a policy they are the plain twins


def test_guider_from_takes_a_policy_and_leaves_the_original_alone():
    theirs = dg.ClassifierFreeGuidance(guidance_scale=6.0)
    before = dict(theirs.config)
    with pytest.raises(TypeError, match="adaptive must be a fastguide.AG"):
        fd.guider_from(theirs, adaptive=0.5)
    ours = fd.guider_from(theirs, adaptive=AG(0.9))
    assert type(ours) is fd.ClassifierFreeGuidance and ours.config["adaptive"] == {"threshold": 0.9, "space": "prediction"}
    assert dict(theirs.config) == before and not hasattr(theirs, "_skip")
    with pytest.raises(ValueError, match="cannot do"):
        fd.guider_from(dg.PerturbedAttentionGuidance(perturbed_guidance_layers=[0]), adaptive=AG(0.9))


# --- AG in x0 space ------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_schedule_x0_equals_the_schedulers_own_estimate(prediction_type):
    from diffusers import DDIMScheduler
    sch = DDIMScheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2", clip_sample=False)
    sch.set_timesteps(10)
    sched = NoiseSchedule(sch)
    g = torch.Generator().manual_seed(0)
    x, pred = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for t in sch.timesteps[:-1]:
        theirs = sch.step(pred, t, x).pred_original_sample
        torch.testing.assert_close(sched.x0(x, pred, t), theirs, atol=2e-4, rtol=1e-4)


def test_noise_schedule_x0_of_flow_matching():
    sch = FlowMatchEulerDiscreteScheduler()
    sched = NoiseSchedule(sch)
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    torch.testing.assert_close(sched.x0(x, v, torch.tensor(250.0)), x - 0.25 * v)


def test_ag_in_x0_space_needs_the_scheduler_and_switches_on_the_x0_cosine():
    with pytest.raises(ValueError, match=r"space='x0'.*scheduler=pipe.scheduler"):
        fd.ClassifierFreeGuidance(guidance_scale=3.0, adaptive=AG(0.9, space="x0"))
    with pytest.raises(ValueError, match="space must be"):
        AG(0.9, space="eps")
    sch = EulerDiscreteScheduler()
    sched = NoiseSchedule(sch)
    cond, uncond, lat = _inputs()
    # The threshold between the x0 and the prediction cosines of step 0: the two spaces must decide differently.
    den = RowDenoiser()
    t0 = torch.tensor(float(TIMESTEPS[0]))
    c, u = den(lat, t0, emb=cond), den(lat, t0, emb=uncond)
    g = fastguide.cfg(c, u, 3.0)
    cos_pred = fastguide.guidance_stats(c, g, g).cos_cond_guided
    cos_x0 = fastguide.guidance_stats(sched.x0(lat, c, t0), sched.x0(lat, g, t0), sched.x0(lat, g, t0)).cos_cond_guided
    lo, hi = sorted([cos_pred.min().item(), cos_x0.max().item()])
    assert lo < hi
    threshold = (lo + hi) / 2
    guider = fd.ClassifierFreeGuidance(guidance_scale=3.0, adaptive=AG(threshold, space="x0"), scheduler=sch)
    protocol_run(guider, cond, uncond, lat)
    switched_x0 = guider.report.ag_switch_step
    guider = fd.ClassifierFreeGuidance(guidance_scale=3.0, adaptive=AG(threshold, space="prediction"))
    protocol_run(guider, cond, uncond, lat)
    expect_x0 = [0 if v > threshold else None for v in cos_x0.tolist()]
    expect_pred = [0 if v > threshold else None for v in cos_pred.tolist()]
    assert [s == 0 for s in switched_x0] == [e == 0 for e in expect_x0]
    assert [s == 0 for s in guider.report.ag_switch_step] == [e == 0 for e in expect_pred]
    assert expect_x0 != expect_pred


def test_ag_space_survives_save_and_load(tmp_path):
    guider = fd.ClassifierFreeGuidance(guidance_scale=3.0, adaptive=AG(0.97, space="x0"),
                                       scheduler=EulerDiscreteScheduler())
    guider.save_pretrained(tmp_path)
    again = fd.ClassifierFreeGuidance.from_pretrained(tmp_path)
    assert again._skip.adaptive == AG(0.97, space="x0")


# --- APG in x0 space --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sched_cls", [EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler])
def test_apg_in_x0_space_equals_apg_on_the_x0_estimates(sched_cls):
    """space='x0': the denoiser's predictions -> x0 estimates -> APG (momentum, clamp, projection) -> back to the
    prediction type; equal to doing that by hand with the same momentum buffer."""
    sch = sched_cls()
    sched = NoiseSchedule(sch)
    kw = dict(guidance_scale=5.0, eta=0.0, adaptive_projected_guidance_momentum=-0.5,
              adaptive_projected_guidance_rescale=2.0)
    guider = fd.AdaptiveProjectedGuidance(**kw, space="x0", scheduler=sch)
    cond, uncond, lat = _inputs()
    ours, _ = protocol_run(guider, cond, uncond, lat)
    den, x, buf = RowDenoiser(), lat.clone(), fastguide.MomentumBuffer(-0.5)
    for i in range(N):
        t = torch.tensor(float(TIMESTEPS[i]))
        c, u = den(x, t, emb=cond), den(x, t, emb=uncond)
        g0 = fastguide.apg(sched.x0(x, c, t), sched.x0(x, u, t), 5.0, eta=0.0, norm_threshold=2.0, momentum_buffer=buf)
        x = x - 0.1 * sched.from_x0(x, g0, t)
    torch.testing.assert_close(ours, x)
    plain, _ = protocol_run(fd.AdaptiveProjectedGuidance(**kw), cond, uncond, lat)
    assert (plain - ours).abs().max() > 1e-3  # the space matters


def test_apg_space_is_validated_and_saved(tmp_path):
    with pytest.raises(ValueError, match="scheduler=pipe.scheduler"):
        fd.AdaptiveProjectedGuidance(space="x0")
    with pytest.raises(ValueError, match="space must be"):
        fd.AdaptiveProjectedGuidance(space="eps", scheduler=EulerDiscreteScheduler())
    assert "space" not in fd.AdaptiveProjectedGuidance().config  # the default keeps diffusers' config
    g = fd.AdaptiveProjectedGuidance(guidance_scale=4.0, space="x0", scheduler=EulerDiscreteScheduler())
    g.save_pretrained(tmp_path)
    again = fd.AdaptiveProjectedGuidance.from_pretrained(tmp_path)
    assert again._space == "x0" and again._schedule is not None and again.guidance_scale == 4.0
