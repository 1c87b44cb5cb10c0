"""One line for classic diffusers pipelines: `fastguide.enable(pipe, guidance="apg", ...)`.

The settings belong to the pipeline, not to its denoiser. `enable` gives the pipeline instance a subclass
(same name) whose `__call__` makes its settings the active ones (a ContextVar) while it runs, and gives the
denoiser (`pipe.unet` / `pipe.transformer`) one pass-through wrapper of its `forward`, shared by every
enabled pipeline on that module. During an enabled pipeline's CFG call the wrapper splits the denoiser's
output into its uncond/cond halves, computes fastguide's guided prediction g, and returns [g, g]: the
pipeline's own arithmetic `uncond + s * (cond - uncond)` then yields g exactly (cond - uncond = 0). Any other
caller of the module (a stock pipeline sharing it, `from_pipe`, a modular pipeline, another thread) runs it
untouched. Nothing in diffusers is edited. For PAG the wrapper appends the conditional rows again to every
batched input ([uncond, cond, cond]) and the chosen layers get `GatedPAGProcessor`s, identity attention on
the extra rows only during the calls of pipelines that asked for it.

Supported (and subclasses): StableDiffusion{,Img2Img,Inpaint}Pipeline, StableDiffusionXL{,Img2Img,Inpaint}
Pipeline, StableDiffusion3Pipeline (true CFG; skip_guidance_layers keeps working), StableDiffusionPAGPipeline
and StableDiffusionXLPAGPipeline (their own PAG fused with guidance="cfg"), PixArtSigmaPipeline (learned-sigma
channels left out of the guidance, as the pipeline drops them). `enable` on an enabled pipeline
replaces its settings; `disable` restores the class, and the denoiser once no enabled pipeline uses it.
Pass guidance_rescale=0 to the pipeline call and `rescale=` here (the pipeline's own rescale would
act on [g, g] and is the identity up to rounding).
"""
import contextvars
import functools
import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch

from . import methods, ops
from .attention import GatedPAGProcessor, select_layers


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



# The state of the enabled pipeline whose __call__ is running in this thread / task, or None. Denoisers see
# the pipeline only through this: a module shared by several pipelines guides a call only while one of its
# enabled pipelines is running, with that pipeline's settings.
_ACTIVE = contextvars.ContextVar("fastguide_active_pipeline", default=None)


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


def _pag_layout(state, bound):
    """diffusers' PAG pipelines: [uncond, cond, perturbed] while their own PAG is on, else plain CFG."""
    if not state.pipe.do_classifier_free_guidance:
        return None
    return "pag" if state.pipe.do_perturbed_attention_guidance else "cfg"


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
            ("PixArtSigmaPipeline", "transformer", _call_scale_layout)) if hasattr(d, name)]
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
    get `GatedPAGProcessor`s that are likewise identity attention only for the users that asked for them."""

    def __init__(self, module):
        self.module = module
        self.saved_forward = module.__dict__.get("forward", _ABSENT)  # e.g. accelerate's offload hook
        self.original = module.forward
        self.signature = inspect.signature(self.original)
        # Weak references: the module must not keep a dropped pipeline (its VAE, text encoders) alive.
        self.users = []
        self.pag_saved = {}  # layer name -> the processor its GatedPAGProcessor replaced

        def forward(*args, **kwargs):
            state = _ACTIVE.get()
            if state is None or state.hook is not self:
                return self.original(*args, **kwargs)
            return state(self.original, args, kwargs)

        forward.fastguide_hook = self
        self.forward = forward
        module.forward = forward

    @staticmethod
    def of(module):
        """The module's hook, installed on first use."""
        hook = getattr(module.__dict__.get("forward"), "fastguide_hook", None)
        return hook if hook is not None else _Hook(module)

    def live_users(self):
        return [u for u in (ref() for ref in self.users) if u is not None]

    def add(self, state):
        self.users.append(weakref.ref(state, self._dropped))
        state.hook = self
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

    def _sync_pag(self):
        """Gated processors on exactly the layers some user perturbs; the others get their processor back."""
        wanted = set().union(*(u.pag_layers for u in self.live_users()))
        modules = dict(self.module.named_modules())
        for name in sorted(wanted - set(self.pag_saved)):
            self.pag_saved[name] = modules[name].processor
            modules[name].set_processor(GatedPAGProcessor(self._gate(name), self.pag_saved[name], chunks=3))
        for name in sorted(set(self.pag_saved) - wanted):
            modules[name].set_processor(self.pag_saved.pop(name))

    def _gate(self, name):
        def gate():
            state = _ACTIVE.get()
            return state is not None and state.hook is self and name in state.pag_layers
        return gate


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
            token = _ACTIVE.set(state)
            try:
                return cls.__call__(self, *args, **kwargs)
            finally:  # also when the call raises: the next call must not see this pipeline as running
                _ACTIVE.reset(token)

        _CLASSES[cls] = type(cls)(cls.__name__, (cls,), {
            "__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__, "_fastguide_base": cls})
    return _CLASSES[cls]


# --- the per-pipeline guidance state ------------------------------------------------------------------
class _Guidance:
    """The per-pipeline state: the method and its settings, the step counter, the method's state across
    steps (APG's momentum buffer), the AG/interval policy."""

    def __init__(self, pipe, layout, guidance, params, adaptive=None, interval=None, linear_ag=None):
        self.method = methods.get(guidance, "fastguide.enable")
        from .skip import check_policy  # (skip.py imports this module's AG / LinearAG: a local import)
        adaptive, interval, linear_ag = check_policy("fastguide.enable", adaptive, interval, linear_ag)
        if ((adaptive is not None or interval is not None or linear_ag is not None)
                and not self.method.can_skip_uncond):
            usable = sorted(m.name for m in methods.METHODS.values() if m.can_skip_uncond)
            raise ValueError(f"fastguide.enable: adaptive/interval/linear_ag skip rows per sample; guidance={guidance!r} "
                             f"(state across steps or extra branches) is not supported with them yet; use one of {usable}")
        if layout is _pag_layout and "perturbed" in self.method.branches:
            raise ValueError(f"fastguide.enable: guidance={guidance!r} on {type(pipe).__name__}, which perturbs its "
                             f"own layers (pag_applied_layers, pag_scale): use guidance='cfg' (fastguide fuses the "
                             f"pipeline's PAG), or guidance='pag' on the matching non-PAG pipeline")
        self.linear_ag = linear_ag
        self.record = None      # calibration: per-step (cond, uncond) of full-CFG runs
        self.history = None     # LinearAG: the previous step's (cond, uncond)
        self.adaptive, self.interval = adaptive, interval
        self.report = Report()
        self.done = None  # per-sample AG flags of the current trajectory
        self.pipe, self.layout, self.guidance = pipe, layout, guidance
        self.params = self.method.check_params(params, "fastguide.enable")
        self.step, self.last_t = -1, None
        self.last = None        # this step's (cond, guided), for SD3's skip-layer term
        self.state = self.method.new_state(self.params) if self.method.new_state is not None else None
        self.hook, self.attr = None, None  # set by enable
        self.parallel = None                # fastguide.parallel.RowSplit under enable(parallel=...)
        self.call = None                    # the running pipeline call's arguments
        # PixArt's learned sigma: the denoiser outputs [prediction, sigma] channels and the pipeline drops the
        # sigma half after CFG, so only the first `pred_channels` are guided (norms and spectra included).
        self.pred_channels = None
        self.pag_layers = frozenset()       # names of the layers fastguide's own PAG perturbs
        self.schedule = None                # AG in x0 space: the scheduler's noise schedule (timestep -> x0)
        if adaptive is not None and adaptive.space == "x0":
            from .skip import NoiseSchedule
            self.schedule = NoiseSchedule(pipe.scheduler, "fastguide.enable")

    def begin(self, call):
        """An enabled pipeline call starts (`call`: its bound arguments): check it against the settings, then
        start a new trajectory. Runs before the pipeline does any work."""
        name = type(self.pipe).__name__
        call.apply_defaults()
        self.call = call.arguments
        if _unwrap(getattr(self.pipe, self.attr, None)) is not self.hook.module:
            raise RuntimeError(f"fastguide: {name}.{self.attr} was replaced after fastguide.enable; call "
                               f"fastguide.enable(pipe, ...) again so the new {self.attr} is guided")
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
        self.step, self.last_t, self.done, self.history, self.last = -1, None, None, None, None
        self.report = Report()
        self.pipe.fastguide_report = self.report
        if self.method.reset_state is not None:
            self.method.reset_state(self.state)

    def _scale(self, name="scale"):
        """A scale setting: None follows the pipeline call's guidance_scale; a callable is a per-step schedule
        `f(step, timestep) -> float or tensor` (a tensor scale changes per step without recompiling)."""
        value = self.params[name]
        if value is None:  # the pipeline's property when it has one: step callbacks may change it mid-call
            has_property = isinstance(getattr(type(self.pipe), "guidance_scale", None), property)
            return float(self.pipe.guidance_scale if has_property else self.call["guidance_scale"])
        return value(self.step, self.last_t) if callable(value) else value

    def _new_step(self, timestep):
        """Count the steps of the trajectory: "step" is the index into the user's num_inference_steps. A
        second-order scheduler (Heun, KDPM2, DPM-SDE) evaluates the model twice per step and says which
        evaluation it is at with `state_in_first_order`; both evaluations share the step index. Multistep
        solvers (DPM++ 2M) and first-order ones evaluate once per step."""
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        if self.step < 0 or getattr(self.pipe.scheduler, "state_in_first_order", True):
            self.step += 1
        self.last_t = t
        self.report.steps = self.step + 1
        return t

    def _sigma(self, t):
        """The noise level of timestep t: the scheduler's sigma (Euler, flow matching), else sqrt((1-a)/a)."""
        sch = self.pipe.scheduler
        ts = getattr(sch, "timesteps", None)
        sigmas = getattr(sch, "sigmas", None)
        if ts is not None and sigmas is not None and len(sigmas) > len(ts) - 1:
            idx = (ts.float() - t).abs().argmin().item()
            return float(sigmas[idx])
        ac = sch.alphas_cumprod[int(round(t))]
        return float(((1 - ac) / ac) ** 0.5)

    def guide(self, cond, uncond, perturbed):
        """The method's combine on this step's predictions, its scales resolved for this step."""
        c = self.pred_channels
        if c is not None:
            part = lambda x: x[:, :c].contiguous() if x is not None else None  # noqa: E731
            return torch.cat([self._combine(part(cond), part(uncond), part(perturbed)), cond[:, c:]], dim=1)
        return self._combine(cond, uncond, perturbed)

    def _combine(self, cond, uncond, perturbed):
        p = dict(self.params)
        for name in self.method.scale_params:
            p[name] = self._scale(name)
        preds = {"cond": cond, "uncond": uncond, "perturbed": perturbed}
        return self.method.combine(preds, p, self.state, self.step)

    def _guided(self, out, cond, guided, copies=2):
        """Return `guided` in every CFG slot of the output; remember (cond, guided) for a skip-layer call."""
        self.last = (cond, guided)
        return _with_prediction(out, torch.cat([guided] * copies))

    def __call__(self, forward, args, kwargs):
        bound = self.hook.signature.bind(*args, **kwargs)
        layout = self.layout(self, bound)
        if layout is None:
            return forward(*args, **kwargs)
        if layout == "slg":
            return self._skip_layer_call(forward, args, kwargs)
        sample_name = next(iter(bound.arguments))  # sample / hidden_states: the batched latents
        batch = bound.arguments[sample_name].shape[0]
        half = batch // 2
        t = self._new_step(bound.arguments["timestep"])
        if self.parallel is not None:  # branch-parallel: this rank runs its rows, one all-gather rebuilds the batch
            forward = self.parallel.wrap(forward, self)
        if layout == "pag":
            return self._pipeline_pag_call(forward, bound, bound.arguments["timestep"])
        if self.adaptive is not None or self.interval is not None:
            return self._skipping_call(forward, bound, batch, half, t, sample_name)
        if self.linear_ag is not None:
            return self._linear_ag_call(forward, bound, batch, half)
        pag = "perturbed" in self.method.branches
        if pag:  # [uncond, cond] -> [uncond, cond, cond]: every input batched like the latents gets its cond half again
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_batched(value, batch, lambda v: torch.cat([v, v[half:]]))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += pred.shape[0]
        parts = pred.chunk(3 if pag else 2)
        if self.record is not None:
            self.record.append((parts[1].detach().clone(), parts[0].detach().clone()))
        return self._guided(out, parts[1], self.guide(parts[1], parts[0], parts[2] if pag else None))

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

    def _linear_ag_call(self, forward, bound, batch, half):
        """LinearAG: at calibrated steps, run the conditional rows only and predict the unconditional ones."""
        coef = self.linear_ag.coefficients.get(self.step)
        if coef is not None and self.history is None:
            raise ValueError(f"fastguide LinearAG: step {self.step} is predicted from the previous step, which did not run")
        if coef is not None:
            idx = torch.arange(half, batch, device=bound.arguments[next(iter(bound.arguments))].device)
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_batched(value, batch, lambda v: v.index_select(0, idx.to(v.device)))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        if coef is None:
            uncond, cond = pred.chunk(2)
            self.report.nfe += batch
        else:
            cond = pred
            a, b, c = coef
            c_prev, u_prev = self.history
            uncond = a * cond + b * c_prev + c * u_prev
            self.report.nfe += half
            self.report.nfe_skipped += half
        self.history = (cond, uncond)
        return self._guided(out, cond, self.guide(cond, uncond, None))

    def _skipping_call(self, forward, bound, batch, half, t, sample_name):
        """Evaluate the unconditional rows only of samples that still need guidance (interval, AG)."""
        if self.done is None:
            self.done = [False] * half
            self.report.ag_switch_step = [None] * half
        in_interval = self.interval is None or self.interval[0] <= self._sigma(t) <= self.interval[1]
        guided = [i for i in range(half) if in_interval and not self.done[i]]
        rows = guided + list(range(half, batch))  # uncond rows still needed, then every cond row
        if len(rows) < batch:
            idx = torch.tensor(rows, device=bound.arguments[next(iter(bound.arguments))].device)
            for name, value in bound.arguments.items():
                bound.arguments[name] = _map_batched(value, batch, lambda v: v.index_select(0, idx.to(v.device)))
        out = forward(*bound.args, **bound.kwargs)
        pred = _prediction(out)
        self.report.nfe += len(rows)
        self.report.nfe_skipped += batch - len(rows)
        n = len(guided)
        cond = pred[n:]
        result = cond.clone() if n < half else None
        if n:
            gidx = torch.tensor(guided, device=pred.device)
            g = self.guide(cond.index_select(0, gidx), pred[:n], None)
            if self.adaptive is not None:
                c_sel, g_sel = cond.index_select(0, gidx), g
                if self.pred_channels is not None:
                    c_sel, g_sel = c_sel[:, :self.pred_channels].contiguous(), g[:, :self.pred_channels].contiguous()
                if self.schedule is not None:  # AG(space="x0"): the x0 estimates from the denoiser's own input
                    x = bound.arguments[sample_name][n:].index_select(0, gidx)
                    c_sel, g_sel = self.schedule.x0(x, c_sel, t), self.schedule.x0(x, g_sel, t)
                cos = ops.guidance_stats(c_sel, g_sel, g_sel).cos_cond_guided.tolist()  # the policy's sync
                for i, c in zip(guided, cos):
                    if c > self.adaptive.threshold and not self.done[i]:
                        self.done[i] = True
                        self.report.ag_switch_step[i] = self.step
            if result is None:
                result = g
            else:
                result.index_copy_(0, gidx, g)
        return self._guided(out, cond, result)


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


def enable(pipe, guidance="cfg", *, adaptive=None, interval=None, linear_ag=None, parallel=None, **params):
    """Make `pipe`'s classifier-free guidance compute `guidance` with fastguide's fused ops.

    guidance: "cfg" (scale, rescale, original), "apg" (scale, eta, norm_threshold, momentum, norm_dim,
    rescale, original), "pag" (scale, pag_scale, layers, rescale, original), "cfg_zero_star" (scale,
    zero_init_steps, rescale, original), "frequency" (scale_low, scale_high, method, cutoff, size, rescale,
    original), "fdg" (scales, parallel_weights, rescale, original). A scale left as None follows the
    pipeline call's guidance_scale; a callable `f(step, timestep)` is a per-step schedule (step: the index
    into num_inference_steps; both evaluations of a second-order step share it).
    adaptive=fastguide.AG(threshold): Adaptive Guidance, per sample. interval=(sigma_lo, sigma_hi):
    limited-interval guidance (Kynkaeaenniemi et al. 2024), no unconditional pass outside it. With either,
    the denoiser runs only the rows that are needed; `pipe.fastguide_report` counts the evaluations.
    linear_ag=calibrate_linear_ag(...): LinearAG, predicted unconditional passes (deviates from the model).

    The settings belong to `pipe`: they apply only while `pipe(...)` runs, so other pipelines sharing its
    denoiser (from_pipe, modular pipelines, a second pipeline on the same UNet) run stock or their own
    settings. Returns the pipeline.

    parallel=True (or a torch.distributed ProcessGroup): branch-parallel over that group (see
    `fastguide.parallel`; `fastguide.parallel.init_from_env()` under torchrun): each rank evaluates its share
    of the guidance batch, one all-gather per step gives every rank the same guided result.
    """
    group = _parallel_group(parallel)
    if _takes_guider(pipe) and not _has_pattern(pipe):
        _enable_guider(pipe, guidance, params, adaptive, interval, linear_ag)
        if group is not False:
            from .parallel import distribute
            distribute(pipe.guider, group)
        return pipe
    attr, layout = _pattern(pipe)
    denoiser = _unwrap(getattr(pipe, attr))
    state = _Guidance(pipe, layout, guidance, params, adaptive, interval, linear_ag)  # validates first
    if "perturbed" in state.method.branches:  # validates the layer specs; nothing is changed yet
        state.pag_layers = frozenset(select_layers(denoiser, list(state.params["layers"])))
    state.attr = attr
    if group is not False:
        if layout is _pag_layout or "perturbed" in state.method.branches:
            raise ValueError("fastguide.enable: parallel=... with PAG on a classic pipeline is not supported (its "
                             "perturbed attention needs the whole [uncond, cond, perturbed] batch in one call); use "
                             "fastguide.diffusers.PerturbedAttentionGuidance with fastguide.parallel.distribute")
        from .parallel import RowSplit
        state.parallel = RowSplit(group)
    config = getattr(denoiser, "config", None)
    if layout is _call_scale_layout and config is not None and config.out_channels == 2 * config.in_channels:
        state.pred_channels = config.in_channels
    disable(pipe)
    _Hook.of(denoiser).add(state)
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


def _enable_guider(pipe, guidance, params, adaptive, interval, linear_ag):
    from . import diffusers as fgd
    from .skip import check_policy
    method = methods.get(guidance, "fastguide.enable")
    where = f"fastguide.enable({type(pipe).__name__})"
    if method.guider_config is None or method.twin is None:
        usable = sorted(m.name for m in methods.METHODS.values() if m.guider_config is not None)
        raise ValueError(f"{where}: this pipeline takes a guider, and guidance={guidance!r} has no guider twin yet; "
                         f"use one of {usable}")
    p = method.check_params(params, "fastguide.enable")
    schedules = [n for n in method.scale_params if callable(p.get(n))]
    if schedules:
        raise ValueError(f"{where}: per-step schedules ({schedules}) need the classic route; a guider's scales are "
                         f"numbers (its start/stop window limits the steps)")
    if "perturbed" in method.branches:
        raise ValueError(f"{where}: guidance={guidance!r} needs the layers to perturb, which depend on the model: "
                         f"build fastguide.diffusers.{method.twin}(perturbed_guidance_config=...) and pass it as the "
                         f"pipeline's guider")
    adaptive, interval, linear_ag = check_policy("fastguide.enable", adaptive, interval, linear_ag)
    policy = {"adaptive": adaptive, "interval": interval, "linear_ag": linear_ag}
    if (adaptive is not None and adaptive.space == "x0") or interval is not None:
        policy["scheduler"] = pipe.scheduler  # x0 estimates and sigmas come from the pipeline's noise schedule
    guider = getattr(fgd, method.twin)(**method.guider_config(p), **policy)  # validates before anything changes
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
    state.hook.remove(state)
    base = type(pipe).__dict__.get("_fastguide_base")
    if base is not None:
        pipe.__class__ = base
    del pipe._fastguide
    return pipe


def is_enabled(pipe):
    return getattr(pipe, "__dict__", {}).get("_fastguide") is not None
