"""`fastguide.enable` belongs to the pipeline, not to its denoiser: pipelines sharing a module stay independent
(issue 11). Tiny random-weight pipelines, no download."""
import json
import threading

import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPAGPipeline, StableDiffusionPipeline
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import \
    StableDiffusionXLCoreDenoiseStep

import fastguide
from fastguide import attention, pipelines
from test_pipelines import STEPS, assert_close, inputs, make_sd, make_sdxl, run


def exact(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def shared(pipe):
    """A second StableDiffusionPipeline on the same modules (its own scheduler: a scheduler is stateful, and
    sharing one between concurrent or nested calls breaks diffusers itself)."""
    return StableDiffusionPipeline(**{**pipe.components, "scheduler": EulerDiscreteScheduler.from_config(
        pipe.scheduler.config)})


def test_stock_pipeline_sharing_the_unet_runs_stock():
    p1 = make_sd()
    p2 = shared(p1)
    stock3 = run(p2, "sd", scale=3.0)
    fastguide.enable(p1, guidance="cfg", scale=9.0)
    exact(run(p2, "sd", scale=3.0), stock3)  # before: ran at the enabled pipeline's 9.0
    assert_close(run(p1, "sd", scale=3.0), run(make_sd(), "sd", scale=9.0))
    exact(run(p2, "sd", scale=3.0), stock3)
    assert p2.unet is p1.unet and not fastguide.pipelines.is_enabled(p2)


def alone(guidance, **params):
    """The result of `guidance` on a pipeline with its own (identically initialised) modules."""
    pipe = fastguide.enable(make_sd(), guidance=guidance, **params)
    return run(pipe, "sd")


def test_two_enabled_pipelines_on_one_unet_keep_their_settings():
    p1 = make_sd()
    p2 = shared(p1)
    fastguide.enable(p1, guidance="apg", momentum=-0.5, norm_threshold=2.0)
    fastguide.enable(p2, guidance="cfg", scale=2.0)  # before: p2(...) raised 'tuple' has no attribute 'shape'
    ref1, ref2 = alone("apg", momentum=-0.5, norm_threshold=2.0), alone("cfg", scale=2.0)
    for _ in range(2):  # interleaved calls: APG's momentum state is p1's alone
        assert_close(run(p2, "sd"), ref2)
        assert_close(run(p1, "sd"), ref1)
    assert p1.fastguide_report is not p2.fastguide_report and p1.fastguide_report.steps == STEPS


def test_two_enabled_pipelines_called_from_two_threads():
    p1 = make_sd()
    p2 = shared(p1)
    fastguide.enable(p1, guidance="cfg", scale=9.0)
    fastguide.enable(p2, guidance="cfg_zero_star", zero_init_steps=1)
    refs = {1: alone("cfg", scale=9.0), 2: alone("cfg_zero_star", zero_init_steps=1)}
    barrier, out, errors = threading.Barrier(2), {}, []

    def work(key, pipe):
        try:
            barrier.wait()
            for k in range(2):
                out[key, k] = run(pipe, "sd")
        except Exception as e:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k, p)) for k, p in ((1, p1), (2, p2))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (key, _), value in out.items():
        assert_close(value, refs[key])


def test_from_pipe_of_an_enabled_pipeline_runs_stock():
    pipe = fastguide.enable(make_sd(), guidance="cfg", scale=9.0)
    assert_close(run(pipe, "sd", scale=3.0), alone("cfg", scale=9.0))  # it has run: the old wrapper was live
    stock = run(make_sd(), "sd", scale=3.0)
    for new in (StableDiffusionPipeline.from_pipe(pipe), type(pipe).from_pipe(pipe)):
        assert new.unet is pipe.unet and not fastguide.pipelines.is_enabled(new)
        exact(run(new, "sd", scale=3.0), stock)
    # the PAG pipeline batches [uncond, cond, perturbed] on the same UNet (before: a shape error)
    pag = StableDiffusionPAGPipeline.from_pipe(pipe, pag_applied_layers=["mid"])
    ref = StableDiffusionPAGPipeline.from_pipe(make_sd(), pag_applied_layers=["mid"])
    exact(run(pag, "sd", scale=3.0), run(ref, "sd", scale=3.0))


def test_modular_pipeline_from_enabled_components_runs_stock():
    def modular(pipe):
        m = StableDiffusionXLCoreDenoiseStep().init_pipeline()
        m.update_components(unet=pipe.unet, scheduler=pipe.scheduler, guider=ClassifierFreeGuidance(guidance_scale=5.0))
        with torch.no_grad():
            return m(**inputs("sdxl"), num_inference_steps=STEPS, height=16, width=16, output="latents")
    enabled = fastguide.enable(make_sdxl(), guidance="apg", norm_threshold=1.0)
    run(enabled, "sdxl")  # it has run: the old wrapper was live
    exact(modular(enabled), modular(make_sdxl()))  # before: IndexError in the split of a B-row batch


def test_disable_restores_module_processors_and_class_exactly():
    pipe = make_sd()
    cls, processors = type(pipe), pipe.unet.attn_processors
    p2 = shared(pipe)
    fastguide.enable(pipe, guidance="pag", layers=["mid"])
    fastguide.enable(p2, guidance="pag", layers=["up_blocks.1"])
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe) is not cls and isinstance(pipe, cls)
    attn = pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn1
    assert isinstance(attn.processor, attention.SwitchedPerturbation)
    fastguide.disable(pipe)  # p2 still needs the hook, not the mid layer
    assert type(pipe) is cls and "forward" in pipe.unet.__dict__
    assert attn.processor is processors["mid_block.attentions.0.transformer_blocks.0.attn1.processor"]
    fastguide.disable(p2)  # the last user: everything back
    assert "forward" not in pipe.unet.__dict__ and type(p2) is cls
    now = pipe.unet.attn_processors
    assert all(now[k] is v for k, v in processors.items())


def test_fastguide_pag_layers_are_identity_only_for_their_pipeline():
    p1 = make_sd()
    p2 = shared(p1)
    fastguide.enable(p1, guidance="pag", pag_scale=3.0, layers=["mid"])
    fastguide.enable(p2, guidance="cfg")
    assert_close(run(p1, "sd"), alone("pag", pag_scale=3.0, layers=["mid"]))
    assert_close(run(p2, "sd"), alone("cfg"))
    exact(run(shared(p1), "sd"), run(make_sd(), "sd"))  # a stock one: the gated processors fall back


def test_failed_call_leaves_no_active_pipeline():
    pipe = fastguide.enable(make_sd(), guidance="cfg", scale=9.0)
    p2 = shared(pipe)
    stock = run(p2, "sd", scale=3.0)

    def boom(p, i, t, kw):
        raise RuntimeError("callback failed")
    with pytest.raises(RuntimeError, match="callback failed"), torch.no_grad():
        pipe(**inputs("sd"), num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", height=16, width=16,
             callback_on_step_end=boom)
    assert pipelines._ACTIVE.get() is None
    exact(run(p2, "sd", scale=3.0), stock)
    assert_close(run(pipe, "sd"), alone("cfg", scale=9.0))  # and the enabled one starts a fresh trajectory


def test_nested_enabled_call_inside_a_callback():
    """An enabled pipeline called from another's step callback: each call runs its own settings, and the
    outer trajectory (APG momentum, step count) is untouched by the inner one."""
    p1 = make_sd()
    p2 = shared(p1)
    fastguide.enable(p1, guidance="apg", momentum=-0.5, norm_threshold=2.0)
    fastguide.enable(p2, guidance="cfg", scale=2.0)
    inner = []

    def callback(p, i, t, kw):
        if i == 1:
            inner.append(run(p2, "sd"))
        return {}
    with torch.no_grad():
        outer = p1(**inputs("sd"), num_inference_steps=STEPS, guidance_scale=5.0, output_type="latent", height=16,
                   width=16, callback_on_step_end=callback).images
    assert_close(outer, alone("apg", momentum=-0.5, norm_threshold=2.0))
    assert_close(inner[0], alone("cfg", scale=2.0))
    assert p1.fastguide_report.steps == STEPS


def test_compiled_shared_unet_follows_the_running_pipeline():
    p1 = make_sd()
    p2 = shared(p1)
    stock = run(make_sd(), "sd")
    fastguide.enable(p1, guidance="cfg", scale=9.0)
    compiled = torch.compile(p1.unet, backend="eager")
    p1.unet = p2.unet = compiled  # compiled after enable: the compiled graph must not bake in p1's settings
    ref = alone("cfg", scale=9.0)
    for _ in range(2):
        assert_close(run(p1, "sd"), ref)
        assert_close(run(p2, "sd"), stock)


def test_enable_on_a_compiled_unet_and_a_replaced_unet():
    pipe = make_sd()
    pipe.unet = torch.compile(pipe.unet, backend="eager")  # compiled before enable
    fastguide.enable(pipe, guidance="cfg", scale=9.0)
    assert_close(run(pipe, "sd"), alone("cfg", scale=9.0))
    pipe.unet = make_sd().unet
    with pytest.raises(RuntimeError, match="unet was replaced after fastguide.enable"):
        run(pipe, "sd")


def test_save_pretrained_of_an_enabled_pipeline_loads_a_stock_one(tmp_path):
    pipe = fastguide.enable(make_sd(), guidance="cfg", scale=9.0)
    pipe.save_pretrained(tmp_path / "enabled")
    make_sd().save_pretrained(tmp_path / "stock")
    index = json.loads((tmp_path / "enabled" / "model_index.json").read_text())
    assert index == json.loads((tmp_path / "stock" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    none = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, image_encoder=None)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "enabled", **none)
    assert type(loaded) is StableDiffusionPipeline and "forward" not in loaded.unet.__dict__
    exact(run(loaded, "sd"), run(make_sd(), "sd"))
    assert_close(run(pipe, "sd"), alone("cfg", scale=9.0))


def test_a_dropped_enabled_pipeline_is_freed_and_unhooks_the_module():
    import gc
    import weakref
    p1 = fastguide.enable(make_sd(), guidance="cfg", scale=9.0)
    p2 = fastguide.enable(shared(p1), guidance="cfg", scale=2.0)
    run(p1, "sd")
    unet, gone = p1.unet, weakref.ref(p1)
    del p1
    gc.collect()
    assert gone() is None  # the shared UNet does not keep the dropped pipeline (and its other modules) alive
    assert_close(run(p2, "sd"), alone("cfg", scale=2.0))
    gone = weakref.ref(p2)
    del p2
    gc.collect()
    assert gone() is None and "forward" not in unet.__dict__  # no enabled pipeline left: the module is stock
