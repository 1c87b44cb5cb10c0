"""fastguide.diffusers guiders through save_pretrained / from_pretrained: alone, in a classic pipeline
(model_index.json), and in a modular pipeline (modular_model_index.json); the skipping policy included."""
import json

import pytest
import torch
from diffusers import EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, MotifVideoPipeline
from diffusers import guiders as dg
from diffusers.modular_pipelines import ComponentSpec
from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
    StableDiffusionXLCoreDenoiseStep)

import fastguide
import fastguide.diffusers as fd
from test_guiders_modular import sdxl_inputs
from test_pipelines import make_sdxl


def AG(*args, **kwargs):
    """fastguide.AG measuring in the prediction space unless told otherwise: these tests drive the policy's
    machinery with toy denoisers and no noise schedule (the x0 space is tested on its own)."""
    return fastguide.AG(*args, **{"space": "prediction", **kwargs})

EULER = EulerDiscreteScheduler(steps_offset=1)

# (twin, constructor kwargs): every fastguide guider, with a policy where it can skip.
CASES = [
    (fd.ClassifierFreeGuidance, dict(guidance_scale=6.0, adaptive=AG(0.97))),
    (fd.ClassifierFreeGuidance, dict(guidance_scale=6.0, guidance_rescale=0.7, interval=(0.3, 5.4), scheduler=EULER)),
    (fd.ClassifierFreeZeroStarGuidance, dict(guidance_scale=4.0, linear_ag=fastguide.LinearAG(
        {1: (0.5, 0.25, 0.125), 3: (1.0, -0.5, 0.5)}, 8))),
    (fd.FrequencyDecoupledGuidance, dict(guidance_scales=[8.0, 3.0], adaptive=AG(0.99))),
    (fd.AdaptiveProjectedGuidance, dict(guidance_scale=5.0, eta=0.5, interval=(0.2, 0.8),
                                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))),
    (fd.AdaptiveProjectedGuidance, dict(guidance_scale=5.0, adaptive_projected_guidance_momentum=-0.5,
                                        adaptive=AG(0.99))),
    (fd.PerturbedAttentionGuidance, dict(guidance_scale=5.0, perturbed_guidance_layers=[0])),
    (fd.SkipLayerGuidance, dict(guidance_scale=5.0, skip_layer_guidance_layers=[0])),
]
IDS = [f"{cls.__name__}-{'+'.join(k for k in kw if k in fd.POLICY_ARGS) or 'plain'}" for cls, kw in CASES]


def _public(config):
    return {k: v for k, v in config.items() if not k.startswith("_")}


def assert_same_guider(back, ours):
    assert type(back) is type(ours)
    assert _public(back.config) == _public(ours.config)
    if ours._skip is None:
        assert back._skip is None
        return
    a, b = ours._skip, back._skip
    assert (b.adaptive, b.interval, b.linear_ag) == (a.adaptive, a.interval, a.linear_ag)
    if a.schedule is not None:
        ts = [999, 640.5, 301, 17]
        assert [b.schedule.sigma(t) for t in ts] == pytest.approx([a.schedule.sigma(t) for t in ts], rel=1e-12)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_guider_round_trip(tmp_path, cls, kw):
    ours = cls(**kw)
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "guider_config.json").read_text())
    assert saved["_class_name"] == cls.__name__
    assert_same_guider(cls.from_pretrained(tmp_path), ours)
    assert_same_guider(ours.new(), ours)  # diffusers' copy goes through from_config too
    changed = ours.new(stop=0.5)
    assert changed.config["stop"] == 0.5 and _public(changed.config) == {**_public(ours.config), "stop": 0.5}
    # diffusers' own guider reads the file (it ignores the policy entries)
    theirs = getattr(dg, cls.__name__).from_pretrained(tmp_path)
    assert all(theirs.config[k] == v for k, v in _public(ours.config).items() if k not in fd.POLICY_ARGS)


def test_policy_config_entries_are_json_and_absent_without_a_policy(tmp_path):
    ours = CASES[2][0](**CASES[2][1])
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "guider_config.json").read_text())
    assert saved["linear_ag"] == {"num_inference_steps": 8,
                                  "coefficients": [[1, 0.5, 0.25, 0.125], [3, 1.0, -0.5, 0.5]]}
    interval = fd.ClassifierFreeGuidance(interval=(0.3, 5.4), scheduler=EULER).config
    assert interval["interval"] == [0.3, 5.4] and interval["scheduler"]["class_name"] == "EulerDiscreteScheduler"
    # a twin without a policy has exactly its diffusers guider's config
    plain = fd.ClassifierFreeGuidance(guidance_scale=3.0)
    assert dict(plain.config) == dict(dg.ClassifierFreeGuidance(guidance_scale=3.0).config)


def test_malformed_policy_entry_names_it(tmp_path):
    fd.ClassifierFreeGuidance(adaptive=AG(0.9)).save_pretrained(tmp_path)
    path = tmp_path / "guider_config.json"
    cfg = json.loads(path.read_text())
    cfg["adaptive"] = {"thresh": 0.9}
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"cannot read config entry 'adaptive' = \{'thresh': 0.9\}"):
        fd.ClassifierFreeGuidance.from_pretrained(tmp_path)


def _motif(guider):
    # A classic pipeline whose constructor takes a guider; its heavy components are not needed to test loading.
    return MotifVideoPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                              transformer=None, guider=guider)


NONE = dict(vae=None, text_encoder=None, tokenizer=None, transformer=None)


def test_classic_pipeline_round_trip(tmp_path):
    ours = fd.ClassifierFreeGuidance(guidance_scale=4.5, adaptive=AG(0.98))
    _motif(ours).save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["guider"] == ["fastguide.diffusers", "ClassifierFreeGuidance"]
    back = MotifVideoPipeline.from_pretrained(tmp_path, **NONE)
    assert_same_guider(back.guider, ours)


def test_classic_pipeline_loading_needs_base_guidance_in_the_module(tmp_path, monkeypatch):
    """Why fastguide.diffusers re-exports BaseGuidance: diffusers finds the load method of a component of
    library "fastguide.diffusers" by looking LOADABLE_CLASSES' names up in that module."""
    _motif(fd.ClassifierFreeGuidance()).save_pretrained(tmp_path)
    monkeypatch.delattr(fd, "BaseGuidance")
    with pytest.raises(ValueError, match="does not seem to have any of the loading methods"):
        MotifVideoPipeline.from_pretrained(tmp_path, **NONE)


def test_modular_pipeline_round_trip(tmp_path):
    """A modular pipeline saves the components loaded with from_pretrained (diffusers treats a guider passed
    to update_components as a config component and does not save it, ours or its own): the guider is saved,
    loaded through a ComponentSpec, then the pipeline round-trips with it -- and runs identically."""
    guider = fd.ClassifierFreeGuidance(guidance_scale=5.0, adaptive=AG(-1.0))
    guider.save_pretrained(tmp_path / "src" / "guider")
    loaded = ComponentSpec(name="guider", type_hint=fd.ClassifierFreeGuidance,
                           pretrained_model_name_or_path=str(tmp_path / "src"), subfolder="guider").load()
    pipe = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    pipe.update_components(unet=make_sdxl().unet, scheduler=EulerDiscreteScheduler(steps_offset=1), guider=loaded)
    pipe.save_pretrained(str(tmp_path / "pipe"), overwrite_modular_index=True)
    index = json.loads((tmp_path / "pipe" / "modular_model_index.json").read_text())
    assert index["guider"][:2] == ["fastguide.diffusers", "ClassifierFreeGuidance"]

    back = StableDiffusionXLCoreDenoiseStep().init_pipeline(str(tmp_path / "pipe"))
    back.load_components()
    assert_same_guider(back.guider, guider)
    inputs = sdxl_inputs(batch=2, seed=3)
    outs, reports = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny UNet on a shared machine
    try:
        for p in (pipe, back):
            with torch.no_grad():
                outs.append(p(**inputs, height=16, width=16, num_inference_steps=3, output="latents"))
            reports.append(p.guider.report)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(outs[1], outs[0])
    assert reports[0] == reports[1] and reports[1].nfe == 2 * 2 + 2 * 2 and reports[1].ag_switch_step == [0, 0]
