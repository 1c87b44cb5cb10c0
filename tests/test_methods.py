"""The method registry: one record per guidance method, read by `enable` (and `info`)."""
import pytest
import torch
from diffusers import guiders as dg

import fastguide
import fastguide.diffusers as fd
from fastguide import methods
from test_pipelines import STEPS, make_sd, run


def test_registry_is_public_read_only_and_consistent():
    assert fastguide.METHODS is methods.METHODS
    assert {"cfg", "apg", "pag", "cfg_zero_star", "frequency", "fdg"} <= set(fastguide.METHODS)
    with pytest.raises(TypeError):
        fastguide.METHODS["mine"] = None  # registration goes through methods.register
    for name, m in fastguide.METHODS.items():
        assert m.name == name and m.summary and m.peer
        assert set(m.example) <= set(m.params) and set(m.scale_params) <= set(m.params)
        assert {"rescale", "original"} <= set(m.params)
        if m.twin is not None:  # the twin is fastguide's subclass of the diffusers guider of the same name
            twin = getattr(fd, m.twin)
            assert issubclass(twin, getattr(dg, m.twin)) and fd.GUIDERS[getattr(dg, m.twin)] is twin


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown guidance 'magic'; known methods: \['apg', .*'cfg', "):
        methods.get("magic", "somewhere")
    with pytest.raises(ValueError, match="known methods"):
        methods.get(None)
    with pytest.raises(ValueError, match="already registered"):
        methods.register(fastguide.METHODS["cfg"])


def second_unet():
    """Another UNet of make_sd's architecture with other weights (a second model for RLG / autoguidance)."""
    unet = make_sd().unet
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet


# enable builds cond / uncond / perturbed from the pipeline's own batch, a second model's branches from models=
# and a middle / empty prompt branch by encoding the method's prompt parameter (tests/test_enable_prompts.py)
@pytest.mark.parametrize("name", sorted(n for n, m in methods.METHODS.items() if m.enable_ready))
def test_every_method_runs_through_enable(name):
    """Each registered method on a tiny StableDiffusion pipeline with its example settings: runs every
    step, stays finite, and (except plain CFG) changes the result against CFG at the same scale."""
    from test_enable_prompts import make_sd_text
    method = fastguide.METHODS[name]
    pipe = make_sd_text() if method.prompts else make_sd()  # a text encoder for the extra prompt
    fastguide.enable(pipe, guidance="cfg")
    cfg = run(pipe, "sd")
    models = {key: second_unet() for key in method.model_keys}  # RLG's reference, autoguidance's weak model
    prompts = {p: "newer" for p in method.prompts.values() if method.params[p] is None}  # dual CFG's middle_prompt
    fastguide.enable(pipe, guidance=name, **method.example, **prompts, **({"models": models} if models else {}))
    out = run(pipe, "sd")
    assert pipe.fastguide_report.steps == STEPS and torch.isfinite(out).all()
    rows = len(method.branches)  # one denoiser row per branch and sample (of whichever model)
    assert pipe.fastguide_report.nfe == STEPS * rows
    if name != "cfg" or method.example.get("rescale"):
        assert (out - cfg).abs().max() > 1e-4
    fastguide.disable(pipe)
