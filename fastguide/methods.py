"""The method registry: every guidance method fastguide runs, declared once.

A `Method` record holds what the integration layers need to know about one method: its parameters and
their defaults, the branches (predictions) its combine takes, the state it carries across the steps of a
trajectory, the combine itself (fastguide's fused ops), and its diffusers guider twin if it has one.
`fastguide.enable(pipe, guidance=NAME, ...)` and `python -m fastguide info` read it; `fastguide.METHODS` is
the public name -> Method mapping, so users and tools can list what is there.

Adding a method = its kernel(s) and op wrapper, one `register(Method(...))` here, and its tests
(CONTRIBUTING.md walks through a real example).
"""
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Optional, Tuple

import torch

from . import frequency, ops

# Parameters every method takes; "scale" None follows the pipeline call's guidance_scale.
COMMON = {"rescale": 0.0, "original": False}


@dataclass(frozen=True)
class Method:
    """One guidance method.

    combine(preds, params, state, step) -> guided prediction, where `preds` maps each branch name to its
    prediction ([B, ...] tensors), `params` holds every parameter with scales already resolved to a float
    or tensor for this step, `state` is what `new_state(params)` made for the trajectory (None when the
    method is stateless) and `step` the 0-based denoising step.
    """
    name: str
    summary: str
    peer: str                                   # what it equals (diffusers class, paper or node)
    params: Mapping[str, Any]                   # name -> default
    combine: Callable
    branches: Tuple[str, ...] = ("cond", "uncond")
    # Branches computed by another model than the pipeline's: branch -> (model key, the prompt batch it runs on,
    # "cond" or "uncond"). The user supplies one model per key (the guider's `models=` in the guider route).
    models: Mapping[str, Tuple[str, str]] = field(default_factory=dict)
    new_state: Optional[Callable] = None        # params -> per-trajectory state (reset at step 0)
    reset_state: Optional[Callable] = None      # state -> None, at the start of a new trajectory
    twin: Optional[str] = None                  # class name in fastguide.diffusers
    scale_params: Tuple[str, ...] = ("scale",)  # parameters that may be None (pipeline scale) or a schedule
    example: Mapping[str, Any] = field(default_factory=dict)  # settings for a meaningful run (tests, bench, docs)
    # params -> constructor kwargs of the twin guider (fastguide.diffusers.<twin>), for pipelines that take a
    # guider: `enable` then installs that guider instead of wrapping the denoiser. None: no guider route.
    guider_config: Optional[Callable] = None

    @property
    def stateless(self):
        return self.new_state is None

    @property
    def can_skip_uncond(self):
        """Whether Adaptive Guidance, intervals and LinearAG may drop rows per sample: no state across
        steps and only the cond / uncond branches."""
        return self.stateless and self.branches == ("cond", "uncond")

    @property
    def model_keys(self):
        """The second models the method needs, by key (sorted)."""
        return tuple(sorted({key for key, _ in self.models.values()}))

    @property
    def enable_ready(self):
        """Whether `fastguide.enable` on a classic pipeline builds every branch from the pipeline's own batch
        today (cond, uncond, perturbed); methods with a middle / empty prompt or a second model need the guider
        route (`fastguide.diffusers.MultiBranchGuidance`) or their own loop."""
        return all(b in ENABLE_BRANCHES for b in self.branches)

    def check_params(self, given, where):
        """{name: value} with defaults filled in; unknown names raise, listing the known ones."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f"{where}: guidance={self.name!r} takes {sorted(self.params)}, not {unknown}")
        return {**self.params, **given}


_REGISTRY = {}
METHODS = MappingProxyType(_REGISTRY)  # public, read-only view: name -> Method


# The predictions a method's combine may take from the pipeline's own model, and what each is.
PROMPT_BRANCHES = {
    "cond": "the prompt",
    "uncond": "the negative (or empty) prompt",
    "perturbed": "the prompt, with perturbed self-attention (PAG)",
    "middle": "a second condition between cond and uncond (dual CFG; InstructPix2Pix: the image-only condition)",
    "empty": "the empty prompt, next to a negative prompt (Perp-Neg)",
}
ENABLE_BRANCHES = ("cond", "uncond", "perturbed")  # what fastguide.enable builds on classic pipelines today
MODEL_BRANCH_INPUTS = ("cond", "uncond")            # the prompt batches a second model can run on


def register(method):
    where = "fastguide.methods.register"
    if method.name in _REGISTRY:
        raise ValueError(f"{where}: {method.name!r} is already registered")
    for branch, spec in method.models.items():
        if branch in PROMPT_BRANCHES or branch not in method.branches:
            raise ValueError(f"{where}: model branch {branch!r} of {method.name!r} must be one of its branches "
                             f"{method.branches} and not a prompt branch {sorted(PROMPT_BRANCHES)}")
        if (not isinstance(spec, tuple) or len(spec) != 2 or not isinstance(spec[0], str) or not spec[0].isidentifier()
                or spec[1] not in MODEL_BRANCH_INPUTS):
            raise ValueError(f"{where}: model branch {branch!r} of {method.name!r} must map to (model key, one of "
                             f"{MODEL_BRANCH_INPUTS}), got {spec!r}")
    missing = [b for b in method.branches if b not in PROMPT_BRANCHES and b not in method.models]
    if missing or len(set(method.branches)) != len(method.branches):
        raise ValueError(f"{where}: unknown or repeated branches {missing or list(method.branches)} for "
                         f"{method.name!r}; known: {sorted(PROMPT_BRANCHES)} and the method's model branches")
    _REGISTRY[method.name] = method
    return method


def get(name, where="fastguide"):
    """The registered method `name`, or a ValueError listing every known one."""
    method = _REGISTRY.get(name) if isinstance(name, str) else None
    if method is None:
        raise ValueError(f"{where}: unknown guidance {name!r}; known methods: {sorted(_REGISTRY)}")
    return method


# --- the methods ------------------------------------------------------------------------------------
def _twin_common(p):
    """The parameters every diffusers twin shares; a scale left as None keeps the guider's own default (the
    pipeline's guidance_scale argument, where it has one, overrides it)."""
    out = {"guidance_rescale": p["rescale"], "use_original_formulation": p["original"]}
    if p.get("scale") is not None:
        out["guidance_scale"] = p["scale"]
    return out


register(Method(
    name="cfg", summary="classifier-free guidance (+ guidance rescale)",
    peer="diffusers ClassifierFreeGuidance", twin="ClassifierFreeGuidance",
    params={"scale": None, **COMMON}, example={"rescale": 0.7},
    guider_config=_twin_common,
    combine=lambda x, p, state, step: ops.cfg(x["cond"], x["uncond"], p["scale"], rescale=p["rescale"],
                                              original=p["original"])))


def _apg_state(p):
    return ops.MomentumBuffer(p["momentum"]) if p["momentum"] is not None else None


register(Method(
    name="apg", summary="adaptive projected guidance (momentum, norm clamp, projection)",
    peer="diffusers AdaptiveProjectedGuidance", twin="AdaptiveProjectedGuidance",
    params={"scale": None, "eta": 1.0, "norm_threshold": 0.0, "momentum": None, "norm_dim": None, **COMMON},
    example={"momentum": -0.5, "norm_threshold": 2.0, "eta": 0.5},
    guider_config=lambda p: {**_twin_common(p), "eta": p["eta"], "adaptive_projected_guidance_momentum": p["momentum"],
                             "adaptive_projected_guidance_rescale": p["norm_threshold"],
                             "adaptive_projected_guidance_norm_dim": p["norm_dim"]},
    new_state=_apg_state, reset_state=lambda buf: buf is not None and buf.reset(),
    combine=lambda x, p, buf, step: ops.apg(x["cond"], x["uncond"], p["scale"], eta=p["eta"],
                                            norm_threshold=p["norm_threshold"], momentum_buffer=buf,
                                            norm_dim=p["norm_dim"], rescale=p["rescale"], original=p["original"])))

register(Method(
    name="pag", summary="perturbed-attention guidance combined with CFG (identity attention on `layers`)",
    peer="diffusers PerturbedAttentionGuidance", twin="PerturbedAttentionGuidance",
    branches=("cond", "uncond", "perturbed"),
    params={"scale": None, "pag_scale": 3.0, "layers": ("mid",), **COMMON},
    example={"pag_scale": 3.0, "layers": ("mid",)},
    combine=lambda x, p, state, step: ops.pag(x["cond"], x["uncond"], x["perturbed"], p["scale"], p["pag_scale"],
                                              rescale=p["rescale"], original=p["original"])))


def _cfg_zero_star(x, p, state, step):
    if step < p["zero_init_steps"]:  # CFG-Zero*'s zero-init: the first steps predict zero
        return torch.zeros_like(x["cond"])
    return ops.cfg_zero_star(x["cond"], x["uncond"], p["scale"], rescale=p["rescale"], original=p["original"])


register(Method(
    name="cfg_zero_star", summary="CFG-Zero* (optimised per-sample scale, zero-init steps)",
    peer="diffusers ClassifierFreeZeroStarGuidance", twin="ClassifierFreeZeroStarGuidance",
    params={"scale": None, "zero_init_steps": 1, **COMMON}, example={"zero_init_steps": 1}, combine=_cfg_zero_star,
    guider_config=lambda p: {**_twin_common(p), "zero_init_steps": p["zero_init_steps"]}))

register(Method(
    name="frequency", summary="frequency-split CFG: FreSca FFT box (cutoff=) or FreCaS bilinear (size=)",
    peer="ComfyUI FreSca node / FreCaS facfg_wrapper", scale_params=("scale_high",),
    params={"scale_low": 1.0, "scale_high": None, "method": "fft_box", "cutoff": None, "size": None, **COMMON},
    example={"cutoff": 2, "scale_low": 1.0},
    combine=lambda x, p, state, step: frequency.frequency_cfg(
        x["cond"], x["uncond"], p["scale_low"], p["scale_high"], method=p["method"], cutoff=p["cutoff"],
        size=p["size"], rescale=p["rescale"], original=p["original"])))

register(Method(
    name="fdg", summary="frequency-decoupled guidance (Laplacian pyramid, one scale per level)",
    peer="diffusers FrequencyDecoupledGuidance", twin="FrequencyDecoupledGuidance", scale_params=(),
    params={"scales": (10.0, 5.0), "parallel_weights": None, **COMMON},
    example={"scales": (8.0, 3.0)},
    guider_config=lambda p: {"guidance_scales": list(p["scales"]), "use_original_formulation": p["original"],
                             "guidance_rescale": p["rescale"],
                             **({"parallel_weights": list(p["parallel_weights"])} if p["parallel_weights"] else {})},
    combine=lambda x, p, state, step: frequency.fdg(x["cond"], x["uncond"], list(p["scales"]),
                                                    parallel_weights=p["parallel_weights"], rescale=p["rescale"],
                                                    original=p["original"])))


# --- multi-branch methods (ComfyUI's guiders, two-model guidance) --------------------------------------
def _no_original(name, p):
    if p["original"]:
        raise ValueError(f"fastguide: guidance={name!r} has no 'original formulation' (original=True is CFG's)")


def _rescaled(out, cond, p):
    return ops.rescale(out, cond, p["rescale"]) if p["rescale"] > 0 else out


def _dual_cfg(x, p, state, step):
    _no_original("dual_cfg", p)
    out = ops.dual_cfg(x["cond"], x["middle"], x["uncond"], p["scale"], p["middle_scale"], nested=p["nested"])
    return _rescaled(out, x["cond"], p)


register(Method(
    name="dual_cfg", summary="dual CFG over cond / middle / uncond (InstructPix2Pix text + image guidance)",
    peer="ComfyUI DualCFGGuider (regular / nested); diffusers StableDiffusionInstructPix2PixPipeline",
    branches=("cond", "middle", "uncond"), scale_params=("scale", "middle_scale"),
    params={"scale": None, "middle_scale": 1.5, "nested": False, **COMMON}, example={"middle_scale": 1.5},
    combine=_dual_cfg))


def _perp_neg(x, p, state, step):
    _no_original("perp_neg", p)
    out = ops.perp_neg(x["cond"], x["uncond"], x["empty"], p["scale"], p["neg_scale"], per_sample=p["per_sample"])
    return _rescaled(out, x["cond"], p)


register(Method(
    name="perp_neg", summary="Perp-Neg: the negative prompt's direction perpendicular to the positive one",
    peer="ComfyUI PerpNegGuider (batch-wide projection; per_sample=True projects each sample)",
    branches=("cond", "uncond", "empty"), scale_params=("scale", "neg_scale"),
    params={"scale": None, "neg_scale": 1.0, "per_sample": False, **COMMON}, example={"neg_scale": 1.0},
    combine=_perp_neg))

register(Method(
    name="weak_model", summary="autoguidance with a separate weak model: weak + scale (cond - weak)",
    peer="Karras et al. 2024 (a weaker / earlier checkpoint of the same model; diffusers' AutoGuidance skips layers "
         "instead)",
    branches=("cond", "weak"), models={"weak": ("weak", "cond")}, params={"scale": None, **COMMON},
    combine=lambda x, p, state, step: ops.cfg(x["cond"], x["weak"], p["scale"], rescale=p["rescale"],
                                              original=p["original"])))


def _rlg(x, p, state, step):
    _no_original("rlg", p)
    out = ops.two_model_cfg(x["cond"], x["uncond"], x["ref"], x["ref_uncond"], p["scale"], p["rl_scale"])
    return _rescaled(out, x["cond"], p)


register(Method(
    name="rlg", summary="Reinforcement Learning Guidance: g_ref + rl_scale (g_rl - g_ref), CFG on each model",
    peer="Jin et al. 2025 (arXiv 2508.21016): the pipeline's model is the RL-fine-tuned one, `ref` its base",
    branches=("cond", "uncond", "ref", "ref_uncond"), models={"ref": ("ref", "cond"), "ref_uncond": ("ref", "uncond")},
    scale_params=("scale", "rl_scale"), params={"scale": None, "rl_scale": 1.5, **COMMON}, example={"rl_scale": 1.5},
    combine=_rlg))


# ComfyUI's post-CFG nodes. The nodes run on the denoised (x0) predictions; the combine gets the pipeline's own
# predictions (epsilon / velocity), where the channel norms and cosines differ: equal to the nodes on x0-predicting
# models, the same idea elsewhere (QwenImage / Lumina 2 in diffusers renormalise their velocity the same way).
def _cfg_norm(x, p, state, step):
    _no_original("cfg_norm", p)
    return _rescaled(ops.cfg_norm(x["cond"], x["uncond"], p["scale"], strength=p["strength"]), x["cond"], p)


register(Method(
    name="cfg_norm", summary="CFGNorm: CFG whose norm along the channels never exceeds cond's, times strength",
    peer="ComfyUI CFGNorm (nodes_cfg.py)", params={"scale": None, "strength": 1.0, **COMMON},
    example={"strength": 1.0}, combine=_cfg_norm))


def _renorm_cfg(x, p, state, step):
    _no_original("renorm_cfg", p)
    out = ops.renorm_cfg(x["cond"], x["uncond"], p["scale"], p["renorm"], channels=p["channels"])
    return _rescaled(out, x["cond"], p)


register(Method(
    name="renorm_cfg", summary="Lumina 2 renormalised CFG: |g| clamped at renorm |cond| per sample",
    peer="ComfyUI RenormCFG (nodes_lumina2.py; its cfg_trunc is a sigma threshold: use a scale schedule here)",
    params={"scale": None, "renorm": 1.0, "channels": None, **COMMON}, example={"renorm": 1.0},
    combine=_renorm_cfg))


def _mahiro(x, p, state, step):
    _no_original("mahiro", p)
    return _rescaled(ops.mahiro(x["cond"], x["uncond"], p["scale"], per_sample=p["per_sample"]), x["cond"], p)


register(Method(
    name="mahiro", summary="Mahiro: scale along the positive prompt's direction by a signed-sqrt cosine",
    peer="ComfyUI Mahiro (nodes_mahiro.py; the similarity is averaged over the batch unless per_sample)",
    params={"scale": None, "per_sample": False, **COMMON}, example={}, combine=_mahiro))
