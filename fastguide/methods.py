"""The method registry: every guidance method fastguide runs, declared once.

A `Method` record holds what the integration layers need to know about one method: its parameters and
their defaults, the branches (predictions) its combine takes, the state it carries across the steps of a
trajectory, the combine itself (fastguide's fused ops), and its diffusers guider twin if it has one.
`fastguide.enable(pipe, guidance=NAME, ...)` and `python -m fastguide info` read it; `fastguide.METHODS` is
the public name -> Method mapping, so users and tools can list what is there.

Adding a method = its kernel(s) and op wrapper, one `register(Method(...))` here, and its tests
(CONTRIBUTING.md walks through a real example).
"""
import math
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
    # Extra prompt branches enable builds on SD / SDXL pipelines: branch -> the parameter holding its prompt (a str,
    # a list of one per prompt, or its embeddings), encoded by the pipeline's own text encoder(s) each call and run
    # as extra rows of the one denoiser forward (dual CFG's middle_prompt, Perp-Neg's empty_prompt "").
    prompts: Mapping[str, str] = field(default_factory=dict)
    new_state: Optional[Callable] = None        # params -> per-trajectory state (reset at step 0)
    reset_state: Optional[Callable] = None      # state -> None, at the start of a new trajectory
    twin: Optional[str] = None                  # class name in fastguide.diffusers
    scale_params: Tuple[str, ...] = ("scale",)  # parameters that may be None (pipeline scale) or a schedule
    example: Mapping[str, Any] = field(default_factory=dict)  # settings for a meaningful run (tests, bench, docs)
    # params -> constructor kwargs of the twin guider (fastguide.diffusers.<twin>), for pipelines that take a
    # guider: `enable` then installs that guider instead of wrapping the denoiser. None: no guider route.
    guider_config: Optional[Callable] = None
    # params -> the attention processor that makes the perturbed rows of a [uncond, cond, perturbed] batch on
    # the chosen `layers` (enable's route). None: identity attention (PAG). SEG: blurred queries.
    perturbation: Optional[Callable] = None
    # The branch whose rows the perturbation acts on: "perturbed", an extra chunk of the batch ([uncond, cond,
    # perturbed]: PAG, SEG), or a branch of the pipeline's own batch ("uncond": diffusers' AutoGuidance, whose
    # uncond rows run the layer-skipped model in the one [uncond, cond] forward: no extra rows).
    perturbs: str = "perturbed"

    @property
    def stateless(self):
        return self.new_state is None

    @property
    def perturbed_branch(self):
        """The branch `enable` computes under the perturbation, or None (no perturbation)."""
        if self.perturbs in self.branches and (self.perturbation is not None or self.perturbs == "perturbed"):
            return self.perturbs
        return None

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
        """Whether `fastguide.enable` on a classic pipeline builds every branch: from the pipeline's own batch
        (cond, uncond, perturbed), for a second model's branches from the models passed as
        `enable(..., models={key: module})`, and for an extra prompt branch (`prompts`: dual CFG's middle, Perp-Neg's
        empty) by encoding the method's prompt parameter with the pipeline's text encoder(s) (StableDiffusion and
        StableDiffusionXL pipelines; InstructPix2Pix's middle is its image condition). Other pipelines run the
        prompt-branch methods through `fastguide.diffusers.MultiBranchGuidance`."""
        return all(b in ENABLE_BRANCHES or b in self.models or b in self.prompts for b in self.branches)

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
ENABLE_BRANCHES = ("cond", "uncond", "perturbed")  # what fastguide.enable builds from a classic pipeline's own batch
PROMPT_PARAM_BRANCHES = ("middle", "empty")         # built by enable from a method's prompt parameter (`prompts`)
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
    for branch, param in method.prompts.items():
        if branch not in PROMPT_PARAM_BRANCHES or branch not in method.branches or param not in method.params:
            raise ValueError(f"{where}: prompt branch {branch!r} of {method.name!r} must be one of its branches and of "
                             f"{PROMPT_PARAM_BRANCHES}, and map to one of its parameters {sorted(method.params)}, "
                             f"got {param!r}")
    if method.perturbation is not None and (method.perturbs not in method.branches or method.perturbs in method.models):
        raise ValueError(f"{where}: {method.name!r} perturbs the rows of {method.perturbs!r}, which must be one of its "
                         f"prompt branches {method.branches}")
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


def _seg_perturbation(p):
    from .attention import SEGProcessor
    return SEGProcessor(blur_sigma=p["blur_sigma"], blur_threshold_inf=p["blur_threshold_inf"], chunks=3)


register(Method(
    name="seg", summary="smoothed energy guidance: the perturbed branch's queries Gaussian-blurred on `layers`, with CFG",
    peer="diffusers SmoothedEnergyGuidance (its blur fixed as in the official SEG code, see fastguide.attention)",
    twin="SmoothedEnergyGuidance", branches=("cond", "uncond", "perturbed"),
    params={"scale": None, "seg_scale": 3.0, "blur_sigma": 9999999.0, "blur_threshold_inf": 9999.0,
            "layers": ("mid",), **COMMON},
    example={"seg_scale": 3.0, "blur_sigma": 2.0, "layers": ("mid",)}, perturbation=_seg_perturbation,
    combine=lambda x, p, state, step: ops.pag(x["cond"], x["uncond"], x["perturbed"], p["scale"], p["seg_scale"],
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


# --- the diffusers 0.42 guiders twinned in fastguide.diffusers (MAG, TCFG, APMix, LTX-2) -----------------
# Each combine is one function here, called by the registry entry and by the twin alike.
def _isclose(scale, value):
    """diffusers' `math.isclose(scale, value)` switch; a tensor scale (never read on the host) counts as on."""
    return not isinstance(scale, torch.Tensor) and math.isclose(float(scale), value)


def mag(cond, uncond, scale, alpha, *, rescale=0.0, original=False):
    """Magnitude-aware guidance (MAMBO-G; diffusers `mambo_guidance` + rescale): CFG with the per-sample scale
    1 + (scale - 1) exp(-alpha |c - u| / |u|) (scale exp(...) when `original`). One guidance_stats pass gives
    the norms, then one cfg pass with the [B] scale. |c - u|^2 = |c|^2 - 2<c,u> + |u|^2 from fp32 sums cancels
    when c ~ u; the scale's error is then multiplied by the small c - u: measured on [2, 4096, 64], scale 10,
    alpha 8, the prediction is within 1e-5 of the float64 result (relative to its max) down to |c - u| = 0.01 |c|
    (diffusers' fp32: 6e-7; it forms c - u, one more pass). Float64 inputs: float64 norms."""
    ops._check_pair("mag", cond, uncond, "uncond")
    # s in one small op (guide_weights, fp64 math) from the Gram sums, then CFG with the [B] scale
    w = ops._guide_weights(ops._gram_stats(cond, uncond), "mag_original" if original else "mag",
                           ops._scale("mag", "scale", scale, cond), param=float(alpha))
    return ops._op["cfg"](cond, uncond, w.view(-1), 0.0, ops._rescale("mag", rescale), bool(original))


def tcfg(cond, uncond, scale, *, rescale=0.0, original=False):
    """Tangential CFG (diffusers `normalized_guidance` of TangentialClassifierFreeGuidance): uncond is replaced by
    its projection u' = <u, v0> v0 on the first right singular vector v0 of the 2 x N matrix [c; u] per sample,
    then CFG on (c, u'). v0 lies in span(c, u): with the 2 x 2 Gram matrix G = [c; u][c; u]^T = U S^2 U^T
    (G's leading eigenvector, in closed form, float64), v0 = (U00 c + U10 u) / S0, so u' = p c + q u and the guided
    prediction is A c + B u with per-sample A, B: one guidance_stats pass, one small op for A and B
    (guide_weights), one lincomb, instead of the SVD of [B, 2, N] and its matmuls. The sign of v0 cancels in u'."""
    ops._check_pair("tcfg", cond, uncond, "uncond")
    # (a + b, a) as lincomb weights on [u, c], from a closed-form 2 x 2 eigenproblem in one small op (guide_weights)
    w = ops._guide_weights(ops._gram_stats(cond, uncond), "tcfg_original" if original else "tcfg",
                           ops._scale("tcfg", "scale", scale, cond))
    out = ops._op["lincomb"]([uncond, cond], w, [])
    return ops.rescale(out, cond, rescale) if rescale > 0 else out


def apg_mix(cond, uncond, scale, apg_scale, apg_on, *, eta=0.0, norm_threshold=10.0, momentum_buffer=None,
            rescale=0.0, original=False):
    """diffusers AdaptiveProjectedMixGuidance (HunyuanImage 2.1) on a step where its CFG is on: APG with
    `apg_scale` when `apg_on` (past its start step; fastguide.apg: momentum, norm clamp, projection), else CFG
    with `scale` while the momentum follows cond - uncond."""
    if apg_on:
        return ops.apg(cond, uncond, apg_scale, eta=eta, norm_threshold=max(float(norm_threshold), 0.0),
                       momentum_buffer=momentum_buffer, rescale=rescale, original=original)
    if momentum_buffer is None:
        return ops.cfg(cond, uncond, scale, rescale=rescale, original=original)
    ops._check_pair("apg_mix", cond, uncond, "uncond")
    st, s = ops._scale("apg_mix", "scale", scale, cond)
    r = ops._rescale("apg_mix", rescale)
    buf, mom, bind = ops._momentum_state("apg_mix", None, momentum_buffer, cond)  # all validated: now the state moves
    grad = torch.is_grad_enabled() and (cond.requires_grad or uncond.requires_grad
                                        or (st is not None and st.requires_grad))
    if r > 0 or grad:  # rescale needs the output's norm first; a gradient needs the differentiable cfg
        pred = ops._op["cfg"](cond, uncond, st, s, r, bool(original))
        # diffusers' MomentumBuffer.update, rounded as it is; the buffer takes the values, never the graph
        buf.mul_(mom).add_((cond - uncond).detach())
    else:  # one pass: cfg's output (bitwise) and the update in place, fp32 math (5 tensor moves, not 11)
        pred = ops._op["cfg_momentum"](cond, uncond, st, s, bool(original), mom, buf)
    if bind is not None:
        bind._bind(buf)
    return pred


def ltx2(cond, terms, *, rescale=0.0):
    """LTX-2's delta formulation: cond + sum_k w_k (cond - other_k) over the enabled terms [(w_k, other_k)]
    ((gs - 1, uncond), (stg, stg pass), (modality - 1, modality-isolated pass)), then guidance rescale. One
    fastguide.cfg / pag pass for up to two terms (their original formulation is cond + w (cond - other)), two
    for three."""
    if not terms:
        return cond
    if len(terms) == 1:
        (w, o), = terms
        return ops.cfg(cond, o, w, rescale=rescale, original=True)
    (w1, o1), (w2, o2), *rest = terms
    if not rest:
        return ops.pag(cond, o1, o2, w1, w2, rescale=rescale, original=True)
    (w3, o3), = rest
    first = ops.pag(cond, o1, o2, w1, w2, original=True)
    return ops.pag(cond, first, o3, 0.0, w3, rescale=rescale)  # first + 0 (cond - first) + w3 (cond - o3)


register(Method(
    name="mag", summary="magnitude-aware guidance, MAMBO-G (CFG scale damped by |c - u| / |u| per sample)",
    peer="diffusers MagnitudeAwareGuidance", twin="MagnitudeAwareGuidance",
    params={"scale": None, "alpha": 8.0, **COMMON}, example={"alpha": 8.0},
    guider_config=lambda p: {**_twin_common(p), "alpha": p["alpha"]},
    combine=lambda x, p, state, step: mag(x["cond"], x["uncond"], p["scale"], p["alpha"], rescale=p["rescale"],
                                          original=p["original"])))

register(Method(
    name="tcfg", summary="tangential CFG (uncond projected on the first singular vector of [cond; uncond])",
    peer="diffusers TangentialClassifierFreeGuidance", twin="TangentialClassifierFreeGuidance",
    params={"scale": None, **COMMON}, example={}, guider_config=_twin_common,
    combine=lambda x, p, state, step: tcfg(x["cond"], x["uncond"], p["scale"], rescale=p["rescale"],
                                           original=p["original"])))


def _apg_mix_config(p):
    return {**_twin_common(p), "adaptive_projected_guidance_scale": p["apg_scale"],
            "adaptive_projected_guidance_momentum": p["momentum"],
            "adaptive_projected_guidance_rescale": p["norm_threshold"], "eta": p["eta"],
            "adaptive_projected_guidance_start_step": p["start_step"]}


def _apg_mix_on(p, step):
    """diffusers' _is_apg_enabled: past the start step, and an APG scale that guides (!= 1; != 0 when original)."""
    return step > p["start_step"] and not _isclose(p["apg_scale"], 0.0 if p["original"] else 1.0)


register(Method(
    name="apg_mix", summary="CFG for the first steps, then APG (momentum kept from the start): HunyuanImage 2.1",
    peer="diffusers AdaptiveProjectedMixGuidance", twin="AdaptiveProjectedMixGuidance",
    scale_params=("scale", "apg_scale"),
    params={"scale": None, "apg_scale": 10.0, "momentum": -0.5, "norm_threshold": 10.0, "eta": 0.0, "start_step": 5,
            **COMMON},
    example={"start_step": 1, "apg_scale": 6.0}, guider_config=_apg_mix_config,
    new_state=_apg_state, reset_state=lambda buf: buf is not None and buf.reset(),
    combine=lambda x, p, buf, step: apg_mix(x["cond"], x["uncond"], p["scale"], p["apg_scale"], _apg_mix_on(p, step),
                                            eta=p["eta"], norm_threshold=p["norm_threshold"], momentum_buffer=buf,
                                            rescale=p["rescale"], original=p["original"])))


def _ltx2(x, p, state, step):
    if p["original"]:
        raise ValueError("fastguide: guidance='ltx2' has one formulation (cond + (scale - 1)(cond - uncond) + ...); "
                         "original=True does not apply")
    return ltx2(x["cond"], [(p["scale"] - 1.0, x["uncond"]), (p["stg_scale"], x["perturbed"])], rescale=p["rescale"])


register(Method(
    name="ltx2", summary="LTX-2 guidance: CFG + spatio-temporal guidance (identity attention on `layers`)",
    peer="diffusers LTX2Guidance (single modality)", twin="LTX2Guidance",
    branches=("cond", "uncond", "perturbed"), scale_params=("scale", "stg_scale"),
    params={"scale": None, "stg_scale": 1.0, "layers": ("mid",), **COMMON},
    example={"stg_scale": 1.0, "layers": ("mid",)},
    guider_config=lambda p: {"guidance_rescale": p["rescale"], "stg_scale": p["stg_scale"],
                             **({"guidance_scale": p["scale"]} if p["scale"] is not None else {})},
    combine=_ltx2))


def _autoguidance_perturbation(p):
    from .attention import LayerSkip
    return LayerSkip(skip=p["skip"], dropout=p["dropout"])


def _autoguidance_config(p):
    """The twin's auto_guidance_config: `layers` as indices into the stack of transformer blocks diffusers finds
    with fqn="auto" (DiTs). Name patterns ("mid", ...) need the model, which a guider's config does not have."""
    from .attention import SKIPS
    layers = [p["layers"]] if isinstance(p["layers"], (str, int)) else list(p["layers"])
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"fastguide: guidance='autoguidance' in a pipeline that takes a guider needs layers= as block "
                         f"indices (ints, the stack diffusers' LayerSkipConfig(fqn='auto') finds), got {p['layers']!r}; "
                         f"for other layers build fastguide.diffusers.AutoGuidance(auto_guidance_config="
                         f"LayerSkipConfig(indices, fqn=...)) and pass it as the pipeline's guider")
    attention, ff = SKIPS[p["skip"]] if p["skip"] in SKIPS else (None, None)
    if attention is None:
        raise ValueError(f"fastguide: guidance='autoguidance': skip must be one of {sorted(SKIPS)}, got {p['skip']!r}")
    return {**_twin_common(p), "auto_guidance_config": [{"indices": layers, "fqn": "auto", "skip_attention": attention,
                                                         "skip_ff": ff, "dropout": p["dropout"]}]}


register(Method(
    name="autoguidance", summary="diffusers' AutoGuidance: CFG whose uncond rows skip `layers` (the 'bad model')",
    peer="diffusers AutoGuidance (LayerSkipConfig on the uncond batch; dropout < 1: another random stream)",
    twin="AutoGuidance", params={"scale": None, "layers": ("mid",), "skip": "block", "dropout": 1.0, **COMMON},
    example={"layers": ("mid",), "skip": "block"}, perturbation=_autoguidance_perturbation, perturbs="uncond",
    guider_config=_autoguidance_config,
    combine=lambda x, p, state, step: ops.cfg(x["cond"], x["uncond"], p["scale"], rescale=p["rescale"],
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
    # middle_prompt: enable's second condition on SD / SDXL (ComfyUI's cond2); InstructPix2Pix's is its image
    params={"scale": None, "middle_scale": 1.5, "nested": False, "middle_prompt": None, **COMMON},
    prompts={"middle": "middle_prompt"}, example={"middle_scale": 1.5},
    combine=_dual_cfg))


def _perp_neg(x, p, state, step):
    _no_original("perp_neg", p)
    out = ops.perp_neg(x["cond"], x["uncond"], x["empty"], p["scale"], p["neg_scale"], per_sample=p["per_sample"])
    return _rescaled(out, x["cond"], p)


register(Method(
    name="perp_neg", summary="Perp-Neg: the negative prompt's direction perpendicular to the positive one",
    peer="ComfyUI PerpNegGuider (batch-wide projection; per_sample=True projects each sample)",
    branches=("cond", "uncond", "empty"), scale_params=("scale", "neg_scale"),
    # empty_prompt: what enable encodes for the empty branch (ComfyUI's empty_conditioning: the prompt "")
    params={"scale": None, "neg_scale": 1.0, "per_sample": False, "empty_prompt": "", **COMMON},
    prompts={"empty": "empty_prompt"}, example={"neg_scale": 1.0}, combine=_perp_neg))

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
