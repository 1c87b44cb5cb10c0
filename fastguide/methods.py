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

    def check_params(self, given, where):
        """{name: value} with defaults filled in; unknown names raise, listing the known ones."""
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            raise ValueError(f"{where}: guidance={self.name!r} takes {sorted(self.params)}, not {unknown}")
        return {**self.params, **given}


_REGISTRY = {}
METHODS = MappingProxyType(_REGISTRY)  # public, read-only view: name -> Method


def register(method):
    if method.name in _REGISTRY:
        raise ValueError(f"fastguide.methods.register: {method.name!r} is already registered")
    missing = [b for b in method.branches if b not in ("cond", "uncond", "perturbed")]
    if missing:
        raise ValueError(f"fastguide.methods.register: unknown branches {missing} for {method.name!r}")
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
