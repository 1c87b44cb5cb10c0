"""One line for classic diffusers pipelines: `fastguide.enable(pipe, guidance="apg", ...)`.

The settings belong to the pipeline, not to its denoiser. `enable` gives the pipeline instance a subclass
(same name) whose `__call__` makes its settings the active ones (a ContextVar) while it runs, and gives the
denoiser (`pipe.unet` / `pipe.transformer`) one pass-through wrapper of its `forward`, shared by every
enabled pipeline on that module. During an enabled pipeline's CFG call the wrapper splits the denoiser's
output into its uncond/cond halves, computes fastguide's guided prediction g, and returns [g, g]: the
pipeline's own arithmetic `uncond + s * (cond - uncond)` then yields g exactly (cond - uncond = 0). Any other
caller of the module (a stock pipeline sharing it, `from_pipe`, a modular pipeline, another thread) runs it
untouched. Nothing in diffusers is edited. Each step's combine and its AG / interval / LinearAG decisions come
from the method's `fastguide.diffusers` twin guider, driven through the guider protocol (set_state,
prepare_inputs, forward): the same object and code as the modular route. For PAG the wrapper appends the conditional rows again to every
batched input ([uncond, cond, cond]) and the chosen layers get `SwitchedPerturbation`s: identity attention (PAG; SEG: blurred queries) on
the extra rows only during the calls of pipelines that asked for it. Methods with an extra prompt branch (Perp-Neg's
empty prompt, dual CFG's middle prompt) get [uncond, cond, extra] the same way, the extra rows carrying that
prompt's embeddings (encoded per call by the pipeline's own text encoder(s)).

Pipelines that call the denoiser once per branch (`cache_context("cond")`, then `("uncond")`, then their own
combine and `scheduler.step`) get fastguide's guided prediction at `scheduler.step` instead of their combine
(the scheduler's `step` is wrapped while the pipeline runs); the cond call is deferred so that both branches run
as one forward of 2B rows where the two calls' arguments allow it (`batch_branches=False`: as stock, two calls).

Supported (and subclasses): StableDiffusion{,Img2Img,Inpaint}Pipeline, StableDiffusionXL{,Img2Img,Inpaint}
Pipeline, StableDiffusion3Pipeline (true CFG; skip_guidance_layers keeps working), StableDiffusionPAGPipeline
and StableDiffusionXLPAGPipeline (their own PAG fused with guidance="cfg"), PixArtSigmaPipeline (learned-sigma
channels left out of the guidance, as the pipeline drops them); per branch: FluxPipeline (true CFG:
true_cfg_scale and a negative prompt), QwenImage{,Img2Img,Inpaint}Pipeline (its renorm to the cond norm kept),
WanPipeline (Wan 2.1, and Wan 2.2's two experts with guidance_scale_2), HunyuanVideoPipeline. `enable` on an enabled pipeline
replaces its settings; `disable` restores the class, and the denoiser once no enabled pipeline uses it.
Pass guidance_rescale=0 to the pipeline call and `rescale=` here (the pipeline's own rescale would
act on [g, g] and is the identity up to rounding).
"""
import contextlib
import contextvars
import copy
import functools
import inspect
import math
import os
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import methods, ops
from .attention import IdentityPAGProcessor


@dataclass(frozen=True)
class AG:
    """Adaptive Guidance (Castillo et al., AAAI 2025): once cos(cond, guided) of a sample exceeds `threshold`,
    stop evaluating its unconditional branch and run conditional-only steps for the rest of the trajectory.
    The cosine comes from the fused `guidance_stats` (one pass, on device); the policy reads it once per
    step (a host sync of B floats). threshold > 1 never switches (plain CFG); -1 switches after the first
    guided step.

    space: where the cosine is measured. "x0" (default): the clean-image estimates x0(cond) and x0(guided)
    the scheduler forms from the denoiser's input and its predictions (`enable` reads the pipeline's
    scheduler; guiders take scheduler=pipe.scheduler). "prediction": the denoiser's outputs as they are
    (epsilon, v or flow velocity). Measured on the lab's trained model (fastguide.lab, `bench/NOTES.md`):
    the epsilon cosine is highest at the first step and not monotone, so any threshold there switches at
    once (the result equals no guidance); the x0 cosine rises steadily to 1, as the paper assumes. The
    default 0.97 in x0 space skipped 32% of the evaluations at CFG 3 there with accuracy and Fréchet distance
    equal to full CFG within the measurement noise; tune it per model and scale."""
    threshold: float = 0.97
    space: str = "x0"

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or not math.isfinite(self.threshold):
            raise ValueError(f"fastguide.AG: threshold must be a finite float, got {self.threshold!r}")
        if self.space not in ("prediction", "x0"):
            raise ValueError(f"fastguide.AG: space must be 'prediction' or 'x0', got {self.space!r}")


@dataclass(frozen=True)
class LinearAG:
    """LinearAG (Castillo et al., AAAI 2025): at the listed steps the unconditional prediction is not evaluated
    but predicted from past estimates, u_i ~ a cond_i + b cond_{i-1} + c uncond_{i-1}, one (a, b, c) per step,
    fitted by `calibrate_linear_ag` on full-CFG runs. This DEVIATES from the base model's CFG (it is a
    learned approximation); check the result against full CFG on your own prompts. Our formulation of the
    paper's affine predictor; the coefficients are per step and shared by all pixels and samples."""
    coefficients: dict  # step -> (a, b, c)
    num_inference_steps: int


def fit_linear_ag(history, steps):
    """Least-squares (a, b, c) per step from recorded trajectories: history is a list (one per calibration run)
    of per-step (cond, uncond) predictions. fp64 normal equations of three regressors."""
    coefficients = {}
    for i in steps:
        if i < 1:
            raise ValueError(f"fastguide.fit_linear_ag: step {i} has no previous step to predict from")
        xs, ys = [], []
        for run in history:
            (c_prev, u_prev), (c_i, u_i) = run[i - 1], run[i]
            xs.append(torch.stack([c_i.flatten(), c_prev.flatten(), u_prev.flatten()], 1).double())
            ys.append(u_i.flatten().double())
        X, y = torch.cat(xs), torch.cat(ys)
        sol = torch.linalg.lstsq(X.cpu(), y.cpu()[:, None]).solution.flatten()
        coefficients[i] = tuple(float(v) for v in sol)
    return coefficients


def calibrate_linear_ag(pipe, prompt_embeds, negative_prompt_embeds, num_inference_steps, steps=None, **call_kwargs):
    """Fit LinearAG coefficients on full-CFG runs of `pipe` (one run per (prompt_embeds[k], negative[k]) pair;
    pass other pipeline arguments, e.g. guidance_scale, height, width, generator, in call_kwargs).
    `steps` (default: every other step of the first half, from step 1) are the steps whose unconditional
    pass LinearAG will replace. Returns a LinearAG for `enable(pipe, linear_ag=...)`."""
    if steps is None:
        steps = list(range(1, num_inference_steps // 2, 2))
    steps = sorted(int(s) for s in steps)
    if any(not 1 <= s < num_inference_steps for s in steps):
        raise ValueError(f"fastguide.calibrate_linear_ag: steps must lie in [1, {num_inference_steps}), got {steps}")
    previous = getattr(pipe, "_fastguide", None)
    history = []
    try:
        for pos, neg in zip(prompt_embeds, negative_prompt_embeds):
            enable(pipe, guidance="cfg")
            pipe._fastguide.record = []
            with torch.no_grad():
                pipe(prompt_embeds=pos, negative_prompt_embeds=neg, num_inference_steps=num_inference_steps,
                     output_type="latent", **call_kwargs)
            history.append(pipe._fastguide.record)
    finally:
        disable(pipe)
        if previous is not None:
            enable(pipe, previous.guidance, adaptive=previous.adaptive, interval=previous.interval,
                   linear_ag=previous.linear_ag, **{k: v for k, v in previous.params.items()
                                                   if v != previous.method.params[k]})
    return LinearAG(fit_linear_ag(history, steps), num_inference_steps)


@dataclass
class Report:
    """What guidance cost in one pipeline call (per-sample network evaluations)."""
    steps: int = 0
    nfe: int = 0                 # denoiser rows evaluated (one row = one sample's prediction)
    nfe_skipped: int = 0         # unconditional rows not evaluated (interval or AG)
    ag_switch_step: list = field(default_factory=list)  # per sample: step where AG stopped the uncond pass
    branch_batched: int = 0      # per-branch pipelines: steps whose two branches ran as one forward



# The state of the enabled pipeline whose __call__ is running in this thread / task, or None. Denoisers see
# the pipeline only through this: a module shared by several pipelines guides a call only while one of its
# enabled pipelines is running, with that pipeline's settings.
_ACTIVE = contextvars.ContextVar("fastguide_active_pipeline", default=None)
# The branch of the denoiser call in progress, from the pipeline's `denoiser.cache_context("cond" / "uncond")`
# (the per-branch pipelines: Flux true CFG, QwenImage, Wan, HunyuanVideo); None outside such a context.
_BRANCH = contextvars.ContextVar("fastguide_branch", default=None)


# --- which pipelines, and how their denoiser calls lay out the batch ----------------------------------
# A layout reads the running call (the pipeline, its call arguments, the denoiser call's bound arguments)
# and says how the denoiser batch is laid out: "cfg" [uncond, cond], "pag" [uncond, cond, perturbed],
# "slg" (SD3's conditional-only skip-layer call) or None (no guidance in this call: pass through).
def _cfg_layout(state, bound):
    return "cfg" if state.pipe.do_classifier_free_guidance else None


def _call_scale_layout(state, bound):
    """PixArt decides CFG from the call's guidance_scale (a local of its __call__, no pipeline property)."""
    return "cfg" if state.call["guidance_scale"] > 1 else None


def _sd3_layout(state, bound):
    """SD3: the CFG call, then (with skip_guidance_layers) a conditional-only call with `skip_layers`."""
    if not state.pipe.do_classifier_free_guidance:
        return None
    return "slg" if bound.arguments.get("skip_layers") is not None else "cfg"


def _ip2p_layout(state, bound):
    """InstructPix2Pix: [text, image, uncond] (cond, middle, uncond) while its guidance is on."""
    return "ip2p" if state.pipe.do_classifier_free_guidance else None


# The pipelines on which enable builds a method's extra prompt branches (dual CFG's middle, Perp-Neg's empty:
# `Method.prompts`), by kind: their `encode_prompt` encodes the prompt, their UNet takes it as encoder_hidden_states
# (SDXL: and its pooled embeddings as added_cond_kwargs["text_embeds"]).
_PROMPT_PIPELINES = {
    "sd": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline")}


def _prompt_kind(pipe, layout):
    """"sd" / "sdxl" for a pipeline whose [uncond, cond] call enable extends by extra prompt rows, else None."""
    if layout is not _cfg_layout:
        return None
    import diffusers as d
    for kind, names in _PROMPT_PIPELINES.items():
        if isinstance(pipe, tuple(getattr(d, n) for n in names if hasattr(d, n))):
            return kind
    return None


# Scales a layout takes from the pipeline when the method's setting is None: name -> pipeline property.
_PIPELINE_SCALES = {_ip2p_layout: {"middle_scale": "image_guidance_scale"}}


def _pag_layout(state, bound):
    """diffusers' PAG pipelines: [uncond, cond, perturbed] while their own PAG is on, else plain CFG."""
    if not state.pipe.do_classifier_free_guidance:
        return None
    return "pag" if state.pipe.do_perturbed_attention_guidance else "cfg"


@dataclass(frozen=True)
class _Branches:
    """Pipelines that call the denoiser once per branch, `cache_context("cond")` then `cache_context("uncond")`,
    combine the two themselves and pass the result to `scheduler.step`. fastguide computes its guided
    prediction at the uncond call and hands it to the scheduler in place of the pipeline's combine (the
    scheduler's `step` is wrapped for the duration of the call). With `batch_branches` (the default) the cond
    call is deferred: it returns a buffer, and the uncond call runs both branches as one forward of 2B rows
    where the two calls' arguments allow it (same shapes; everything not batched identical), filling the buffer
    before the pipeline reads it. That needs the prediction to have the latents' shape (`defer`)."""
    cfg_on: Callable                  # state -> whether this pipeline call runs the uncond branch
    scale: Callable                   # (state, attr) -> the pipeline's own scale for the denoiser `attr`
    timestep_scale: float = 1.0       # the denoiser gets timestep / timestep_scale (Flux, QwenImage: 1000)
    post: Optional[Callable] = None   # (cond, guided) -> what the pipeline does after its combine
    defer: bool = True

    def __call__(self, state, bound):
        return "branch" if self.cfg_on(state) else None


def _has_negative(call, pooled):
    """The pipelines' own `has_neg_prompt` test (Flux and HunyuanVideo also need the pooled embeddings)."""
    embeds = call.get("negative_prompt_embeds") is not None
    if pooled:
        embeds = embeds and call.get("negative_pooled_prompt_embeds") is not None
    return call.get("negative_prompt") is not None or embeds


def _true_cfg(pooled):
    return lambda state: state.call["true_cfg_scale"] > 1 and _has_negative(state.call, pooled)


def _true_cfg_scale(state, attr):
    return state.call["true_cfg_scale"]


def _wan_scale(state, attr):
    """Wan 2.2's low-noise expert (transformer_2) uses guidance_scale_2."""
    return state.pipe._guidance_scale_2 if attr == "transformer_2" else state.pipe._guidance_scale


def _qwen_renorm(cond, guided):
    # QwenImage rescales its guided prediction to the conditional prediction's norm, per token (the last dim
    # holds a token's channels): kept so guidance="cfg" equals the stock pipeline. Plain torch: two norms.
    return guided * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(guided, dim=-1, keepdim=True))


_FLUX = _Branches(_true_cfg(pooled=True), _true_cfg_scale, timestep_scale=1000.0)
_QWEN = _Branches(_true_cfg(pooled=False), _true_cfg_scale, timestep_scale=1000.0, post=_qwen_renorm)
_HUNYUAN_VIDEO = _Branches(_true_cfg(pooled=True), _true_cfg_scale)
_WAN = _Branches(lambda state: state.pipe.do_classifier_free_guidance, _wan_scale)

_PATTERNS = None


def _patterns():
    """[(pipeline class, denoiser attribute, layout)]: support is decided by the class (subclasses included)
    because what matters is how its __call__ batches the denoiser, which these classes share."""
    global _PATTERNS
    if _PATTERNS is None:
        import diffusers as d
        _PATTERNS = [(getattr(d, name), attr, layout) for name, attr, layout in (
            ("StableDiffusionPipeline", "unet", _cfg_layout),
            ("StableDiffusionImg2ImgPipeline", "unet", _cfg_layout),
            ("StableDiffusionInpaintPipeline", "unet", _cfg_layout),
            ("StableDiffusionXLPipeline", "unet", _cfg_layout),
            ("StableDiffusionXLImg2ImgPipeline", "unet", _cfg_layout),
            ("StableDiffusionXLInpaintPipeline", "unet", _cfg_layout),
            ("StableDiffusion3Pipeline", "transformer", _sd3_layout),
            ("StableDiffusionPAGPipeline", "unet", _pag_layout),
            ("StableDiffusionXLPAGPipeline", "unet", _pag_layout),
            ("PixArtSigmaPipeline", "transformer", _call_scale_layout),
            ("StableDiffusionInstructPix2PixPipeline", "unet", _ip2p_layout),
            ("FluxPipeline", "transformer", _FLUX),
            ("QwenImagePipeline", "transformer", _QWEN),
            ("QwenImageImg2ImgPipeline", "transformer", _QWEN),
            ("QwenImageInpaintPipeline", "transformer", _QWEN),
            ("HunyuanVideoPipeline", "transformer", _HUNYUAN_VIDEO),
            ("WanPipeline", "transformer", _WAN)) if hasattr(d, name)]
    return _PATTERNS


def _pattern(pipe):
    for cls, attr, layout in _patterns() if _is_pipeline(pipe) else ():
        if isinstance(pipe, cls):
            if getattr(pipe, attr, None) is None:
                raise ValueError(f"fastguide.enable: {type(pipe).__name__} has {attr}=None; enable guides the "
                                 f"pipeline's denoiser, so build the pipeline with its {attr}")
            return attr, layout
    names = ", ".join(cls.__name__ for cls, _, _ in _patterns())
    raise TypeError(f"fastguide.enable: {type(pipe).__name__} is not supported; supported pipelines: {names} "
                    f"(and their subclasses). For other pipelines use fastguide's diffusers guiders "
                    f"(fastguide.diffusers, e.g. fastguide.diffusers.guider_from(pipe.guider)) in a modular pipeline")


def _is_pipeline(obj):
    try:
        from diffusers import DiffusionPipeline
    except ImportError:
        return False
    return isinstance(obj, DiffusionPipeline)


def _unwrap(module):
    """The module itself under torch.compile's OptimizedModule: the hook lives on the real denoiser, so
    compiling before or after enable finds the same one."""
    return getattr(module, "_orig_mod", module)


# --- the per-module hook -------------------------------------------------------------------------------
_ABSENT = object()


class _Hook:
    """The one pass-through wrapper a denoiser module gets, however many enabled pipelines share it. It guides
    a call only when the running pipeline (`_ACTIVE`) is one of its users; any other caller (a stock pipeline
    on the same module, `from_pipe`, a modular pipeline, a direct call) runs the module untouched. PAG layers
    get `SwitchedPerturbation`s that perturb only for the users that asked for it, with their own perturbation."""

    def __init__(self, module):
        self.module = module
        self.saved_forward = module.__dict__.get("forward", _ABSENT)  # e.g. accelerate's offload hook
        self.original = module.forward
        self.signature = inspect.signature(self.original)
        # Weak references: the module must not keep a dropped pipeline (its VAE, text encoders) alive.
        self.users = []
        self.pag_saved = {}  # (perturbation kind, layer name) -> the function that undoes its switch

        def forward(*args, **kwargs):
            state = _ACTIVE.get()
            if state is None or not state.uses(self):
                return self.original(*args, **kwargs)
            return state(self, args, kwargs)

        forward.fastguide_hook = self
        self.forward = forward
        module.forward = forward
        # The branch of a per-branch pipeline's call: its `cache_context(name)` also sets _BRANCH.
        self.saved_cache_context = module.__dict__.get("cache_context", _ABSENT)
        self.cache_context = None
        if callable(getattr(module, "cache_context", None)):
            inner = module.cache_context

            @contextlib.contextmanager
            def cache_context(name, *args, **kwargs):
                token = _BRANCH.set(name)
                try:
                    with inner(name, *args, **kwargs):
                        yield
                finally:
                    _BRANCH.reset(token)

            self.cache_context = cache_context
            module.cache_context = cache_context

    @staticmethod
    def of(module):
        """The module's hook, installed on first use."""
        hook = getattr(module.__dict__.get("forward"), "fastguide_hook", None)
        return hook if hook is not None else _Hook(module)

    def live_users(self):
        return [u for u in (ref() for ref in self.users) if u is not None]

    def add(self, state):
        self.users.append(weakref.ref(state, self._dropped))
        self._sync_pag()

    def _dropped(self, ref):
        """An enabled pipeline was garbage-collected without `disable`: as if it had been disabled."""
        self.remove(None)

    def remove(self, state):
        self.users = [ref for ref in self.users if ref() is not None and ref() is not state]
        self._sync_pag()
        if not self.users and self.module.__dict__.get("forward") is self.forward:
            # Unwrap only if nobody wrapped the module after us; otherwise we stay underneath as a pass-through.
            if self.saved_forward is _ABSENT:
                del self.module.forward
            else:
                self.module.forward = self.saved_forward
            if self.cache_context is not None and self.module.__dict__.get("cache_context") is self.cache_context:
                if self.saved_cache_context is _ABSENT:
                    del self.module.cache_context
                else:
                    self.module.cache_context = self.saved_cache_context

    def _sync_pag(self):
        """Switched layers on exactly the layers some user perturbs, each switched the way its perturbation's kind
        says (SwitchedPerturbation processors for PAG / SEG, wrapped forwards for autoguidance's layer skipping);
        the others are put back."""
        wanted = {}
        for user in self.live_users():
            for key in user.pag_layers:
                wanted.setdefault(key, user.perturbation)
        modules = dict(self.module.named_modules())
        for key in sorted(set(wanted) - set(self.pag_saved)):
            self.pag_saved[key] = wanted[key].switch(modules[key[1]], self._select(key))
        for key in sorted(set(self.pag_saved) - set(wanted), reverse=True):  # undo in the reverse order
            self.pag_saved.pop(key)()

    def _select(self, key):
        def select():
            state = _ACTIVE.get()
            if state is None or not state.uses(self) or key not in state.pag_layers:
                return None
            return state.perturbation  # the running pipeline's: PAG's identity attention, SEG's blur, ...
        return select


# --- the per-pipeline class: marks the pipeline's calls -----------------------------------------------
_CLASSES = {}


def _hooked_class(cls):
    """A subclass of `cls` (same name and module, so `type(pipe).__name__` and save_pretrained's model_index
    are unchanged) whose __call__ makes the instance's fastguide state the active one for the duration of the
    call. One per pipeline class; an instance without state (e.g. `type(pipe).from_pipe(pipe)`) runs stock."""
    if "_fastguide_base" in cls.__dict__:
        return cls
    if cls not in _CLASSES:
        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            state = self.__dict__.get("_fastguide")
            if state is None:
                return cls.__call__(self, *args, **kwargs)
            state.begin(inspect.signature(cls.__call__).bind(self, *args, **kwargs))  # checks before any work
            with state.running():
                return cls.__call__(self, *args, **kwargs)

        _CLASSES[cls] = type(cls)(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_fastguide_base": cls})
    return _CLASSES[cls]


# --- the per-pipeline guidance state ------------------------------------------------------------------
class _Guidance:
    """The per-pipeline state: the method and its settings, the step counter, and the guider that runs each
    step: the method's `fastguide.diffusers` twin (the object the modular route uses: same combine, same
    AG / interval / LinearAG logic in its SkipPolicy, same state such as APG's momentum), or for a method
    without a twin (or with per-step scale schedules) a guider around the registry combine. Methods with a
    perturbed branch (PAG) run the registry combine on [uncond, cond, perturbed] directly."""

    def __init__(self, pipe, layout, guidance, params, adaptive=None, interval=None, linear_ag=None, models=None):
        self.method = methods.get(guidance, "fastguide.enable")
        self.models = self._check_models(pipe, models)
        if layout is _ip2p_layout:
            if "middle" not in self.method.branches or not set(self.method.branches) <= {"cond", "middle", "uncond"}:
                usable = sorted(m.name for m in methods.METHODS.values() if "middle" in m.branches)
                raise ValueError(f"fastguide.enable: {type(pipe).__name__} batches [text, image, uncond] (cond, middle, "
                                 f"uncond); guidance={guidance!r} takes {list(self.method.branches)}: use one of {usable}")
            if "middle_scale" not in params:  # the pipeline call's image_guidance_scale
                params = {**params, "middle_scale": None}
        elif not self.method.enable_ready:
            extra = sorted(set(self.method.branches) - set(methods.ENABLE_BRANCHES) - set(self.method.models))
            raise ValueError(f"fastguide.enable: guidance={guidance!r} needs the branches {extra}, which enable cannot "
                             f"build from {type(pipe).__name__}'s batch; run it with "
                             f"fastguide.diffusers.MultiBranchGuidance(method={guidance!r}, ...) as the guider of a "
                             f"modular pipeline (or a pipeline that takes a guider), or call fastguide.ops directly")
        from .skip import check_policy  # (skip.py imports this module's AG / LinearAG: a local import)
        adaptive, interval, linear_ag = check_policy("fastguide.enable", adaptive, interval, linear_ag)
        self.pipe, self.layout, self.guidance = pipe, layout, guidance
        self.params = self.method.check_params(params, "fastguide.enable")
        # Extra prompt branches (dual CFG's middle, Perp-Neg's empty): branch -> prompt or embeddings, checked here;
        # begin() encodes them for each call (extra_embeds: branch -> (embeddings, SDXL's pooled or None)).
        self.prompt_kind = _prompt_kind(pipe, layout)
        self.extra_prompts = self._check_prompts(pipe, layout)
        self.extra_embeds = {}
        policy = adaptive is not None or interval is not None or linear_ag is not None
        twin = self._twin()
        if policy and not (self.method.can_skip_uncond or twin is not None):
            usable = sorted(m.name for m in methods.METHODS.values()
                            if m.can_skip_uncond or (m.twin and m.guider_config and "perturbed" not in m.branches))
            raise ValueError(f"fastguide.enable: adaptive/interval/linear_ag skip rows per sample; guidance={guidance!r} "
                             f"(state across steps or extra branches) is not supported with them yet; use one of {usable}")
        if layout is _pag_layout and "perturbed" in self.method.branches:
            raise ValueError(f"fastguide.enable: guidance={guidance!r} on {type(pipe).__name__}, which perturbs its "
                             f"own layers (pag_applied_layers, pag_scale): use guidance='cfg' (fastguide fuses the "
                             f"pipeline's PAG), or guidance='pag' on the matching non-PAG pipeline")
        self.linear_ag = linear_ag
        self.adaptive, self.interval = adaptive, interval
        self.record = None      # calibration: per-step (cond, uncond) of full-CFG runs
        self.report = Report()
        self.step, self.last_t = -1, None
        self.last = None        # this step's (cond, guided), for SD3's skip-layer call
        self.rows = None        # this step's guided samples: None all, [] none, else their indices
        # State of a method run through the registry combine (PAG, or a method without a twin).
        self.state = self.method.new_state(self.params) if self.method.new_state is not None else None
        self.hooks = {}                     # denoiser attribute -> its _Hook (set by enable)
        self.attr = None                    # the attribute of the denoiser call in progress
        self.pending = None                 # per-branch pipelines: this step's cond call (_Pending)
        self.guided_out = None              # per-branch pipelines: the guided prediction for scheduler.step
        self.batch_branches = True          # per-branch pipelines: both branches in one forward when possible
        self.parallel = None                # fastguide.parallel.RowSplit under enable(parallel=...)
        self.call = None                    # the running pipeline call's arguments
        # PixArt's learned sigma: the denoiser outputs [prediction, sigma] channels and the pipeline drops the
        # sigma half after CFG, so only the first `pred_channels` are guided (norms and spectra included).
        self.pred_channels = None
        self.pag_layers = frozenset()       # names of the layers fastguide's own PAG / SEG perturbs
        self.perturbation = None            # the processor of the perturbed rows on those layers
        self.guider, self.sets_scale = None, False
        if set(self.method.branches) <= {"cond", "uncond"}:
            kw = {"adaptive": adaptive, "interval": interval, "linear_ag": linear_ag}
            if (adaptive is not None and adaptive.space == "x0") or interval is not None:
                kw["scheduler"] = pipe.scheduler  # sigmas and x0 estimates from the pipeline's noise schedule
            self.sets_scale = twin is not None and self.method.scale_params == ("scale",)
            if twin is not None:
                self.guider = twin(**self.method.guider_config({**self.params, "scale": None}), **kw)
            else:
                self.guider = _registry_guider(self._registry_combine, **kw)

    def _check_models(self, pipe, models):
        """enable's models=: exactly the second models the method's branches name (RLG's `ref`, autoguidance's
        `weak`), each a module taking the pipeline denoiser's call arguments, none the denoiser itself."""
        need = set(self.method.model_keys)
        given = {} if models is None else models
        if not isinstance(given, dict) or set(given) != need:
            what = (f"models={{{', '.join(repr(k) + ': <module>' for k in sorted(need))}}}" if need
                    else "no models=")
            raise ValueError(f"fastguide.enable: guidance={self.method.name!r} takes {what}, got "
                             f"{sorted(given) if isinstance(given, dict) else given!r}")
        own = [_unwrap(getattr(pipe, a, None)) for a in ("unet", "transformer", "transformer_2")]
        for key, module in given.items():
            if not callable(module):
                raise TypeError(f"fastguide.enable: models[{key!r}] must be a module (callable like the pipeline's "
                                f"denoiser), got {type(module).__name__}")
            if any(_unwrap(module) is m for m in own if m is not None):
                raise ValueError(f"fastguide.enable: models[{key!r}] is the pipeline's own denoiser; pass the "
                                 f"second model (e.g. an earlier checkpoint, or the reference model)")
        return dict(given)

    def _check_prompts(self, pipe, layout):
        """enable's prompt parameters (`Method.prompts`: dual CFG's middle_prompt, Perp-Neg's empty_prompt) as
        {branch: a str, a list of str (one per prompt) or embeddings}, checked before anything changes."""
        m, name, where = self.method, type(pipe).__name__, "fastguide.enable"
        given = {b: self.params[p] for b, p in m.prompts.items()}
        if layout is _ip2p_layout:  # its middle branch is the image condition, in the pipeline's own batch
            set_ = [m.prompts[b] for b, v in given.items() if v is not None]
            if set_:
                raise ValueError(f"{where}: {name}'s middle branch is its image condition; {set_[0]}= does not apply "
                                 f"there (leave it unset)")
            return {}
        if not given:
            return {}
        if self.prompt_kind is None:
            names = ", ".join(n for group in _PROMPT_PIPELINES.values() for n in group)
            raise ValueError(f"{where}: guidance={m.name!r} needs the {' and '.join(repr(b) for b in given)} prompt "
                             f"branch, which enable builds on {names} (and subclasses), not on {name}: run it with "
                             f"fastguide.diffusers.MultiBranchGuidance(method={m.name!r}, ...) as the guider of a "
                             f"modular pipeline (or of a pipeline that takes a guider), or call fastguide.ops directly")
        sdxl = self.prompt_kind == "sdxl"
        hint = ("(prompt_embeds [n, seq, dim], pooled_prompt_embeds [n, dim]), a tuple of two float tensors" if sdxl
                else "a float tensor [n, seq, dim] like prompt_embeds")
        for branch, value in given.items():
            param = m.prompts[branch]
            if value is None:
                raise ValueError(f"{where}: guidance={m.name!r} on {name} needs {param}=..., the prompt of its "
                                 f"{branch!r} branch ({methods.PROMPT_BRANCHES[branch]}): e.g. enable(pipe, "
                                 f"guidance={m.name!r}, {param}='a photo'); a list gives one per prompt, or pass its "
                                 f"embeddings, {hint}")
            if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
                encoder = ("tokenizer_2", "text_encoder_2") if sdxl else ("tokenizer", "text_encoder")
                missing = [a for a in encoder if getattr(pipe, a, None) is None]
                if missing:
                    raise ValueError(f"{where}: guidance={m.name!r} encodes {param}={value!r} with the pipeline's text "
                                     f"encoder, and {name} has {missing[0]}=None: build the pipeline with it, or pass "
                                     f"{param}= as embeddings, {hint}")
                continue
            tensors = value if sdxl and isinstance(value, tuple) and len(value) == 2 else (value,)
            if not (all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors)
                    and [t.dim() for t in tensors] == ([3, 2] if sdxl else [3])
                    and tensors[0].shape[0] == tensors[-1].shape[0]):
                got = (tuple(f"{type(t).__name__}{list(t.shape) if isinstance(t, torch.Tensor) else ''}" for t in value)
                       if isinstance(value, (tuple, list)) else
                       f"{type(value).__name__}{list(value.shape) if isinstance(value, torch.Tensor) else ''}")
                raise ValueError(f"{where}: {param} must be a str, a non-empty list of str (one per prompt) or its "
                                 f"embeddings on {name}, {hint}; got {got}")
        return given

    def _twin(self):
        """The method's fastguide.diffusers guider class when enable can drive it: a cond / uncond guider with
        at most a `scale` that is a number (a schedule or a per-sample tensor scale goes through the registry
        combine, which takes them)."""
        m = self.method
        if m.twin is None or m.guider_config is None or m.branches != ("cond", "uncond") or m.perturbation is not None:
            return None  # (a perturbation's layers are enable's own: the registry combine runs the step)
        if m.scale_params not in ((), ("scale",)):
            return None
        if m.scale_params and not (self.params["scale"] is None or isinstance(self.params["scale"], (int, float))):
            return None
        from . import diffusers as fgd
        twin = getattr(fgd, m.twin, None)
        return twin if isinstance(twin, type) and issubclass(twin, fgd._Skipping) else None

    def _registry_combine(self, cond, uncond, rows=None):
        return self._combine(cond, uncond, None)

    def begin(self, call):
        """An enabled pipeline call starts (`call`: its bound arguments): check it against the settings, then
        start a new trajectory. Runs before the pipeline does any work."""
        name = type(self.pipe).__name__
        call.apply_defaults()
        self.call = call.arguments
        for attr, hook in self.hooks.items():
            if _unwrap(getattr(self.pipe, attr, None)) is not hook.module:
                raise RuntimeError(f"fastguide: {name}.{attr} was replaced after fastguide.enable; call "
                                   f"fastguide.enable(pipe, ...) again so the new {attr} is guided")
        if self.layout is _pag_layout:
            pag_scale = self.call["pag_scale"]
            fusable = self.guidance == "cfg" and not (self.adaptive or self.interval or self.linear_ag)
            if pag_scale > 0 and self.pipe.pag_applied_layers and self.call["guidance_scale"] > 1 and not fusable:
                extra = " and adaptive/interval/linear_ag" if self.guidance == "cfg" else ""
                raise ValueError(f"fastguide: {name} called with pag_scale={pag_scale} batches [uncond, cond, "
                                 f"perturbed]; fastguide fuses that with plain guidance='cfg' only, this pipeline is "
                                 f"enabled with guidance={self.guidance!r}{extra}. Pass pag_scale=0 to use it on plain "
                                 f"CFG, or use the non-PAG pipeline with guidance='pag'")
        if self.linear_ag is not None or self.record is not None:
            sch = self.pipe.scheduler
            if hasattr(type(sch), "state_in_first_order"):
                raise ValueError(f"fastguide LinearAG: {type(sch).__name__} evaluates the model twice per step; "
                                 f"LinearAG predicts one unconditional pass per step from the previous one, so it "
                                 f"needs a scheduler with one evaluation per step (e.g. Euler, DPMSolverMultistep)")
        if (self.linear_ag is not None and "num_inference_steps" in self.call
                and self.call["num_inference_steps"] != self.linear_ag.num_inference_steps):
            raise ValueError(f"fastguide LinearAG: calibrated for {self.linear_ag.num_inference_steps} steps, the "
                             f"pipeline is called with num_inference_steps={self.call['num_inference_steps']}")
        self.extra_embeds = self._encode_prompts() if self.extra_prompts else {}
        self.step, self.last_t, self.last, self.rows = -1, None, None, None
        self.pending = self.guided_out = None
        self.report = Report()
        self.pipe.fastguide_report = self.report
        if self.method.reset_state is not None:
            self.method.reset_state(self.state)

    def _scale(self, name="scale"):
        """A scale setting: None follows the pipeline call's guidance_scale; a callable is a per-step schedule
        `f(step, timestep) -> float or tensor` (a tensor scale changes per step without recompiling)."""
        value = self.params[name]
        if value is None and name in _PIPELINE_SCALES.get(self.layout, {}):
            return float(getattr(self.pipe, _PIPELINE_SCALES[self.layout][name]))
        if value is None and isinstance(self.layout, _Branches):
            return float(self.layout.scale(self, self.attr))
        if value is None:  # the pipeline's property when it has one: step callbacks may change it mid-call
            has_property = isinstance(getattr(type(self.pipe), "guidance_scale", None), property)
            return float(self.pipe.guidance_scale if has_property else self.call["guidance_scale"])
        return value(self.step, self.last_t) if callable(value) else value

    def _new_step(self, timestep):
        """Count the steps of the trajectory: "step" is the index into the user's num_inference_steps. A
        second-order scheduler (Heun, KDPM2, DPM-SDE) evaluates the model twice per step and says which
        evaluation it is at with `state_in_first_order`; both evaluations share the step index (and the
        guider's decisions for it). Multistep solvers (DPM++ 2M) and first-order ones evaluate once per step.
        Then the guider's step starts as in the guider protocol: set_state, prepare_inputs."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        first = self.step < 0 or getattr(self.pipe.scheduler, "state_in_first_order", True)
        if first:
            self.step += 1
        self.last_t = t
        self.report.steps = self.step + 1
        g = self.guider
        if g is not None:
            if self.sets_scale:
                g.guidance_scale = self._scale()  # the pipeline's scale at this step (callbacks may change it)
            if first:
                g.set_state(self.step, self.call.get("num_inference_steps"), t)
                g.prepare_inputs({})  # diffusers' guiders start their per-trajectory state here (APG momentum)
            elif g._skip is not None:
                g._skip.in_step = True  # the second evaluation of the step: the same rows
            self.rows = [] if g.num_conditions == 1 else (g._skip.rows if g._skip is not None else None)
        return t

    def guide(self, cond, uncond, perturbed):
        """The registry combine on this step's predictions, its scales resolved for this step (PAG)."""
        c = self.pred_channels
        if c is not None:
            part = lambda x: x[:, :c].contiguous() if x is not None else None  # noqa: E731
            return torch.cat([self._combine(part(cond), part(uncond), part(perturbed)), cond[:, c:]], dim=1)
        return self._combine(cond, uncond, perturbed)

    def _combine(self, cond, uncond, perturbed):
        return self._combine_preds({"cond": cond, "uncond": uncond, "perturbed": perturbed})

    def _combine_preds(self, preds):
        p = dict(self.params)
        for name in self.method.scale_params:
            p[name] = self._scale(name)
        return self.method.combine(preds, p, self.state, self.step)

    def _run_guider(self, cond, uncond, x):
        """This step's guided prediction from the guider: `cond` for every sample, `uncond` for this step's
        guided rows (None when there are none), `x` the denoiser's input of the cond rows (AG in x0 space)."""
        c = self.pred_channels
        part = (lambda v: v[:, :c].contiguous() if v is not None else None) if c is not None else (lambda v: v)  # noqa: E731
        self.guider._sample = part(x) if x is not None and c is not None and x.shape[1] != c else x
        # ["pred"], not .pred: under a compiled denoiser (this runs inside its forward, so dynamo compiles the
        # guider's forward as a frame of its own) dynamo hands back the GuiderOutput rebuilt from its dict entries
        # only, without the dataclass attributes: `.pred` raises AttributeError (torch 2.13, diffusers 0.42;
        # test_pipelines.test_works_with_torch_compile_of_the_denoiser runs this route).
        pred = self.guider.forward(part(cond), part(uncond))["pred"]
        skip = self.guider._skip
        if skip is not None:
            self.report.ag_switch_step = list(skip.report.ag_switch_step)
        if self.record is not None and uncond is not None and uncond.shape[0] == cond.shape[0]:
            self.record.append((cond.detach().clone(), uncond.detach().clone()))
        return torch.cat([pred, cond[:, c:]], dim=1) if c is not None else pred

    def _guided(self, out, cond, guided, copies=2):
        """Return `guided` in every CFG slot of the output; remember (cond, guided) for a skip-layer call."""
        self.last = (cond, guided)
        return _with_prediction(out, torch.cat([guided] * copies))

    def uses(self, hook):
        return any(h is hook for h in self.hooks.values())

    @contextlib.contextmanager
    def running(self):
        """The pipeline's call in progress: this state is the active one, and for per-branch pipelines the
        scheduler's `step` takes the guided prediction in place of the pipeline's own combine."""
        token = _ACTIVE.set(self)
        sch = self.pipe.scheduler if isinstance(self.layout, _Branches) else None
        saved = sch.__dict__.get("step", _ABSENT) if sch is not None else None
        if sch is not None:
            inner = sch.step

            @functools.wraps(inner)
            def step(model_output, *args, **kwargs):
                if _ACTIVE.get() is self:
                    model_output = self._take_guided(model_output)
                return inner(model_output, *args, **kwargs)

            sch.step = step
        try:
            yield
        finally:  # also when the call raises: the next call must not see this pipeline as running
            if sch is not None and sch.__dict__.get("step") is step:
                if saved is _ABSENT:
                    del sch.step
                else:
                    sch.step = saved
            _ACTIVE.reset(token)

    def __call__(self, hook, args, kwargs):
        forward = hook.original
        self.attr = next(a for a, h in self.hooks.items() if h is hook)
        bound = hook.signature.bind(*args, **kwargs)
        layout = self.layout(self, bound)
        if layout is None:
            return forward(*args, **kwargs)
        if self.parallel is not None and layout != "slg":
            # branch-parallel: each denoiser call runs this rank's rows, one all-gather rebuilds the batch
            forward = self.parallel.wrap(forward, self)
        if layout == "branch":
            return self._branch_call(forward, bound)
        if layout == "slg":
            return self._skip_layer_call(forward, args, kwargs)
        self._new_step(bound.arguments["timestep"])
        if layout == "pag":
            return self._pipeline_pag_call(forward, bound, bound.arguments["timestep"])
        if layout == "ip2p":
            out = forward(*bound.args, **bound.kwargs)
            pred = _prediction(out)
            self.report.nfe += pred.shape[0]
            text, image, uncond = pred.chunk(3)
            g = self._combine_preds({"cond": text, "middle": image, "uncond": uncond})
            return self._guided(out, text, g, copies=3)
        if "perturbed" in self.method.branches:
            return self._perturbed_call(forward, bound)
        if self.method.models:
            return self._models_call(forward, bound)
        if self.extra_prompts:
            return self._prompt_call(forward, bound)
        return self._cfg_call(forward, bound)

    def _models_call(self, forward, bound):
        """Methods with a second model's branches (RLG's reference model, autoguidance's weak model): the
        pipeline's denoiser runs the prompt batches the method takes from it (only the cond rows when it needs no
        uncond), each second model the prompt batches its branches run on: one forward per model and step."""
        sample_name = next(iter(bound.arguments))
        batch = bound.arguments[sample_name].shape[0]
        half = batch // 2

        def run(fn, prompts):
            rows = (list(range(half)) if "uncond" in prompts else []) + (list(range(half, batch)) if "cond" in prompts else [])
            args = bound if len(rows) == batch else _select_rows(bound, batch, rows)
            out = fn(*args.args, **args.kwargs)
            pred = _prediction(out)
            self.report.nfe += pred.shape[0]
            parts = [p for p in ("uncond", "cond") if p in prompts]
            return out, dict(zip(parts, pred.split(half)))

        own = [b for b in self.method.branches if b not in self.method.models]
        out, preds = run(forward, set(own) | {"cond"})
        by_key = {}
        for branch, (key, prompt) in self.method.models.items():
            by_key.setdefault(key, {})[branch] = prompt
        for key, branches in sorted(by_key.items()):
            _, parts = run(self.models[key], set(branches.values()))
            preds.update({branch: parts[prompt] for branch, prompt in branches.items()})
        return self._guided(out, preds["cond"], self._combine_preds(preds))

    def _encode_prompts(self):
        """This call's embeddings of the extra prompt branches, {branch: (embeddings [n, seq, dim], SDXL's pooled
        [n, dim] or None)}: a prompt is encoded the way the pipeline encodes its own (its text encoder(s), the call's
        clip_skip and LoRA scale), once per call and per pipeline (nothing is shared with other pipelines on the same
        modules); n is 1 or the call's number of prompts. Checked against the call before the pipeline does any work."""
        call, pipe, sdxl = self.call, self.pipe, self.prompt_kind == "sdxl"
        prompt, given = call.get("prompt"), call.get("prompt_embeds")
        n_call = (1 if isinstance(prompt, str) else len(prompt) if isinstance(prompt, list)
                  else given.shape[0] if given is not None else None)
        out = {}
        for branch, value in self.extra_prompts.items():
            param = self.method.prompts[branch]
            if isinstance(value, torch.Tensor):
                emb, pooled = value, None
            elif isinstance(value, tuple):
                emb, pooled = value
            else:
                lora = (call.get("cross_attention_kwargs") or {}).get("scale")
                with torch.no_grad():
                    enc = pipe.encode_prompt(prompt=[value] if isinstance(value, str) else list(value),
                                             device=pipe._execution_device, num_images_per_prompt=1,
                                             do_classifier_free_guidance=False, lora_scale=lora,
                                             clip_skip=call.get("clip_skip"))
                emb, pooled = enc[0], (enc[2] if sdxl else None)
            if n_call is not None and emb.shape[0] not in (1, n_call):
                raise ValueError(f"fastguide: {param} holds {emb.shape[0]} prompts, the call {n_call}: give one, or "
                                 f"one per prompt")
            for mine, theirs, what in ((emb, given, "prompt_embeds"), (pooled, call.get("pooled_prompt_embeds"),
                                                                        "pooled_prompt_embeds")):
                if mine is not None and theirs is not None and mine.shape[1:] != theirs.shape[1:]:
                    raise ValueError(f"fastguide: {param}'s embeddings are {list(mine.shape)}, the call's {what} "
                                     f"{list(theirs.shape)}: one denoiser batch needs the same sequence length and "
                                     f"width (encode both with the same tokenizer length)")
            out[branch] = (emb, pooled)
        return out

    def _prompt_call(self, forward, bound):
        """Extra prompt branches (dual CFG's middle, Perp-Neg's empty): [uncond, cond] -> [uncond, cond, extra...],
        one forward of (2 + k) B rows. Each extra part is the cond rows of every input batched like the latents
        (latents, SDXL's time ids) with that prompt's embeddings as encoder_hidden_states (SDXL: its pooled
        embeddings as added_cond_kwargs["text_embeds"])."""
        args = bound.arguments
        batch = args[next(iter(args))].shape[0]
        half = batch // 2
        hs = args["encoder_hidden_states"]
        added = args.get("added_cond_kwargs")
        branches = [b for b in self.method.branches if b in self.extra_embeds]
        new = {k: _map_batched(v, batch, lambda t: torch.cat([t] + [t[half:]] * len(branches)))
               for k, v in args.items()}
        embs = [self._extra_rows(self.extra_embeds[b][0], hs, half, b) for b in branches]
        new["encoder_hidden_states"] = torch.cat([hs] + embs)
        if self.prompt_kind == "sdxl":
            te = added["text_embeds"]
            pooled = [self._extra_rows(self.extra_embeds[b][1], te, half, b) for b in branches]
            new["added_cond_kwargs"] = {**new["added_cond_kwargs"], "text_embeds": torch.cat([te] + pooled)}
        bound = _rebound(bound, new)
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += pred.shape[0]
        uncond, cond, *extra = pred.split(half)
        g = self._combine_preds({"cond": cond, "uncond": uncond, **dict(zip(branches, extra))})
        return self._guided(out, cond, g)

    def _extra_rows(self, value, like, rows, branch):
        """An extra prompt's [n, ...] embeddings as `rows` rows batched like `like`: each of the n repeated for the
        rows of its prompt (the pipeline's order: num_images_per_prompt consecutive rows per prompt)."""
        if value.shape[1:] != like.shape[1:] or rows % value.shape[0]:
            param = self.method.prompts[branch]
            raise ValueError(f"fastguide: {param}'s embeddings {list(value.shape)} do not fit the denoiser's "
                             f"{list(like.shape)} ({rows} samples): same sequence length and width needed (encode it "
                             f"like the prompt), one entry or one per prompt")
        return value.to(like.device, like.dtype).repeat_interleave(rows // value.shape[0], 0)

    def _cfg_call(self, forward, bound):
        """A [uncond, cond] call: the uncond rows of this step's guided samples only (all, some or none), the
        cond rows of every sample; the guider combines them."""
        sample_name = next(iter(bound.arguments))  # sample / hidden_states: the batched latents
        batch = bound.arguments[sample_name].shape[0]
        half = batch // 2
        rows = self.rows
        if rows is not None:  # uncond rows still needed, then every cond row
            bound = _select_rows(bound, batch, rows + list(range(half, batch)))
        n = half if rows is None else len(rows)
        with self._perturbing({"uncond": (0, n), "cond": (n, n + half)}.get(self.method.perturbed_branch), n + half):
            out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += n + half
        self.report.nfe_skipped += half - n
        cond = pred[n:]
        g = self._run_guider(cond, pred[:n] if n else None, bound.arguments[sample_name][n:])
        return self._guided(out, cond, g)

    @contextlib.contextmanager
    def _perturbing(self, span, batch):
        """While the denoiser call runs: the perturbation acts on its rows span = (start, stop) of `batch` (a
        method perturbing a branch of the pipeline's own batch, autoguidance's uncond rows); none when span is
        None."""
        if span is None:
            yield
            return
        self.perturbation.rows = (*span, batch)
        try:
            yield
        finally:
            self.perturbation.rows = None

    def _perturbed_call(self, forward, bound):
        """PAG: [uncond, cond] -> [uncond, cond, cond], every input batched like the latents gets its cond half
        again; the chosen layers' gated processors make the third part the perturbed branch."""
        batch = bound.arguments[next(iter(bound.arguments))].shape[0]
        half = batch // 2
        for name, value in bound.arguments.items():
            bound.arguments[name] = _map_batched(value, batch, lambda v: torch.cat([v, v[half:]]))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += pred.shape[0]
        uncond, cond, perturbed = pred.chunk(3)
        return self._guided(out, cond, self.guide(cond, uncond, perturbed))

    def _skip_layer_call(self, forward, args, kwargs):
        """SD3's skip-layer call (conditional rows only, after the CFG call): runs untouched. The pipeline adds
        (cond - skip) * skip_layer_guidance_scale using the second half of the CFG output as cond; that half is
        our guided g, so the skip prediction is returned shifted by (g - cond): g + (g - (skip + g - cond)) * s
        = g + (cond - skip) * s, the stock term on fastguide's guided prediction."""
        out = forward(*args, **kwargs)
        pred = _prediction(out)
        self.report.nfe += pred.shape[0]
        if self.last is None:
            return out
        cond, guided = self.last
        return _with_prediction(out, pred + (guided - cond))

    def _pipeline_pag_call(self, forward, bound, timestep):
        """diffusers' PAG pipelines batch [uncond, cond, perturbed] and perturb their own layers; fastguide
        fuses their arithmetic, uncond + scale (cond - uncond) + pag_scale (cond - perturbed), into one pass
        with the pipeline's (possibly adaptive) pag_scale, and returns [g, g, g]."""
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += pred.shape[0]
        uncond, cond, perturbed = pred.chunk(3)
        g = ops.pag(cond, uncond, perturbed, self._scale(), float(self.pipe._get_pag_scale(timestep)),
                    rescale=self.params["rescale"], original=self.params["original"])
        return self._guided(out, cond, g, copies=3)

    # --- per-branch pipelines (Flux true CFG, QwenImage, Wan, HunyuanVideo) ---------------------------
    def _branch_call(self, forward, bound):
        branch = _BRANCH.get()
        name = type(self.pipe).__name__
        if branch == "cond":
            return self._cond_call(forward, bound)
        if branch == "uncond":
            return self._uncond_call(forward, bound)
        raise RuntimeError(f"fastguide: {name} called its denoiser outside cache_context('cond') / ('uncond') "
                           f"(got {branch!r}) while guiding; fastguide supports this pipeline's own loop only")

    def _cond_call(self, forward, bound):
        if self.pending is not None or self.guided_out is not None:
            raise RuntimeError(f"fastguide: {type(self.pipe).__name__} ran a second cond call before the uncond "
                               f"call and scheduler.step of the step; fastguide supports this pipeline's own loop only")
        sample = bound.arguments[next(iter(bound.arguments))]
        self._new_step(bound.arguments["timestep"] * self.layout.timestep_scale)
        if self.batch_branches and self.layout.defer and bound.arguments.get("return_dict") is False and self.rows != []:
            # Deferred: the pipeline keeps this buffer as its cond prediction and reads it only after the
            # uncond call, which fills it (one forward of both branches where possible).
            buffer = torch.empty_like(sample)
            if os.environ.get("FASTGUIDE_POISON_OUTPUTS") == "1":  # the test suite: unfilled shows as NaN
                buffer.fill_(float("nan"))
            self.pending = _Pending(bound, buffer, None)
            return (buffer,)
        out = forward(*bound.args, **bound.kwargs)
        self.report.nfe += sample.shape[0]
        self.pending = _Pending(bound, None, out)
        return out

    def _uncond_call(self, forward, bound):
        pending, self.pending = self.pending, None
        name = type(self.pipe).__name__
        if pending is None:
            raise RuntimeError(f"fastguide: {name} ran an uncond call without a cond call first in the step; "
                               f"fastguide supports this pipeline's own loop only")
        x = bound.arguments[next(iter(bound.arguments))]
        batch = x.shape[0]
        guided = list(range(batch)) if self.rows is None else self.rows
        gidx = torch.tensor(guided, dtype=torch.long, device=x.device)
        # the uncond rows of the still-guided samples only
        uncond_args = bound if len(guided) == batch else _select_rows(bound, batch, guided)
        out, uncond = None, None
        if pending.out is None:  # deferred cond call: both branches in one forward when the arguments allow
            merged = _merge_calls(pending.bound, uncond_args, batch) if guided else None
            if merged is not None:
                out = forward(*merged.args, **merged.kwargs)
                pred = _prediction(out)
                cond, uncond = pred[:batch], pred[batch:]
                self.report.branch_batched += 1
            else:
                cond = _prediction(forward(*pending.bound.args, **pending.bound.kwargs))
            if cond.shape != pending.buffer.shape:
                raise RuntimeError(f"fastguide: {name}'s denoiser returned shape {tuple(cond.shape)}, not its input's "
                                   f"{tuple(pending.buffer.shape)}; enable(..., batch_branches=False) runs the branches "
                                   f"as the pipeline does")
            pending.buffer.copy_(cond)
            cond = pending.buffer
            self.report.nfe += batch
        else:
            out = pending.out
            cond = _prediction(out)
        if uncond is None and guided:
            out = forward(*uncond_args.args, **uncond_args.kwargs)
            uncond = _prediction(out)
        self.report.nfe += len(guided)
        self.report.nfe_skipped += batch - len(guided)
        result = self._run_guider(cond, uncond, x)
        if len(guided) == batch:
            full_uncond = uncond
        else:  # unguided samples: the pipeline sees uncond == cond there (its combine is replaced anyway)
            full_uncond = cond.clone()
            if guided:
                full_uncond.index_copy_(0, gidx, uncond)
        if self.layout.post is not None:
            result = self.layout.post(cond, result)
        self.guided_out = result
        if out is None or isinstance(out, tuple):
            return (full_uncond,) + (tuple(out[1:]) if isinstance(out, tuple) else ())
        return _with_prediction(copy.copy(out), full_uncond)

    def _take_guided(self, model_output):
        """scheduler.step of a per-branch pipeline: the guided prediction of this step, if it guided."""
        if self.pending is not None:
            self.pending = None
            raise RuntimeError(f"fastguide: {type(self.pipe).__name__} stepped after a cond call without its "
                               f"uncond call; fastguide supports this pipeline's own loop only")
        guided, self.guided_out = self.guided_out, None
        if guided is None:
            return model_output
        if guided.shape != model_output.shape:
            raise RuntimeError(f"fastguide: {type(self.pipe).__name__} passed scheduler.step a prediction of shape "
                               f"{tuple(model_output.shape)}, its guided prediction has {tuple(guided.shape)}")
        return guided.to(model_output.dtype)


_REGISTRY_GUIDER = None


def _registry_guider(combine, **policy):
    """A fastguide guider (the guider protocol, the SkipPolicy of AG / interval / LinearAG) whose combine is
    `combine(cond, uncond, rows)`: enable's route for a registry method without a twin guider, or with
    per-step / per-sample scales. Always guiding (its scales are the method's, not a guidance_scale)."""
    global _REGISTRY_GUIDER
    if _REGISTRY_GUIDER is None:
        from . import diffusers as fgd

        class RegistryGuidance(fgd.ClassifierFreeGuidance):
            def _is_cfg_enabled(self):
                return self._enabled

            def _guide(self, pred_cond, pred_uncond, rows=None):
                return self._combine(pred_cond, pred_uncond, rows)

        _REGISTRY_GUIDER = RegistryGuidance
    guider = _REGISTRY_GUIDER(**policy)
    guider._combine = combine
    return guider


@dataclass
class _Pending:
    bound: object     # the cond call's bound arguments
    buffer: object    # deferred: the tensor the pipeline holds as its cond prediction, filled by the uncond call
    out: object       # not deferred: the cond call's output


def _rebound(bound, arguments):
    new = bound.signature.bind_partial()
    new.arguments.update(arguments)
    return new


def _select_rows(bound, batch, rows):
    """The call's arguments with every input batched like the latents reduced to `rows` (indices)."""
    idx = torch.tensor(rows, dtype=torch.long, device=bound.arguments[next(iter(bound.arguments))].device)
    return _rebound(bound, {k: _map_batched(v, batch, lambda t: t.index_select(0, idx.to(t.device)))
                            for k, v in bound.arguments.items()})


_DIFFERENT = object()


def _merge_value(a, b, batch, n):
    """One argument of the two calls as one call of batch + n rows, or _DIFFERENT."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dim() > 0 and a.shape[0] == batch and b.dim() > 0 and b.shape[0] == n:
            if a.shape[1:] != b.shape[1:] or a.dtype != b.dtype or a.device != b.device:
                return _DIFFERENT
            return torch.cat([a, b])
        return a if a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)) else _DIFFERENT
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return _DIFFERENT
        merged = {k: _merge_value(a[k], b[k], batch, n) for k in a}
        return _DIFFERENT if any(v is _DIFFERENT for v in merged.values()) else merged
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == batch and len(b) == n and batch != n:
        return type(a)(list(a) + list(b))  # per-sample lists (e.g. image shapes)
    try:
        return a if a is b or bool(a == b) else _DIFFERENT
    except Exception:  # noqa: BLE001 - values that do not compare: not mergeable
        return _DIFFERENT


def _merge_calls(cond, uncond, batch):
    """The cond call's and the uncond call's arguments as one call: tensors batched like the latents
    concatenated (cond rows first), everything else identical in both; None when they differ (e.g. prompts of
    different token lengths), and the branches then run as two calls."""
    n = uncond.arguments[next(iter(uncond.arguments))].shape[0]
    if cond.arguments.keys() != uncond.arguments.keys():
        return None
    merged = {}
    for key in cond.arguments:
        value = _merge_value(cond.arguments[key], uncond.arguments[key], batch, n)
        if value is _DIFFERENT:
            return None
        merged[key] = value
    return _rebound(cond, merged)


def _prediction(out):
    return out[0] if isinstance(out, tuple) else out.sample


def _with_prediction(out, pred):
    """The denoiser's output with `pred` as its prediction."""
    if isinstance(out, tuple):
        return (pred,) + tuple(out[1:])
    out.sample = pred
    return out


def _map_batched(value, batch, fn):
    """Apply fn to every tensor batched like the latents (dim 0 == batch), inside dicts too (SDXL's added_cond_kwargs)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return fn(value)
    if isinstance(value, dict):
        return {k: _map_batched(v, batch, fn) for k, v in value.items()}
    return value


def enable(pipe, guidance="cfg", *, adaptive=None, interval=None, linear_ag=None, batch_branches=True, parallel=None,
           models=None, **params):
    """Make `pipe`'s classifier-free guidance compute `guidance` with fastguide's fused ops.

    guidance: "cfg" (scale, rescale, original), "apg" (scale, eta, norm_threshold, momentum, norm_dim,
    rescale, original), "pag" (scale, pag_scale, layers, rescale, original), "cfg_zero_star" (scale,
    zero_init_steps, rescale, original), "frequency" (scale_low, scale_high, method, cutoff, size, rescale,
    original), "fdg" (scales, parallel_weights, rescale, original), "autoguidance" (scale, layers, skip, dropout,
    rescale, original: diffusers' AutoGuidance, `layers` skipped on the uncond rows of the one forward; see
    fastguide.attention.LayerSkip), and the rest of fastguide.METHODS. A scale left as None follows the
    pipeline call's guidance_scale; a callable `f(step, timestep)` is a per-step schedule (step: the index
    into num_inference_steps; both evaluations of a second-order step share it).
    adaptive=fastguide.AG(threshold): Adaptive Guidance, per sample. interval=(sigma_lo, sigma_hi):
    limited-interval guidance (Kynkaeaenniemi et al. 2024), no unconditional pass outside it. With either,
    the denoiser runs only the rows that are needed; `pipe.fastguide_report` counts the evaluations.
    linear_ag=calibrate_linear_ag(...): LinearAG, predicted unconditional passes (deviates from the model).
    models={key: module}: the second models of a method whose branches come from another model
    (guidance="rlg": models={"ref": base_unet}; guidance="weak_model": models={"weak": early_unet}); each runs
    on the same (sliced) call arguments as the pipeline's denoiser, one forward per step.
    Extra prompt branches (StableDiffusion / StableDiffusionXL pipelines and their img2img / inpaint variants):
    guidance="perp_neg" (scale, neg_scale, per_sample, empty_prompt="") and guidance="dual_cfg" (scale,
    middle_scale, nested, middle_prompt: required, ComfyUI DualCFGGuider's second condition) encode that prompt
    with the pipeline's text encoder(s) at each call (a list: one per prompt; or its embeddings, SDXL (embeddings,
    pooled)) and run [uncond, cond, extra] as one forward of 3B rows. On StableDiffusionInstructPix2PixPipeline
    dual_cfg's middle is the image condition of its own [text, image, uncond] batch (no middle_prompt).
    batch_branches: pipelines that call the denoiser once per branch (Flux true CFG, QwenImage, Wan,
    HunyuanVideo) get both branches in one forward of 2B rows where the two calls' arguments allow it
    (`pipe.fastguide_report.branch_batched` counts those steps); False runs them as two calls, as stock.

    The settings belong to `pipe`: they apply only while `pipe(...)` runs, so other pipelines sharing its
    denoiser (from_pipe, modular pipelines, a second pipeline on the same UNet) run stock or their own
    settings. Returns the pipeline.

    parallel=True (or a torch.distributed ProcessGroup): branch-parallel over that group (see
    `fastguide.parallel`; `fastguide.parallel.init_from_env()` under torchrun): each rank evaluates its share
    of the guidance batch, one all-gather per step gives every rank the same guided result.
    """
    group = _parallel_group(parallel)
    if _takes_guider(pipe) and not _has_pattern(pipe):
        _enable_guider(pipe, guidance, params, adaptive, interval, linear_ag, models)
        if group is not False:
            from .parallel import distribute
            distribute(pipe.guider, group)
        return pipe
    attr, layout = _pattern(pipe)
    denoiser = _unwrap(getattr(pipe, attr))
    state = _Guidance(pipe, layout, guidance, params, adaptive, interval, linear_ag, models)  # validates first
    attrs = [attr]
    if isinstance(layout, _Branches):
        name = type(pipe).__name__
        if "perturbed" in state.method.branches:
            raise ValueError(f"fastguide.enable: guidance={guidance!r} needs a perturbed branch; {name} calls its "
                             f"denoiser once per branch (cond, uncond) and has none. Use a two-branch method: "
                             f"{sorted(m.name for m in methods.METHODS.values() if m.branches == ('cond', 'uncond'))}")
        if state.method.perturbed_branch is not None:
            raise ValueError(f"fastguide.enable: guidance={guidance!r} perturbs the {state.method.perturbed_branch} rows "
                             f"of the batch; {name} calls its denoiser once per branch, which is not supported yet: "
                             f"use a pipeline that batches [uncond, cond] (SD, SDXL, SD3, PixArt)")
        if state.method.models:
            raise ValueError(f"fastguide.enable: guidance={guidance!r} (a second model's branches) on {name}, which "
                             f"calls its denoiser once per branch, is not supported yet; use a pipeline that batches "
                             f"[uncond, cond] (SD, SDXL, SD3, PixArt) or fastguide.diffusers.MultiBranchGuidance")
        if linear_ag is not None:
            raise ValueError(f"fastguide.enable: linear_ag on {name} (one denoiser call per branch) is not supported; "
                             f"use adaptive= or interval=, which skip its uncond calls")
        if getattr(pipe, "transformer_2", None) is not None:  # Wan 2.2: the low-noise expert, guidance_scale_2
            attrs.append("transformer_2")
    if not isinstance(batch_branches, bool):
        raise TypeError(f"fastguide.enable: batch_branches must be True or False, got {batch_branches!r}")
    state.batch_branches = batch_branches
    if state.method.perturbed_branch is not None:  # validates the settings and layer specs; nothing is changed yet
        make = state.method.perturbation
        state.perturbation = make(state.params) if make is not None else IdentityPAGProcessor(chunks=3)
        kind = state.perturbation.kind
        state.pag_layers = frozenset((kind, name) for name in state.perturbation.layers(denoiser, state.params["layers"]))
        if linear_ag is not None and state.method.perturbed_branch in ("cond", "uncond"):
            raise ValueError(f"fastguide.enable: linear_ag with guidance={guidance!r}: LinearAG predicts the plain "
                             f"model's uncond pass (calibrate_linear_ag runs CFG), this method's "
                             f"{state.method.perturbed_branch} rows run the perturbed model; use adaptive= or interval=")
    if group is not False:
        if state.extra_prompts:
            raise ValueError(f"fastguide.enable: parallel=... with guidance={guidance!r}'s extra prompt branch on a "
                             f"classic pipeline is not supported yet; use fastguide.diffusers.MultiBranchGuidance with "
                             f"fastguide.parallel.distribute")
        if layout is _pag_layout or state.method.perturbed_branch is not None:
            raise ValueError(f"fastguide.enable: parallel=... with guidance={guidance!r} on a classic pipeline is not "
                             f"supported (its perturbed rows need the whole batch in one call); use its "
                             f"fastguide.diffusers guider with fastguide.parallel.distribute")
        from .parallel import RowSplit
        state.parallel = RowSplit(group)
    config = getattr(denoiser, "config", None)
    if layout is _call_scale_layout and config is not None and config.out_channels == 2 * config.in_channels:
        state.pred_channels = config.in_channels
    disable(pipe)
    for a in attrs:
        hook = _Hook.of(_unwrap(getattr(pipe, a)))
        state.hooks[a] = hook
        hook.add(state)
    pipe.__class__ = _hooked_class(type(pipe))
    pipe._fastguide = state
    return pipe


def _parallel_group(parallel):
    """enable's parallel=: None / False (off: returns False), True (the default process group: None) or a
    ProcessGroup. Checked before enable changes anything."""
    if parallel is None or parallel is False:
        return False
    import torch.distributed as dist
    if parallel is not True and not isinstance(parallel, dist.ProcessGroup):
        raise TypeError(f"fastguide.enable: parallel must be True, False/None or a torch.distributed ProcessGroup, "
                        f"got {type(parallel).__name__}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastguide.enable: parallel=... needs a process group; call "
                           "fastguide.parallel.init_from_env() (under torchrun) first")
    return None if parallel is True else parallel


# --- pipelines that take a guider ---------------------------------------------------------------------
def _takes_guider(pipe):
    """A pipeline with a `guider` component (diffusers' guider protocol: HunyuanImage, MotifVideo, the lab's
    DigitsPipeline, ...): enable installs the method's fastguide guider there, the same object the modular
    route uses, instead of wrapping the denoiser."""
    return _is_pipeline(pipe) and "guider" in getattr(pipe, "config", {})


def _has_pattern(pipe):
    return any(isinstance(pipe, cls) for cls, _, _ in _patterns())


@dataclass
class _GuiderRoute:
    previous: object  # the guider the pipeline had
    guider: object    # the fastguide guider enable installed


def _enable_guider(pipe, guidance, params, adaptive, interval, linear_ag, models=None):
    from . import diffusers as fgd
    from .skip import check_policy
    method = methods.get(guidance, "fastguide.enable")
    where = f"fastguide.enable({type(pipe).__name__})"
    p = method.check_params(params, "fastguide.enable")
    if (method.guider_config is None or method.twin is None) and "perturbed" not in method.branches:
        # no diffusers twin (dual CFG, Perp-Neg, RLG, weak_model, ...): the registry guider runs the combine
        if adaptive is not None or interval is not None or linear_ag is not None:
            usable = sorted(m.name for m in methods.METHODS.values() if m.guider_config is not None)
            raise ValueError(f"{where}: adaptive/interval/linear_ag need a twin guider; guidance={guidance!r} has none, "
                             f"use one of {usable}")
        # a number `scale` becomes the guider's guidance_scale (a float in its config); a tensor one (per-sample)
        # stays a combine parameter, which takes tensors
        tensor_scale = isinstance(p.get("scale"), torch.Tensor)
        rest = {k: v for k, v in p.items() if (k != "scale" or tensor_scale) and not _is_default(v, method.params[k])}
        kw = {"guidance_scale": p["scale"]} if p.get("scale") is not None and not tensor_scale else {}
        guider = fgd.MultiBranchGuidance(method=guidance, params=rest, models=models, **kw)  # validates models
        return _install_guider(pipe, guider)
    if models is not None:
        raise ValueError(f"{where}: guidance={guidance!r} takes no models=")
    schedules = [n for n in method.scale_params if callable(p.get(n))]
    if schedules:
        raise ValueError(f"{where}: per-step schedules ({schedules}) need the classic route; a guider's scales are "
                         f"numbers (its start/stop window limits the steps)")
    tensors = sorted(k for k, v in p.items() if isinstance(v, torch.Tensor) and v.dim() > 0)
    if tensors:
        raise ValueError(f"{where}: guidance={guidance!r} runs as fastguide.diffusers.{method.twin} here, whose "
                         f"config takes numbers: per-sample tensor parameters {tensors} cannot be honoured (pass floats)")
    if "perturbed" in method.branches:
        raise ValueError(f"{where}: guidance={guidance!r} needs the layers to perturb, which depend on the model: "
                         f"build fastguide.diffusers.{method.twin}(perturbed_guidance_config=...) and pass it as the "
                         f"pipeline's guider")
    adaptive, interval, linear_ag = check_policy("fastguide.enable", adaptive, interval, linear_ag)
    policy = {"adaptive": adaptive, "interval": interval, "linear_ag": linear_ag}
    if (adaptive is not None and adaptive.space == "x0") or interval is not None:
        policy["scheduler"] = pipe.scheduler  # x0 estimates and sigmas come from the pipeline's noise schedule
    guider = getattr(fgd, method.twin)(**method.guider_config(p), **policy)  # validates before anything changes
    return _install_guider(pipe, guider)


def _is_default(value, default):
    """Whether a parameter still has the method's default. A tensor (a per-sample scale) never counts as one:
    `==` on it is elementwise (ambiguous in an `if` for more than one element, a host sync for one)."""
    if isinstance(value, torch.Tensor) or isinstance(default, torch.Tensor):
        return value is default
    return value == default


def _install_guider(pipe, guider):
    disable(pipe)
    state = _GuiderRoute(previous=pipe.guider, guider=guider)
    pipe.register_modules(guider=guider)
    pipe.__class__ = _guider_class(type(pipe))
    pipe._fastguide = state
    return pipe


def _guider_class(cls):
    """`cls` with a `fastguide_report` property (the installed guider's report); same name and module."""
    if "_fastguide_base" in cls.__dict__:
        return cls
    key = (cls, "guider")
    if key not in _CLASSES:
        _CLASSES[key] = type(cls)(cls.__name__, (cls,), {
            "fastguide_report": property(lambda self: getattr(self.guider, "report", None)),
            "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
            "_fastguide_base": cls})
    return _CLASSES[key]


def disable(pipe):
    """Undo `enable`: the pipeline's class, and once no enabled pipeline uses its denoiser any more, the
    denoiser's forward and attention processors (a no-op on a pipeline that is not enabled). On a pipeline
    that takes a guider: its previous guider back."""
    state = pipe.__dict__.get("_fastguide") if hasattr(pipe, "__dict__") else None
    if state is None:
        return pipe
    if isinstance(state, _GuiderRoute):
        pipe.register_modules(guider=state.previous)
        pipe.__class__ = type(pipe).__dict__["_fastguide_base"]
        del pipe._fastguide
        return pipe
    for hook in state.hooks.values():
        hook.remove(state)
    base = type(pipe).__dict__.get("_fastguide_base")
    if base is not None:
        pipe.__class__ = base
    del pipe._fastguide
    return pipe


def is_enabled(pipe):
    return getattr(pipe, "__dict__", {}).get("_fastguide") is not None
